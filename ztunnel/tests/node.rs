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

/// POSTs the secret from `from` to `to` while capturing the underlay (VXLAN included); returns
/// the server's answer and whether the secret was visible on the wire.
fn post_and_sniff(lab: &Lab, from: &Pod, to: &Pod) -> (String, bool) {
    let pcap = lab.dir.path().join(format!(
        "underlay-{}.pcap",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    let pcap = pcap.display().to_string();
    lab.spawn(
        "tcpdump",
        &lab.underlay(),
        std::path::Path::new("tcpdump"),
        &["-i", "br0", "-U", "-s", "0", "-w", &pcap],
    );
    wait_for("tcpdump running", Duration::from_secs(5), || std::path::Path::new(&pcap).exists().then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    let out = lab.exec(&from.netns, &format!("curl -sS --max-time 5 -d {SECRET} http://{}:8080/", to.ip));
    std::thread::sleep(Duration::from_millis(500));
    lab.stop("tcpdump");
    let seen = contains(&std::fs::read(&pcap).expect("capture"), SECRET.as_bytes());
    let vxlan = netlab::sh(&format!("tcpdump -nn -r {pcap} 'udp port 4789' 2>/dev/null | wc -l"));
    assert!(vxlan.trim().parse::<u32>().unwrap() > 0, "pod traffic did not cross the underlay in VXLAN");
    (String::from_utf8_lossy(&out.stdout).trim().to_string(), seen)
}

fn metric_count(lab: &Lab, node: usize, needle: &str) -> usize {
    lab.ztunnel_get(node, 15020, "/metrics")
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total") && l.contains(needle))
        .count()
}

#[test]
fn overlay_pods_switch_to_hbone_live_with_namespace_labels() {
    let lab = Lab::bare(2);
    lab.start_istiod();
    lab.apply_nodes();
    lab.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n");
    lab.start_ztunnel(1, &[]);
    lab.start_ztunnel(2, &[]);

    // The overlay: one route per remote pod CIDR through the VXLAN device, from Node objects.
    wait_for("overlay routes", Duration::from_secs(15), || {
        let r1 = lab.exec_ok(&lab.node(1), "ip route show 10.244.2.0/24");
        let r2 = lab.exec_ok(&lab.node(2), "ip route show 10.244.1.0/24");
        (r1.contains("trellis.vxlan") && r2.contains("trellis.vxlan")).then_some(())
    });
    let fdb = lab.exec_ok(&lab.node(1), "bridge fdb show dev trellis.vxlan");
    assert!(fdb.contains("dst 172.30.0.12"), "{fdb}");

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
    let (answer, seen) = post_and_sniff(&lab, &client, &server);
    assert_eq!(answer, "server");
    assert!(seen, "unmeshed traffic should be plaintext on the wire (the positive control)");

    // Labelling the namespace meshes the running pods: TLS on the wire, mutual_tls in metrics.
    let out = lab.meshctl("label namespace demo istio.io/dataplane-mode=ambient", "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.wait_enrolled(&client, true);
    lab.wait_enrolled(&server, true);
    assert!(!lab.enrollment(&opted_out).0, "the pod label `none` overrides the namespace");
    let before = metric_count(&lab, 2, "connection_security_policy=\"mutual_tls\"");
    let (answer, seen) = post_and_sniff(&lab, &client, &server);
    assert_eq!(answer, "server");
    assert!(!seen, "meshed traffic must not show the payload on the wire");
    wait_for("mutual_tls metric", Duration::from_secs(5), || {
        (metric_count(&lab, 2, "connection_security_policy=\"mutual_tls\"") > before).then_some(())
    });
    assert_eq!(lab.curl(&client, &format!("http://{}:8080/", opted_out.ip)).as_deref(), Ok("legacy"));

    // Unlabelling reverts, live.
    let out = lab.meshctl("label namespace demo istio.io/dataplane-mode-", "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.wait_enrolled(&client, false);
    lab.wait_enrolled(&server, false);
    let (answer, seen) = post_and_sniff(&lab, &client, &server);
    assert_eq!(answer, "server");
    assert!(seen, "after unlabelling, traffic is plain again");
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
    let client = lab.cni_pod(1, "demo", "client", "client", "app: client", &conf, &json!({}));
    lab.wait_enrolled(&server, true);
    lab.wait_enrolled(&client, true);
    lab.app(&server, &["http", "server", "8080"], 8080);
    let via_hostport = lab.exec(&lab.underlay(), "curl -sS --max-time 5 http://172.30.0.11:18080/");
    assert_eq!(
        String::from_utf8_lossy(&via_hostport.stdout).trim(),
        "server",
        "{}",
        String::from_utf8_lossy(&via_hostport.stderr)
    );
    assert_eq!(lab.curl(&client, &format!("http://{}:8080/", server.ip)).as_deref(), Ok("server"));

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

    // GC releases allocations the runtime no longer knows; DEL after the netns is gone succeeds.
    let data = lab.dir.path().join("cni1/trellis");
    let allocated = || {
        std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("10."))
            .count()
    };
    assert_eq!(allocated(), 2);
    let gc = json!({"cniVersion": "1.1.0", "name": "trellis", "type": "trellis-cni", "podCIDR": "10.244.1.0/24",
        "dataDir": lab.dir.path().join("cni1").display().to_string(),
        "cni.dev/valid-attachments": [{"containerID": server.netns, "ifname": "eth0"}]});
    let (ok, out) = lab.cni_plugin(1, "trellis-cni", "GC", "", "", ("", ""), &gc);
    assert!(ok, "{out}");
    assert_eq!(allocated(), 1, "the client's allocation was not in valid-attachments");
    netlab::sh(&format!("ip netns del {}", server.netns));
    let path = format!("/var/run/netns/{}", server.netns);
    lab.cni_list(1, "DEL", &server.netns, &path, ("demo", "server"), &conf, &ports)
        .expect("DEL after the netns is gone");
    assert_eq!(allocated(), 0);
    let (enrolled, reason) = lab.enrollment(&server);
    assert!(!enrolled && reason == "not registered", "DEL unregisters the pod: {reason}");
    lab.cni_list(1, "DEL", &server.netns, &path, ("demo", "server"), &conf, &ports).expect("DEL is idempotent");
}
