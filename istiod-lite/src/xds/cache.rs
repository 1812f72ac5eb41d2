//! Versioned resource cache with a change log, so a stream can ask "what changed since I last
//! synced" in time proportional to the change, not to the number of resources.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::watch;

/// One encoded resource. `version` is a hash of the bytes: identical content has the same version
/// across restarts, which is what lets `initial_resource_versions` skip unchanged resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub version: u64,
    pub body: Bytes,
    seq: u64,
}

impl Entry {
    /// An entry built outside the cache (a per-client variant of a cached resource).
    pub fn new(body: Bytes) -> Entry {
        Entry { version: version_of(&body), body, seq: 0 }
    }
}

#[derive(Default)]
struct TypeCache {
    entries: HashMap<String, Entry>,
    /// seq → name for the latest change of each name (including removals).
    log: BTreeMap<u64, String>,
}

#[derive(Default)]
struct Inner {
    seq: u64,
    types: HashMap<&'static str, TypeCache>,
}

/// What changed for one type since a sequence number.
#[derive(Debug, Default)]
pub struct Changes {
    pub updated: Vec<(String, Entry)>,
    pub removed: Vec<String>,
}

pub struct Cache {
    inner: RwLock<Inner>,
    seq_tx: watch::Sender<u64>,
}

/// FNV-1a 64 of the encoded resource; stable across builds and restarts.
pub(crate) fn version_of(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

/// The wire form of a version: 16 hex digits.
pub fn version_string(v: u64) -> String {
    format!("{v:016x}")
}

/// Parses a version a client reports; anything else (another server's format) is `None`, which
/// simply means the resource is sent again.
pub fn parse_version(s: &str) -> Option<u64> {
    (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten()
}

impl Default for Cache {
    fn default() -> Self {
        Cache { inner: RwLock::default(), seq_tx: watch::channel(0).0 }
    }
}

impl Cache {
    /// Applies a set of updates (`Some`) and removals (`None`) atomically, skipping those that
    /// change nothing. Returns how many resources actually changed.
    pub fn apply(&self, type_url: &'static str, changes: Vec<(String, Option<Bytes>)>) -> usize {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let mut seq = inner.seq;
        let tc = inner.types.entry(type_url).or_default();
        let mut changed = 0;
        for (name, body) in changes {
            let old_seq = match body {
                Some(body) => {
                    let version = version_of(&body);
                    if tc.entries.get(&name).is_some_and(|e| e.version == version) {
                        continue;
                    }
                    seq += 1;
                    tc.entries.insert(name.clone(), Entry { version, body, seq }).map(|e| e.seq)
                }
                None => match tc.entries.remove(&name) {
                    Some(e) => {
                        seq += 1;
                        Some(e.seq)
                    }
                    None => continue,
                },
            };
            if let Some(s) = old_seq {
                tc.log.remove(&s);
            }
            tc.log.insert(seq, name);
            changed += 1;
        }
        // Tombstones of long-removed names are kept; their count is bounded by names ever seen
        // and they cost one map entry each. A future compaction can drop those older than every
        // connected stream.
        inner.seq = seq;
        drop(inner);
        if changed > 0 {
            self.seq_tx.send_replace(seq);
        }
        changed
    }

    pub fn seq(&self) -> u64 {
        self.inner.read().map(|i| i.seq).unwrap_or(0)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.seq_tx.subscribe()
    }

    /// Changes of `type_url` with sequence in `(since, upto]`.
    pub fn changes_since(&self, type_url: &str, since: u64) -> (Changes, u64) {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Changes::default();
        if let Some(tc) = inner.types.get(type_url) {
            for (_, name) in tc.log.range(since + 1..) {
                match tc.entries.get(name) {
                    Some(e) => out.updated.push((name.clone(), e.clone())),
                    None => out.removed.push(name.clone()),
                }
            }
        }
        (out, inner.seq)
    }

    /// The named resources of a type that exist, and the sequence they were read at.
    pub fn get_many<'a>(&self, type_url: &str, names: impl Iterator<Item = &'a str>) -> (Vec<(String, Entry)>, u64) {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let list = match inner.types.get(type_url) {
            Some(tc) => names.filter_map(|n| tc.entries.get(n).map(|e| (n.to_string(), e.clone()))).collect(),
            None => Vec::new(),
        };
        (list, inner.seq)
    }

    /// Every current resource of a type, for a fresh subscription.
    pub fn all(&self, type_url: &str) -> (Vec<(String, Entry)>, u64) {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let list = inner
            .types
            .get(type_url)
            .map(|tc| tc.entries.iter().map(|(n, e)| (n.clone(), e.clone())).collect())
            .unwrap_or_default();
        (list, inner.seq)
    }
}

pub type SharedCache = Arc<Cache>;

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "t";

    #[test]
    fn only_real_changes_advance_and_are_reported() {
        let c = Cache::default();
        assert_eq!(
            c.apply(
                T,
                vec![("a".into(), Some(Bytes::from_static(b"1"))), ("b".into(), Some(Bytes::from_static(b"2")))]
            ),
            2
        );
        let s = c.seq();
        assert_eq!(c.apply(T, vec![("a".into(), Some(Bytes::from_static(b"1")))]), 0, "same bytes are not a change");
        assert_eq!(c.seq(), s);
        c.apply(T, vec![("a".into(), Some(Bytes::from_static(b"3"))), ("b".into(), None), ("zz".into(), None)]);
        let (ch, now) = c.changes_since(T, s);
        assert_eq!(ch.updated.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(ch.removed, ["b"]);
        assert_eq!(now, s + 2);
        assert_eq!(c.changes_since(T, now).0.updated.len(), 0);
    }
}
