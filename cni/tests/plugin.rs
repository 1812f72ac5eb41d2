//! The plugin invoked exactly as a container runtime does: `CNI_*` environment variables, the
//! config on stdin, inside the node's network namespace. Requires root.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

static N: AtomicUsize = AtomicUsize::new(0);

/// A node netns and pod netns that are deleted on drop.
struct Node {
    name: String,
    pods: Vec<String>,
    data: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain([&self.name]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(cmd: &str) -> Output {
    Command::new("bash").args(["-c", cmd]).output().unwrap()
}

impl Node {
    fn new() -> Node {
        let name = format!("cni{}x{}", std::process::id() % 100000, N.fetch_add(1, Ordering::Relaxed));
        assert!(sh(&format!("ip netns add {name} && ip -n {name} link set lo up")).status.success());
        Node { name, pods: Vec::new(), data: tempfile::tempdir().unwrap() }
    }

    fn pod(&mut self) -> String {
        let p = format!("{}p{}", self.name, self.pods.len());
        assert!(sh(&format!("ip netns add {p}")).status.success());
        self.pods.push(p.clone());
        p
    }

    fn conf(&self, cidr: &str, extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"trellis","type":"trellis-cni","podCIDR":"{cidr}","dataDir":"{}","mtu":1450{extra}}}"#,
            self.data.path().display()
        )
    }

    /// Runs the plugin; returns (exit success, parsed stdout or Null).
    fn cni(&self, command: &str, container: &str, netns: &str, conf: &str) -> (bool, Value) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_trellis-cni")])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", if netns.is_empty() { String::new() } else { format!("/var/run/netns/{netns}") })
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=p")
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), v)
    }

    fn allocations(&self) -> Vec<String> {
        let dir: PathBuf = self.data.path().join("trellis");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("10.")).collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn links(&self) -> String {
        String::from_utf8_lossy(&sh(&format!("ip -n {} -o link show", self.name)).stdout).into_owned()
    }
}

#[test]
fn add_check_del_gc_between_two_pods() {
    let mut node = Node::new();
    let conf = node.conf("10.250.1.0/24", "");
    let (a, b) = (node.pod(), node.pod());
    let (ok, ra) = node.cni("ADD", "ca", &a, &conf);
    assert!(ok, "{ra}");
    let (ok, rb) = node.cni("ADD", "cb", &b, &conf);
    assert!(ok, "{rb}");
    assert_eq!(ra["cniVersion"], "1.1.0");
    assert_eq!(ra["ips"][0]["address"], "10.250.1.2/24");
    assert_eq!(ra["ips"][0]["gateway"], "10.250.1.1");
    assert_eq!(ra["ips"][0]["interface"], 1);
    assert_eq!(ra["interfaces"][1]["name"], "eth0");
    assert_eq!(ra["interfaces"][1]["sandbox"], format!("/var/run/netns/{a}"));
    assert_eq!(ra["routes"][0]["gw"], "10.250.1.1");
    assert_eq!(rb["ips"][0]["address"], "10.250.1.3/24");

    // The pods reach each other over the veths and the node bridge.
    let ip_a = "10.250.1.2";
    let mut server = Command::new("ip")
        .args(["netns", "exec", &a, "python3", "-c"])
        .arg("import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',7000));s.listen();c,_=s.accept();c.sendall(b'pong')")
        .spawn()
        .unwrap();
    let mut got = String::new();
    for _ in 0..50 {
        let out = sh(&format!("ip netns exec {b} bash -c 'exec 3<>/dev/tcp/{ip_a}/7000; cat <&3'"));
        got = String::from_utf8_lossy(&out.stdout).into_owned();
        if got == "pong" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(got, "pong");
    assert!(sh(&format!("ip netns exec {a} ip route show default | grep -q 'via 10.250.1.1'")).status.success());
    assert!(sh(&format!("ip netns exec {a} ip link show eth0 | grep -q 'mtu 1450'")).status.success());

    // CHECK passes, and notices a removed address.
    assert!(node.cni("CHECK", "ca", &a, &conf).0);
    assert!(sh(&format!("ip -n {a} addr flush dev eth0")).status.success());
    let (ok, err) = node.cni("CHECK", "ca", &a, &conf);
    assert!(!ok && err["code"] == 104 && err["msg"].as_str().unwrap().contains("10.250.1.2"), "{err}");

    // DEL releases and is idempotent; DEL after the netns is gone succeeds too.
    assert!(node.cni("DEL", "ca", &a, &conf).0);
    assert!(node.cni("DEL", "ca", &a, &conf).0);
    assert_eq!(node.allocations(), vec!["10.250.1.3"]);
    assert!(sh(&format!("ip netns del {b}")).status.success());
    assert!(node.cni("DEL", "cb", &b, &conf).0);
    assert!(node.allocations().is_empty());
    assert!(!node.links().contains("trl"), "veths leaked: {}", node.links());

    // GC releases allocations the runtime no longer lists.
    let (c, d) = (node.pod(), node.pod());
    assert!(node.cni("ADD", "cc", &c, &conf).0);
    assert!(node.cni("ADD", "cd", &d, &conf).0);
    assert_eq!(node.allocations().len(), 2);
    let gc = node.conf("10.250.1.0/24", r#","cni.dev/valid-attachments":[{"containerID":"cd","ifname":"eth0"}]"#);
    assert!(node.cni("GC", "", "", &gc).0);
    assert_eq!(node.allocations().len(), 1);
    assert!(node.cni("CHECK", "cd", &d, &conf).0, "GC must keep valid attachments");
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    let mut node = Node::new();
    let conf = node.conf("10.250.2.0/24", "");
    let pods: Vec<String> = (0..8).map(|_| node.pod()).collect();
    let node = &node;
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let conf = conf.clone();
                s.spawn(move || {
                    let (ok, r) = node.cni("ADD", &format!("c{i}"), p, &conf);
                    assert!(ok, "{r}");
                    r["ips"][0]["address"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 8, "{ips:?}");
}

#[test]
fn bad_input_fails_cleanly() {
    let mut node = Node::new();
    let p = node.pod();

    // Invalid config: code 7, naming the field.
    let (ok, e) = node.cni("ADD", "c1", &p, &node.conf("10.250.3.0/33", ""));
    assert!(!ok && e["code"] == 7 && e["msg"].as_str().unwrap().starts_with("podCIDR"), "{e}");
    // Bad environment: code 4.
    let (ok, e) = node.cni("ADD", "c1", "", &node.conf("10.250.3.0/24", ""));
    assert!(!ok && e["code"] == 4 && e["msg"].as_str().unwrap().contains("CNI_NETNS"), "{e}");
    // VERSION.
    let (ok, v) = node.cni("VERSION", "", "", r#"{"cniVersion":"1.0.0"}"#);
    assert!(ok && v["supportedVersions"] == serde_json::json!(["1.0.0", "1.1.0"]), "{v}");

    // An exhausted CIDR is named, and nothing leaks.
    let small = node.conf("10.250.3.0/30", "");
    assert!(node.cni("ADD", "c1", &p, &small).0);
    let q = node.pod();
    let (ok, e) = node.cni("ADD", "c2", &q, &small);
    assert!(!ok && e["code"] == 100 && e["msg"].as_str().unwrap().contains("10.250.3.0/30"), "{e}");
    assert_eq!(node.allocations(), vec!["10.250.3.2"]);

    // A netns that does not exist: an error, and no allocation or veth left behind.
    let (ok, e) = node.cni("ADD", "c3", "no-such-netns", &node.conf("10.250.4.0/24", ""));
    assert!(!ok && e["code"] == 101, "{e}");
    assert_eq!(node.allocations(), vec!["10.250.3.2"]);
    assert_eq!(node.links().matches("trl").count(), 1, "{}", node.links());

    // With an agent socket configured, an unreachable agent fails ADD closed (11) and STATUS (50);
    // a listening agent makes STATUS succeed.
    let sock = node.data.path().join("agent.sock");
    let agent = node.conf("10.250.5.0/24", &format!(r#","agentSocket":"{}""#, sock.display()));
    let (ok, e) = node.cni("ADD", "c4", &q, &agent);
    assert!(!ok && e["code"] == 11, "{e}");
    assert!(node.allocations().iter().all(|a| !a.starts_with("10.250.5.")));
    // ... unless the pod's namespace is excluded (where the control plane itself runs): it starts
    // without the agent.
    let excluded =
        node.conf("10.250.5.0/24", &format!(r#","agentSocket":"{}","excludeNamespaces":["demo"]"#, sock.display()));
    let (ok, r) = node.cni("ADD", "c4", &q, &excluded);
    assert!(ok && r["ips"][0]["address"] == "10.250.5.2/24", "{r}");
    assert!(node.cni("DEL", "c4", &q, &excluded).0);
    assert!(node.allocations().iter().all(|a| !a.starts_with("10.250.5.")));
    let (ok, e) = node.cni("STATUS", "", "", &agent);
    assert!(!ok && e["code"] == 50, "{e}");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert!(node.cni("STATUS", "", "", &agent).0);

    // ADD registers the pod with the agent; a refusal fails ADD (11) and leaks nothing.
    let answer = |reply: &'static str| {
        let l = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            // Reachability probes (STATUS, the start of ADD) connect and close without a request.
            loop {
                let (mut s, _) = l.accept().unwrap();
                let mut line = String::new();
                std::io::BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
                if line.is_empty() {
                    continue;
                }
                s.write_all(reply.as_bytes()).unwrap();
                return serde_json::from_str::<Value>(&line).unwrap();
            }
        })
    };
    let agent_thread = answer("{\"ok\":false,\"error\":\"no such pod\"}\n");
    let (ok, e) = node.cni("ADD", "c5", &q, &agent);
    assert!(!ok && e["code"] == 11 && e["msg"].as_str().unwrap().contains("no such pod"), "{e}");
    agent_thread.join().unwrap();
    assert!(node.allocations().iter().all(|a| !a.starts_with("10.250.5.")));
    assert_eq!(node.links().matches("trl").count(), 1, "{}", node.links());
    let agent_thread = answer("{\"ok\":true,\"pods\":[]}\n");
    let (ok, r) = node.cni("ADD", "c6", &q, &agent);
    assert!(ok, "{r}");
    let req = agent_thread.join().unwrap();
    assert_eq!(
        (req["op"].as_str(), req["namespace"].as_str(), req["name"].as_str()),
        (Some("add"), Some("demo"), Some("p"))
    );
    assert_eq!(req["netns"].as_str(), Some(format!("/var/run/netns/{q}").as_str()));
    assert_eq!(req["container"].as_str(), Some("c6"), "the sandbox, so a late DEL of an older one is told apart");
}

/// A bridge left to itself takes the lowest MAC among its ports, so a new pod could change the
/// gateway's address under every other pod (whose traffic off the node then stalls until ARP
/// notices). The plugin's bridge has a fixed address, and one it finds already there is pinned
/// as it is.
#[test]
fn the_bridge_keeps_its_mac_when_ports_join() {
    let mac_of = |node: &Node, dev: &str| {
        let out = sh(&format!("ip -n {} -o link show {dev}", node.name));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).unwrap_or_default().to_string()
    };
    // A port whose MAC is below any other: the one a bridge would otherwise take.
    let join_low_port = |node: &Node, name: &str| {
        let cmd = format!(
            "ip -n {n} link add {name} address 02:00:00:00:00:01 type veth peer name {name}p && \
             ip -n {n} link set {name} master trellis0 up",
            n = node.name
        );
        assert!(sh(&cmd).status.success());
    };

    let mut node = Node::new();
    let conf = node.conf("10.250.1.0/24", "");
    let a = node.pod();
    assert!(node.cni("ADD", "ca", &a, &conf).0);
    assert_eq!(mac_of(&node, "trellis0"), "0a:58:0a:fa:01:01", "derived from the gateway 10.250.1.1");
    join_low_port(&node, "low0");
    assert_eq!(mac_of(&node, "trellis0"), "0a:58:0a:fa:01:01", "a port changed the bridge's MAC");
    let b = node.pod();
    assert!(node.cni("ADD", "cb", &b, &conf).0);
    assert_eq!(mac_of(&node, "trellis0"), "0a:58:0a:fa:01:01");

    // A bridge that already exists and follows its ports keeps the address it has now.
    let mut old = Node::new();
    let cmd = format!("ip -n {n} link add trellis0 type bridge && ip -n {n} link set trellis0 up", n = old.name);
    assert!(sh(&cmd).status.success());
    let before = mac_of(&old, "trellis0");
    let c = old.pod();
    assert!(old.cni("ADD", "cc", &c, &old.conf("10.250.1.0/24", "")).0);
    assert_eq!(mac_of(&old, "trellis0"), before, "pinning must not change the address pods have cached");
    join_low_port(&old, "low1");
    assert_eq!(mac_of(&old, "trellis0"), before, "the existing bridge still follows its ports");
}

/// Placed after another plugin, ADD amends that plugin's result instead of replacing it.
#[test]
fn add_amends_the_previous_plugins_result() {
    let mut node = Node::new();
    let prev = r#","prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"macvlan0"}],"ips":[{"address":"192.0.2.5/24","interface":0}],"routes":[{"dst":"192.0.2.0/24"}],"dns":{"nameservers":["192.0.2.53"]},"custom":"kept"}"#;
    let conf = node.conf("10.250.3.0/24", prev);
    let pod = node.pod();
    let (ok, r) = node.cni("ADD", "cp", &pod, &conf);
    assert!(ok, "{r}");
    let names: Vec<&str> = r["interfaces"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{r}");
    assert_eq!((names[0], names[2]), ("macvlan0", "eth0"));
    assert_eq!(r["ips"][0]["address"], "192.0.2.5/24");
    assert_eq!(r["ips"][1]["address"], "10.250.3.2/24");
    assert_eq!(r["ips"][1]["interface"], 2, "our pod interface, after the earlier plugin's");
    assert_eq!(r["routes"][0]["dst"], "192.0.2.0/24");
    assert_eq!(r["routes"][1]["dst"], "0.0.0.0/0");
    assert_eq!(r["dns"]["nameservers"][0], "192.0.2.53");
    assert_eq!(r["custom"], "kept");
    assert_eq!(r["cniVersion"], "1.1.0");

    // A prevResult that is not a result is refused, naming it, and nothing is left behind.
    let bad = node.conf("10.250.3.0/24", r#","prevResult":{"ips":"192.0.2.5"}"#);
    let other = node.pod();
    let (ok, e) = node.cni("ADD", "cq", &other, &bad);
    assert!(!ok);
    assert!(e["msg"].as_str().unwrap().starts_with("prevResult.ips"), "{e}");
    assert_eq!(node.allocations(), ["10.250.3.2"]);

    // DEL is handed prevResult too, and succeeds whatever it holds: a failed DEL would leak the
    // veth and the address while the runtime retries forever.
    let (ok, e) = node.cni("DEL", "cp", &pod, &bad);
    assert!(ok, "{e}");
    assert!(node.allocations().is_empty());
}
