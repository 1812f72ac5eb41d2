//! 15006: plaintext TCP to the pod from outside the mesh. There is no peer identity, so under
//! STRICT the `istio_converted_static_strict` policy denies it; the connection is reset and
//! counted. Under PERMISSIVE, L4 policy still applies to the source address and ports.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::conn::{self, Record};
use super::{is_listener_loop, peer_of, splice, Authorized, Pod, Proxy};
use crate::log_budget::warn_limited;
use crate::metrics::Reporter;
use crate::sockets;
use crate::state::policy::Decision;

const DIRECTION: &str = "inbound_plaintext";

impl Proxy {
    pub(super) async fn plaintext(self: Arc<Self>, pod: Arc<Pod>, client: TcpStream) {
        let src = peer_of(&client);
        let dst = match sockets::original_destination(&client) {
            Ok(d) if !is_listener_loop(d) => d,
            _ => {
                self.metrics.reject(DIRECTION, "bad_request");
                return sockets::reset(client);
            }
        };
        let Some(Authorized { source: src_peer, destination: dst_peer, decision }) =
            self.authorize(&pod, None, src, dst)
        else {
            warn_limited!(per src.ip(); "plaintext connection not addressed to this workload", %src, %dst, pod = pod.uid);
            self.metrics.reject(DIRECTION, "bad_request");
            return sockets::reset(client);
        };
        if let Decision::Deny(policy) = decision {
            warn_limited!(per src.ip();
                "plaintext connection denied",
                policy,
                %src,
                %dst,
                destination = dst_peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default()
            );
            self.metrics.reject(DIRECTION, "policy");
            return sockets::reset(client);
        }
        let record = Record {
            direction: DIRECTION,
            reporter: Reporter::destination,
            src,
            dst,
            src_peer,
            dst_peer,
            service: String::new(),
            mtls: false,
        };
        let guard = conn::Guard { pod_uid: pod.uid.clone(), source: None };
        match self.connect_tracked(&pod, record, Some(guard)).await {
            Some(up) => splice(client, up).await,
            None => sockets::reset(client),
        }
    }
}
