//! Parsing of Kubernetes REST paths:
//! `/api/v1[/namespaces/{ns}]/{plural}[/{name}]` and
//! `/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}]`.

use trellis_config::Kind;

#[derive(Debug, PartialEq, Eq)]
pub struct ResourcePath {
    pub kind: Kind,
    /// `None` for cluster-scoped kinds and for lists across all namespaces.
    pub namespace: Option<String>,
    pub name: Option<String>,
}

pub fn parse(path: &str) -> Result<ResourcePath, String> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(format!("{path} is not an API path")),
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return Err(format!("{path} is not a resource path")),
    };
    let kind = Kind::from_rest(group, version, plural)
        .ok_or_else(|| format!("the server could not find the requested resource {group}/{version}/{plural}"))?;
    if namespace.is_some() && !kind.namespaced() {
        return Err(format!("{} is cluster-scoped and has no namespaced path", kind.plural()));
    }
    if name.is_some_and(str::is_empty) || namespace.is_some_and(str::is_empty) {
        return Err(format!("{path} has an empty segment"));
    }
    Ok(ResourcePath { kind, namespace: namespace.map(String::from), name: name.map(String::from) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_paths() {
        let p = parse("/api/v1/namespaces/demo/pods/a").unwrap();
        assert_eq!((p.kind, p.namespace.as_deref(), p.name.as_deref()), (Kind::Pod, Some("demo"), Some("a")));
        let p = parse("/api/v1/namespaces/demo").unwrap();
        assert_eq!((p.kind, p.namespace, p.name.as_deref()), (Kind::Namespace, None, Some("demo")));
        let p = parse("/apis/security.istio.io/v1/authorizationpolicies").unwrap();
        assert_eq!((p.kind, p.namespace, p.name), (Kind::AuthorizationPolicy, None, None));
        assert!(parse("/apis/apps/v1/namespaces/x/deployments").is_err());
        assert!(parse("/api/v1/namespaces/x/nodes").is_err());
    }
}
