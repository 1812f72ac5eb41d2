//! Table tests: each manifest either loads or fails with an error naming the field and reason.

use trellis_config::load::{load_text, LoadError};
use trellis_config::Object;

fn errors(yaml: &str) -> Vec<String> {
    match load_text("test.yaml", yaml, "default") {
        Ok(_) => vec![],
        Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
    }
}

/// (name, manifest, expected substring of the error; "" means the manifest is valid)
const CASES: &[(&str, &str, &str)] = &[
    ("valid pod", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo, labels: {app: a}}\nspec: {nodeName: node1, serviceAccountName: sa}\nstatus: {podIP: 10.244.1.5}", ""),
    ("pod owned by a replicaset", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-5d8f7c9b4-x2k7q\n  labels: {pod-template-hash: 5d8f7c9b4}\n  ownerReferences:\n  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-5d8f7c9b4, uid: 0b8e5c1e-4f3a-4d2b-9a57-2f5f1f0c1d11, controller: true, blockOwnerDeletion: true}", ""),
    ("owner without kind", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, ownerReferences: [{apiVersion: apps/v1, name: web}]}", "Pod default/a: metadata.ownerReferences[0].kind: is required"),
    ("owner with a bad name", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, ownerReferences: [{apiVersion: batch/v1, kind: Job, name: Nightly}]}", "metadata.ownerReferences[0].name: \"Nightly\" is not a valid DNS subdomain"),
    ("two controllers", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: r, controller: true}, {apiVersion: apps/v1, kind: StatefulSet, name: s, controller: true}]}", "metadata.ownerReferences: at most one may have controller: true"),
    ("owner unknown field", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: r, contoller: true}]}", "unknown field `contoller`"),
    ("pod with bad ip", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.244.1.500}", "status.podIP: \"10.244.1.500\" is not an IP address"),
    ("pod sidecar port", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {initContainers: [{name: s, restartPolicy: Always, ports: [{name: proxy, containerPort: 70000}]}]}", "spec.initContainers[0].ports[0].containerPort: 70000 is out of range 1-65535"),
    ("pod port protocol", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, ports: [{name: web, containerPort: 80, protocol: tcp}]}]}", "spec.containers[0].ports[0].protocol: \"tcp\" is not one of TCP, UDP, SCTP"),
    ("pod unknown field", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeNme: x}", "spec.nodeNme: unknown field `nodeNme`: not a Kubernetes PodSpec field; did you mean `nodeName`?"),
    ("pod unknown status field", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {hostIp: 10.0.0.1}", "status.hostIp: unknown field `hostIp`: not a Kubernetes PodStatus field; did you mean `hostIP`?"),
    ("pod field nowhere near", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {sidecarMode: ambient}", "spec.sidecarMode: unknown field `sidecarMode`: not a Kubernetes PodSpec field"),
    ("pod other kubernetes fields", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, generateName: a-, finalizers: [x/y]}\nspec: {restartPolicy: Always, volumes: []}\nstatus: {qosClass: BestEffort}", ""),
    ("pod service account alias", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {serviceAccount: web}", ""),
    ("pod service account alias disagrees", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {serviceAccount: web, serviceAccountName: api}", "spec.serviceAccount: must equal spec.serviceAccountName (it is its deprecated alias)"),
    ("metadata typo", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, lables: {app: a}}", "unknown field `lables`"),
    ("generateName without name", "apiVersion: v1\nkind: Pod\nmetadata: {generateName: a-}", "metadata.name: is required"),
    ("generateName not a name prefix", "apiVersion: v1\nkind: Pod\nmetadata: {name: web-x2k7q, generateName: Web_}", "Pod default/web-x2k7q: metadata.generateName: \"Web_\" is not a valid name prefix: names of this kind are a DNS subdomain"),
    ("generateName of a label-named kind", "apiVersion: v1\nkind: Service\nmetadata: {name: s, generateName: web.v1-}", "metadata.generateName: \"web.v1-\" is not a valid name prefix: names of this kind are a DNS label"),
    ("generateName too long for a label", "apiVersion: v1\nkind: Service\nmetadata: {name: s, generateName: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-}", "metadata.generateName"),
    ("generateName one over a label, as Kubernetes allows", "apiVersion: v1\nkind: Service\nmetadata: {name: s, generateName: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-}", ""),
    ("generateName non-ASCII before the dash", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, generateName: \"abcé-\"}", "metadata.generateName: \"abcé-\" is not a valid name prefix"),
    ("generateName a lone dash", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, generateName: \"-\"}", "metadata.generateName: \"-\" is not a valid name prefix"),
    ("generateName with dots for a subdomain", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, generateName: web.v1-}", ""),
    ("wrong type", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: \"eighty\"}]}", "spec.ports[0].port: invalid type: string \"eighty\", expected i64"),
    ("unknown kind", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}", "unknown kind \"Deployment\""),
    ("missing kind", "apiVersion: v1\nmetadata: {name: d}", "kind: is required"),
    ("service port out of range", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}", "Service default/s: spec.ports[0].port: 70000 is out of range 1-65535"),
    ("service target port name", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {selector: {app: a}, ports: [{port: 80, targetPort: http, appProtocol: http}], clusterIP: 10.96.0.10}", ""),
    ("service bad cluster ip", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0}", "spec.clusterIP: \"10.96.0\" is not an IP address"),
    ("service duplicate port names", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{name: a, port: 80}, {name: a, port: 81}]}", "spec.ports[1].name: duplicate port name \"a\""),
    ("namespace with namespace", "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, namespace: y}", "metadata.namespace: must be empty: Namespace is cluster-scoped"),
    ("bad name", "apiVersion: v1\nkind: Namespace\nmetadata: {name: Demo}", "metadata.name: \"Demo\" is not a valid DNS label"),
    ("bad label value", "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {a: \"-b\"}}", "metadata.labels[a]: value \"-b\" is not a valid label value"),
    ("node cidr", "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.11}]}", ""),
    ("node bad cidr", "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/40}", "spec.podCIDR: \"10.244.1.0/40\" is not a CIDR"),
    ("ap cidr", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}", "AuthorizationPolicy demo/p: spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.0/33\" is not a CIDR"),
    ("ap selector and targetRefs", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, group: \"\", name: echo}]", "spec: selector and targetRefs are mutually exclusive"),
    ("ap custom", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: CUSTOM, provider: {name: ext}, rules: [{}]}", "spec.action: CUSTOM (external authorization) is not supported"),
    ("ap bad action", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: REJECT}", "spec.action: \"REJECT\" is not one of ALLOW, DENY, AUDIT"),
    ("ap deny all with empty spec", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}", ""),
    ("ap bad port", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{to: [{operation: {ports: [\"http\"]}}]}]}", "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port number"),
    ("ap unknown when key", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{when: [{key: source.color, values: [red]}]}]}", "spec.rules[0].when[0].key: \"source.color\" is not a supported condition key"),
    ("ap old api version", "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p}", "use \"security.istio.io/v1\""),
    ("pa strict", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}", ""),
    ("pa bad mode", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default}\nspec: {mtls: {mode: STRICTER}}", "spec.mtls.mode: \"STRICTER\" is not one of"),
    ("pa port level needs selector", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default}\nspec: {portLevelMtls: {\"8080\": {mode: DISABLE}}}", "spec.portLevelMtls: requires a selector"),
    ("workload entry", "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm1}\nspec: {address: 192.168.1.10, ports: {http: 8080}, labels: {app: vm}, serviceAccount: vm}", ""),
    ("workload entry bad port", "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm1}\nspec: {address: 192.168.1.10, ports: {http: 0}}", "spec.ports[http]: 0 is out of range 1-65535"),
    ("gateway", "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}", ""),
    ("gateway bad protocol", "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w}\nspec: {gatewayClassName: x, listeners: [{name: mesh, port: 15008, protocol: QUIC}]}", "spec.listeners[0].protocol: \"QUIC\" is not one of"),
    ("httproute", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: x-user, value: a}]}]\n    backendRefs: [{name: echo-v2, port: 80, weight: 90}]\n    timeouts: {request: 10s}", ""),
    ("httproute relative path", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{matches: [{path: {type: Exact, value: v2}}]}]}", "spec.rules[0].matches[0].path.value: \"v2\" must start with '/'"),
    ("httproute backend without port", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{backendRefs: [{name: echo}]}]}", "spec.rules[0].backendRefs[0].port: is required for a Service backend"),
    ("httproute bad timeout", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{timeouts: {request: 1.5s}}]}", "spec.rules[0].timeouts.request: \"1.5s\" is not a Gateway API duration"),
    ("httproute try outlasts request", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{timeouts: {request: 1s, backendRequest: 1s1ms}}]}", "spec.rules[0].timeouts.backendRequest: \"1s1ms\" cannot be longer than timeouts.request \"1s\""),
    ("httproute no request timeout", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{timeouts: {request: 0s, backendRequest: 1h}}, {timeouts: {request: 2s, backendRequest: 2000ms}}]}", ""),
    ("httproute bad filter", "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{filters: [{type: RequestHeaderModifier}]}]}", "spec.rules[0].filters[0]: type RequestHeaderModifier requires exactly the field requestHeaderModifier"),
    ("grpcroute", "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec: {parentRefs: [{group: \"\", kind: Service, name: echo}], rules: [{matches: [{method: {service: echo.Echo, method: Say}}], backendRefs: [{name: echo, port: 8080, weight: 80}]}]}", ""),
    ("grpcroute empty method", "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec: {rules: [{matches: [{method: {type: Exact}}]}]}", "spec.rules[0].matches[0].method: must set service, method or both"),
    ("not an object", "- a\n- b", "expected an object, found a list"),
    ("ap non-ascii values", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{to: [{operation: {paths: [\"/menü\"]}}], from: [{source: {namespaces: [\"équipe\"]}}]}]}", ""),
    ("ap non-ascii inner wildcard", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{to: [{operation: {paths: [\"é*é\"]}}]}]}", "paths[0]: \"é*é\": '*' is only allowed as a prefix or suffix"),
    ("ap cidr with a leading zero", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: DENY, rules: [{from: [{source: {ipBlocks: [\"010.20.0.0/16\"]}}]}]}", "ipBlocks[0]: \"010.20.0.0/16\" is not a CIDR: \"010.20.0.0\" is not an IP address"),
    ("ap cidr prefix not a number", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/+8\"]}}]}]}", "is not a CIDR: the prefix length must be 0-32"),
    ("ap when namespace inner wildcard", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: DENY, rules: [{when: [{key: source.namespace, values: [\"team-*-dev\"]}]}]}", "spec.rules[0].when[0].values[0]: \"team-*-dev\": '*' is only allowed"),
    ("ap when principal empty", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: DENY, rules: [{when: [{key: source.principal, notValues: [\"\"]}]}]}", "spec.rules[0].when[0].notValues[0]: must not be empty"),
    ("ap service account half", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{from: [{source: {serviceAccounts: [\"ns/\"]}}]}]}", "serviceAccounts[0]: \"ns/\" must be \"namespace/name\""),
    ("pa port level with empty selector", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {selector: {matchLabels: {}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {\"5432\": {mode: STRICT}}}", "spec.portLevelMtls: requires a selector"),
    ("pa port written with a zero", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {selector: {matchLabels: {app: a}}, portLevelMtls: {\"08080\": {mode: STRICT}}}", "spec.portLevelMtls[08080]: \"08080\" must be written 8080"),
    ("pa unquoted port key", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {selector: {matchLabels: {app: a}}, portLevelMtls: {8080: {mode: STRICT}}}", ""),
    ("service headless with a vip", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: None, clusterIPs: [10.96.0.5]}", "spec.clusterIPs[0]: \"10.96.0.5\" must equal spec.clusterIP (\"None\")"),
    ("service two vips disagree", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2]}", "must equal spec.clusterIP"),
    ("service dual stack", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, \"fd00::1\"]}", ""),
    ("service none among vips", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIPs: [10.96.0.1, None]}", "spec.clusterIPs[1]: \"None\" (headless) must be the only entry"),
    ("pod container port", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}", ""),
    ("pod container port out of range", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: app, ports: [{name: http, containerPort: 70000}]}]}", "spec.containers[0].ports[0].containerPort: 70000 is out of range"),
    ("pod container port huge", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: app, ports: [{containerPort: 4294967376}]}]}", "containerPort: 4294967376 is out of range"),
    ("pod container port name", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: app, ports: [{name: HTTP, containerPort: 80}]}]}", "spec.containers[0].ports[0].name: \"HTTP\" is not a valid port name"),
    ("repeated key", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: DENY\n  rules: [{from: [{source: {namespaces: [untrusted]}}]}]\n  rules: [{to: [{operation: {ports: [\"9999\"]}}]}]", "duplicate entry with key \"rules\""),
];

#[test]
fn validation_table() {
    let mut failures = Vec::new();
    for (name, yaml, want) in CASES {
        let errs = errors(yaml);
        let ok = if want.is_empty() { errs.is_empty() } else { errs.iter().any(|e| e.contains(want)) };
        if !ok {
            failures.push(format!("{name}: want {want:?}, got {errs:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A Pod exported from a real cluster applies as it is and reads back whole, except what that
/// cluster's API server kept about it for itself.
#[test]
fn a_pod_exported_with_kubectl_applies_and_keeps_its_fields() {
    let yaml = include_str!("fixtures/pod-from-kubectl.yaml");
    let loaded = load_text("pod.yaml", yaml, "default").unwrap_or_else(|e| panic!("{e:?}"));
    let Object::Pod(pod) = &loaded[0].object else { panic!("not a pod") };
    assert_eq!(pod.spec.service_account_name.as_deref(), Some("web"));
    assert_eq!(pod.spec.service_account(), "web");
    assert_eq!(pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()), Some("10.244.1.17"));
    let back = loaded[0].object.to_value();
    let meta = &back["metadata"];
    assert_eq!(meta["generateName"], "web-7c5d9f8b6d-");
    assert_eq!(meta["finalizers"][0], "batch.kubernetes.io/job-tracking");
    for dropped in ["managedFields", "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds"] {
        assert!(meta.get(dropped).is_none(), "{dropped} was kept: {meta}");
    }
    assert_eq!(back["spec"]["volumes"][0]["name"], "kube-api-access-7xk2p");
    assert_eq!(back["spec"]["tolerations"][1]["key"], "node.kubernetes.io/unreachable");
    assert_eq!(back["spec"]["containers"][0]["readinessProbe"]["periodSeconds"], 5);
    assert_eq!(back["status"]["conditions"][2]["type"], "Ready");
    assert_eq!(back["status"]["containerStatuses"][0]["restartCount"], 0);
    assert_eq!(back["status"]["qosClass"], "Burstable");
    // What reads back loads again to the same object.
    let again = Object::from_value(back.clone()).unwrap();
    assert_eq!(again.to_value(), back);
}

#[test]
fn errors_name_file_document_object_path_and_reason() {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: [{port: 0}]}\n";
    let errs = load_text("svc.yaml", yaml, "default").unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(
        errs[0].to_string(),
        "svc.yaml (document 2): Service demo/s: spec.ports[0].port: 0 is out of range 1-65535"
    );
}

#[test]
fn every_error_in_a_file_is_reported_not_just_the_first() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{name: a, port: 0}, {name: b, port: 99999}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: BAD}\n";
    let errs = load_text("f.yaml", yaml, "default").unwrap_err();
    let text: Vec<_> =
        errs.iter().map(LoadError::to_string).collect::<Vec<_>>().join("\n").lines().map(String::from).collect();
    assert_eq!(text.len(), 3, "{text:?}");
    assert!(text.iter().all(|l| l.starts_with("f.yaml (document ")), "{text:?}");
}

#[test]
fn malformed_yaml_is_an_error_not_a_panic() {
    let errs = load_text("bad.yaml", "apiVersion: v1\nkind: [Pod\n", "default").unwrap_err();
    assert!(errs[0].to_string().contains("malformed YAML"), "{}", errs[0]);
}

#[test]
fn namespaced_kinds_get_the_default_namespace_and_lists_expand() {
    let yaml = "kind: List\napiVersion: v1\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a}}\n- {apiVersion: v1, kind: Node, metadata: {name: n}}\n";
    let objs = load_text("l.yaml", yaml, "team").unwrap();
    assert_eq!(objs[0].object.meta().namespace.as_deref(), Some("team"));
    assert_eq!(objs[1].object.meta().namespace, None);
}

#[test]
fn objects_round_trip_without_losing_fields() {
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, annotations: {note: keep}, ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: u1, controller: true}]}\nspec:\n  containers: [{name: app, image: echo, ports: [{name: http, containerPort: 8080}]}]\nstatus: {podIP: 10.0.0.1}\n";
    let obj = load_text("p.yaml", yaml, "default").unwrap().remove(0).object;
    let back = Object::from_value(obj.to_value()).unwrap();
    assert_eq!(obj, back);
    assert_eq!(back.to_value()["spec"]["containers"][0]["image"], "echo");
    assert_eq!(back.meta().controller().map(|o| (o.kind.as_str(), o.name.as_str())), Some(("StatefulSet", "db")));
}
