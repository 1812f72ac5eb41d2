//! `trellis-cni`: the CNI 1.1 plugin that builds a pod's network on a Trellis node.
//!
//! ADD allocates an address from `podCIDR` ([`ipam`]), creates a veth pair whose host side joins
//! the node bridge `trellis0` (which holds the CIDR's first address, the pods' gateway) and whose
//! other side becomes `CNI_IFNAME` in the pod, and routes the pod's traffic via the node ([`net`]).
//! With `agentSocket` set, ADD registers the pod (`K8S_POD_NAMESPACE`/`K8S_POD_NAME` from
//! `CNI_ARGS`) with the node agent, which meshes it if its labels say so. An unreachable agent,
//! or one that cannot yet tell whether the pod is meshed, fails ADD with code 11, so a pod is
//! never started unprotected. Pods in `excludeNamespaces` (default `kube-system` and
//! `istio-system`, where the control plane runs) skip the agent. DEL unregisters, best effort.

pub mod config;
pub mod env;
pub mod error;
pub mod ipam;
pub mod net;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use config::NetConf;
use env::{Command, Env};
use error::{CniError, PLUGIN_UNAVAILABLE, TRY_AGAIN_LATER};
use ipam::Ipam;

/// The agent answers an `add` after at most a few seconds (it waits to report enrollment).
const AGENT_TIMEOUT: Duration = Duration::from_secs(15);

fn agent_reachable(path: &Path) -> Result<(), String> {
    UnixStream::connect(path).map(drop).map_err(|e| format!("node agent at {}: {e}", path.display()))
}

/// One request/answer on the node agent socket.
fn agent_call(path: &Path, req: &Value) -> Result<Value, String> {
    let at = |e: std::io::Error| format!("node agent at {}: {e}", path.display());
    let mut s = UnixStream::connect(path).map_err(at)?;
    s.set_read_timeout(Some(AGENT_TIMEOUT)).map_err(at)?;
    s.set_write_timeout(Some(AGENT_TIMEOUT)).map_err(at)?;
    s.write_all(format!("{req}\n").as_bytes()).map_err(at)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(at)?;
    let v: Value =
        serde_json::from_str(&line).map_err(|e| format!("node agent at {}: bad answer: {e}", path.display()))?;
    if v.get("ok") != Some(&Value::Bool(true)) {
        return Err(format!(
            "node agent refused the pod: {}",
            v.get("error").and_then(Value::as_str).unwrap_or("no reason given")
        ));
    }
    Ok(v)
}

/// The pod's namespace and name from `CNI_ARGS`.
fn pod_key(env: &Env) -> Result<(&str, &str), CniError> {
    match (env.args.get("K8S_POD_NAMESPACE"), env.args.get("K8S_POD_NAME")) {
        (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => Ok((ns, name)),
        _ => Err(CniError::new(
            error::INVALID_ENV,
            "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME when agentSocket is configured",
        )),
    }
}

fn ipam(conf: &NetConf) -> Ipam {
    Ipam::new(&conf.data_dir, &conf.name, conf.pod_cidr)
}

/// Runs one plugin invocation; `Ok(Some(result))` is printed on stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "1.1.0".into());
        return Ok(Some(json!({"cniVersion": version, "supportedVersions": config::SUPPORTED_VERSIONS})));
    }
    let conf = config::parse(stdin)?;
    match env.command {
        Command::Add => add(env, &conf).map(Some),
        Command::Del => del(env, &conf).map(|_| None),
        Command::Check => check(env, &conf).map(|_| None),
        Command::Status => match &conf.agent_socket {
            Some(p) => agent_reachable(p).map(|_| None).map_err(|e| CniError::new(PLUGIN_UNAVAILABLE, e)),
            None => Ok(None),
        },
        Command::Gc => ipam(&conf).gc(&conf.valid_attachments).map(|_| None),
        Command::Version => unreachable!("handled above"),
    }
}

/// The node agent socket, if this pod must be registered with it.
fn agent_for<'c>(env: &Env, conf: &'c NetConf) -> Result<Option<&'c Path>, CniError> {
    let Some(sock) = &conf.agent_socket else { return Ok(None) };
    let (namespace, _) = pod_key(env)?;
    Ok((!conf.exclude_namespaces.iter().any(|n| n == namespace)).then_some(sock.as_path()))
}

fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let prev = config::prev_result(&conf.raw)?;
    if let Some(p) = agent_for(env, conf)? {
        agent_reachable(p).map_err(|e| CniError::new(TRY_AGAIN_LATER, format!("{e}; try again later")))?;
    }
    let netns = env.netns.as_deref().ok_or_else(|| CniError::new(error::INVALID_ENV, "CNI_NETNS is required"))?;
    if !netns.exists() {
        return Err(CniError::new(error::NETNS, format!("netns {} does not exist", netns.display())));
    }
    let ip = ipam(conf).allocate(&env.container_id, &env.ifname)?;
    match wire(env, conf, netns, ip).and_then(|v| register(env, conf, netns, ip).map(|_| v)) {
        Ok(v) => Ok(chain_result(prev, v)),
        Err(e) => {
            // Leave nothing behind: no veth, no allocation.
            let host = net::host_name(&env.container_id, &env.ifname);
            let _ = net::with_netlink(None, |h| async move { net::del_veth(&h, &host).await });
            let _ = ipam(conf).release(&env.container_id, &env.ifname);
            Err(e)
        }
    }
}

fn wire(env: &Env, conf: &NetConf, netns: &Path, ip: std::net::Ipv4Addr) -> Result<Value, CniError> {
    let (gw, prefix, mtu) = (conf.gateway(), conf.pod_cidr.prefix_len(), conf.mtu);
    let host = net::host_name(&env.container_id, &env.ifname);
    let peer = format!("tmp{}", &host[3..]);
    let host_mac = {
        let host = host.clone();
        net::with_netlink(None, |h| async move {
            let br = net::ensure_bridge(&h, gw, prefix, mtu).await?;
            net::add_veth(&h, &host, br, mtu, netns).await
        })?
    };
    let ifname = env.ifname.clone();
    let pod_mac = net::with_netlink(Some(netns), |h| async move {
        net::configure_pod(&h, &peer, &ifname, ip, prefix, gw, mtu).await
    })?;
    Ok(json!({
        "cniVersion": conf.cni_version,
        "interfaces": [
            {"name": host, "mac": host_mac},
            {"name": env.ifname, "mac": pod_mac, "sandbox": netns.display().to_string()},
        ],
        "ips": [{"address": format!("{ip}/{prefix}"), "gateway": gw.to_string(), "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": gw.to_string()}],
        "dns": {},
    }))
}

/// Our ADD result amended onto `prev`, the result of the plugins before us in the chain, as the
/// CNI spec asks: their interfaces, IPs and routes first, ours after, with our IPs' interface
/// indexes shifted past theirs. Their other fields (DNS, anything newer) are kept; DNS is ours
/// only if they set none.
fn chain_result(prev: Option<&Value>, ours: Value) -> Value {
    let Some(prev) = prev else { return ours };
    let list = |v: &Value, key: &str| v.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    let mut out = prev.clone();
    let mut interfaces = list(prev, "interfaces");
    let offset = interfaces.len() as u64;
    interfaces.extend(list(&ours, "interfaces"));
    let mut ips = list(prev, "ips");
    ips.extend(list(&ours, "ips").into_iter().map(|mut ip| {
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            ip["interface"] = json!(i + offset);
        }
        ip
    }));
    let mut routes = list(prev, "routes");
    routes.extend(list(&ours, "routes"));
    out["cniVersion"] = ours["cniVersion"].clone();
    out["interfaces"] = json!(interfaces);
    out["ips"] = json!(ips);
    out["routes"] = json!(routes);
    if prev.get("dns").is_none_or(|d| d.as_object().is_none_or(|o| o.is_empty())) {
        out["dns"] = ours["dns"].clone();
    }
    out
}

/// Tells the node agent about the new pod; it decides whether to mesh it.
fn register(env: &Env, conf: &NetConf, netns: &Path, ip: std::net::Ipv4Addr) -> Result<(), CniError> {
    let Some(sock) = agent_for(env, conf)? else { return Ok(()) };
    let (namespace, name) = pod_key(env)?;
    // The control plane learns the IP only after ADD; the agent needs it to capture the pod now.
    let req = json!({"op": "add", "namespace": namespace, "name": name, "netns": netns.display().to_string(), "ip": ip,
               "container": env.container_id});
    agent_call(sock, &req).map(drop).map_err(|e| CniError::new(TRY_AGAIN_LATER, format!("{e}; try again later")))
}

fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    // Best effort: DEL must succeed even when the agent is down (it forgets pods whose netns is
    // gone when it restarts).
    if let (Ok(Some(sock)), Ok((namespace, name))) = (agent_for(env, conf), pod_key(env)) {
        let req = json!({"op": "remove", "namespace": namespace, "name": name, "container": env.container_id});
        let _ = agent_call(sock, &req);
    }
    let host = net::host_name(&env.container_id, &env.ifname);
    net::with_netlink(None, |h| async move { net::del_veth(&h, &host).await })?;
    ipam(conf).release(&env.container_id, &env.ifname)?;
    Ok(())
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let fail = |m: String| CniError::new(error::CHECK_FAILED, m);
    let ip = ipam(conf)
        .find(&env.container_id, &env.ifname)?
        .ok_or_else(|| fail(format!("no address allocated to {}/{}", env.container_id, env.ifname)))?;
    let host = net::host_name(&env.container_id, &env.ifname);
    let present = net::with_netlink(None, |h| async move { net::link(&h, &host).await.map(|l| l.is_some()) })?;
    if !present {
        return Err(fail(format!("host interface {} is missing", net::host_name(&env.container_id, &env.ifname))));
    }
    let netns = env.netns.as_deref().ok_or_else(|| CniError::new(error::INVALID_ENV, "CNI_NETNS is required"))?;
    let (ifname, gw, prefix) = (env.ifname.clone(), conf.gateway(), conf.pod_cidr.prefix_len());
    net::with_netlink(Some(netns), |h| async move { net::check_pod(&h, &ifname, ip, prefix, gw).await })
}
