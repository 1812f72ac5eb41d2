//! Read-only views of the running mesh: what each ztunnel holds (`ztunnel-config`, from its
//! admin endpoint) and what each proxy acknowledged (`proxy-status`, from istiod-lite).

use anyhow::{anyhow, bail};
use hyper::Method;
use serde_json::{json, Value};

use crate::client::Client;
use crate::output::{render_table, to_yaml, Format};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ZtunnelView {
    Workloads,
    Services,
    Policies,
    Certificates,
    Connections,
}

impl ZtunnelView {
    /// Views that are the same on every ztunnel (the control plane's state) are read from one;
    /// per-node views are gathered from all.
    fn per_node(self) -> bool {
        matches!(self, ZtunnelView::Certificates | ZtunnelView::Connections)
    }
}

/// A ztunnel's admin endpoint and the node it runs on.
struct Ztunnel {
    node: String,
    admin: String,
}

/// Finds ztunnels through the Node objects: admin on the node's InternalIP at `admin_port`.
async fn ztunnels(client: &Client, node: Option<&str>, admin_port: u16) -> anyhow::Result<Vec<Ztunnel>> {
    let nodes = client.ok(Method::GET, "/api/v1/nodes", None).await?.body;
    let mut out = Vec::new();
    let mut names = Vec::new();
    for n in nodes["items"].as_array().into_iter().flatten() {
        let name = n.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
        names.push(name.clone());
        if node.is_some_and(|want| want != name) {
            continue;
        }
        let ip = n.pointer("/status/addresses").and_then(Value::as_array).and_then(|a| {
            a.iter().find(|x| x["type"] == "InternalIP").and_then(|x| x["address"].as_str().map(String::from))
        });
        match ip {
            Some(ip) => out.push(Ztunnel { node: name, admin: format!("http://{ip}:{admin_port}") }),
            None => eprintln!("warning: node {name} has no InternalIP; skipping its ztunnel"),
        }
    }
    if let Some(want) = node {
        if out.is_empty() {
            bail!(
                "no node {want:?} with an InternalIP; nodes: {}",
                if names.is_empty() { "(none)".into() } else { names.join(", ") }
            );
        }
    }
    if out.is_empty() {
        bail!("istiod-lite knows no nodes, so no ztunnels to ask (use --ztunnel-admin URL)");
    }
    Ok(out)
}

async fn config_dump(z: &Ztunnel) -> anyhow::Result<Value> {
    let c = Client::new(&z.admin)?;
    let r = c.call(Method::GET, "/config_dump", None).await.map_err(|e| anyhow!("ztunnel on {}: {e}", z.node))?;
    if !r.status.is_success() {
        bail!("ztunnel on {} ({}) answered {}", z.node, z.admin, r.status);
    }
    Ok(r.body)
}

pub async fn ztunnel_config(
    client: &Client,
    view: ZtunnelView,
    node: Option<&str>,
    admin_port: u16,
    admin_urls: &[String],
    output: Format,
) -> anyhow::Result<()> {
    let targets = if admin_urls.is_empty() {
        ztunnels(client, node, admin_port).await?
    } else {
        admin_urls.iter().map(|u| Ztunnel { node: u.clone(), admin: u.trim_end_matches('/').to_string() }).collect()
    };
    let mut dumps = Vec::new();
    for z in &targets {
        match config_dump(z).await {
            Ok(d) => {
                let node = d["node"].as_str().map(String::from).unwrap_or_else(|| z.node.clone());
                dumps.push((node, d));
                if !view.per_node() {
                    break;
                }
            }
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    if dumps.is_empty() {
        bail!(
            "no ztunnel answered (tried {})",
            targets.iter().map(|z| z.admin.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if !view.per_node() && targets.len() > 1 && output == Format::Table {
        eprintln!("(from the ztunnel on {}; --node picks another)", dumps[0].0);
    }
    let mut items = Vec::new();
    for (node, d) in &dumps {
        let list: Vec<Value> = match view {
            ZtunnelView::Workloads => d["workloads"].as_array().cloned().unwrap_or_default(),
            ZtunnelView::Services => d["services"].as_array().cloned().unwrap_or_default(),
            ZtunnelView::Policies => d["policies"].as_array().cloned().unwrap_or_default(),
            ZtunnelView::Certificates => d["certificates"].as_array().cloned().unwrap_or_default(),
            ZtunnelView::Connections => {
                let c = &d["connections"];
                c["open"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(c["recent"].as_array().into_iter().flatten())
                    .cloned()
                    .collect()
            }
        };
        for mut v in list {
            if view.per_node() {
                v["node"] = json!(node);
            }
            items.push(v);
        }
    }
    if view == ZtunnelView::Connections {
        // One timeline across nodes, oldest first: the newest connections end the listing.
        items.sort_by(|a, b| a["opened"].as_str().cmp(&b["opened"].as_str()));
    }
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&items)?),
        Format::Yaml => print!("{}", to_yaml(&Value::Array(items))),
        Format::Table => print!("{}", ztunnel_table(view, &items)),
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) if !x.is_empty() => x.clone(),
        Value::Null | Value::String(_) => "-".into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn ztunnel_table(view: ZtunnelView, items: &[Value]) -> String {
    let (headers, rows): (&[&str], Vec<Vec<String>>) = match view {
        ZtunnelView::Workloads => (
            &["NAMESPACE", "NAME", "ADDRESS", "NODE", "IDENTITY", "PROTOCOL", "STATUS"],
            items
                .iter()
                .map(|w| {
                    vec![
                        s(&w["namespace"]),
                        s(&w["name"]),
                        s(&w["addresses"]),
                        s(&w["node"]),
                        s(&w["identity"]),
                        s(&w["protocol"]),
                        s(&w["status"]),
                    ]
                })
                .collect(),
        ),
        ZtunnelView::Services => (
            &["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS"],
            items
                .iter()
                .map(|x| {
                    let ports: Vec<String> = x["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| format!("{}->{}", s(&p["port"]), s(&p["target_port"])))
                        .collect();
                    vec![
                        s(&x["namespace"]),
                        s(&x["name"]),
                        s(&x["vips"]),
                        ports.join(","),
                        x["endpoints"].as_array().map_or(0, Vec::len).to_string(),
                    ]
                })
                .collect(),
        ),
        ZtunnelView::Policies => (
            &["NAME", "SCOPE", "ACTION", "RULES"],
            items.iter().map(|p| vec![s(&p["name"]), s(&p["scope"]), s(&p["action"]), s(&p["rules"])]).collect(),
        ),
        ZtunnelView::Certificates => (
            &["NODE", "IDENTITY", "EXPIRES", "EXPIRES-IN"],
            items
                .iter()
                .map(|c| {
                    let secs = c["expires_in_s"].as_u64().unwrap_or(0);
                    vec![
                        s(&c["node"]),
                        s(&c["identity"]),
                        s(&c["expires"]),
                        format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
                    ]
                })
                .collect(),
        ),
        ZtunnelView::Connections => (
            &[
                "NODE",
                "STATE",
                "DIRECTION",
                "SOURCE",
                "SOURCE-IDENTITY",
                "DESTINATION",
                "DESTINATION-IDENTITY",
                "MTLS",
                "BYTES-SENT/RECV",
            ],
            items
                .iter()
                .map(|c| {
                    let end = |wl: &Value, addr: &Value| match wl.as_str() {
                        Some(w) if !w.is_empty() => format!("{w} ({})", s(addr)),
                        _ => s(addr),
                    };
                    vec![
                        s(&c["node"]),
                        s(&c["state"]),
                        s(&c["direction"]),
                        end(&c["src_workload"], &c["src"]),
                        s(&c["src_identity"]),
                        end(&c["dst_workload"], &c["dst"]),
                        s(&c["dst_identity"]),
                        s(&c["mtls"]),
                        format!("{}/{}", s(&c["bytes_sent"]), s(&c["bytes_received"])),
                    ]
                })
                .collect(),
        ),
    };
    if rows.is_empty() {
        return "(none)\n".into();
    }
    render_table(headers, &rows)
}

/// `type.googleapis.com/istio.workload.Address` → `ADDRESS`.
fn short_type(url: &str) -> String {
    url.rsplit('.').next().unwrap_or(url).to_ascii_uppercase()
}

/// One type's sync state for a proxy, as the table shows it.
pub fn sync_state(t: &Value) -> String {
    let (sent, acked) = (t["sent_version"].as_str().unwrap_or(""), t["acked_version"].as_str().unwrap_or(""));
    if let Some(n) = t.get("last_nack").filter(|n| !n.is_null()) {
        return format!("NACKED {} ({})", s(&n["version"]), s(&n["error"]));
    }
    match (sent, acked) {
        ("", _) => "NOT SENT".into(),
        (s, a) if s == a => format!("SYNCED {a}"),
        (s, "") => format!("STALE (sent {s}, none acked)"),
        (s, a) => format!("STALE (sent {s}, acked {a})"),
    }
}

pub async fn proxy_status(client: &Client, output: Format) -> anyhow::Result<()> {
    let proxies = client.ok(Method::GET, "/debug/syncz", None).await?.body;
    let list = proxies.as_array().cloned().unwrap_or_default();
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&list)?),
        Format::Yaml => print!("{}", to_yaml(&Value::Array(list))),
        Format::Table => {
            if list.is_empty() {
                eprintln!("No proxies are connected to istiod-lite.");
                return Ok(());
            }
            let mut types: Vec<String> =
                list.iter().flat_map(|p| p["types"].as_object().into_iter().flat_map(|m| m.keys().cloned())).collect();
            types.sort();
            types.dedup();
            let mut headers = vec!["NAME".to_string(), "PEER".into(), "CONNECTED".into()];
            headers.extend(types.iter().map(|t| short_type(t)));
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|p| {
                    let name =
                        p["node_name"].as_str().filter(|n| !n.is_empty()).or(p["node_id"].as_str()).unwrap_or("-");
                    let mut row = vec![name.to_string(), s(&p["peer"]), crate::output::age(p["connected_at"].as_str())];
                    row.extend(types.iter().map(|t| p["types"].get(t).map(sync_state).unwrap_or_else(|| "-".into())));
                    row
                })
                .collect();
            let h: Vec<&str> = headers.iter().map(String::as_str).collect();
            print!("{}", render_table(&h, &rows));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_states_name_nacks_and_lag() {
        assert_eq!(sync_state(&json!({"sent_version": "7", "acked_version": "7"})), "SYNCED 7");
        assert_eq!(sync_state(&json!({"sent_version": "8", "acked_version": "7"})), "STALE (sent 8, acked 7)");
        assert_eq!(
            sync_state(
                &json!({"sent_version": "8", "acked_version": "7", "last_nack": {"version": "8", "error": "bad"}})
            ),
            "NACKED 8 (bad)"
        );
        assert_eq!(short_type("type.googleapis.com/istio.workload.Address"), "ADDRESS");
    }
}
