//! End to end: `meshctl lab` with the real binaries, as root. One test, because each step builds
//! on the last: up, exec, every inspection command checked against the live lab, a deny policy,
//! `analyze --live`, down leaving nothing, and a second round that recovers from a crash.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../../ztunnel/tests/netlab/cargo.rs"]
mod cargo;

const PREFIX: &str = "trlt";
const UNDERLAY: &str = "172.28.0.0";

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_meshctl")).parent().expect("target dir").to_path_buf()
}

/// The lab runs the other binaries; build them into the same target directory.
fn build_binaries() {
    let mut cmd = cargo::nested_cargo();
    cmd.args(["build", "-q", "-p", "istiod-lite", "-p", "ztunnel", "-p", "trellis-cni", "-p", "trellis-echo"]);
    if bin_dir().ends_with("release") {
        cmd.arg("--release");
    }
    assert!(cmd.status().expect("cargo").success(), "building the lab's binaries failed");
}

struct Lab {
    state: PathBuf,
    api: String,
    _dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Also after a failed assertion: leave nothing behind.
        let _ = self.run(&["lab", "down"]);
    }
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Lab { state: dir.path().join("lab"), api: format!("127.0.0.1:{port}"), _dir: dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        cmd.arg("--server").arg(format!("http://{}", self.api));
        match args.split_first() {
            // Before the subcommand: `exec` passes everything after `--` to the pod.
            Some((&"lab", rest)) => cmd.arg("lab").arg("--state-dir").arg(&self.state).args(rest),
            _ => cmd.args(args),
        };
        cmd.output().expect("meshctl")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "meshctl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let text = self.ok(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("meshctl {}: {e}: {text}", args.join(" ")))
    }

    fn up(&self, extra: &[&str]) -> Output {
        let mut args = vec!["lab", "up", "--prefix", PREFIX, "--underlay", UNDERLAY, "--pod-net", "10.246.0.0"];
        args.extend(["--api-addr", &self.api]);
        args.extend(extra);
        let bin = bin_dir();
        args.extend(["--bin-dir", bin.to_str().unwrap()]);
        self.run(&args)
    }

    fn curl(&self, url: &str) -> Result<Value, String> {
        let out = self.run(&["lab", "exec", "demo/client", "--", "curl", "-sS", "--max-time", "3", url]);
        if !out.status.success() {
            return Err(format!("{:?}: {}", out.status.code(), stdout_of(&out)));
        }
        Ok(serde_json::from_slice(&out.stdout).expect("echo answers JSON"))
    }

    fn apply(&self, yaml: &str) {
        let f = self.state.parent().unwrap().join("obj.yaml");
        std::fs::write(&f, yaml).unwrap();
        self.ok(&["apply", "-f", f.to_str().unwrap()]);
    }

    fn delete(&self, yaml: &str) {
        let f = self.state.parent().unwrap().join("obj.yaml");
        std::fs::write(&f, yaml).unwrap();
        self.ok(&["delete", "-f", f.to_str().unwrap()]);
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stdout_of(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn lab_netns() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .map(String::from)
        .collect()
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: demo}\n\
spec:\n  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/demo/sa/client]}\n";
const ORPHAN: &str =
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: orphan, namespace: demo}\n\
spec: {selector: {matchLabels: {app: nothing}}, rules: [{}]}\n";

#[test]
fn lab_up_inspect_and_down() {
    build_binaries();
    let lab = Lab::new();

    // Not root: one sentence saying why, and nothing created. The binary is copied where an
    // unprivileged user can run it, whatever the checkout's permissions.
    let copy = PathBuf::from(format!("/tmp/meshctl-nonroot-{}", std::process::id()));
    std::fs::copy(env!("CARGO_BIN_EXE_meshctl"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let user = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .args(["lab", "--state-dir"])
        .arg(&lab.state)
        .arg("up")
        .output()
        .expect("setpriv");
    let _ = std::fs::remove_file(&copy);
    assert!(!user.status.success() && stdout_of(&user).contains("meshctl lab needs root"), "{}", stdout_of(&user));
    assert!(!lab.state.exists());

    // ---- up, and up again -------------------------------------------------------------------
    let out = lab.up(&["--sample"]);
    let text = stdout_of(&out);
    assert!(out.status.success(), "lab up: {text}");
    for want in [
        "ztunnel/node1",
        "ztunnel/node2",
        "echo-v2",
        "spiffe://cluster.local/ns/demo/sa/client",
        "Namespaces in the mesh: demo",
    ] {
        assert!(text.contains(want), "summary lacks {want:?}: {text}");
    }
    let again = lab.up(&["--sample"]);
    assert!(again.status.success() && stdout_of(&again).contains("already up"), "{}", stdout_of(&again));
    let resize = lab.up(&["--nodes", "3"]);
    assert!(!resize.status.success() && stdout_of(&resize).contains("lab down"), "{}", stdout_of(&resize));
    // Another state dir cannot take the same names.
    let other = tempfile::tempdir().unwrap();
    let conflict = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["lab", "up", "--prefix", PREFIX, "--state-dir"])
        .arg(other.path().join("lab"))
        .output()
        .unwrap();
    let msg = stdout_of(&conflict);
    assert!(!conflict.status.success() && msg.contains(lab.state.to_str().unwrap()), "{msg}");

    let status = lab.json(&["lab", "status"]);
    let pods = status["pods"].as_array().unwrap().clone();
    assert_eq!(pods.len(), 3);
    assert!(pods.iter().all(|p| p["enrolled"] == true && p["app"]["running"] == true), "{status}");
    let ip_of = |name: &str| pods.iter().find(|p| p["name"] == name).unwrap()["ip"].as_str().unwrap().to_string();

    // ---- exec -------------------------------------------------------------------------------
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let r = lab.curl("http://echo/").expect("client reaches echo");
        assert_eq!(r["namespace"], "demo");
        served.insert(r["pod"].as_str().unwrap().to_string());
    }
    assert_eq!(served.into_iter().collect::<Vec<_>>(), ["echo-v1", "echo-v2"], "both nodes' echo pods serve");
    let code = lab.run(&["lab", "exec", "demo/client", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code.status.code(), Some(7), "exit code passes through");
    let unknown = lab.run(&["lab", "exec", "demo/nope", "--", "true"]);
    assert!(!unknown.status.success() && stdout_of(&unknown).contains("no pod demo/nope"), "{}", stdout_of(&unknown));

    // ---- ztunnel-config against the live lab ------------------------------------------------
    let workloads = lab.json(&["ztunnel-config", "workloads"]);
    for (name, sa) in [("client", "client"), ("echo-v1", "echo"), ("echo-v2", "echo")] {
        let w = workloads.as_array().unwrap().iter().find(|w| w["name"] == name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(w["addresses"][0], ip_of(name).as_str());
        assert_eq!(w["identity"], format!("spiffe://cluster.local/ns/demo/sa/{sa}").as_str());
        assert_eq!(w["protocol"], "HBONE");
    }
    let services = lab.json(&["ztunnel-config", "services", "--node", "node2"]);
    let echo = services.as_array().unwrap().iter().find(|s| s["name"] == "echo").unwrap();
    assert_eq!(echo["vips"][0], "10.96.0.20");
    assert_eq!(echo["endpoints"].as_array().unwrap().len(), 2);
    let certs = lab.json(&["ztunnel-config", "certificates"]);
    let held = |node: &str| -> Vec<String> {
        certs
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["node"] == node)
            .map(|c| c["identity"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(held("node1"), ["spiffe://cluster.local/ns/demo/sa/client", "spiffe://cluster.local/ns/demo/sa/echo"]);
    assert_eq!(held("node2"), ["spiffe://cluster.local/ns/demo/sa/echo"]);
    let conns = lab.json(&["ztunnel-config", "connections"]);
    let seen = |node: &str, direction: &str, dst: &str| {
        conns.as_array().unwrap().iter().any(|c| {
            c["node"] == node
                && c["direction"] == direction
                && c["dst_workload"] == dst
                && c["src_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
                && c["dst_identity"] == "spiffe://cluster.local/ns/demo/sa/echo"
                && c["mtls"] == true
        })
    };
    assert!(seen("node1", "outbound", "demo/echo-v2") && seen("node2", "inbound", "demo/echo-v2"), "{conns:#}");
    let table = lab.ok(&["ztunnel-config", "connections", "--node", "node2"]);
    assert!(table.contains("SOURCE-IDENTITY") && !table.contains("node1"), "{table}");

    // ---- proxy-status -----------------------------------------------------------------------
    let ps = lab.json(&["proxy-status"]);
    let mut names: Vec<&str> = ps.as_array().unwrap().iter().map(|p| p["node_name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["node1", "node2"]);
    for p in ps.as_array().unwrap() {
        let types = p["types"].as_object().unwrap();
        assert!(types.contains_key("type.googleapis.com/istio.workload.Address"), "{p}");
        for (t, s) in types {
            assert!(s["last_nack"].is_null(), "{t}: {s}");
            assert_eq!(s["acked_version"], s["sent_version"], "{t} acked");
        }
    }
    assert!(lab.ok(&["proxy-status"]).contains("SYNCED"));

    // ---- a deny policy: ztunnels get it, describe explains it, traffic stops -----------------
    lab.apply(DENY);
    wait_for("client denied", || lab.curl("http://echo/").is_err());
    let policies = lab.json(&["ztunnel-config", "policies"]);
    assert!(
        policies.as_array().unwrap().iter().any(|p| p["name"] == "demo/deny-client" && p["action"] == "DENY"),
        "{policies}"
    );
    let d = lab.json(&["x", "describe", "pod", "demo/echo-v1"]);
    assert_eq!(d["identity"], "spiffe://cluster.local/ns/demo/sa/echo");
    assert_eq!(d["enrolled"], true);
    assert_eq!(d["ztunnel"]["enrolled"], true, "{d}");
    assert_eq!(d["authorization"]["policies"][0]["name"], "demo/deny-client");
    assert!(d["authorization"]["verdict"].as_str().unwrap().contains("DENY"), "{d}");
    assert_eq!(d["services"][0]["name"], "demo/echo");
    let client = lab.json(&["x", "describe", "pod", "demo/client"]);
    assert_eq!(client["authorization"]["policies"].as_array().unwrap().len(), 0, "the policy selects echo only");
    assert_eq!(client["services"].as_array().unwrap().len(), 0);
    lab.delete(DENY);
    wait_for("client allowed again", || lab.curl("http://echo/").is_ok());

    // ---- analyze --live ---------------------------------------------------------------------
    assert!(lab.ok(&["analyze", "--live"]).contains("No problems found"));
    lab.apply(ORPHAN);
    let found = lab.run(&["analyze", "--live", "-o", "json"]);
    assert_eq!(found.status.code(), Some(1));
    let f: Value = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(f[0]["code"], "TR0101");
    assert_eq!(f[0]["resource"], "AuthorizationPolicy demo/orphan");
    lab.delete(ORPHAN);

    // ---- down leaves nothing ----------------------------------------------------------------
    let mut pids: Vec<u64> = vec![status["istiod"]["pid"].as_u64().unwrap()];
    pids.extend(status["nodes"].as_array().unwrap().iter().map(|n| n["ztunnel"]["pid"].as_u64().unwrap()));
    pids.extend(pods.iter().map(|p| p["app"]["pid"].as_u64().unwrap()));
    let down = lab.ok(&["lab", "down"]);
    assert!(down.contains("Lab removed"), "{down}");
    assert_eq!(lab_netns(), Vec::<String>::new());
    assert!(!Path::new(&format!("/sys/class/net/{PREFIX}-lab")).exists(), "host link left");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(lab.state.to_str().unwrap()), "bpffs left mounted");
    assert!(!lab.state.exists(), "state dir left");
    assert!(!std::fs::read_dir("/etc/netns")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(PREFIX)))
        .unwrap_or(false));
    std::thread::sleep(Duration::from_millis(300));
    let live: Vec<u64> = pids.into_iter().filter(|p| pid_alive(*p)).collect();
    assert!(live.is_empty(), "processes left: {live:?}");
    assert!(lab.ok(&["lab", "down"]).contains("nothing to remove"));
    let stopped = lab.run(&["lab", "exec", "demo/client", "--", "true"]);
    assert!(!stopped.status.success() && stdout_of(&stopped).contains("no lab in"), "{}", stdout_of(&stopped));

    // ---- a second round, a crash, and recovery ----------------------------------------------
    assert!(lab.up(&["--sample"]).status.success(), "second lab up");
    lab.curl("http://echo/").expect("second lab serves");
    let status = lab.json(&["lab", "status"]);
    let ztunnel1 = status["nodes"][0]["ztunnel"]["pid"].as_u64().unwrap();
    Command::new("kill").args(["-KILL", &ztunnel1.to_string()]).status().unwrap();
    wait_for("ztunnel gone", || !pid_alive(ztunnel1));
    let sick = lab.run(&["lab", "status"]);
    assert!(
        !sick.status.success() && stdout_of(&sick).contains("ztunnel on node1 is not running"),
        "{}",
        stdout_of(&sick)
    );
    let recovered = lab.up(&["--sample"]);
    let text = stdout_of(&recovered);
    assert!(recovered.status.success() && text.contains("Found a broken lab"), "{text}");
    lab.curl("http://echo/").expect("recovered lab serves");
    lab.ok(&["lab", "down"]);
    assert_eq!(lab_netns(), Vec::<String>::new());
}
