//! Human output: aligned tables, ages, per-kind columns; and machine output (json, yaml).

use serde_json::Value;
use trellis_config::Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{:<w$}", c, w = widths[i])).collect();
        out.push_str(parts.join("   ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// "5s", "3m", "2h", "4d" since an RFC 3339 timestamp.
pub fn age(created: Option<&str>) -> String {
    let Some(t) =
        created.and_then(|c| time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339).ok())
    else {
        return "<unknown>".into();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn s(v: &Value, ptr: &str) -> String {
    match v.pointer(ptr) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn or_dash(x: String) -> String {
    if x.is_empty() {
        "-".into()
    } else {
        x
    }
}

/// Columns after NAME and before AGE, per kind.
pub fn kind_columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Namespace => &["DATAPLANE-MODE"],
        Kind::Node => &["POD-CIDR", "INTERNAL-IP"],
        Kind::Pod => &["NODE", "IP", "SERVICE-ACCOUNT"],
        Kind::Service => &["CLUSTER-IP", "PORTS"],
        Kind::ServiceAccount => &[],
        Kind::WorkloadEntry => &["ADDRESS", "SERVICE-ACCOUNT"],
        Kind::AuthorizationPolicy => &["ACTION", "TARGET"],
        Kind::PeerAuthentication => &["MODE", "SELECTOR"],
        Kind::Gateway => &["CLASS", "LISTENERS"],
        Kind::HttpRoute | Kind::GrpcRoute => &["PARENTS", "RULES"],
    }
}

pub fn kind_cells(kind: Kind, o: &Value) -> Vec<String> {
    let cells = match kind {
        Kind::Namespace => vec![s(o, "/metadata/labels/istio.io~1dataplane-mode")],
        Kind::Node => {
            let ip = o.pointer("/status/addresses").and_then(Value::as_array).and_then(|a| {
                a.iter().find(|x| x.get("type").and_then(Value::as_str) == Some("InternalIP")).map(|x| s(x, "/address"))
            });
            vec![s(o, "/spec/podCIDR"), ip.unwrap_or_default()]
        }
        Kind::Pod => vec![s(o, "/spec/nodeName"), s(o, "/status/podIP"), {
            let sa = s(o, "/spec/serviceAccountName");
            if sa.is_empty() {
                "default".into()
            } else {
                sa
            }
        }],
        Kind::Service => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| format!("{}/{}", s(p, "/port"), p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")))
                .collect();
            vec![s(o, "/spec/clusterIP"), ports.join(",")]
        }
        Kind::ServiceAccount => vec![],
        Kind::WorkloadEntry => vec![s(o, "/spec/address"), s(o, "/spec/serviceAccount")],
        Kind::AuthorizationPolicy => {
            let action = s(o, "/spec/action");
            let target = if o.pointer("/spec/targetRefs").is_some() || o.pointer("/spec/targetRef").is_some() {
                "targetRefs (waypoint)".to_string()
            } else if let Some(sel) = o.pointer("/spec/selector/matchLabels").and_then(Value::as_object) {
                sel.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(",")
            } else {
                "namespace".to_string()
            };
            vec![if action.is_empty() { "ALLOW".into() } else { action }, target]
        }
        Kind::PeerAuthentication => {
            let sel = o
                .pointer("/spec/selector/matchLabels")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![s(o, "/spec/mtls/mode"), sel]
        }
        Kind::Gateway => {
            let n = o.pointer("/spec/listeners").and_then(Value::as_array).map_or(0, Vec::len);
            vec![s(o, "/spec/gatewayClassName"), n.to_string()]
        }
        Kind::HttpRoute | Kind::GrpcRoute => {
            let parents: Vec<String> = o
                .pointer("/spec/parentRefs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| s(p, "/name"))
                .collect();
            let n = o.pointer("/spec/rules").and_then(Value::as_array).map_or(0, Vec::len);
            vec![parents.join(","), n.to_string()]
        }
    };
    cells.into_iter().map(or_dash).collect()
}

pub fn to_yaml(v: &Value) -> String {
    serde_yaml::to_string(v).unwrap_or_default()
}
