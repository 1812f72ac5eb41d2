//! Mesh membership: which workloads are enrolled in ambient mode, and why. istiod-lite renders
//! workloads with it and meshctl explains it, so both must agree.

use std::collections::BTreeMap;

/// The label that enrolls a namespace (or, overriding it, a pod).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrollment {
    pub enrolled: bool,
    /// Why, in words an operator can act on.
    pub reason: String,
    /// The pod's own label decided, and it differs from what the namespace says.
    pub pod_overrides_namespace: bool,
}

pub fn enrollment(
    namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> Enrollment {
    let ns_mode = namespace_labels.get(DATAPLANE_MODE).map(String::as_str);
    let ns_enrolled = ns_mode == Some(AMBIENT);
    match pod_labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some(mode) => {
            let enrolled = mode == AMBIENT;
            let overrides = enrolled != ns_enrolled;
            let ns_says = match ns_mode {
                Some(m) => format!("namespace {namespace} has {DATAPLANE_MODE}={m}"),
                None => format!("namespace {namespace} has no {DATAPLANE_MODE} label"),
            };
            Enrollment {
                enrolled,
                reason: format!(
                    "pod label {DATAPLANE_MODE}={mode}{}",
                    if overrides { format!(" (overrides: {ns_says})") } else { String::new() }
                ),
                pod_overrides_namespace: overrides,
            }
        }
        None => Enrollment {
            enrolled: ns_enrolled,
            reason: match ns_mode {
                Some(m) => format!("namespace {namespace} has {DATAPLANE_MODE}={m}"),
                None => format!("namespace {namespace} has no {DATAPLANE_MODE} label"),
            },
            pod_overrides_namespace: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(mode: Option<&str>) -> BTreeMap<String, String> {
        mode.map(|m| (DATAPLANE_MODE.to_string(), m.to_string())).into_iter().collect()
    }

    #[test]
    fn the_pod_label_wins_and_says_so() {
        let cases = [
            (None, Some("ambient"), true, false),
            (None, None, false, false),
            (Some("none"), Some("ambient"), false, true),
            (Some("ambient"), None, true, true),
            (Some("ambient"), Some("ambient"), true, false),
            (Some("none"), None, false, false),
        ];
        for (pod, ns, enrolled, overrides) in cases {
            let e = enrollment("demo", &labels(pod), &labels(ns));
            assert_eq!((e.enrolled, e.pod_overrides_namespace), (enrolled, overrides), "{pod:?} {ns:?}: {}", e.reason);
        }
        let e = enrollment("demo", &labels(Some("none")), &labels(Some("ambient")));
        assert_eq!(
            e.reason,
            "pod label istio.io/dataplane-mode=none (overrides: namespace demo has istio.io/dataplane-mode=ambient)"
        );
    }
}
