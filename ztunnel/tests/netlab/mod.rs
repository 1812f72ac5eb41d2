//! A throwaway multi-node network built from network namespaces, for end-to-end tests with the
//! real binaries.
//!
//! ```text
//!  <p>u (underlay): br0 172.30.0.1/24, istiod-lite
//!    ├─ veth ─ <p>n1 (node1): eth0 172.30.0.11, cni0 10.244.1.1/24, ztunnel ─ pods 10.244.1.x
//!    └─ veth ─ <p>n2 (node2): eth0 172.30.0.12, cni0 10.244.2.1/24, ztunnel ─ pods 10.244.2.x
//! ```
//!
//! Every namespace has a per-lab prefix, so labs run in parallel without colliding, and nothing
//! touches the host's own namespace. Dropping the lab kills its processes and deletes its
//! namespaces (with every link in them), also when the test panics.
#![allow(dead_code)]

mod cargo;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

pub const ISTIOD_IP: &str = "172.30.0.1";
/// Bridges get fixed MACs (as trellis-cni's does): one left to itself takes its lowest port's MAC,
/// so a pod added mid-test could change the gateway's address under the others and stall them.
const UNDERLAY_MAC: &str = "0a:58:ac:1e:00:01";

static BUILD: Once = Once::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ztunnel")).parent().expect("target dir").to_path_buf()
}

/// istiod-lite and meshctl live in other packages: make sure they are built and current.
fn ensure_binaries() {
    BUILD.call_once(|| {
        let profile = if target_dir().ends_with("release") { vec!["--release"] } else { vec![] };
        let st = cargo::nested_cargo()
            .args(["build", "-q", "-p", "istiod-lite", "-p", "meshctl", "-p", "trellis-cni"])
            .args(profile)
            .status()
            .expect("running cargo build");
        assert!(st.success(), "building istiod-lite, meshctl and trellis-cni failed");
    });
}

pub fn bin(name: &str) -> PathBuf {
    if name == "ztunnel" {
        return PathBuf::from(env!("CARGO_BIN_EXE_ztunnel"));
    }
    ensure_binaries();
    target_dir().join(name)
}

/// The stdout of a command that must have succeeded; panics with its output otherwise.
fn stdout_ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "`{what}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell command on the host and panics with its output if it fails.
pub fn sh(cmd: &str) -> String {
    stdout_ok(cmd, Command::new("bash").args(["-c", cmd]).output().expect("bash"))
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Pod {
    pub netns: String,
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub node: usize,
}

pub struct Lab {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    namespaces: Mutex<Vec<String>>,
    procs: Mutex<Vec<(String, Child)>>,
    nodes: usize,
    veths: AtomicUsize,
}

/// A bpffs shared by the tests' ztunnels (each under its own directory).
pub const BPFFS: &str = "/run/trellis-test-bpf";

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        }
        for i in 1..=self.nodes {
            let _ = std::fs::remove_dir_all(Path::new(BPFFS).join(format!("{}n{i}", self.prefix)));
        }
    }
}

impl Lab {
    /// The underlay and `nodes` nodes, routed to each other's pod CIDRs.
    pub fn new(nodes: usize) -> Lab {
        Lab::build(nodes, true)
    }

    /// The underlay and `nodes` bare nodes: no pod bridge and no pod routes. `trellis-cni` and
    /// the overlay build those.
    pub fn bare(nodes: usize) -> Lab {
        Lab::build(nodes, false)
    }

    fn build(nodes: usize, static_pod_network: bool) -> Lab {
        let prefix = format!("tr{}x{}", std::process::id() % 100000, COUNTER.fetch_add(1, Ordering::Relaxed));
        let lab = Lab {
            prefix,
            dir: tempfile::tempdir().expect("tempdir"),
            namespaces: Mutex::default(),
            procs: Mutex::default(),
            nodes,
            veths: AtomicUsize::new(0),
        };
        let u = lab.underlay();
        lab.add_netns(&u);
        sh(&format!(
            "ip -n {u} link set lo up && ip -n {u} link add br0 address {UNDERLAY_MAC} type bridge && ip -n {u} addr add {ISTIOD_IP}/24 dev br0 && ip -n {u} link set br0 up"
        ));
        for i in 1..=nodes {
            let n = lab.node(i);
            lab.add_netns(&n);
            sh(&format!(
                "ip -n {u} link add n{i} type veth peer name eth0 netns {n} && ip -n {u} link set n{i} master br0 up && \
                 ip -n {n} link set lo up && ip -n {n} addr add 172.30.0.{}/24 dev eth0 && ip -n {n} link set eth0 up",
                10 + i
            ));
            if !static_pod_network {
                continue;
            }
            sh(&format!(
                "ip -n {n} link add cni0 address 0a:58:0a:f4:{i:02x}:01 type bridge && ip -n {n} addr add 10.244.{i}.1/24 dev cni0 && \
                 ip -n {n} link set cni0 up && ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1 && \
                 ip -n {u} route add 10.244.{i}.0/24 via 172.30.0.{}",
                10 + i
            ));
            for j in (1..=nodes).filter(|j| *j != i) {
                sh(&format!("ip -n {n} route add 10.244.{j}.0/24 via 172.30.0.{}", 10 + j));
            }
        }
        lab
    }

    fn add_netns(&self, name: &str) {
        sh(&format!("ip netns add {name}"));
        self.namespaces.lock().unwrap().push(name.to_string());
    }

    pub fn underlay(&self) -> String {
        format!("{}u", self.prefix)
    }

    pub fn node(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    /// Starts a process inside a network namespace; it is killed when the lab is dropped.
    pub fn spawn(&self, label: &str, netns: &str, program: &Path, args: &[&str]) -> u32 {
        self.spawn_env(label, netns, program, args, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables.
    pub fn spawn_env(&self, label: &str, netns: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> u32 {
        let log = std::fs::File::create(self.dir.path().join(format!("{label}.log"))).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn");
        let pid = child.id();
        self.procs.lock().unwrap().push((label.to_string(), child));
        pid
    }

    /// Stops a process started with [`spawn`](Self::spawn): SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&self, label: &str) {
        let mut procs = self.procs.lock().unwrap();
        let Some(i) = procs.iter().position(|(l, _)| l == label) else { return };
        let (_, mut child) = procs.remove(i);
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn pid(&self, label: &str) -> Option<u32> {
        self.procs.lock().unwrap().iter().find(|(l, _)| l == label).map(|(_, c)| c.id())
    }

    /// Whether a process started with [`spawn`](Self::spawn) has exited.
    pub fn exited(&self, label: &str) -> bool {
        let mut procs = self.procs.lock().unwrap();
        let child = procs.iter_mut().find(|(l, _)| l == label).map(|(_, c)| c);
        child.is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{label}.log"))).unwrap_or_default()
    }

    /// Runs a command inside a network namespace.
    pub fn exec(&self, netns: &str, cmd: &str) -> Output {
        Command::new("ip").args(["netns", "exec", netns, "bash", "-c", cmd]).output().expect("ip netns exec")
    }

    pub fn exec_ok(&self, netns: &str, cmd: &str) -> String {
        stdout_ok(&format!("{cmd} (in {netns})"), self.exec(netns, cmd))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("istiod")
    }

    pub fn start_istiod(&self) {
        let state = self.state_dir();
        let state = state.to_str().unwrap();
        self.spawn(
            "istiod",
            &self.underlay(),
            &bin("istiod-lite"),
            &[
                "--state-dir",
                state,
                "--api-addr",
                &format!("{ISTIOD_IP}:15014"),
                "--xds-addr",
                &format!("{ISTIOD_IP}:15010"),
                "--secure-addr",
                &format!("{ISTIOD_IP}:15012"),
            ],
        );
        let u = self.underlay();
        wait_for("istiod-lite /ready", Duration::from_secs(20), || {
            self.exec(&u, &format!("curl -sf http://{ISTIOD_IP}:15014/ready")).status.success().then_some(())
        });
    }

    pub fn meshctl(&self, args: &str, stdin: &str) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.underlay()])
            .arg(bin("meshctl"))
            .args(["--server", &format!("http://{ISTIOD_IP}:15014")])
            .args(args.split_whitespace())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("meshctl");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    pub fn apply(&self, yaml: &str) {
        let out = self.meshctl("apply -f -", yaml);
        assert!(out.status.success(), "meshctl apply failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn delete(&self, yaml: &str) {
        let out = self.meshctl("delete -f -", yaml);
        assert!(out.status.success(), "meshctl delete failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn agent_socket(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("agent{node}.sock"))
    }

    /// A node token for node `i`, written to a file; returns the file.
    pub fn token(&self, i: usize) -> PathBuf {
        let out = self.meshctl(&format!("create token node node{i}"), "");
        assert!(out.status.success(), "token: {}", String::from_utf8_lossy(&out.stderr));
        let token = self.dir.path().join(format!("token{i}"));
        std::fs::write(&token, String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        token
    }

    /// Starts node `i`'s ztunnel and waits until it is ready.
    pub fn start_ztunnel(&self, i: usize, extra: &[&str]) {
        self.start_ztunnel_env(i, extra, &[]);
    }

    /// [`start_ztunnel`](Self::start_ztunnel) with extra environment variables.
    pub fn start_ztunnel_env(&self, i: usize, extra: &[&str], env: &[(&str, &str)]) {
        let token = self.token(i);
        self.spawn_ztunnel_env(i, &token, extra, env);
        let n = self.node(i);
        wait_for(&format!("ztunnel{i} ready"), Duration::from_secs(20), || {
            self.exec(&n, "curl -sf http://127.0.0.1:15021/healthz/ready").status.success().then_some(())
        });
    }

    /// Node `i`'s pins, on a bpffs mounted in the host's mount namespace: `ip netns exec` gives each
    /// process a fresh /sys, so /sys/fs/bpf would not outlive a ztunnel restart.
    pub fn bpf_pin_dir(&self, i: usize) -> PathBuf {
        let root = Path::new(BPFFS);
        if !Command::new("mountpoint").arg("-q").arg(root).status().is_ok_and(|s| s.success()) {
            std::fs::create_dir_all(root).unwrap();
            sh(&format!("mountpoint -q {BPFFS} || mount -t bpf bpf {BPFFS}"));
        }
        root.join(format!("{}n{i}", self.prefix))
    }

    /// Starts node `i`'s ztunnel without waiting for it.
    pub fn spawn_ztunnel(&self, i: usize, token: &Path, extra: &[&str]) {
        self.spawn_ztunnel_env(i, token, extra, &[]);
    }

    /// Starts another ztunnel on node `i`, next to the one running there, under `label`; `extra`
    /// must move its admin, metrics and readiness ports.
    /// It reads the running one's token file (a new token would revoke the running one's).
    pub fn spawn_another_ztunnel(&self, label: &str, i: usize, extra: &[&str]) {
        let token = self.dir.path().join(format!("token{i}"));
        self.spawn_ztunnel_as(label, i, &token, extra, &[]);
    }

    fn spawn_ztunnel_env(&self, i: usize, token: &Path, extra: &[&str], env: &[(&str, &str)]) {
        self.spawn_ztunnel_as(&format!("ztunnel{i}"), i, token, extra, env);
    }

    fn spawn_ztunnel_as(&self, label: &str, i: usize, token: &Path, extra: &[&str], env: &[(&str, &str)]) {
        let root = self.state_dir().join("ca/root-cert.pem");
        let sock = self.agent_socket(i);
        let mut args = vec![
            "--node-name".to_string(),
            format!("node{i}"),
            "--node-ip".into(),
            format!("172.30.0.{}", 10 + i),
            "--xds-address".into(),
            format!("https://{ISTIOD_IP}:15012"),
            "--root-cert".into(),
            root.display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--agent-socket".into(),
            sock.display().to_string(),
            "--worker-threads".into(),
            "1".into(),
            "--bpf-pin-dir".into(),
            self.bpf_pin_dir(i).display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn_env(label, &self.node(i), &bin("ztunnel"), &args, env);
    }

    /// The Pod object, scheduled to node `node`, and running with address `ip` once it has one.
    pub fn apply_pod(&self, node: usize, namespace: &str, name: &str, sa: &str, labels: &str, ip: Option<&str>) {
        let status = ip.map(|ip| format!("status: {{podIP: {ip}, phase: Running}}\n")).unwrap_or_default();
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\n\
             spec: {{nodeName: node{node}, serviceAccountName: {sa}}}\n{status}"
        ));
    }

    /// A pod: its Pod object in istiod-lite, a network namespace wired to the node's bridge, and
    /// (if `enroll`) enrollment with the node's ztunnel, as the CNI plugin would do.
    pub fn add_pod(&self, node: usize, namespace: &str, name: &str, sa: &str, labels: &str, host: u8) -> Pod {
        let ip = format!("10.244.{node}.{host}");
        self.apply_pod(node, namespace, name, sa, labels, Some(&ip));
        let netns = format!("{}p{}", self.prefix, self.veths.fetch_add(1, Ordering::Relaxed));
        self.add_netns(&netns);
        let n = self.node(node);
        let v = format!("v{host}");
        sh(&format!(
            "ip -n {n} link add {v} type veth peer name eth0 netns {netns} && ip -n {n} link set {v} master cni0 up && \
             ip -n {netns} link set lo up && ip -n {netns} addr add {ip}/24 dev eth0 && ip -n {netns} link set eth0 up && \
             ip -n {netns} route add default via 10.244.{node}.1"
        ));
        Pod { netns, namespace: namespace.into(), name: name.into(), ip, node }
    }

    /// Sends one request to a node agent socket and returns the JSON answer.
    pub fn agent(&self, node: usize, req: &serde_json::Value) -> serde_json::Value {
        let mut s = UnixStream::connect(self.agent_socket(node)).expect("agent socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).expect("agent answer")
    }

    pub fn enroll(&self, pod: &Pod) {
        let path = format!("/var/run/netns/{}", pod.netns);
        let r = self.agent(
            pod.node,
            &serde_json::json!({"op": "add", "namespace": pod.namespace, "name": pod.name, "netns": path}),
        );
        assert_eq!(r["ok"], true, "registering {}/{}: {r}", pod.namespace, pod.name);
        assert_eq!(r["pods"][0]["enrolled"], true, "enrolling {}/{}: {r}", pod.namespace, pod.name);
    }

    /// Starts the test app (`tests/fixtures/app.py MODE ARGS…`) in a pod and waits until `port`
    /// accepts connections.
    pub fn app(&self, pod: &Pod, args: &[&str], port: u16) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/app.py");
        let mut full = vec![script];
        full.extend(args);
        self.spawn(&format!("app-{}-{port}", pod.name), &pod.netns, Path::new("python3"), &full);
        wait_for(&format!("{} listening on {port}", pod.name), Duration::from_secs(10), || {
            self.exec(&pod.netns, &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")).status.success().then_some(())
        });
    }

    /// `curl` from a pod; `Ok(body)` or `Err(exit code and stderr)`.
    pub fn curl(&self, pod: &Pod, url: &str) -> Result<String, String> {
        let out = self.exec(&pod.netns, &format!("curl -sS --max-time 5 {url}"));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!("{:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// A GET against a ztunnel's admin, metrics or readiness port, from its node.
    pub fn ztunnel_get(&self, node: usize, port: u16, path: &str) -> String {
        self.exec_ok(&self.node(node), &format!("curl -sf http://127.0.0.1:{port}{path}"))
    }

    /// Node objects for every node: InternalIP on the underlay, pod CIDR 10.244.i.0/24.
    pub fn apply_nodes(&self) {
        for i in 1..=self.nodes {
            self.apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: node{i}}}\nspec: {{podCIDR: 10.244.{i}.0/24}}\n\
                 status: {{addresses: [{{type: InternalIP, address: 172.30.0.{}}}]}}\n",
                10 + i
            ));
        }
    }

    /// Node `i`'s CNI network config (a conflist), registering pods with its ztunnel.
    pub fn cni_conf(&self, i: usize, chained: &[serde_json::Value]) -> serde_json::Value {
        let mut plugins = vec![serde_json::json!({
            "type": "trellis-cni",
            "podCIDR": format!("10.244.{i}.0/24"),
            "dataDir": self.dir.path().join(format!("cni{i}")).display().to_string(),
            "mtu": 1450,
            "agentSocket": self.agent_socket(i).display().to_string(),
        })];
        plugins.extend(chained.iter().cloned());
        // Debian's plugins speak CNI 1.0.0 at most; trellis-cni accepts it.
        serde_json::json!({"cniVersion": "1.0.0", "name": "trellis", "plugins": plugins})
    }

    /// Invokes one plugin exactly as a container runtime does: `CNI_*` variables, config on stdin,
    /// run in the node's namespace. Returns (success, parsed stdout).
    #[allow(clippy::too_many_arguments)] // one argument per CNI_* variable a runtime sets
    pub fn cni_plugin(
        &self,
        node: usize,
        plugin: &str,
        command: &str,
        container: &str,
        netns: &str,
        pod: (&str, &str),
        conf: &serde_json::Value,
    ) -> (bool, serde_json::Value) {
        let path = if plugin == "trellis-cni" { bin("trellis-cni") } else { Path::new("/usr/lib/cni").join(plugin) };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node(node)])
            .arg(path)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", format!("K8S_POD_NAMESPACE={};K8S_POD_NAME={}", pod.0, pod.1))
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cni plugin");
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&out.stderr).into()));
        (out.status.success(), v)
    }

    /// Runs a conflist's plugins in order for ADD (each gets the previous result), or in reverse
    /// for DEL, as libcni does. Returns the final result.
    #[allow(clippy::too_many_arguments)] // one argument per CNI_* variable a runtime sets
    pub fn cni_list(
        &self,
        node: usize,
        command: &str,
        container: &str,
        netns: &str,
        pod: (&str, &str),
        list: &serde_json::Value,
        runtime: &serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let mut plugins: Vec<serde_json::Value> = list["plugins"].as_array().cloned().unwrap_or_default();
        if command == "DEL" {
            plugins.reverse();
        }
        let mut prev = serde_json::Value::Null;
        for p in plugins {
            let mut conf = p.clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            conf["name"] = list["name"].clone();
            conf["runtimeConfig"] = runtime.clone();
            if !prev.is_null() {
                conf["prevResult"] = prev.clone();
            }
            let plugin = p["type"].as_str().unwrap().to_string();
            let (ok, out) = self.cni_plugin(node, &plugin, command, container, netns, pod, &conf);
            if !ok {
                return Err(out);
            }
            if command == "ADD" {
                prev = out;
            }
        }
        Ok(prev)
    }

    /// A pod as a kubelet makes one: [`Lab::cni_add`], then the Pod's status with the IP the
    /// plugin allocated.
    #[allow(clippy::too_many_arguments)] // one argument per CNI_* variable a runtime sets
    pub fn cni_pod(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        sa: &str,
        labels: &str,
        list: &serde_json::Value,
        runtime: &serde_json::Value,
    ) -> Pod {
        let pod = self.cni_add(node, namespace, name, sa, labels, list, runtime);
        self.report_pod_ip(&pod, sa, labels);
        pod
    }

    /// Writes the pod's IP to its status, as the kubelet does once ADD has returned.
    pub fn report_pod_ip(&self, pod: &Pod, sa: &str, labels: &str) {
        self.apply_pod(pod.node, &pod.namespace, &pod.name, sa, labels, Some(&pod.ip));
    }

    /// The first half of [`Lab::cni_pod`]: the Pod object as the scheduler leaves it (bound to
    /// the node, no IP), a netns, and CNI ADD through `list`. The control plane does not know the
    /// pod's IP yet.
    #[allow(clippy::too_many_arguments)]
    pub fn cni_add(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        sa: &str,
        labels: &str,
        list: &serde_json::Value,
        runtime: &serde_json::Value,
    ) -> Pod {
        self.apply_pod(node, namespace, name, sa, labels, None);
        self.sandbox_add(node, namespace, name, list, runtime)
            .unwrap_or_else(|e| panic!("CNI ADD for {namespace}/{name}: {e}"))
    }

    /// A new sandbox (netns) for pod `namespace/name` and CNI ADD through `list`, whatever the
    /// control plane knows of the pod. `Err` is the failing plugin's error result.
    pub fn sandbox_add(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        list: &serde_json::Value,
        runtime: &serde_json::Value,
    ) -> Result<Pod, serde_json::Value> {
        let netns = format!("{}p{}", self.prefix, self.veths.fetch_add(1, Ordering::Relaxed));
        self.add_netns(&netns);
        sh(&format!("ip -n {netns} link set lo up"));
        let path = format!("/var/run/netns/{netns}");
        let result = self.cni_list(node, "ADD", &netns, &path, (namespace, name), list, runtime)?;
        let cidr = result["ips"][0]["address"].as_str().expect("an address in the CNI result");
        let ip = cidr.split('/').next().unwrap().to_string();
        Ok(Pod { netns, namespace: namespace.into(), name: name.into(), ip, node })
    }

    /// The node agent's view of a pod: `(enrolled, reason)`.
    pub fn enrollment(&self, pod: &Pod) -> (bool, String) {
        let r = self.agent(pod.node, &serde_json::json!({"op": "list"}));
        let uid = format!("Kubernetes//v1/Pod/{}/{}", pod.namespace, pod.name);
        let p =
            r["pods"].as_array().into_iter().flatten().find(|p| p["uid"] == uid.as_str()).cloned().unwrap_or_default();
        (p["enrolled"] == true, p["reason"].as_str().unwrap_or("not registered").to_string())
    }

    pub fn wait_enrolled(&self, pod: &Pod, enrolled: bool) {
        wait_for(&format!("{}/{} enrolled={enrolled}", pod.namespace, pod.name), Duration::from_secs(20), || {
            (self.enrollment(pod).0 == enrolled).then_some(())
        });
    }
}
