//! The config REST API against a real server: round trips, conflicts, and every error class.

mod common;

use std::time::Duration;

use common::Istiod;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

fn pod(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "a"}},
           "spec": {"nodeName": "node1"}, "status": {"podIP": ip}})
}

const POD_PATH: &str = "/api/v1/namespaces/demo/pods";

#[tokio::test]
async fn create_get_update_list_delete_round_trip() {
    let s = Istiod::start().await;
    let c = s.api();
    let r = c.call(Method::PUT, &format!("{POD_PATH}/a"), Some(&pod("a", "10.0.0.1"))).await.unwrap();
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.outcome.as_deref(), Some("created"));
    let meta = &r.body["metadata"];
    assert_eq!(meta["namespace"], "demo", "namespace comes from the URL");
    assert_eq!(meta["generation"], 1);
    assert!(meta["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(meta["creationTimestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    let rv1 = meta["resourceVersion"].as_str().unwrap().to_string();

    let same = c.call(Method::PUT, &format!("{POD_PATH}/a"), Some(&pod("a", "10.0.0.1"))).await.unwrap();
    assert_eq!((same.status, same.outcome.as_deref()), (StatusCode::OK, Some("unchanged")));
    assert_eq!(same.body["metadata"]["resourceVersion"], rv1.as_str());

    let upd = c.call(Method::PUT, &format!("{POD_PATH}/a"), Some(&pod("a", "10.0.0.2"))).await.unwrap();
    assert_eq!(upd.outcome.as_deref(), Some("configured"));
    assert_eq!(upd.body["metadata"]["generation"], 2);
    assert_eq!(upd.body["metadata"]["uid"], meta["uid"]);
    assert_eq!(upd.body["metadata"]["creationTimestamp"], meta["creationTimestamp"]);
    assert_ne!(upd.body["metadata"]["resourceVersion"], rv1.as_str());

    let got = c.ok(Method::GET, &format!("{POD_PATH}/a"), None).await.unwrap();
    assert_eq!(got.body["status"]["podIP"], "10.0.0.2");
    c.ok(Method::PUT, &format!("{POD_PATH}/b"), Some(&pod("b", "10.0.0.3"))).await.unwrap();
    let list = c.ok(Method::GET, POD_PATH, None).await.unwrap();
    assert_eq!(list.body["kind"], "PodList");
    let names: Vec<_> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let all = c.ok(Method::GET, "/api/v1/pods", None).await.unwrap();
    assert_eq!(all.body["items"].as_array().unwrap().len(), 2);

    let del = c.call(Method::DELETE, &format!("{POD_PATH}/a"), None).await.unwrap();
    assert_eq!(del.status, StatusCode::OK);
    let gone = c.call(Method::GET, &format!("{POD_PATH}/a"), None).await.unwrap();
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.body["kind"], "Status");
    assert_eq!(gone.body["code"], 404);
}

/// A Pod exported from a real cluster (`kubectl get -o yaml`) is stored whole and reads back
/// whole, under this server's own uid and resourceVersion; the other server's bookkeeping
/// (`managedFields`, `selfLink`) is dropped. Its resourceVersion, that server's, must go first, as
/// with any create.
#[tokio::test]
async fn a_pod_exported_from_a_cluster_is_stored_whole() {
    let s = Istiod::start().await;
    let c = s.api();
    let yaml = include_str!("../../config/tests/fixtures/pod-from-kubectl.yaml");
    let loaded = trellis_config::load::load_text("pod.yaml", yaml, "demo").unwrap();
    let mut exported = loaded[0].object.to_value();
    let path = format!("{POD_PATH}/web-7c5d9f8b6d-q2x8z");
    let stale = c.call(Method::PUT, &path, Some(&exported)).await.unwrap();
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    exported["metadata"].as_object_mut().unwrap().remove("resourceVersion");
    let created = c.call(Method::PUT, &path, Some(&exported)).await.unwrap();
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let got = c.ok(Method::GET, &path, None).await.unwrap().body;
    assert_ne!(got["metadata"]["uid"], "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", "the uid is this server's");
    assert_eq!(got["metadata"]["generateName"], "web-7c5d9f8b6d-");
    assert_eq!(got["metadata"]["finalizers"][0], "batch.kubernetes.io/job-tracking");
    assert!(got["metadata"].get("managedFields").is_none() && got["metadata"].get("selfLink").is_none());
    assert_eq!(got["spec"]["volumes"][0]["projected"]["defaultMode"], 420);
    assert_eq!(got["status"]["containerStatuses"][0]["ready"], true);
    assert_eq!(got["status"]["podIP"], "10.244.1.17");
    // Deleting it is not held up by its finalizer: nothing here runs finalizers.
    c.ok(Method::DELETE, &path, None).await.unwrap();
    assert_eq!(c.call(Method::GET, &path, None).await.unwrap().status, StatusCode::NOT_FOUND);
}

/// A create whose body names no object but has `generateName` gets a fresh name from it, as the
/// Kubernetes API server gives a ReplicaSet's pods theirs; a name in the body wins.
#[tokio::test]
async fn a_create_with_generate_name_gets_a_fresh_name() {
    let s = Istiod::start().await;
    let c = s.api();
    let mut body = pod("unused", "10.0.0.1");
    let meta = body["metadata"].as_object_mut().unwrap();
    meta.remove("name");
    meta.insert("generateName".into(), json!("web-7c5d9f8b6d-"));
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let r = c.call(Method::POST, POD_PATH, Some(&body)).await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let name = r.body["metadata"]["name"].as_str().unwrap().to_string();
        let suffix = name.strip_prefix("web-7c5d9f8b6d-").expect("the prefix comes first");
        assert!(suffix.len() == 5 && suffix.bytes().all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)), "{name}");
        assert_eq!(r.body["metadata"]["generateName"], "web-7c5d9f8b6d-");
        c.ok(Method::GET, &format!("{POD_PATH}/{name}"), None).await.unwrap();
        names.insert(name);
    }
    assert_eq!(names.len(), 3, "each create gets its own name: {names:?}");
    // A long prefix is cut so that the name fits in 63 characters.
    body["metadata"]["generateName"] = json!(format!("{}-", "a".repeat(70)));
    let long = c.call(Method::POST, POD_PATH, Some(&body)).await.unwrap();
    assert_eq!(long.status, StatusCode::CREATED, "{}", long.body);
    assert_eq!(long.body["metadata"]["name"].as_str().unwrap().len(), 63);
    // A prefix that cannot start a valid name is refused, and the error names the field it is in.
    body["metadata"]["generateName"] = json!("Web_");
    let bad = c.call(Method::POST, POD_PATH, Some(&body)).await.unwrap();
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    let message = bad.body["message"].as_str().unwrap();
    assert!(message.contains("metadata.generateName: \"Web_\" is not a valid name prefix"), "{message}");
    body["metadata"]["generateName"] = json!("web-7c5d9f8b6d-");
    // A name in the body is used, and a create of a name that exists is refused, not renamed.
    body["metadata"]["name"] = json!("chosen");
    let chosen = c.call(Method::POST, POD_PATH, Some(&body)).await.unwrap();
    assert_eq!((chosen.status, &chosen.body["metadata"]["name"]), (StatusCode::CREATED, &json!("chosen")));
    let again = c.call(Method::POST, POD_PATH, Some(&body)).await.unwrap();
    assert_eq!((again.status, &again.body["reason"]), (StatusCode::CONFLICT, &json!("AlreadyExists")));
    // An empty name counts as none.
    body["metadata"]["name"] = json!("");
    let empty = c.call(Method::POST, POD_PATH, Some(&body)).await.unwrap();
    assert_eq!(empty.status, StatusCode::CREATED, "{}", empty.body);
    // No name, and an empty or no generateName: the name is required.
    for generate in [json!(""), Value::Null] {
        let meta = body["metadata"].as_object_mut().unwrap();
        meta.remove("name");
        meta.insert("generateName".into(), generate);
        let nameless = c.call(Method::POST, POD_PATH, Some(&body)).await.unwrap();
        assert_eq!(nameless.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", nameless.body);
        assert!(nameless.body["message"].as_str().unwrap().contains("metadata.name"), "{}", nameless.body);
    }
}

#[tokio::test]
async fn stale_resource_version_is_a_conflict() {
    let s = Istiod::start().await;
    let c = s.api();
    let created = c.ok(Method::PUT, &format!("{POD_PATH}/a"), Some(&pod("a", "10.0.0.1"))).await.unwrap();
    let rv = created.body["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let mut first = pod("a", "10.0.0.2");
    first["metadata"]["resourceVersion"] = json!(rv);
    c.ok(Method::PUT, &format!("{POD_PATH}/a"), Some(&first)).await.unwrap();
    let mut second = pod("a", "10.0.0.3");
    second["metadata"]["resourceVersion"] = json!(rv);
    let r = c.call(Method::PUT, &format!("{POD_PATH}/a"), Some(&second)).await.unwrap();
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.body["reason"], "Conflict");
    assert!(r.body["message"].as_str().unwrap().contains("stale"), "{}", r.body);
    let now = c.ok(Method::GET, &format!("{POD_PATH}/a"), None).await.unwrap();
    assert_eq!(now.body["status"]["podIP"], "10.0.0.2", "the losing write changed nothing");
    let dup = c.call(Method::POST, POD_PATH, Some(&pod("a", "10.0.0.9"))).await.unwrap();
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.body["reason"], "AlreadyExists");
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_changes_nothing() {
    let s = Istiod::start().await;
    let c = s.api();
    let invalid =
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 70000}]}});
    let r = c.call(Method::PUT, "/api/v1/namespaces/demo/services/s", Some(&invalid)).await.unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["details"]["causes"][0]["field"], "spec.ports[0].port");
    assert_eq!(r.body["message"], "Service demo/s: spec.ports[0].port: 70000 is out of range 1-65535");

    let unknown_field = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"nodeNam": "x"}});
    let r = c.call(Method::PUT, &format!("{POD_PATH}/p"), Some(&unknown_field)).await.unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    let wrong_ns = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "other"}});
    assert_eq!(
        c.call(Method::PUT, &format!("{POD_PATH}/p"), Some(&wrong_ns)).await.unwrap().status,
        StatusCode::BAD_REQUEST
    );
    let wrong_kind = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "p"}});
    assert_eq!(
        c.call(Method::PUT, &format!("{POD_PATH}/p"), Some(&wrong_kind)).await.unwrap().status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        c.call(Method::GET, "/apis/apps/v1/namespaces/demo/deployments", None).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(c.call(Method::DELETE, &format!("{POD_PATH}/nope"), None).await.unwrap().status, StatusCode::NOT_FOUND);
    assert_eq!(
        c.call(Method::PUT, &format!("{POD_PATH}/p"), Some(&json!("just a string"))).await.unwrap().status,
        StatusCode::BAD_REQUEST
    );

    // Raw bodies: malformed YAML, YAML accepted, oversized rejected.
    let raw = |body: Vec<u8>, ct: &'static str| {
        let url = format!("http://{}/api/v1/namespaces/demo/pods/y", s.running.api_addr);
        async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
            let req = hyper::Request::put(url)
                .header("content-type", ct)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            client.request(req).await.unwrap().status()
        }
    };
    assert_eq!(raw(b"apiVersion: v1\nkind: [Pod\n".to_vec(), "application/yaml").await, StatusCode::BAD_REQUEST);
    // A repeated key would keep only its last value: refused, in JSON as in YAML.
    let repeated = br#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "y", "labels": {"a": "1"}, "labels": {"b": "2"}}}"#;
    assert_eq!(raw(repeated.to_vec(), "application/json").await, StatusCode::BAD_REQUEST);
    assert_eq!(
        raw(b"apiVersion: v1\nkind: Pod\nkind: Pod\nmetadata: {name: y}\n".to_vec(), "application/yaml").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        raw(b"apiVersion: v1\nkind: Pod\nmetadata: {name: y}\n".to_vec(), "application/yaml").await,
        StatusCode::CREATED
    );
    let mut huge = b"apiVersion: v1\nkind: Pod\nmetadata: {name: y, annotations: {a: \"".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 2 << 20));
    huge.extend(b"\"}}\n");
    assert_eq!(raw(huge, "application/yaml").await, StatusCode::PAYLOAD_TOO_LARGE);

    let list = c.ok(Method::GET, "/api/v1/pods", None).await.unwrap();
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1, "only the valid object was stored");
}

#[tokio::test]
async fn watch_streams_existing_then_new_events_as_ndjson() {
    let s = Istiod::start().await;
    let c = s.api();
    c.ok(Method::PUT, &format!("{POD_PATH}/a"), Some(&pod("a", "10.0.0.1"))).await.unwrap();
    let url = format!("http://{}/api/v1/namespaces/demo/pods?watch=true", s.running.api_addr);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    c.ok(Method::PUT, &format!("{POD_PATH}/b"), Some(&pod("b", "10.0.0.2"))).await.unwrap();
    c.ok(Method::PUT, "/api/v1/namespaces/other/pods/z", Some(&pod("z", "10.0.0.9"))).await.unwrap();
    c.ok(Method::DELETE, &format!("{POD_PATH}/a"), None).await.unwrap();
    let mut text = String::new();
    use http_body_util::BodyExt;
    while text.lines().count() < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            text.push_str(std::str::from_utf8(&d).unwrap());
        }
    }
    let events: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["type"].as_str().unwrap().to_string(), v["object"]["metadata"]["name"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        events,
        vec![("ADDED".into(), "a".into()), ("ADDED".into(), "b".into()), ("DELETED".into(), "a".into())],
        "other namespaces are filtered out"
    );
}

#[tokio::test]
async fn metrics_and_ready_are_served() {
    let s = Istiod::start().await;
    let c = s.api();
    c.ok(Method::PUT, &format!("{POD_PATH}/a"), Some(&pod("a", "10.0.0.1"))).await.unwrap();
    let ready = c.call(Method::GET, "/ready", None).await.unwrap();
    assert_eq!(ready.status, StatusCode::OK);
    let m = c.call(Method::GET, "/metrics", None).await.unwrap();
    let text = m.body.as_str().unwrap_or_default().to_string();
    assert!(text.contains("trellis_config_writes_total{kind=\"Pod\",op=\"put\",result=\"created\"} 1"), "{text}");
    assert!(text.contains("pilot_xds "), "{text}");
}
