//! `meshctl lab up`: underlay → istiod-lite → nodes (netns, ztunnel, CNI config) → pods, each
//! step recorded in the state file before the next begins, so `down` can undo any prefix of it.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hyper::Method;
use serde_json::{json, Value};

use super::sample::{self, App, PodSpec};
use super::state::{self, Lab, Node, Pod, Proc};
use super::sys;
use crate::client::Client;

/// How long each component gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const ZTUNNEL_ADMIN_PORT: u16 = 15000;
const ZTUNNEL_READY_PORT: u16 = 15021;

pub struct UpOptions {
    pub nodes: u8,
    pub sample: bool,
    pub state_dir: PathBuf,
    pub prefix: String,
    pub underlay: Ipv4Addr,
    pub pod_net: [u8; 2],
    pub api: SocketAddr,
    pub bin_dir: PathBuf,
}

fn step(what: &str) {
    println!("  \u{2713} {what}");
}

pub async fn up(o: UpOptions) -> anyhow::Result<Lab> {
    preflight(&o)?;
    std::fs::create_dir_all(&o.state_dir).with_context(|| format!("creating {}", o.state_dir.display()))?;
    std::fs::set_permissions(&o.state_dir, std::fs::Permissions::from_mode(0o700))?;
    let mut lab = Lab {
        prefix: o.prefix.clone(),
        state_dir: std::fs::canonicalize(&o.state_dir)?,
        underlay: o.underlay,
        pod_net: o.pod_net,
        api: o.api,
        bin_dir: o.bin_dir.clone(),
        istiod: None,
        nodes: Vec::new(),
        pods: Vec::new(),
        complete: false,
    };
    lab.save()?;
    std::fs::create_dir_all(state::OWNERS_DIR)?;
    std::fs::write(state::owner_file(&lab.prefix), lab.state_dir.to_string_lossy().as_bytes())?;
    println!("Bringing up a {}-node Trellis lab (state in {})", o.nodes, lab.state_dir.display());

    underlay(&lab)?;
    step(&format!("underlay {}/24: netns {}, host link {}", lab.underlay, lab.underlay_netns(), lab.host_link()));
    sys::mount_bpffs(&lab.bpffs())?;

    let client = start_istiod(&mut lab).await?;
    step(&format!("istiod-lite: API http://{}, xDS and CA https://{}:15012", lab.api, lab.host_ip()));

    for i in 1..=o.nodes {
        add_node(&mut lab, &client, i).await?;
        let n = lab.nodes.last().expect("just added");
        step(&format!(
            "{}: {} pods {} ztunnel ready (admin http://{}:{ZTUNNEL_ADMIN_PORT})",
            n.name, n.ip, n.pod_cidr, n.ip
        ));
    }

    if o.sample {
        apply_yaml(&client, sample::OBJECTS).await?;
        step("sample config: namespace demo (ambient), Service echo 10.96.0.20:80 -> 8080");
        for spec in sample::PODS {
            let node = spec.node.min(o.nodes);
            let pod = add_pod(&mut lab, &client, spec, node).await?;
            step(&format!(
                "pod {}/{} on {}: {} {}",
                pod.namespace,
                pod.name,
                pod.node,
                pod.ip.map(|i| i.to_string()).unwrap_or_default(),
                if spec.app == App::Echo { "trellis-echo :8080" } else { "idle" }
            ));
        }
    }
    lab.complete = true;
    lab.save()?;
    Ok(lab)
}

fn preflight(o: &UpOptions) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("meshctl lab needs root: it creates network namespaces, veth and VXLAN links and loads eBPF programs (run it with sudo)");
    }
    if sys::find_in_path("ip").is_none() {
        bail!("meshctl lab needs iproute2's `ip` command (apt-get install iproute2)");
    }
    if !(1..=9).contains(&o.nodes) {
        bail!("--nodes {}: a lab has 1 to 9 nodes", o.nodes);
    }
    if o.prefix.is_empty() || o.prefix.len() > 11 || !o.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("--prefix {:?}: use 1 to 11 letters, digits or '-' (it names host links)", o.prefix);
    }
    for b in ["istiod-lite", "ztunnel", "trellis-cni", "trellis-echo"] {
        if !o.bin_dir.join(b).is_file() {
            bail!(
                "{b} not found in {}: build the binaries first (cargo build --release -p istiod-lite -p ztunnel -p trellis-cni -p trellis-echo, or make demo), or pass --bin-dir",
                o.bin_dir.display()
            );
        }
    }
    let host = Ipv4Addr::from(u32::from(o.underlay) & 0xffff_ff00);
    if let Some(route) = host_route_overlapping(host) {
        bail!("the underlay {host}/24 overlaps the host's route `{route}`: choose another with --underlay");
    }
    Ok(())
}

/// A host route that already covers `net`/24 (which would make the lab shadow or be shadowed).
fn host_route_overlapping(net: Ipv4Addr) -> Option<String> {
    let routes = sys::ip(&["-4", "route", "show", "table", "all"]).ok()?;
    routes.lines().find_map(|l| {
        let dst = l.split_whitespace().next()?;
        let (addr, len) = dst.split_once('/')?;
        let (addr, len): (Ipv4Addr, u32) = (addr.parse().ok()?, len.parse().ok()?);
        if len == 0 || l.contains(" dev lo ") {
            return None;
        }
        let mask = |n: u32| if n == 0 { 0 } else { u32::MAX << (32 - n) };
        let m = mask(len.min(24));
        (u32::from(addr) & m == u32::from(net) & m).then(|| l.trim().to_string())
    })
}

fn underlay(lab: &Lab) -> anyhow::Result<()> {
    let u = lab.underlay_netns();
    let host = lab.host_link();
    sys::ip(&["netns", "add", &u])?;
    sys::ip(&["-n", &u, "link", "set", "lo", "up"])?;
    sys::ip(&["-n", &u, "link", "add", "br0", "type", "bridge"])?;
    sys::ip(&["-n", &u, "link", "set", "br0", "up"])?;
    // Probe VXLAN support here, where a failure names the missing feature, rather than deep in
    // a ztunnel log.
    if let Err(e) = sys::ip(&["-n", &u, "link", "add", "probe0", "type", "vxlan", "id", "1", "dstport", "4789"]) {
        bail!("this kernel cannot create VXLAN devices (CONFIG_VXLAN, module vxlan), which the lab's node overlay needs: {e}");
    }
    sys::ip(&["-n", &u, "link", "del", "probe0"])?;
    sys::ip(&["link", "add", &host, "type", "veth", "peer", "name", "host0", "netns", &u])?;
    sys::ip(&["-n", &u, "link", "set", "host0", "master", "br0", "up"])?;
    sys::ip(&["addr", "add", &format!("{}/24", lab.host_ip()), "dev", &host])?;
    sys::ip(&["link", "set", &host, "up"])?;
    Ok(())
}

/// Polls a readiness URL; gives up early, with the log, if the process exits.
async fn wait_http(url_base: &str, path: &str, what: &str, proc_: &Proc) -> anyhow::Result<()> {
    let client = Client::new(url_base)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let log = &proc_.log;
    loop {
        if let Ok(r) = client.call(Method::GET, path, None).await {
            if r.status.is_success() {
                return Ok(());
            }
        }
        if !sys::alive(proc_) {
            bail!("{what} exited during startup; the end of its log ({}):\n{}", log.display(), log_tail(log, 15));
        }
        if Instant::now() > deadline {
            let tail = log_tail(log, 15);
            bail!(
                "{what} did not become ready within {}s; its log ({}):\n{tail}",
                READY_TIMEOUT.as_secs(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn start_istiod(lab: &mut Lab) -> anyhow::Result<Client> {
    let dir = lab.state_dir.join("istiod");
    std::fs::create_dir_all(&dir)?;
    let host = lab.host_ip();
    let args = vec![
        "--state-dir".into(),
        dir.display().to_string(),
        "--api-addr".into(),
        lab.api.to_string(),
        "--xds-addr".into(),
        format!("{host}:15010"),
        "--secure-addr".into(),
        format!("{host}:15012"),
    ];
    let log = lab.state_dir.join("istiod-lite.log");
    let p = sys::spawn(None, &lab.bin_dir.join("istiod-lite"), &args, &[], &log)?;
    lab.istiod = Some(p.clone());
    lab.save()?;
    wait_http(&format!("http://{}", lab.api), "/ready", "istiod-lite", &p).await?;
    Client::new(&format!("http://{}", lab.api))
}

async fn apply_yaml(client: &Client, yaml: &str) -> anyhow::Result<()> {
    let objects = trellis_config::load::load_text("sample", yaml, "default")
        .map_err(|e| anyhow!("built-in sample is invalid: {e:?}"))?;
    for l in objects {
        put(client, &l.object.to_value()).await?;
    }
    Ok(())
}

async fn put(client: &Client, obj: &Value) -> anyhow::Result<()> {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let k = trellis_config::Kind::from_cli(kind).ok_or_else(|| anyhow!("unknown kind {kind}"))?;
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    client.ok(Method::PUT, &format!("{}/{name}", k.collection_path(ns)), Some(obj)).await?;
    Ok(())
}

async fn add_node(lab: &mut Lab, client: &Client, i: u8) -> anyhow::Result<()> {
    let name = format!("node{i}");
    let netns = lab.node_netns(i);
    let ip = lab.node_ip(i);
    let pod_cidr = format!("{}.{}.{i}.0/24", lab.pod_net[0], lab.pod_net[1]);
    let dir = lab.node_dir(&name);
    std::fs::create_dir_all(dir.join("cni"))?;
    lab.nodes.push(Node {
        name: name.clone(),
        index: i,
        netns: netns.clone(),
        ip,
        pod_cidr: pod_cidr.clone(),
        ztunnel: None,
    });
    lab.save()?;

    let u = lab.underlay_netns();
    let port = format!("n{i}");
    sys::ip(&["netns", "add", &netns])?;
    sys::ip(&["-n", &u, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
    sys::ip(&["-n", &u, "link", "set", &port, "master", "br0", "up"])?;
    sys::ip(&["-n", &netns, "link", "set", "lo", "up"])?;
    sys::ip(&["-n", &netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    sys::ip(&["-n", &netns, "link", "set", "eth0", "up"])?;

    put(
        client,
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                "spec": {"podCIDR": pod_cidr},
                "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}}),
    )
    .await?;
    let token = client.ok(Method::PUT, &format!("/apis/trellis.dev/v1/nodetokens/{name}"), None).await?;
    let token =
        token.body.get("token").and_then(Value::as_str).ok_or_else(|| anyhow!("istiod-lite issued no token"))?;
    let token_file = dir.join("token");
    let _ = std::fs::remove_file(&token_file);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&token_file)?
        .write_all(token.as_bytes())?;

    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "trellis",
        "plugins": [{
            "type": "trellis-cni",
            "podCIDR": pod_cidr,
            "dataDir": dir.join("cni/data").display().to_string(),
            "mtu": 1450,
            "agentSocket": lab.agent_socket(&name).display().to_string(),
        }],
    });
    std::fs::write(dir.join("cni/10-trellis.conflist"), serde_json::to_vec_pretty(&conflist)?)?;

    let host = lab.host_ip();
    let args: Vec<String> = [
        "--node-name",
        &name,
        "--node-ip",
        &ip.to_string(),
        "--xds-address",
        &format!("https://{host}:15012"),
        "--root-cert",
        &lab.state_dir.join("istiod/ca/root-cert.pem").display().to_string(),
        "--token-file",
        &token_file.display().to_string(),
        "--agent-socket",
        &lab.agent_socket(&name).display().to_string(),
        "--bpf-pin-dir",
        &lab.bpffs().join(&name).display().to_string(),
        "--admin-addr",
        &format!("{ip}:{ZTUNNEL_ADMIN_PORT}"),
        "--metrics-addr",
        &format!("{ip}:15020"),
        "--readiness-addr",
        &format!("{ip}:{ZTUNNEL_READY_PORT}"),
        "--worker-threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join("ztunnel.log");
    let p = sys::spawn(Some(&netns), &lab.bin_dir.join("ztunnel"), &args, &[("RUST_LOG", "info")], &log)?;
    lab.nodes.last_mut().expect("just pushed").ztunnel = Some(p.clone());
    lab.save()?;
    wait_http(&format!("http://{ip}:{ZTUNNEL_READY_PORT}"), "/healthz/ready", &format!("ztunnel on {name}"), &p).await
}

/// Creates a pod the way a kubelet does: the Pod object, a sandbox netns, CNI ADD through the
/// node's conflist, the Pod's IP in its status, then the app.
async fn add_pod(lab: &mut Lab, client: &Client, spec: &PodSpec, node: u8) -> anyhow::Result<Pod> {
    let node_name = format!("node{node}");
    let netns = lab.pod_netns(spec.namespace, spec.name);
    let labels: serde_json::Map<String, Value> =
        spec.labels.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
    let mut obj = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": {"nodeName": node_name, "serviceAccountName": spec.service_account},
        "status": {"phase": "Pending"},
    });
    put(client, &obj).await?;
    lab.pods.push(Pod {
        namespace: spec.namespace.into(),
        name: spec.name.into(),
        node: node_name.clone(),
        netns: netns.clone(),
        ip: None,
        app: None,
    });
    lab.save()?;
    sys::ip(&["netns", "add", &netns])?;
    sys::ip(&["-n", &netns, "link", "set", "lo", "up"])?;

    let result = cni(lab, &node_name, "ADD", spec.namespace, spec.name)
        .with_context(|| format!("CNI ADD for pod {}/{}", spec.namespace, spec.name))?;
    let ip: Ipv4Addr = result
        .pointer("/ips/0/address")
        .and_then(Value::as_str)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("CNI ADD for {}/{} returned no IPv4 address: {result}", spec.namespace, spec.name))?;
    obj["status"] = json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
    put(client, &obj).await?;
    lab.pods.last_mut().expect("just pushed").ip = Some(ip);
    lab.save()?;
    write_hosts(lab, client, spec.namespace, spec.name).await?;

    let ns_obj = client.ok(Method::GET, &format!("/api/v1/namespaces/{}", spec.namespace), None).await?.body;
    let ns_labels = string_map(ns_obj.pointer("/metadata/labels"));
    let pod_labels = spec.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let want = trellis_config::mesh::enrollment(spec.namespace, &pod_labels, &ns_labels).enrolled;
    wait_enrolled(lab, &node_name, spec.namespace, spec.name, want).await?;

    let log = lab.state_dir.join(format!("pod-{}-{}.log", spec.namespace, spec.name));
    let env = [("POD_NAME", spec.name), ("POD_NAMESPACE", spec.namespace)];
    let p = match spec.app {
        App::Echo => {
            let args = vec!["--port".to_string(), sample::ECHO_PORT.to_string()];
            sys::spawn(Some(&netns), &lab.bin_dir.join("trellis-echo"), &args, &env, &log)?
        }
        App::Idle => {
            let sleep = sys::find_in_path("sleep").ok_or_else(|| anyhow!("`sleep` is not on PATH"))?;
            sys::spawn(Some(&netns), &sleep, &["infinity".to_string()], &env, &log)?
        }
    };
    lab.pods.last_mut().expect("just pushed").app = Some(p);
    lab.save()?;
    if spec.app == App::Echo {
        let deadline = Instant::now() + READY_TIMEOUT;
        while sys::netns_sh(&netns, &format!("exec 3<>/dev/tcp/127.0.0.1/{}", sample::ECHO_PORT)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "trellis-echo in {}/{} is not listening; its log:\n{}",
                    spec.namespace,
                    spec.name,
                    log_tail(&log, 10)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(lab.pods.last().expect("just pushed").clone())
}

pub fn string_map(v: Option<&Value>) -> std::collections::BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

/// Runs the node's conflist for one pod as libcni does: plugins in order for ADD (each given the
/// previous result), in reverse for DEL. Returns the final result.
pub fn cni(lab: &Lab, node: &str, command: &str, namespace: &str, name: &str) -> anyhow::Result<Value> {
    let dir = lab.node_dir(node).join("cni");
    let list: Value = serde_json::from_slice(&std::fs::read(dir.join("10-trellis.conflist"))?)?;
    let mut plugins: Vec<Value> = list["plugins"].as_array().cloned().unwrap_or_default();
    if command == "DEL" {
        plugins.reverse();
    }
    let netns = lab.pod_netns(namespace, name);
    let node_netns = lab.node(node).map(|n| n.netns.clone()).ok_or_else(|| anyhow!("no node {node}"))?;
    let cni_path = format!("{}:/usr/lib/cni:/opt/cni/bin", lab.bin_dir.display());
    let mut prev = Value::Null;
    for p in plugins {
        let ty = p["type"].as_str().unwrap_or_default().to_string();
        let exe = cni_path
            .split(':')
            .map(|d| Path::new(d).join(&ty))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow!("CNI plugin {ty:?} not found in {cni_path}"))?;
        let mut conf = p.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if !prev.is_null() {
            conf["prevResult"] = prev.clone();
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node_netns])
            .arg(&exe)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &netns)
            .env("CNI_NETNS", sys::netns_path(&netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"))
            .env("CNI_PATH", &cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", exe.display()))?;
        child.stdin.take().expect("piped").write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let err: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            bail!(
                "{ty} {command} failed: {} {}",
                err.get("msg").and_then(Value::as_str).unwrap_or_default(),
                err.get("details").and_then(Value::as_str).unwrap_or(&String::from_utf8_lossy(&out.stderr))
            );
        }
        if command == "ADD" {
            prev = serde_json::from_slice(&out.stdout).with_context(|| format!("{ty} printed no CNI result"))?;
        }
    }
    Ok(prev)
}

/// One request to a node agent: a JSON line out, a JSON line back.
pub fn agent(lab: &Lab, node: &str, req: &Value) -> anyhow::Result<Value> {
    let path = lab.agent_socket(node);
    let mut s =
        UnixStream::connect(&path).with_context(|| format!("connecting to {node}'s agent {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("{node}'s agent answered {line:?}"))
}

async fn wait_enrolled(lab: &Lab, node: &str, namespace: &str, name: &str, want: bool) -> anyhow::Result<()> {
    let uid = format!("Kubernetes//v1/Pod/{namespace}/{name}");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let list = agent(lab, node, &json!({"op": "list"}))?;
        let me = list["pods"].as_array().into_iter().flatten().find(|p| p["uid"] == uid.as_str()).cloned();
        if let Some(p) = &me {
            if p["enrolled"] == want {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let why =
                me.and_then(|p| p["reason"].as_str().map(String::from)).unwrap_or_else(|| "not registered".into());
            bail!("pod {namespace}/{name} on {node}: expected enrolled={want}, ztunnel says: {why}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lab has no DNS server: each pod gets `/etc/netns/<netns>/hosts` (which `ip netns exec`
/// mounts over /etc/hosts) naming every Service, short names for its own namespace.
pub async fn write_hosts(lab: &Lab, client: &Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    let services = client.ok(Method::GET, "/api/v1/services", None).await?.body;
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
    if let Some(ip) = lab.pod(namespace, name).and_then(|p| p.ip) {
        text.push_str(&format!("{ip} {name}\n"));
    }
    for s in services["items"].as_array().into_iter().flatten() {
        let (Some(sname), Some(sns)) = (
            s.pointer("/metadata/name").and_then(Value::as_str),
            s.pointer("/metadata/namespace").and_then(Value::as_str),
        ) else {
            continue;
        };
        let Some(vip) = s.pointer("/spec/clusterIP").and_then(Value::as_str).filter(|v| *v != "None") else { continue };
        let short = if sns == namespace { format!(" {sname}") } else { String::new() };
        text.push_str(&format!("{vip} {sname}.{sns}.svc.cluster.local {sname}.{sns}{short}\n"));
    }
    let dir = Path::new("/etc/netns").join(lab.pod_netns(namespace, name));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("hosts"), text)?;
    Ok(())
}
