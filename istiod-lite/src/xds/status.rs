//! Which proxies are connected and what each has acknowledged. Served at `/debug/syncz` and read
//! by `meshctl proxy-status`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    /// Version (cache sequence) of the last response sent.
    pub sent_version: String,
    pub sent_nonce: String,
    /// Version of the last response the proxy acknowledged.
    pub acked_version: String,
    pub acked_nonce: String,
    /// Number of resources the proxy currently holds, as far as this server knows.
    pub resources: usize,
    /// The last rejection and its reason, until a later response is accepted.
    pub last_nack: Option<Nack>,
    pub nacks_total: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Nack {
    pub nonce: String,
    pub version: String,
    pub error: String,
    pub at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    pub stream_id: u64,
    pub node_id: String,
    pub node_name: String,
    pub peer: String,
    pub connected_at: String,
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
}

impl Registry {
    pub fn connect(&self, node_id: String, node_name: String, peer: String) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let status = ProxyStatus {
            stream_id: id,
            node_id,
            node_name,
            peer,
            connected_at: crate::store::file::now_rfc3339(),
            types: BTreeMap::new(),
        };
        self.proxies.lock().unwrap_or_else(|e| e.into_inner()).insert(id, status);
        id
    }

    pub fn disconnect(&self, id: u64) {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    pub fn update(&self, id: u64, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        let mut p = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = p.get_mut(&id) {
            f(s.types.entry(type_url.to_string()).or_default());
        }
    }

    pub fn snapshot(&self) -> Vec<ProxyStatus> {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}
