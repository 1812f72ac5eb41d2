//! `meshctl lab`: a multi-node Trellis mesh on one Linux machine, built from network namespaces
//! and the real binaries.
//!
//! ```text
//!  host: istiod-lite (API 127.0.0.1:15014; xDS/CA on <underlay>.1) ── link <prefix>-lab
//!   └─ netns <prefix>-underlay: bridge br0 <underlay>/24
//!        ├─ netns <prefix>-node1: eth0 .11, ztunnel, trellis-cni, VXLAN ─ pods <pod-net>.1.0/24
//!        └─ netns <prefix>-node2: eth0 .12, …                           ─ pods <pod-net>.2.0/24
//! ```

mod down;
pub mod sample;
pub mod state;
mod sys;
mod up;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use crate::client::Client;
use crate::output::{render_table, to_yaml, Format};
use state::Lab;

pub const DEFAULT_STATE_DIR: &str = "/run/trellis-lab";
pub const DEFAULT_PREFIX: &str = "trellis";

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Create the underlay, istiod-lite, one ztunnel per node, and (with --sample) the demo app.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// Deploy namespace demo: pods client, echo-v1 and echo-v2, and Service echo.
        #[arg(long)]
        sample: bool,
        /// Names of netns and links start with this; two labs need two prefixes.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// The underlay /24 (the host's end is .1, node i is .(10+i)).
        #[arg(long, default_value = "172.30.0.0")]
        underlay: Ipv4Addr,
        /// Pod CIDRs are A.B.<node>.0/24 for --pod-net A.B.0.0.
        #[arg(long, default_value = "10.244.0.0")]
        pod_net: Ipv4Addr,
        /// Where istiod-lite's config API listens (on the host).
        #[arg(long, default_value = "127.0.0.1:15014")]
        api_addr: SocketAddr,
        /// Where the Trellis binaries are; default: next to meshctl.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Run a command inside a pod's network namespace: `lab exec demo/client -- curl echo`.
    Exec {
        /// NAMESPACE/POD
        pod: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Show the lab's processes, nodes and pods, and whether each is healthy.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Remove the lab's processes, netns, links, BPF pins and state. Safe to repeat.
    Down {
        /// The prefix to sweep when the state dir has no record of the lab.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
}

pub async fn run(cmd: LabCommand, state_dir: &Path) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up { nodes, sample, prefix, underlay, pod_net, api_addr, bin_dir } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()
                    .context("locating meshctl")?
                    .parent()
                    .map(Path::to_path_buf)
                    .ok_or_else(|| anyhow!("cannot tell which directory meshctl is in; pass --bin-dir"))?,
            };
            let o = up::UpOptions {
                nodes,
                sample,
                state_dir: state_dir.to_path_buf(),
                prefix,
                underlay: Ipv4Addr::from(u32::from(underlay) & 0xffff_ff00),
                pod_net: [pod_net.octets()[0], pod_net.octets()[1]],
                api: api_addr,
                bin_dir,
            };
            lab_up(o).await
        }
        LabCommand::Exec { pod, command } => {
            let code = exec(state_dir, &pod, &command).await?;
            std::process::exit(code);
        }
        LabCommand::Status { output } => status(state_dir, output).await,
        LabCommand::Down { prefix } => {
            let lab = Lab::load(state_dir)?;
            let prefix = lab.as_ref().map(|l| l.prefix.clone()).unwrap_or(prefix);
            if lab.is_none() {
                if let Some(other) =
                    state::owner(&prefix).filter(|o| o != state_dir && o.join(state::STATE_FILE).exists())
                {
                    bail!(
                        "no lab in {}; the lab named {prefix:?} runs from {}: run `meshctl lab down --state-dir {}`",
                        state_dir.display(),
                        other.display(),
                        other.display()
                    );
                }
            }
            let r = down::down(state_dir, lab, &prefix);
            if r.is_empty() {
                println!("No lab in {}; nothing to remove.", state_dir.display());
            } else {
                println!(
                    "Lab removed: {} process(es), {} netns, {} host link(s), {} BPF mount(s){}",
                    r.processes,
                    r.netns.len(),
                    r.links.len(),
                    r.mounts.len(),
                    if r.state_dir { format!(", state dir {}", state_dir.display()) } else { String::new() }
                );
            }
            Ok(())
        }
    }
}

async fn lab_up(o: up::UpOptions) -> anyhow::Result<()> {
    let state_dir = o.state_dir.clone();
    if let Some(lab) = Lab::load(&state_dir)? {
        let problems = health(&lab).await;
        if lab.complete && problems.is_empty() {
            if lab.nodes.len() != o.nodes as usize || (o.sample && lab.pods.is_empty()) {
                bail!(
                    "the lab in {} is up with {} node(s){}; run `meshctl lab down` first to change it",
                    state_dir.display(),
                    lab.nodes.len(),
                    if lab.pods.is_empty() { " and no sample" } else { "" }
                );
            }
            println!("The lab in {} is already up; nothing to do.", state_dir.display());
            return print_report(&lab, Format::Table).await;
        }
        let why = if lab.complete { problems.join("; ") } else { "a previous `lab up` did not finish".into() };
        println!("Found a broken lab in {} ({why}); removing it first.", state_dir.display());
        let prefix = lab.prefix.clone();
        down::down(&state_dir, Some(lab), &prefix);
    } else {
        if let Some(other) = state::owner(&o.prefix).filter(|d| *d != state_dir) {
            if other.join(state::STATE_FILE).exists() {
                bail!(
                    "a lab named {:?} already exists with state dir {}: run `meshctl lab down --state-dir {}`, or use another --prefix, --underlay and --api-addr",
                    o.prefix,
                    other.display(),
                    other.display()
                );
            }
        }
        // Leftovers of a lab whose state is gone (a deleted state dir, a crash): ours by name.
        let r = down::down(&state_dir, None, &o.prefix);
        if !r.is_empty() {
            println!(
                "Removed leftovers of an earlier lab named {:?}: {} netns, {} link(s).",
                o.prefix,
                r.netns.len(),
                r.links.len()
            );
        }
        if state_dir.exists() && std::fs::read_dir(&state_dir)?.next().is_some() {
            bail!(
                "--state-dir {} is not empty and holds no lab; `lab down` deletes the state dir, so give it a new or empty directory",
                state_dir.display()
            );
        }
    }
    match up::up(o).await {
        Ok(lab) => {
            println!();
            print_report(&lab, Format::Table).await?;
            println!("\nTry: meshctl lab exec demo/client -- curl -s http://echo/   |   meshctl lab down to remove it");
            Ok(())
        }
        Err(e) => Err(e.context(format!(
            "lab up failed; what was created is recorded in {}: run `meshctl lab down --state-dir {}` to remove it",
            state_dir.display(),
            state_dir.display()
        ))),
    }
}

fn load_up(state_dir: &Path) -> anyhow::Result<Lab> {
    Lab::load(state_dir)?.ok_or_else(|| {
        anyhow!("no lab in {}: run `meshctl lab up` first (or pass the --state-dir it used)", state_dir.display())
    })
}

async fn exec(state_dir: &Path, target: &str, command: &[String]) -> anyhow::Result<i32> {
    let lab = load_up(state_dir)?;
    let (ns, name) = target.split_once('/').ok_or_else(|| anyhow!("{target:?}: name a pod as NAMESPACE/NAME"))?;
    let Some(pod) = lab.pod(ns, name) else {
        let known: Vec<String> = lab.pods.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect();
        bail!(
            "no pod {target} in the lab; its pods are: {}",
            if known.is_empty() { "(none; `lab up --sample` creates some)".into() } else { known.join(", ") }
        );
    };
    if !sys::netns_exists(&pod.netns) {
        bail!(
            "pod {target}'s network namespace {} is gone: the lab is not running (see `meshctl lab status`; `meshctl lab up` rebuilds it)",
            pod.netns
        );
    }
    // Services applied since `up` should resolve too; without istiod-lite, keep the old file.
    if let Ok(client) = Client::new(&format!("http://{}", lab.api)) {
        let _ = up::write_hosts(&lab, &client, ns, name).await;
    }
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .args(command)
        .status()
        .context("running ip netns exec")?;
    Ok(status.code().unwrap_or(128 + 9))
}

/// Problems that make a lab unusable; empty when everything is healthy.
async fn health(lab: &Lab) -> Vec<String> {
    let mut problems = Vec::new();
    match &lab.istiod {
        Some(p) if sys::alive(p) => {}
        _ => problems.push("istiod-lite is not running".to_string()),
    }
    for n in &lab.nodes {
        if !n.ztunnel.as_ref().is_some_and(sys::alive) {
            problems.push(format!("ztunnel on {} is not running", n.name));
        }
    }
    for p in &lab.pods {
        if !sys::netns_exists(&p.netns) {
            problems.push(format!("pod {}/{} has no netns", p.namespace, p.name));
        } else if !p.app.as_ref().is_some_and(sys::alive) {
            problems.push(format!("pod {}/{}'s app is not running", p.namespace, p.name));
        }
    }
    problems
}

async fn get_ok(base: &str, path: &str) -> Option<Value> {
    let c = Client::new(base).ok()?;
    let r = c.call(Method::GET, path, None).await.ok()?;
    r.status.is_success().then_some(r.body)
}

/// The lab as a document: processes and their health, nodes, pods with IP, identity and
/// enrollment (as their node's ztunnel reports it).
async fn report(lab: &Lab) -> Value {
    let api = format!("http://{}", lab.api);
    let istiod_running = lab.istiod.as_ref().is_some_and(sys::alive);
    let istiod_ready = istiod_running && get_ok(&api, "/ready").await.is_some();
    let mut nodes = Vec::new();
    for n in &lab.nodes {
        let running = n.ztunnel.as_ref().is_some_and(sys::alive);
        let ready = running && get_ok(&format!("http://{}:15021", n.ip), "/healthz/ready").await.is_some();
        nodes.push(json!({
            "name": n.name, "ip": n.ip.to_string(), "pod_cidr": n.pod_cidr, "netns": n.netns,
            "ztunnel": {"pid": n.ztunnel.as_ref().map(|p| p.pid), "running": running, "ready": ready},
        }));
    }
    let mut pods = Vec::new();
    let mut agents: std::collections::HashMap<String, Value> = Default::default();
    for p in &lab.pods {
        if !agents.contains_key(&p.node) {
            let list = up::agent(lab, &p.node, &json!({"op": "list"})).unwrap_or(Value::Null);
            agents.insert(p.node.clone(), list);
        }
        let uid = format!("Kubernetes//v1/Pod/{}/{}", p.namespace, p.name);
        let reg = agents[&p.node]["pods"].as_array().into_iter().flatten().find(|x| x["uid"] == uid.as_str()).cloned();
        let obj = get_ok(&api, &format!("/api/v1/namespaces/{}/pods/{}", p.namespace, p.name)).await;
        let sa = obj
            .as_ref()
            .and_then(|o| o.pointer("/spec/serviceAccountName").and_then(Value::as_str).map(String::from))
            .unwrap_or_else(|| "default".into());
        pods.push(json!({
            "namespace": p.namespace, "name": p.name, "node": p.node, "netns": p.netns,
            "ip": p.ip.map(|i| i.to_string()),
            "identity": format!("spiffe://cluster.local/ns/{}/sa/{sa}", p.namespace),
            "app": {"pid": p.app.as_ref().map(|a| a.pid), "running": p.app.as_ref().is_some_and(sys::alive)},
            "enrolled": reg.as_ref().map(|r| r["enrolled"] == true),
            "reason": reg.as_ref().and_then(|r| r["reason"].as_str().map(String::from)),
        }));
    }
    let enrolled_ns: Vec<String> = get_ok(&api, "/api/v1/namespaces")
        .await
        .and_then(|v| v["items"].as_array().cloned())
        .into_iter()
        .flatten()
        .filter(|n| n.pointer("/metadata/labels/istio.io~1dataplane-mode").and_then(Value::as_str) == Some("ambient"))
        .filter_map(|n| n.pointer("/metadata/name").and_then(Value::as_str).map(String::from))
        .collect();
    json!({
        "state_dir": lab.state_dir, "complete": lab.complete,
        "istiod": {"pid": lab.istiod.as_ref().map(|p| p.pid), "running": istiod_running, "ready": istiod_ready, "api": api},
        "nodes": nodes, "pods": pods, "enrolled_namespaces": enrolled_ns,
    })
}

fn health_word(running: bool, ready: bool) -> &'static str {
    match (running, ready) {
        (true, true) => "Ready",
        (true, false) => "NotReady",
        _ => "Stopped",
    }
}

async fn print_report(lab: &Lab, format: Format) -> anyhow::Result<()> {
    let r = report(lab).await;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Format::Yaml => print!("{}", to_yaml(&r)),
        Format::Table => {
            let b = |v: &Value| v.as_bool().unwrap_or(false);
            let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
            let pid = |v: &Value| v.as_u64().map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let mut rows = vec![vec![
                "istiod-lite".into(),
                "host".into(),
                s(&r["istiod"]["api"]),
                pid(&r["istiod"]["pid"]),
                health_word(b(&r["istiod"]["running"]), b(&r["istiod"]["ready"])).into(),
            ]];
            for n in r["nodes"].as_array().into_iter().flatten() {
                rows.push(vec![
                    format!("ztunnel/{}", s(&n["name"])),
                    s(&n["name"]),
                    format!("{} pods {}", s(&n["ip"]), s(&n["pod_cidr"])),
                    pid(&n["ztunnel"]["pid"]),
                    health_word(b(&n["ztunnel"]["running"]), b(&n["ztunnel"]["ready"])).into(),
                ]);
            }
            print!("{}", render_table(&["COMPONENT", "NODE", "ADDRESS", "PID", "STATUS"], &rows));
            let pods: Vec<Vec<String>> = r["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    vec![
                        s(&p["namespace"]),
                        s(&p["name"]),
                        s(&p["node"]),
                        s(&p["ip"]),
                        s(&p["identity"]),
                        match p["enrolled"].as_bool() {
                            Some(true) => "yes (HBONE)".into(),
                            Some(false) => "no".into(),
                            None => "unknown".into(),
                        },
                        if b(&p["app"]["running"]) { "Running".into() } else { "Stopped".into() },
                    ]
                })
                .collect();
            if !pods.is_empty() {
                println!();
                print!("{}", render_table(&["NAMESPACE", "POD", "NODE", "IP", "IDENTITY", "MESH", "STATUS"], &pods));
            }
            let ns: Vec<String> = r["enrolled_namespaces"].as_array().into_iter().flatten().map(s).collect();
            println!("\nNamespaces in the mesh: {}", if ns.is_empty() { "(none)".into() } else { ns.join(", ") });
        }
    }
    Ok(())
}

async fn status(state_dir: &Path, output: Format) -> anyhow::Result<()> {
    let lab = load_up(state_dir)?;
    print_report(&lab, output).await?;
    let problems = health(&lab).await;
    if !problems.is_empty() {
        bail!("the lab is unhealthy: {}", problems.join("; "));
    }
    Ok(())
}
