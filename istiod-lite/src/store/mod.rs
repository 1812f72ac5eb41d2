//! The config store: the single source of truth that validation feeds and translation watches.
//!
//! [`Store`] is the seam for the backends ARCHITECTURE.md names (file, Kubernetes, NATS KV). The
//! file store in [`file`] is the embedded default. Every backend gives the same guarantees: a write
//! is acknowledged only once durable, `resourceVersion` is a global monotonic revision, a stale
//! `resourceVersion` precondition is a conflict, and watchers see every change after their
//! snapshot, in order, or are told they fell behind.

pub mod file;
mod wal;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::broadcast;
use trellis_config::{Kind, Object, ObjectKey};

/// A write request. `Put` is create-or-replace; a `resourceVersion` in the object's metadata is
/// a precondition.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // short-lived request values; boxing buys nothing
pub enum Write {
    Put(Object),
    /// A put that fails with [`StoreError::AlreadyExists`] if the object exists, decided by the
    /// writer itself so that two creates of one name cannot both succeed.
    Create(Object),
    Delete {
        key: ObjectKey,
        resource_version: Option<String>,
    },
}

/// What a write did; carries the stored object (with server-owned metadata filled in).
#[derive(Clone, Debug)]
pub enum Applied {
    Created(Arc<Object>),
    Updated(Arc<Object>),
    Unchanged(Arc<Object>),
    Deleted(Arc<Object>),
}

impl Applied {
    pub fn object(&self) -> &Arc<Object> {
        match self {
            Applied::Created(o) | Applied::Updated(o) | Applied::Unchanged(o) | Applied::Deleted(o) => o,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(ObjectKey),
    #[error("{0} already exists")]
    AlreadyExists(ObjectKey),
    #[error("{key}: resourceVersion {expected} is stale (current is {actual}); re-read the object and retry")]
    Conflict { key: ObjectKey, expected: String, actual: String },
    #[error("storage failure: {0}")]
    Io(String),
    #[error("store is shutting down")]
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change. For `Deleted`, `object` is the last state before deletion.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: EventType,
    pub object: Arc<Object>,
    /// For `Modified`, the previous state: translators need it to find what stopped matching.
    pub previous: Option<Arc<Object>>,
    pub revision: u64,
}

/// A consistent snapshot plus a subscription that continues exactly after it.
pub struct Watch {
    pub objects: Vec<Arc<Object>>,
    pub revision: u64,
    pub events: broadcast::Receiver<Event>,
}

pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &ObjectKey) -> Option<Arc<Object>>;
    /// Objects of `kind` (all kinds if `None`) in `namespace` (all if `None`), sorted by key.
    fn list(&self, kind: Option<Kind>, namespace: Option<&str>) -> Vec<Arc<Object>>;
    /// Resolves once the write is durable (or rejected).
    fn write(&self, write: Write) -> BoxFuture<'static, Result<Applied, StoreError>>;
    fn watch(&self) -> Watch;
    fn revision(&self) -> u64;
}
