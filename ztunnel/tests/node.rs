//! Node networking end to end: pods built by `trellis-cni` (invoked as a runtime does), the VXLAN
//! overlay between bare nodes, eBPF capture switched live by namespace labels, a chained Debian
//! plugin, GC, DEL after the netns is gone, and a ztunnel restart.
//! Requires root, curl, tcpdump, python3, iptables and Debian's containernetworking-plugins.

mod netlab;

use std::time::Duration;

use netlab::{wait_for, Lab, Pod};
use serde_json::json;

const SECRET: &str = "trellis-node-secret-5150";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

struct Sniffed {
    answer: String,
    /// The payload was visible on the wire.
    plaintext: bool,
    /// Packets to or from port 15008 inside the VXLAN encapsulation.
    hbone: bool,
}

/// POSTs the secret from `from` to `to` while capturing the underlay (VXLAN included).
fn post_and_sniff(lab: &Lab, from: &Pod, to: &Pod) -> Sniffed {
    let pcap = lab.dir.path().join(format!(
        "underlay-{}.pcap",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    let pcap = pcap.display().to_string();
    lab.spawn(
        "tcpdump",
        &lab.underlay(),
        std::path::Path::new("tcpdump"),
        &["-i", "br0", "-U", "--immediate-mode", "-s", "0", "-w", &pcap],
    );
    // tcpdump says "listening on" once its capture is open: only then can it see the request.
    wait_for("tcpdump listening", Duration::from_secs(15), || {
        lab.log("tcpdump").contains("listening on").then_some(())
    });
    let out = lab.exec(&from.netns, &format!("curl -sS --max-time 5 -d {SECRET} http://{}:8080/", to.ip));
    std::thread::sleep(Duration::from_millis(500));
    lab.stop("tcpdump");
    let seen = contains(&std::fs::read(&pcap).expect("capture"), SECRET.as_bytes());
    // tcpdump decodes VXLAN on 4789 and prints the inner packets.
    let decoded = netlab::sh(&format!("tcpdump -nn -r {pcap} 'udp port 4789' 2>/dev/null"));
    assert!(
        decoded.contains("VXLAN"),
        "pod traffic did not cross the underlay in VXLAN:\n{decoded}\ncurl: {}{}\ntcpdump: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        lab.log("tcpdump")
    );
    let hbone = decoded.lines().any(|l| l.contains(&format!("{}.15008", to.ip)));
    Sniffed { answer: String::from_utf8_lossy(&out.stdout).trim().to_string(), plaintext: seen, hbone }
}

/// Connections opened through a ztunnel, summed over the series whose labels contain `needle`.
fn opened(lab: &Lab, node: usize, needle: &str) -> f64 {
    lab.ztunnel_get(node, 15020, "/metrics")
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total") && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn overlay_pods_switch_to_hbone_live_with_namespace_labels() {
    let lab = Lab::bare(2);
    lab.start_istiod();
    lab.apply_nodes();
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n");
    // Left over from when node 1 had another address: ztunnel must not adopt it as it is.
    let stale = "ip link add trellis.vxlan type vxlan id 1 local 172.30.0.99 dstport 4789 dev eth0 && ip link set trellis.vxlan mtu 1400";
    lab.exec_ok(&lab.node(1), stale);
    lab.start_ztunnel(1, &[]);
    lab.start_ztunnel(2, &[]);
    let dev = wait_for("the stale overlay device recreated", Duration::from_secs(15), || {
        let d = lab.exec_ok(&lab.node(1), "ip -d link show trellis.vxlan");
        d.contains("local 172.30.0.11").then_some(d)
    });
    assert!(dev.contains("mtu 1450") && dev.contains("link/ether 0a:ac:1e:00:0b:01"), "{dev}");

    // The overlay: one route per remote pod CIDR through the VXLAN device, from Node objects.
    wait_for("overlay routes", Duration::from_secs(15), || {
        let r1 = lab.exec_ok(&lab.node(1), "ip route show 10.244.2.0/24");
        let r2 = lab.exec_ok(&lab.node(2), "ip route show 10.244.1.0/24");
        (r1.contains("trellis.vxlan") && r2.contains("trellis.vxlan")).then_some(())
    });
    let fdb = lab.exec_ok(&lab.node(1), "bridge fdb show dev trellis.vxlan");
    assert!(fdb.contains("dst 172.30.0.12"), "{fdb}");
    let dump: serde_json::Value = serde_json::from_str(&lab.ztunnel_get(1, 15000, "/config_dump")).unwrap();
    assert_eq!(dump["capture"], "ebpf", "eBPF is the default capture");
    assert_eq!(dump["nodes"].as_array().map(Vec::len), Some(2), "{}", dump["nodes"]);

    let (c1, c2) = (lab.cni_conf(1, &[]), lab.cni_conf(2, &[]));
    let client = lab.cni_pod(1, "demo", "client", "client", "app: client", &c1, &json!({}));
    let server = lab.cni_pod(2, "demo", "server", "server", "app: server", &c2, &json!({}));
    let opted_out =
        lab.cni_pod(2, "demo", "legacy", "legacy", "app: legacy, istio.io/dataplane-mode: none", &c2, &json!({}));
    assert!(client.ip.starts_with("10.244.1.") && server.ip.starts_with("10.244.2."), "{} {}", client.ip, server.ip);
    lab.app(&server, &["http", "server", "8080"], 8080);
    lab.app(&opted_out, &["http", "legacy", "8080"], 8080);

    // Unlabelled: registered but not meshed; plaintext over VXLAN.
    let (enrolled, reason) = lab.enrollment(&client);
    assert!(!enrolled && reason.contains("istio.io/dataplane-mode=ambient"), "{reason}");
    let w = post_and_sniff(&lab, &client, &server);
    assert_eq!(w.answer, "server");
    assert!(w.plaintext && !w.hbone, "unmeshed traffic should be plaintext on the wire (the positive control)");

    // Labelling the namespace meshes the running pods: TLS on the wire, mutual_tls in metrics.
    let out = lab.meshctl("label namespace demo istio.io/dataplane-mode=ambient", "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.wait_enrolled(&client, true);
    lab.wait_enrolled(&server, true);
    assert!(!lab.enrollment(&opted_out).0, "the pod label `none` overrides the namespace");
    let before = opened(&lab, 2, "connection_security_policy=\"mutual_tls\"");
    let w = post_and_sniff(&lab, &client, &server);
    assert_eq!(w.answer, "server");
    assert!(!w.plaintext, "meshed traffic must not show the payload on the wire");
    assert!(w.hbone, "meshed traffic must travel as HBONE (TLS to 15008) inside VXLAN");
    wait_for("mutual_tls metric", Duration::from_secs(5), || {
        (opened(&lab, 2, "connection_security_policy=\"mutual_tls\"") > before).then_some(())
    });
    assert_eq!(lab.curl(&client, &format!("http://{}:8080/", opted_out.ip)).as_deref(), Ok("legacy"));

    // Unlabelling reverts, live.
    let out = lab.meshctl("label namespace demo istio.io/dataplane-mode-", "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.wait_enrolled(&client, false);
    lab.wait_enrolled(&server, false);
    let w = post_and_sniff(&lab, &client, &server);
    assert_eq!(w.answer, "server");
    assert!(w.plaintext && !w.hbone, "after unlabelling, traffic is plain again");
    let pins = std::fs::read_dir(lab.bpf_pin_dir(1).join("links")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(pins, 0, "released pods keep no pinned links");

    // A deleted node's routes go away.
    lab.delete("apiVersion: v1\nkind: Node\nmetadata: {name: node2}\n");
    wait_for("route to node2 removed", Duration::from_secs(15), || {
        lab.exec_ok(&lab.node(1), "ip route show 10.244.2.0/24").trim().is_empty().then_some(())
    });
    let fdb = lab.exec_ok(&lab.node(1), "bridge fdb show dev trellis.vxlan");
    assert!(!fdb.contains("dst 172.30.0.12"), "{fdb}");
}

#[test]
fn chained_portmap_gc_del_and_ztunnel_restart() {
    let lab = Lab::bare(1);
    lab.start_istiod();
    lab.apply_nodes();
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n");
    lab.start_ztunnel(1, &[]);

    // trellis-cni then Debian's portmap: hostPort 18080 on the node reaches the pod's 8080.
    let conf = lab.cni_conf(1, &[json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true})]);
    let ports = json!({"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]});
    let server = lab.cni_pod(1, "demo", "server", "server", "app: server", &conf, &ports);
    lab.wait_enrolled(&server, true);
    lab.app(&server, &["http", "server", "8080"], 8080);
    // A meshed pod is captured before ADD returns, while the control plane does not yet know its
    // IP (so it has no workload): its membership is enough, and its first connection is mTLS.
    let client = lab.cni_add(1, "demo", "client", "client", "app: client", &conf, &json!({}));
    assert_eq!(lab.enrollment(&client), (true, "meshed".to_string()), "enrolled when ADD returns");
    let dump: serde_json::Value = serde_json::from_str(&lab.ztunnel_get(1, 15000, "/config_dump")).unwrap();
    let names: Vec<&str> = dump["workloads"].as_array().unwrap().iter().filter_map(|w| w["name"].as_str()).collect();
    assert!(!names.contains(&"client"), "the client must not be a workload yet: {names:?}");
    let mtls = "connection_security_policy=\"mutual_tls\"";
    let before = opened(&lab, 1, mtls);
    assert_eq!(lab.curl(&client, &format!("http://{}:8080/", server.ip)).as_deref(), Ok("server"));
    wait_for("the first connection went over mTLS", Duration::from_secs(5), || {
        (opened(&lab, 1, mtls) > before).then_some(())
    });
    lab.report_pod_ip(&client, "client", "app: client");
    let via_hostport = lab.exec(&lab.underlay(), "curl -sS --max-time 5 http://172.30.0.11:18080/");
    assert_eq!(
        String::from_utf8_lossy(&via_hostport.stdout).trim(),
        "server",
        "{}",
        String::from_utf8_lossy(&via_hostport.stderr)
    );
    assert_eq!(lab.curl(&client, &format!("http://{}:8080/", server.ip)).as_deref(), Ok("server"));

    // A pod the control plane does not know (istiod-lite down, or its Pod watch behind) must not
    // start, since ztunnel cannot tell whether to capture it: ADD fails with "try again later"
    // (11) naming the pod and why, and leaves no address, veth or registration. Once the Pod is
    // bound to the node, the kubelet's retry succeeds with the pod meshed.
    let data = lab.dir.path().join("cni1/trellis");
    let allocated = || {
        std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("10."))
            .count()
    };
    let veths = || netlab::sh(&format!("ip -n {} -o link show type veth | wc -l", lab.node(1)));
    let (addresses, links) = (allocated(), veths());
    let refused = lab.sandbox_add(1, "demo", "late", &conf, &json!({})).map(|p| p.ip);
    let msg = refused.as_ref().err().and_then(|e| e["msg"].as_str()).unwrap_or_default().to_string();
    assert!(
        refused.as_ref().is_err_and(|e| e["code"] == 11)
            && msg.contains("pod demo/late: not known to the control plane")
            && msg.contains("try again later"),
        "{refused:?}"
    );
    assert_eq!(allocated(), addresses, "the refused sandbox's address was released");
    assert_eq!(veths(), links, "and its veth deleted");
    let listed = lab.agent(1, &json!({"op": "list"}));
    assert!(!listed.to_string().contains("/late"), "the refused pod is not registered: {listed}");
    // Only ztunnel's own user may use the agent socket, whatever its file's mode says: another
    // user's request gets no answer, while root's still does.
    use std::os::unix::fs::PermissionsExt;
    let sock = lab.agent_socket(1);
    let dir_mode = std::fs::metadata(lab.dir.path()).unwrap().permissions();
    std::fs::set_permissions(lab.dir.path(), PermissionsExt::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&sock, PermissionsExt::from_mode(0o666)).unwrap();
    let ask_as = |who: &str| {
        let py = "import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
try:
    s.sendall(b'{\"op\":\"list\"}\\n')
    print(repr(s.recv(100)))
except (BrokenPipeError, ConnectionResetError):
    print('closed')";
        // Debian's, since a python3 earlier in PATH may live under root's home.
        let python = ["/usr/bin/python3", "python3"].into_iter().find(|p| std::path::Path::new(p).exists());
        let out = std::process::Command::new("setpriv")
            .args(["--reuid", who, "--regid", who, "--clear-groups", python.unwrap_or("python3"), "-c", py])
            .arg(&sock)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let other = ask_as("65534");
    assert!(other == "closed" || other == "b''", "another user's connection is closed unanswered: {other}");
    assert!(ask_as("0").contains("\"ok\":true"), "root is answered");
    std::fs::set_permissions(&sock, PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(lab.dir.path(), dir_mode).unwrap();
    let late = lab.cni_pod(1, "demo", "late", "late", "app: late", &conf, &json!({}));
    assert_eq!(lab.enrollment(&late), (true, "meshed".to_string()), "the retried ADD meshes the pod");

    // A ztunnel restart fails closed: while it is down, the pinned capture stays and drops new
    // connections instead of letting them out unprotected; once it is back the pods are enrolled
    // again from its registry, without any CNI call.
    lab.stop("ztunnel1");
    assert!(lab.bpf_pin_dir(1).join("links").read_dir().unwrap().count() >= 4, "links stay pinned");
    let down = lab.curl(&client, &format!("http://{}:8080/", server.ip));
    assert!(down.is_err(), "a meshed pod must not connect while ztunnel is down: {down:?}");
    lab.start_ztunnel(1, &[]);
    wait_for("traffic after restart", Duration::from_secs(20), || {
        lab.curl(&client, &format!("http://{}:8080/", server.ip)).ok().filter(|a| a == "server")
    });
    assert!(lab.enrollment(&client).0);

    // A pod recreated without a DEL (its sandbox died; a new one has the same name) replaces the
    // old registration: the old capture is dropped and the new sandbox is meshed.
    let stale = client.netns.clone();
    netlab::sh(&format!("ip netns del {stale}"));
    let client = lab.cni_pod(1, "demo", "client", "client", "app: client", &conf, &json!({}));
    lab.wait_enrolled(&client, true);
    let before = opened(&lab, 1, "source_workload=\"client\"");
    assert_eq!(lab.curl(&client, &format!("http://{}:8080/", server.ip)).as_deref(), Ok("server"));
    wait_for("the new sandbox's connection went through ztunnel", Duration::from_secs(5), || {
        (opened(&lab, 1, "source_workload=\"client\"") > before).then_some(())
    });

    // GC releases allocations the runtime no longer knows; DEL after the netns is gone succeeds.
    assert_eq!(allocated(), 4, "server, client, late, and the dead sandbox's address");
    let gc = json!({"cniVersion": "1.1.0", "name": "trellis", "type": "trellis-cni", "podCIDR": "10.244.1.0/24",
        "dataDir": lab.dir.path().join("cni1").display().to_string(),
        "cni.dev/valid-attachments": [{"containerID": server.netns, "ifname": "eth0"}, {"containerID": client.netns, "ifname": "eth0"},
            {"containerID": late.netns, "ifname": "eth0"}]});
    let (ok, out) = lab.cni_plugin(1, "trellis-cni", "GC", "", "", ("", ""), &gc);
    assert!(ok, "{out}");
    assert_eq!(allocated(), 3, "the dead sandbox's allocation was not in valid-attachments");
    netlab::sh(&format!("ip netns del {}", server.netns));
    let path = format!("/var/run/netns/{}", server.netns);
    lab.cni_list(1, "DEL", &server.netns, &path, ("demo", "server"), &conf, &ports)
        .expect("DEL after the netns is gone");
    assert_eq!(allocated(), 2);
    let (enrolled, reason) = lab.enrollment(&server);
    assert!(!enrolled && reason == "not registered", "DEL unregisters the pod: {reason}");
    lab.cni_list(1, "DEL", &server.netns, &path, ("demo", "server"), &conf, &ports).expect("DEL is idempotent");

    // A pod recreated under the same name (a StatefulSet's): the old sandbox's DEL can come after
    // the new sandbox's ADD, and must not uncapture the new one.
    let old = lab.cni_pod(1, "demo", "again", "client", "app: again", &conf, &json!({}));
    lab.wait_enrolled(&old, true);
    let new = lab.cni_pod(1, "demo", "again", "client", "app: again", &conf, &json!({}));
    lab.wait_enrolled(&new, true);
    let old_path = format!("/var/run/netns/{}", old.netns);
    lab.cni_list(1, "DEL", &old.netns, &old_path, ("demo", "again"), &conf, &json!({})).expect("late DEL");
    assert_eq!(lab.enrollment(&new), (true, "meshed".to_string()), "a late DEL of the old sandbox");
    let new_path = format!("/var/run/netns/{}", new.netns);
    lab.cni_list(1, "DEL", &new.netns, &new_path, ("demo", "again"), &conf, &json!({})).expect("DEL");
    assert_eq!(lab.enrollment(&new).1, "not registered", "the current sandbox's DEL unregisters it");
}

#[test]
fn ebpf_load_failure_is_clear_and_falls_back_only_when_asked() {
    let lab = Lab::bare(1);
    lab.start_istiod();
    // A pin directory that is not on bpffs makes loading fail, as an unsupported kernel would.
    let not_bpffs = lab.dir.path().join("not-bpffs");
    let token = lab.token(1);
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            lab.node(1),
            netlab::bin("ztunnel").display().to_string(),
            "--node-name".into(),
            "node1".into(),
            "--node-ip".into(),
            "172.30.0.11".into(),
            "--xds-address".into(),
            format!("https://{}:15012", netlab::ISTIOD_IP),
            "--root-cert".into(),
            lab.state_dir().join("ca/root-cert.pem").display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--agent-socket".into(),
            lab.agent_socket(1).display().to_string(),
            "--bpf-pin-dir".into(),
            not_bpffs.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let out = std::process::Command::new("ip").args(run(&[])).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ztunnel must not start without its capture");
    assert!(stderr.contains("--capture ebpf") && stderr.contains("--capture nftables"), "{stderr}");

    let args = run(&["--capture-fallback-nftables"]);
    let args: Vec<&str> = args.iter().skip(4).map(String::as_str).collect();
    lab.spawn("ztunnel1", &lab.node(1), &netlab::bin("ztunnel"), &args);
    wait_for("ztunnel ready on nftables", Duration::from_secs(20), || {
        lab.exec(&lab.node(1), "curl -sf http://127.0.0.1:15021/healthz/ready").status.success().then_some(())
    });
    assert!(lab.log("ztunnel1").contains("falling back to nftables"), "{}", lab.log("ztunnel1"));
}

/// Each enrollment is a task of its own: a CA that stops answering for a new identity holds up
/// neither the ADD of a pod whose certificate ztunnel already has nor that pod's capture, and
/// the stalled pod's ADD fails closed on its own.
#[test]
fn a_stalled_certificate_request_holds_up_no_other_pod() {
    let lab = Lab::new(1);
    lab.start_istiod();
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n");
    // The CA is reached through a relay that can be told to stop answering.
    let stall = lab.dir.path().join("stall-ca");
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/app.py");
    let relay = [app, "relay", netlab::ISTIOD_IP, "15112", netlab::ISTIOD_IP, "15012", stall.to_str().unwrap()];
    lab.spawn("ca-relay", &lab.underlay(), std::path::Path::new("python3"), &relay);
    let u = lab.underlay();
    wait_for("the CA relay", Duration::from_secs(10), || {
        lab.exec(&u, &format!("bash -c 'echo > /dev/tcp/{}/15112'", netlab::ISTIOD_IP)).status.success().then_some(())
    });
    lab.start_ztunnel(1, &["--ca-address", &format!("https://{}:15112", netlab::ISTIOD_IP)]);
    // Named so that the stalled pod comes first in a pass over the registry.
    let first = lab.add_pod(1, "demo", "b-first", "known", "app: b", 21);
    lab.enroll(&first);

    std::fs::write(&stall, "").unwrap();
    let stalled = lab.add_pod(1, "demo", "a-stalled", "new", "app: a", 22);
    let second = lab.add_pod(1, "demo", "b-second", "known", "app: b", 23);
    let add = |pod: &Pod| {
        let path = format!("/var/run/netns/{}", pod.netns);
        lab.agent(1, &json!({"op": "add", "namespace": "demo", "name": pod.name, "netns": path}))
    };
    std::thread::scope(|s| {
        let stalled_add = s.spawn(|| add(&stalled));
        // Its enrollment is now waiting for a certificate that will not come.
        std::thread::sleep(Duration::from_secs(1));
        let r = add(&second);
        assert!(r["ok"] == true && r["pods"][0]["enrolled"] == true, "the second pod's ADD: {r}");
        let r = stalled_add.join().unwrap();
        assert_eq!(r["ok"], false, "the stalled pod's ADD fails closed: {r}");
        assert!(r["error"].as_str().is_some_and(|e| e.contains("demo/a-stalled")), "{r}");
    });
    lab.app(&second, &["http", "second", "8080"], 8080);
    assert_eq!(lab.curl(&first, &format!("http://{}:8080/", second.ip)).as_deref(), Ok("second"));
}

/// An enrollment the CA refuses is retried with a growing delay, not in a loop: a registered pod
/// that becomes meshed while the control plane has it on another node (so the CA will not certify
/// it here) costs a few certificate requests, and its standing names the refusal. And a netns
/// path that is not a namespace is refused at ADD.
#[test]
fn a_refused_enrollment_is_retried_with_backoff() {
    let lab = Lab::new(1);
    lab.start_istiod();
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n");
    lab.start_ztunnel(1, &[]);
    // A netns path that is not a namespace is refused at once; a FIFO would hang the open.
    let fifo = lab.dir.path().join("not-a-netns");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for bad in [fifo.to_str().unwrap(), "/etc/hostname", "/proc/self/ns/mnt"] {
        let r = lab.agent(1, &json!({"op": "add", "namespace": "demo", "name": "x", "netns": bad}));
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().is_some_and(|e| e.contains("is not a network namespace")), "{r}");
    }
    let pod = lab.add_pod(1, "demo", "roamer", "roamer", "app: roamer", 21);
    let path = format!("/var/run/netns/{}", pod.netns);
    let r = lab.agent(1, &json!({"op": "add", "namespace": "demo", "name": pod.name, "netns": path}));
    assert!(r["ok"] == true && r["pods"][0]["enrolled"] == false, "not meshed yet: {r}");
    // Now meshed, on node2 as far as the control plane knows.
    lab.apply_pod(2, "demo", "roamer", "roamer", "app: roamer, istio.io/dataplane-mode: ambient", Some(&pod.ip));
    let reason = wait_for("the refusal reported", Duration::from_secs(15), || {
        let (_, reason) = lab.enrollment(&pod);
        reason.contains("may not obtain").then_some(reason)
    });
    assert!(reason.contains("spiffe://cluster.local/ns/demo/sa/roamer"), "{reason}");
    let csrs = || -> u64 {
        let m = lab.exec_ok(&lab.underlay(), &format!("curl -sf http://{}:15014/metrics", netlab::ISTIOD_IP));
        m.lines().find_map(|l| l.strip_prefix("citadel_server_csr_count_total ")).unwrap().trim().parse().unwrap()
    };
    let before = csrs();
    std::thread::sleep(Duration::from_secs(4));
    let asked = csrs() - before;
    // 0.5 s, 1 s, 2 s, 4 s ... apart: at most 3 in any 4 s, and at least one (still retried).
    assert!((1..=3).contains(&asked), "{asked} certificate requests in 4 s");
    assert!(!lab.enrollment(&pod).0);
    assert!(lab.log("ztunnel1").contains("retry_in"), "{}", lab.log("ztunnel1"));
}
