//! An indexed copy of the store that the translator queries: objects by key and by
//! (kind, namespace). Updated from store events; never touched by I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use trellis_config::{Kind, Object, ObjectKey};

#[derive(Default)]
pub struct World {
    objects: HashMap<ObjectKey, Arc<Object>>,
    by_namespace: HashMap<(Kind, String), BTreeSet<String>>,
}

impl World {
    pub fn upsert(&mut self, obj: Arc<Object>) {
        let key = obj.key();
        self.by_namespace.entry((key.kind, key.namespace.clone())).or_default().insert(key.name.clone());
        self.objects.insert(key, obj);
    }

    pub fn remove(&mut self, key: &ObjectKey) {
        self.objects.remove(key);
        if let Some(set) = self.by_namespace.get_mut(&(key.kind, key.namespace.clone())) {
            set.remove(&key.name);
        }
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Arc<Object>> {
        self.objects.get(key)
    }

    /// Objects of `kind` in `namespace`, in name order.
    pub fn in_namespace<'a>(&'a self, kind: Kind, namespace: &str) -> impl Iterator<Item = &'a Arc<Object>> + 'a {
        let namespace = namespace.to_string();
        self.by_namespace
            .get(&(kind, namespace.clone()))
            .into_iter()
            .flatten()
            .filter_map(move |name| self.objects.get(&ObjectKey::new(kind, namespace.clone(), name.clone())))
    }

    /// Every object of `kind`, in key order.
    pub fn all(&self, kind: Kind) -> Vec<&Arc<Object>> {
        let mut v: Vec<_> = self.objects.iter().filter(|(k, _)| k.kind == kind).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.into_iter().map(|(_, o)| o).collect()
    }

    /// Every namespace that holds at least one namespaced object.
    pub fn namespaces(&self) -> impl Iterator<Item = String> + '_ {
        let set: BTreeSet<&String> =
            self.by_namespace.iter().filter(|(k, v)| !k.1.is_empty() && !v.is_empty()).map(|(k, _)| &k.1).collect();
        set.into_iter().cloned()
    }

    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        match self.objects.get(&ObjectKey::new(Kind::Namespace, "", ns)).map(|o| o.as_ref()) {
            Some(Object::Namespace(n)) => n.metadata.labels.clone(),
            _ => BTreeMap::new(),
        }
    }
}
