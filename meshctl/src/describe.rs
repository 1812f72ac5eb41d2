//! `meshctl x describe pod NS/NAME`: one pod's place in the mesh: identity, enrollment and why,
//! the policies that apply and what they do, and the Services it backs.

use anyhow::{anyhow, bail};
use hyper::Method;
use serde_json::{json, Value};
use trellis_config::object::{AuthorizationPolicy, Pod};

use crate::client::Client;
use crate::cluster::{selector_text, selects, Cluster, ROOT_NAMESPACE};
use crate::output::{to_yaml, Format};

/// What one AuthorizationPolicy does, in words.
fn policy_effect(p: &AuthorizationPolicy) -> String {
    let action = p.spec.action.as_deref().unwrap_or("ALLOW");
    let rules = p.spec.rules.as_deref().unwrap_or_default();
    let matches_all = rules.iter().any(|r| r.from.is_empty() && r.to.is_empty() && r.when.is_empty());
    match (action, rules.len(), matches_all) {
        ("ALLOW", 0, _) => "allows nothing (no rules): on its own it denies all traffic".into(),
        ("ALLOW", _, true) => "allows all traffic".into(),
        ("ALLOW", n, _) => format!("allows traffic matching {n} rule(s)"),
        ("DENY", 0, _) => "denies nothing (no rules)".into(),
        ("DENY", _, true) => "denies all traffic".into(),
        ("DENY", n, _) => format!("denies traffic matching {n} rule(s)"),
        ("AUDIT", _, _) => "audits matching traffic (no effect on decisions)".into(),
        (other, _, _) => format!("action {other}"),
    }
}

pub fn describe_pod(c: &Cluster, pod: &Pod, ztunnel: Option<Value>) -> Value {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let labels = &pod.metadata.labels;
    let sa = pod.spec.service_account();
    let enrollment = c.enrolled(ns, labels);

    let mut policies = Vec::new();
    let (mut allow, mut deny) = (0, 0);
    for p in c.authorization_policies() {
        let pns = p.metadata.namespace.as_deref().unwrap_or_default();
        let targets_waypoint = p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty();
        if targets_waypoint || !selects(pns, p.spec.selector.as_ref(), ns, labels) {
            continue;
        }
        let action = p.spec.action.clone().unwrap_or_else(|| "ALLOW".into());
        match action.as_str() {
            "ALLOW" => allow += 1,
            "DENY" => deny += 1,
            _ => {}
        }
        let scope = if pns == ROOT_NAMESPACE {
            "mesh-wide"
        } else if selector_text(p.spec.selector.as_ref()).is_empty() {
            "namespace-wide"
        } else {
            "selector"
        };
        policies.push(json!({
            "name": format!("{pns}/{}", p.metadata.name),
            "action": action,
            "scope": scope,
            "selector": selector_text(p.spec.selector.as_ref()),
            "effect": policy_effect(p),
        }));
    }
    let verdict = if !enrollment.enrolled {
        "not enforced: the pod is outside the mesh, so ztunnel does not see its traffic".to_string()
    } else {
        let policies = |n: usize, action: &str| {
            if n == 1 {
                format!("1 {action} policy")
            } else {
                format!("{n} {action} policies")
            }
        };
        let d = if deny > 0 { format!("{} checked first; ", policies(deny, "DENY")) } else { String::new() };
        if allow > 0 {
            format!("{d}{} apply, so inbound traffic matching none of them is denied", policies(allow, "ALLOW"))
        } else {
            format!("{d}no ALLOW policy applies, so inbound traffic is allowed unless a DENY policy matches")
        }
    };

    let mtls = c
        .peer_authentications()
        .filter(|p| selects(p.metadata.namespace.as_deref().unwrap_or_default(), p.spec.selector.as_ref(), ns, labels))
        // Most specific wins: a selector beats the namespace, the namespace beats the root.
        .max_by_key(|p| {
            let pns = p.metadata.namespace.as_deref().unwrap_or_default();
            (!selector_text(p.spec.selector.as_ref()).is_empty(), pns != ROOT_NAMESPACE)
        })
        .map(|p| {
            let mode = p.spec.mtls.as_ref().map(|m| m.mode.as_str()).filter(|m| !m.is_empty()).unwrap_or("PERMISSIVE");
            json!({"mode": mode, "from": format!("PeerAuthentication {}/{}", p.metadata.namespace.as_deref().unwrap_or_default(), p.metadata.name)})
        })
        .unwrap_or_else(|| json!({"mode": "PERMISSIVE", "from": "the default: no PeerAuthentication applies"}));

    let services: Vec<Value> = c
        .services()
        .filter(|s| s.metadata.namespace.as_deref() == Some(ns))
        .filter(|s| {
            s.spec
                .selector
                .as_ref()
                .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
        })
        .map(|s| {
            let ports: Vec<String> = s
                .spec
                .ports
                .iter()
                .map(|p| match &p.target_port {
                    Some(t) => format!(
                        "{}->{}",
                        p.port,
                        serde_json::to_value(t).map(|v| v.to_string().replace('"', "")).unwrap_or_default()
                    ),
                    None => p.port.to_string(),
                })
                .collect();
            json!({"name": format!("{ns}/{}", s.metadata.name), "vip": s.spec.cluster_ip, "ports": ports})
        })
        .collect();

    json!({
        "pod": format!("{ns}/{}", pod.metadata.name),
        "node": pod.spec.node_name,
        "ip": pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        "identity": format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
        "enrolled": enrollment.enrolled,
        "enrollment_reason": enrollment.reason,
        "ztunnel": ztunnel,
        "mtls": mtls,
        "authorization": {"policies": policies, "verdict": verdict},
        "services": services,
    })
}

fn print_text(d: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    println!("Pod:       {}", s(&d["pod"]));
    println!("Node:      {}    IP: {}", s(&d["node"]), s(&d["ip"]));
    println!("Identity:  {}", s(&d["identity"]));
    println!(
        "Mesh:      {} ({})",
        if d["enrolled"] == true { "enrolled, traffic carried over HBONE" } else { "not enrolled" },
        s(&d["enrollment_reason"])
    );
    match &d["ztunnel"] {
        Value::Null => println!("ztunnel:   (its node's ztunnel could not be asked)"),
        z => println!(
            "ztunnel:   {} on {}: {}",
            if z["enrolled"] == true { "captured" } else { "not captured" },
            s(&d["node"]),
            s(&z["reason"])
        ),
    }
    println!("mTLS:      {} ({})", s(&d["mtls"]["mode"]), s(&d["mtls"]["from"]));
    println!("Authorization: {}", s(&d["authorization"]["verdict"]));
    for p in d["authorization"]["policies"].as_array().into_iter().flatten() {
        let sel = p["selector"].as_str().filter(|x| !x.is_empty()).map(|x| format!(" {x}")).unwrap_or_default();
        println!("  {:<6} {}  [{}{sel}]: {}", s(&p["action"]), s(&p["name"]), s(&p["scope"]), s(&p["effect"]));
    }
    let services = d["services"].as_array().cloned().unwrap_or_default();
    if services.is_empty() {
        println!("Services:  (backs none)");
    } else {
        println!("Services:");
        for svc in services {
            let ports: Vec<String> = svc["ports"].as_array().into_iter().flatten().map(s).collect();
            println!("  {}  {}  ports {}", s(&svc["name"]), s(&svc["vip"]), ports.join(", "));
        }
    }
}

/// The pod's registration on its node's ztunnel, if that ztunnel answers.
async fn ztunnel_view(client: &Client, pod: &Pod, admin_port: u16) -> Option<Value> {
    let node = pod.spec.node_name.as_deref()?;
    let node_obj = client.ok(Method::GET, &format!("/api/v1/nodes/{node}"), None).await.ok()?.body;
    let ip = node_obj["status"]["addresses"].as_array()?.iter().find(|a| a["type"] == "InternalIP")?["address"]
        .as_str()?
        .to_string();
    let dump =
        Client::new(&format!("http://{ip}:{admin_port}")).ok()?.call(Method::GET, "/config_dump", None).await.ok()?;
    let uid =
        format!("Kubernetes//v1/Pod/{}/{}", pod.metadata.namespace.as_deref().unwrap_or_default(), pod.metadata.name);
    dump.body["pods"].as_array()?.iter().find(|p| p["uid"] == uid.as_str()).cloned().or(Some(json!({
        "enrolled": false, "reason": "not registered with the node agent (no CNI ADD seen)"
    })))
}

pub async fn run(client: &Client, kind: &str, target: &str, admin_port: u16, output: Format) -> anyhow::Result<()> {
    if !matches!(kind, "pod" | "pods" | "po") {
        bail!("x describe supports pods: `meshctl x describe pod NAMESPACE/NAME`");
    }
    let (ns, name) = target.split_once('/').ok_or_else(|| anyhow!("{target:?}: name the pod as NAMESPACE/NAME"))?;
    let c = Cluster::fetch(client).await?;
    let pod = c
        .pods()
        .find(|p| p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name == name)
        .ok_or_else(|| anyhow!("pod {ns}/{name} not found"))?;
    let z = ztunnel_view(client, pod, admin_port).await;
    let d = describe_pod(&c, pod, z);
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&d)?),
        Format::Yaml => print!("{}", to_yaml(&d)),
        Format::Table => print_text(&d),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> AuthorizationPolicy {
        let yaml = format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\nspec: {spec}\n");
        match trellis_config::load::load_text("t", &yaml, "demo").unwrap().remove(0).object {
            trellis_config::Object::AuthorizationPolicy(p) => p,
            _ => unreachable!(),
        }
    }

    #[test]
    fn policy_effects_follow_istio_semantics() {
        let cases = [
            ("{}", "allows nothing (no rules): on its own it denies all traffic"),
            ("{rules: [{}]}", "allows all traffic"),
            (
                "{rules: [{from: [{source: {principals: [a]}}]}, {to: [{operation: {ports: ['80']}}]}]}",
                "allows traffic matching 2 rule(s)",
            ),
            ("{action: DENY, rules: [{}]}", "denies all traffic"),
            ("{action: DENY, rules: [{from: [{source: {namespaces: [x]}}]}]}", "denies traffic matching 1 rule(s)"),
            ("{action: AUDIT, rules: [{}]}", "audits matching traffic (no effect on decisions)"),
        ];
        for (spec, want) in cases {
            assert_eq!(policy_effect(&policy(spec)), want, "{spec}");
        }
    }
}
