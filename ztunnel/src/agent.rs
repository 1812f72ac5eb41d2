//! The node agent's Unix socket: how the CNI plugin (or an operator) registers pods.
//!
//! One JSON object per line, one answer per line:
//!
//! ```text
//! {"op":"add","namespace":"demo","name":"client","netns":"/var/run/netns/client","ip":"10.244.1.5"}
//! {"op":"remove","namespace":"demo","name":"client"}
//! {"op":"list"}
//! → {"ok":true,"pods":[{uid,netns,enrolled,reason}]} | {"ok":false,"error":"…"}
//! ```
//!
//! `add` registers the pod; whether it is meshed follows its labels (see [`crate::pods`]), and
//! the answer says which. When ztunnel cannot tell yet (the control plane does not know the pod,
//! or enrolling it failed), the answer is an error, so the pod does not start uncaptured. `ip`
//! (optional) is the address the CNI plugin assigned, which the control plane learns only later. The socket is created with mode 0600: registering a pod changes its
//! traffic, so only root may.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::pods::{PodInfo, Pods};

const MAX_LINE: usize = 4096;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Deserialize, Serialize, Debug)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Add {
        namespace: String,
        name: String,
        netns: PathBuf,
        #[serde(default)]
        ip: Option<std::net::Ipv4Addr>,
        /// The sandbox (CNI_CONTAINERID), so that a late remove for an older one is told apart.
        #[serde(default)]
        container: Option<String>,
    },
    Remove {
        namespace: String,
        name: String,
        #[serde(default)]
        container: Option<String>,
    },
    /// A struct variant, so that `deny_unknown_fields` applies to it too: a unit variant of an
    /// internally tagged enum accepts any extra field.
    List {},
}

#[derive(Deserialize, Serialize, Debug, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<PodInfo>>,
}

/// Binds the socket (replacing a stale one from a previous run).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, pods: Arc<Pods>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let pods = pods.clone();
                tokio::spawn(async move { session(s, pods).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn session(stream: UnixStream, pods: Arc<Pods>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_LINE as u64 * 64)).lines();
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            _ => return,
        };
        let resp = if line.len() > MAX_LINE {
            Response { error: Some(format!("request longer than {MAX_LINE} bytes")), ..Default::default() }
        } else {
            handle(&line, &pods).await
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn handle(line: &str, pods: &Pods) -> Response {
    let fail = |e: String| Response { error: Some(e), ..Default::default() };
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid request: {e}")),
    };
    match req {
        Request::Add { namespace, name, netns, ip, container } => {
            match pods.add(&namespace, &name, &netns, ip, container).await {
                Ok(p) => Response { ok: true, pods: Some(vec![p]), ..Default::default() },
                Err(e) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "registration refused");
                    fail(e)
                }
            }
        }
        Request::Remove { namespace, name, container } => {
            pods.remove(&namespace, &name, container.as_deref()).await;
            Response { ok: true, ..Default::default() }
        }
        Request::List {} => Response { ok: true, pods: Some(pods.list()), ..Default::default() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let add = r#"{"op":"add","namespace":"demo","name":"client","netns":"/var/run/netns/c","ip":"10.244.1.5"}"#;
        match serde_json::from_str::<Request>(add) {
            Ok(Request::Add { ip, .. }) => assert_eq!(ip, Some([10, 244, 1, 5].into())),
            other => panic!("{other:?}"),
        }
        let no_ip = r#"{"op":"add","namespace":"demo","name":"client","netns":"/var/run/netns/c"}"#;
        assert!(matches!(serde_json::from_str::<Request>(no_ip), Ok(Request::Add { ip: None, .. })));
        let bad_ip = r#"{"op":"add","namespace":"demo","name":"client","netns":"/n","ip":"10.244.1"}"#;
        assert!(serde_json::from_str::<Request>(bad_ip).unwrap_err().to_string().contains("invalid IPv4 address"));
        assert!(matches!(serde_json::from_str::<Request>(r#"{"op":"list"}"#), Ok(Request::List {})));
        for unknown in [r#"{"op":"list","verbose":true}"#, r#"{"op":"remove","namespace":"d","name":"c","force":1}"#] {
            let r = serde_json::from_str::<Request>(unknown);
            assert!(r.as_ref().is_err_and(|e| e.to_string().contains("unknown field")), "{unknown}: {r:?}");
        }
    }
}
