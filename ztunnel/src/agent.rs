//! The node agent's Unix socket: how the CNI plugin (or an operator) registers pods.
//!
//! One JSON object per line, one answer per line:
//!
//! ```text
//! {"op":"add","namespace":"demo","name":"client","netns":"/var/run/netns/client","ip":"10.244.1.5"}
//! {"op":"remove","namespace":"demo","name":"client"}
//! {"op":"list"}
//! {"op":"handover"}
//! → {"ok":true,"pods":[{uid,netns,enrolled,reason}]} | {"ok":false,"error":"…"}
//! ```
//!
//! `add` registers the pod; whether it is meshed follows its labels (see [`crate::pods`]), and
//! the answer says which. When ztunnel cannot tell yet (the control plane does not know the pod,
//! or enrolling it failed), the answer is an error, so the pod does not start uncaptured. `ip`
//! (optional) is the address the CNI plugin assigned, which the control plane learns only later.
//! The socket is created with mode 0600: registering a pod changes its traffic, so only root may.
//!
//! `handover` is how a new ztunnel takes over from the one running ([`take_over`]) before it
//! binds the socket: the old one persists its registry and stops managing pods, and answers
//! `add` and `remove` that still reach it with an error, so the CNI plugin retries them against
//! the new one.

use std::io::ErrorKind;
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
    /// Sent by a newer ztunnel starting on this node; see [`take_over`].
    Handover {},
}

#[derive(Deserialize, Serialize, Debug, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<PodInfo>>,
}

/// How long a starting ztunnel waits for the running one to hand over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`take_over`] found at the socket path.
#[derive(Debug, PartialEq)]
pub enum TakeOver {
    /// Nothing answers there: no ztunnel is running (or it died).
    NoneRunning,
    /// The running ztunnel persisted its registry and stopped managing pods.
    HandedOver,
    /// A ztunnel answers but did not hand over (an older version, or it failed): both will
    /// manage the pods until it exits.
    Refused(String),
}

/// Asks the ztunnel listening on `path`, if any, to hand its pods over. Call before loading the
/// registry, so that it holds the running one's final state.
pub async fn take_over(path: &Path) -> TakeOver {
    let ask = async {
        let mut s = UnixStream::connect(path).await?;
        s.write_all(b"{\"op\":\"handover\"}\n").await?;
        let mut line = String::new();
        BufReader::new(s.take(MAX_LINE as u64)).read_line(&mut line).await?;
        std::io::Result::Ok(line)
    };
    let answer = match tokio::time::timeout(HANDOVER_TIMEOUT, ask).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return TakeOver::NoneRunning
        }
        Ok(Err(e)) => return TakeOver::Refused(format!("asking {}: {e}", path.display())),
        Err(_) => return TakeOver::Refused(format!("no answer from {} within {HANDOVER_TIMEOUT:?}", path.display())),
    };
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response { ok: true, .. }) => TakeOver::HandedOver,
        Ok(Response { error, .. }) => TakeOver::Refused(error.unwrap_or_else(|| "refused".into())),
        Err(e) => TakeOver::Refused(format!("unreadable answer {:?}: {e}", answer.trim())),
    }
}

/// The bound socket's path, and which file it was, so that exiting removes it only if no newer
/// ztunnel has bound the path since.
pub struct Bound {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Bound {
    pub fn remove_if_ours(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.dev_ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the socket (replacing a stale one from a previous run, or the one of a ztunnel that
/// handed over).
pub fn bind(path: &Path) -> std::io::Result<(UnixListener, Bound)> {
    use std::os::unix::fs::MetadataExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let m = std::fs::symlink_metadata(path)?;
    Ok((l, Bound { path: path.to_path_buf(), dev_ino: (m.dev(), m.ino()) }))
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
    let handed_over = || fail("this ztunnel handed its pods over to a newer one; try again".into());
    match req {
        Request::Add { .. } | Request::Remove { .. } if pods.handed_over() => handed_over(),
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
        Request::Handover {} => {
            pods.hand_over();
            Response { ok: true, ..Default::default() }
        }
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
        assert!(matches!(serde_json::from_str::<Request>(r#"{"op":"handover"}"#), Ok(Request::Handover {})));
        for unknown in [
            r#"{"op":"list","verbose":true}"#,
            r#"{"op":"remove","namespace":"d","name":"c","force":1}"#,
            r#"{"op":"handover","pods":[]}"#,
        ] {
            let r = serde_json::from_str::<Request>(unknown);
            assert!(r.as_ref().is_err_and(|e| e.to_string().contains("unknown field")), "{unknown}: {r:?}");
        }
    }

    /// One answer from whatever listens at `path` (standing in for the running ztunnel).
    async fn answering(path: &Path, answer: String) -> tokio::task::JoinHandle<String> {
        let l = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut asked = String::new();
            BufReader::new(r).read_line(&mut asked).await.unwrap();
            w.write_all(answer.as_bytes()).await.unwrap();
            asked
        })
    }

    #[tokio::test]
    async fn take_over_asks_the_running_ztunnel_and_reads_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        assert_eq!(take_over(&path).await, TakeOver::NoneRunning, "no socket");
        drop(UnixListener::bind(&path).unwrap());
        assert_eq!(take_over(&path).await, TakeOver::NoneRunning, "a stale socket nobody listens on");
        std::fs::remove_file(&path).unwrap();

        let asked = answering(&path, "{\"ok\":true}\n".into()).await;
        assert_eq!(take_over(&path).await, TakeOver::HandedOver);
        assert_eq!(asked.await.unwrap(), "{\"op\":\"handover\"}\n");
        std::fs::remove_file(&path).unwrap();

        // A ztunnel from before hand-overs existed rejects the request.
        let older = r#"{"ok":false,"error":"invalid request: unknown variant `handover`"}"#;
        let _older = answering(&path, format!("{older}\n")).await;
        match take_over(&path).await {
            TakeOver::Refused(why) => assert!(why.contains("unknown variant"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_exiting_ztunnel_removes_only_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _in_rt = rt.enter();
        let (_old, old_bound) = bind(&path).unwrap();
        let (_new, new_bound) = bind(&path).unwrap();
        old_bound.remove_if_ours();
        assert!(path.exists(), "the newer ztunnel's socket must stay");
        new_bound.remove_if_ours();
        assert!(!path.exists());
    }
}
