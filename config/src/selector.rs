//! Label selection as Kubernetes defines it for `matchLabels` maps.

use std::collections::BTreeMap;

/// A `matchLabels`-style selector. An empty selector selects everything; callers decide whether
/// "no selector" means everything (AuthorizationPolicy) or nothing (a Service without a selector).
pub type LabelSelector = BTreeMap<String, String>;

pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
