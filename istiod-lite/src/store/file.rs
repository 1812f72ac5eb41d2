//! The embedded file store: a write-ahead log plus periodic snapshots under `--state-dir`.
//!
//! Writes go through one writer thread that groups concurrent requests into a batch and makes it
//! durable with a single `fdatasync`, then publishes the batch. That is what makes a bulk apply of
//! thousands of objects take a fraction of a second on a disk where one fsync costs ~0.5 ms, while
//! keeping "acknowledged means durable". Snapshots are written to a temporary file, fsynced and
//! renamed into place, then the log is truncated; a crash between the two is harmless because log
//! records at or below the snapshot's revision are skipped on replay.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, RwLock};

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, oneshot};
use trellis_config::{Kind, Object, ObjectKey};

use super::wal::{self, Record};
use super::{Applied, Event, EventType, Store, StoreError, Watch, Write};

/// Writes waiting for the writer thread; a full queue makes callers wait (backpressure).
const QUEUE: usize = 4096;
/// Most writes made durable by one fdatasync.
const MAX_BATCH: usize = 1024;
/// Compact once the log grows past this, by default.
pub const COMPACT_BYTES: u64 = 32 << 20;
/// Watch events buffered per subscriber before it is told it fell behind.
const WATCH_BUFFER: usize = 65536;

type Reply = oneshot::Sender<Result<Applied, StoreError>>;

struct State {
    objects: BTreeMap<ObjectKey, Arc<Object>>,
    revision: u64,
}

pub struct FileStore {
    state: Arc<RwLock<State>>,
    queue: mpsc::SyncSender<(Write, Reply)>,
    events: broadcast::Sender<Event>,
    /// Held for the store's lifetime: a second istiod-lite on the same state dir would corrupt it.
    _lock: File,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    revision: u64,
    objects: Vec<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("state dir {dir}: {err}")]
    Io { dir: PathBuf, err: io::Error },
    #[error("state dir {0} is in use by another istiod-lite")]
    Locked(PathBuf),
    #[error("state dir {dir}: snapshot is unreadable: {reason}")]
    Corrupt { dir: PathBuf, reason: String },
}

impl FileStore {
    pub fn open(dir: &Path) -> Result<FileStore, OpenError> {
        Self::open_with(dir, COMPACT_BYTES)
    }

    /// Like [`open`](Self::open) with an explicit log size that triggers compaction.
    pub fn open_with(dir: &Path, compact_bytes: u64) -> Result<FileStore, OpenError> {
        let io_err = |err| OpenError::Io { dir: dir.to_path_buf(), err };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("LOCK")).map_err(io_err)?;
        if lock.try_lock().is_err() {
            return Err(OpenError::Locked(dir.to_path_buf()));
        }
        let mut objects = BTreeMap::new();
        let mut revision = 0;
        match std::fs::read(dir.join("snapshot.json")) {
            Ok(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes)
                    .map_err(|e| OpenError::Corrupt { dir: dir.to_path_buf(), reason: e.to_string() })?;
                revision = snap.revision;
                for v in snap.objects {
                    let obj = decode(v).map_err(|reason| OpenError::Corrupt { dir: dir.to_path_buf(), reason })?;
                    objects.insert(obj.key(), Arc::new(obj));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let mut log = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("wal.log"))
            .map_err(io_err)?;
        let snapshot_revision = revision;
        for rec in wal::replay(&mut log).map_err(io_err)? {
            if rec.revision() <= snapshot_revision {
                continue;
            }
            revision = rec.revision();
            match rec {
                Record::Put { object, .. } => {
                    let obj = decode(object).map_err(|reason| OpenError::Corrupt { dir: dir.to_path_buf(), reason })?;
                    objects.insert(obj.key(), Arc::new(obj));
                }
                Record::Delete { key, .. } => {
                    objects.remove(&key);
                }
            }
        }
        tracing::info!(dir = %dir.display(), objects = objects.len(), revision, "file store opened");
        let state = Arc::new(RwLock::new(State { objects, revision }));
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let (queue, rx) = mpsc::sync_channel(QUEUE);
        let writer =
            Writer { dir: dir.to_path_buf(), log, state: state.clone(), events: events.clone(), compact_bytes };
        std::thread::Builder::new().name("store-writer".into()).spawn(move || writer.run(rx)).map_err(io_err)?;
        Ok(FileStore { state, queue, events, _lock: lock })
    }
}

/// Stored objects were validated on the way in; re-validating on load catches hand edits.
///
/// One rule is newer than data that may be stored: `metadata.generateName` is checked since
/// this release, and it has no effect once an object exists. An object whose only fault is an
/// invalid one (written by an earlier istiod-lite) is loaded without it and a warning, instead of
/// making the whole state dir unreadable on upgrade; its next write must fix it.
fn decode(v: Value) -> Result<Object, String> {
    if v.pointer("/metadata/generateName").is_none() {
        return Object::from_value(v).map_err(|e| e.to_string());
    }
    match Object::from_value(v.clone()) {
        Ok(obj) => Ok(obj),
        Err(e) if e.errors.iter().all(|f| f.path == "metadata.generateName") => {
            let mut v = v;
            if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("generateName");
            }
            let obj = Object::from_value(v).map_err(|e| e.to_string())?;
            tracing::warn!(object = %e.object, error = %e,
                "stored object has a generateName this release refuses; loaded without it");
            Ok(obj)
        }
        Err(e) => Err(e.to_string()),
    }
}

impl Store for FileStore {
    fn get(&self, key: &ObjectKey) -> Option<Arc<Object>> {
        self.state.read().ok()?.objects.get(key).cloned()
    }

    fn list(&self, kind: Option<Kind>, namespace: Option<&str>) -> Vec<Arc<Object>> {
        let Ok(state) = self.state.read() else { return vec![] };
        state
            .objects
            .iter()
            .filter(|(k, _)| kind.is_none_or(|kind| k.kind == kind) && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, o)| o.clone())
            .collect()
    }

    fn write(&self, write: Write) -> BoxFuture<'static, Result<Applied, StoreError>> {
        let (tx, rx) = oneshot::channel();
        let queue = self.queue.clone();
        async move {
            // `send` blocks only while the bounded queue is full; do that off the async workers.
            tokio::task::spawn_blocking(move || queue.send((write, tx)).map_err(|_| StoreError::Closed))
                .await
                .map_err(|_| StoreError::Closed)??;
            rx.await.map_err(|_| StoreError::Closed)?
        }
        .boxed()
    }

    fn watch(&self) -> Watch {
        // Holding the read lock while subscribing means no event can fall between snapshot and
        // subscription: the writer publishes under the write lock.
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        Watch {
            objects: state.objects.values().cloned().collect(),
            revision: state.revision,
            events: self.events.subscribe(),
        }
    }

    fn revision(&self) -> u64 {
        self.state.read().map(|s| s.revision).unwrap_or(0)
    }
}

struct Writer {
    dir: PathBuf,
    log: File,
    compact_bytes: u64,
    state: Arc<RwLock<State>>,
    events: broadcast::Sender<Event>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<(Write, Reply)>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            self.commit(batch);
            if let Err(e) = self.maybe_compact() {
                tracing::error!(error = %e, "store compaction failed; the log keeps growing until it succeeds");
            }
        }
    }

    /// Plans every write of the batch against the state as it will be, makes the log records
    /// durable, then publishes. Nothing is visible to readers before it is durable.
    fn commit(&mut self, batch: Vec<(Write, Reply)>) {
        let now = now_rfc3339();
        let (mut revision, mut overlay) = {
            let s = self.state.read().unwrap_or_else(|e| e.into_inner());
            (s.revision, BTreeMap::<ObjectKey, Option<Arc<Object>>>::new())
        };
        let mut bytes = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            for (write, reply) in batch {
                let current = |key: &ObjectKey| match overlay.get(key) {
                    Some(v) => v.clone(),
                    None => state.objects.get(key).cloned(),
                };
                let planned = plan(write, &current, revision + 1, &now);
                if let Ok(p) = &planned {
                    if let Some(rec) = &p.record {
                        revision += 1;
                        wal::encode(rec, &mut bytes);
                        overlay.insert(
                            p.event.object.key(),
                            if p.event.kind == EventType::Deleted { None } else { Some(p.event.object.clone()) },
                        );
                    }
                }
                outcomes.push((planned, reply));
            }
        }
        if !bytes.is_empty() {
            if let Err(e) = wal::append(&mut self.log, &bytes) {
                tracing::error!(error = %e, "write-ahead log append failed; rejecting batch");
                // Drop the partial tail so later appends follow intact records.
                let _ = self.log.sync_all();
                for (_, reply) in outcomes {
                    let _ = reply.send(Err(StoreError::Io(e.to_string())));
                }
                self.truncate_to_intact();
                return;
            }
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        for (key, obj) in overlay {
            match obj {
                Some(o) => state.objects.insert(key, o),
                None => state.objects.remove(&key),
            };
        }
        state.revision = revision;
        for (planned, reply) in outcomes {
            let result = planned.map(|p| {
                if p.record.is_some() {
                    // No receivers is fine: nobody is watching yet.
                    let _ = self.events.send(p.event);
                }
                p.applied
            });
            let _ = reply.send(result);
        }
    }

    fn truncate_to_intact(&mut self) {
        if let Err(e) = wal::replay(&mut self.log) {
            tracing::error!(error = %e, "cannot re-read write-ahead log");
        }
    }

    fn maybe_compact(&mut self) -> io::Result<()> {
        if self.log.metadata()?.len() < self.compact_bytes {
            return Ok(());
        }
        let snap = {
            let s = self.state.read().unwrap_or_else(|e| e.into_inner());
            Snapshot { revision: s.revision, objects: s.objects.values().map(|o| o.to_value()).collect() }
        };
        write_atomic(&self.dir.join("snapshot.json"), &serde_json::to_vec(&snap).map_err(io::Error::other)?)?;
        self.log.set_len(0)?;
        // The log is not opened in append mode: without this seek the next append would land at
        // the old offset, leaving a zero-filled hole that replay stops at.
        std::io::Seek::seek(&mut self.log, std::io::SeekFrom::Start(0))?;
        self.log.sync_all()?;
        tracing::info!(revision = snap.revision, objects = snap.objects.len(), "store compacted");
        Ok(())
    }
}

/// Write to a temporary file, fsync it, rename over the target, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

struct Planned {
    record: Option<Record>,
    event: Event,
    applied: Applied,
}

/// Decides what one write does against the current state; pure apart from the clock string.
fn plan(
    write: Write,
    current: &dyn Fn(&ObjectKey) -> Option<Arc<Object>>,
    revision: u64,
    now: &str,
) -> Result<Planned, StoreError> {
    match write {
        Write::Create(obj) if current(&obj.key()).is_some() => Err(StoreError::AlreadyExists(obj.key())),
        Write::Create(obj) => plan(Write::Put(obj), current, revision, now),
        Write::Put(mut obj) => {
            let key = obj.key();
            let existing = current(&key);
            let wanted_rv = obj.meta().resource_version.clone();
            if let Some(rv) = &wanted_rv {
                let actual = existing
                    .as_ref()
                    .and_then(|e| e.meta().resource_version.clone())
                    .unwrap_or_else(|| "<none>".into());
                if *rv != actual {
                    return Err(StoreError::Conflict { key, expected: rv.clone(), actual });
                }
            }
            let rv = revision.to_string();
            let meta = obj.meta_mut();
            match &existing {
                Some(old) => {
                    let om = old.meta();
                    meta.uid = om.uid.clone();
                    meta.creation_timestamp = om.creation_timestamp.clone();
                    meta.generation = om.generation;
                    meta.resource_version = om.resource_version.clone();
                    if **old == obj {
                        return Ok(Planned {
                            record: None,
                            event: Event { kind: EventType::Modified, object: old.clone(), previous: None, revision },
                            applied: Applied::Unchanged(old.clone()),
                        });
                    }
                    let spec_changed = obj.spec_differs(old);
                    let meta = obj.meta_mut();
                    if spec_changed {
                        meta.generation = Some(meta.generation.unwrap_or(0) + 1);
                    }
                    meta.resource_version = Some(rv);
                }
                None => {
                    meta.uid = Some(uuid::Uuid::new_v4().to_string());
                    meta.creation_timestamp = Some(now.to_string());
                    meta.generation = Some(1);
                    meta.resource_version = Some(rv);
                }
            }
            let obj = Arc::new(obj);
            let record = Record::Put { revision, object: obj.to_value() };
            let (kind, applied) = match existing {
                Some(_) => (EventType::Modified, Applied::Updated(obj.clone())),
                None => (EventType::Added, Applied::Created(obj.clone())),
            };
            Ok(Planned {
                record: Some(record),
                event: Event { kind, object: obj, previous: existing, revision },
                applied,
            })
        }
        Write::Delete { key, resource_version } => {
            let Some(existing) = current(&key) else { return Err(StoreError::NotFound(key)) };
            if let Some(rv) = resource_version {
                let actual = existing.meta().resource_version.clone().unwrap_or_default();
                if rv != actual {
                    return Err(StoreError::Conflict { key, expected: rv, actual });
                }
            }
            Ok(Planned {
                record: Some(Record::Delete { revision, key }),
                event: Event { kind: EventType::Deleted, object: existing.clone(), previous: None, revision },
                applied: Applied::Deleted(existing),
            })
        }
    }
}

pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_config::load::load_text;

    fn pod(name: &str, ip: &str) -> Object {
        let y =
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: t}}\nstatus: {{podIP: {ip}}}\n");
        load_text("t", &y, "t").unwrap().remove(0).object
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// An earlier istiod-lite stored generateName unchecked: such an object still loads (without
    /// it), and the state dir stays readable. Any other fault still makes it unreadable.
    #[test]
    fn a_stored_generate_name_refused_since_is_dropped_on_load_and_nothing_else_is_forgiven() {
        let dir = tempfile::tempdir().unwrap();
        let stored = |meta: Value| {
            let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta});
            let snap = serde_json::json!({"revision": 1, "objects": [pod]});
            std::fs::write(dir.path().join("snapshot.json"), snap.to_string()).unwrap();
        };
        stored(serde_json::json!({"name": "web-x2k7q", "namespace": "t", "generateName": "Web_"}));
        let s = FileStore::open(dir.path()).unwrap();
        let pods = s.list(Some(Kind::Pod), None);
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].meta().generate_name, None);
        drop(s);
        stored(serde_json::json!({"name": "Web_x2k7q", "namespace": "t", "generateName": "Web_"}));
        let e = FileStore::open(dir.path()).err().expect("an invalid name is still corrupt");
        assert!(e.to_string().contains("metadata.name"), "{e}");
    }

    #[test]
    fn torn_log_tail_is_dropped_and_earlier_writes_kept() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let s = FileStore::open(dir.path()).unwrap();
            s.write(Write::Put(pod("a", "10.0.0.1"))).await.unwrap();
            s.write(Write::Put(pod("b", "10.0.0.2"))).await.unwrap();
        });
        // Simulate a crash mid-append: half a record at the end of the log.
        use std::io::Write as _;
        let mut f = OpenOptions::new().append(true).open(dir.path().join("wal.log")).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        rt().block_on(async {
            let s = FileStore::open(dir.path()).unwrap();
            assert_eq!(s.list(Some(Kind::Pod), None).len(), 2);
            assert_eq!(s.revision(), 2);
            s.write(Write::Put(pod("c", "10.0.0.3"))).await.unwrap();
        });
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.list(Some(Kind::Pod), None).len(), 3, "appends after recovery follow intact records");
    }

    #[test]
    fn compaction_snapshots_and_truncates_without_losing_state() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let s = FileStore::open_with(dir.path(), 4096).unwrap();
            for i in 0..100 {
                s.write(Write::Put(pod(&format!("p{i}"), &format!("10.0.1.{}", i + 1)))).await.unwrap();
            }
            s.write(Write::Delete { key: ObjectKey::new(Kind::Pod, "t", "p7"), resource_version: None }).await.unwrap();
        });
        assert!(dir.path().join("snapshot.json").exists());
        assert!(std::fs::metadata(dir.path().join("wal.log")).unwrap().len() < 4096);
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.list(Some(Kind::Pod), None).len(), 99);
        assert_eq!(s.revision(), 101);
        assert!(s.get(&ObjectKey::new(Kind::Pod, "t", "p7")).is_none());
    }

    #[test]
    fn of_two_creates_of_one_name_only_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let s = FileStore::open(dir.path()).unwrap();
            // Queued at once: whether the writer takes them in one batch or in two, one must fail.
            let (a, b) = tokio::join!(
                s.write(Write::Create(pod("a", "10.0.0.1"))),
                s.write(Write::Create(pod("a", "10.0.0.2")))
            );
            let (won, lost) = if a.is_ok() { (a, b) } else { (b, a) };
            assert!(matches!(won, Ok(Applied::Created(_))), "{won:?}");
            assert!(matches!(lost, Err(StoreError::AlreadyExists(ref k)) if k.name == "a"), "{lost:?}");
            assert_eq!(s.revision(), 1);
        });
    }

    #[test]
    fn a_second_store_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = FileStore::open(dir.path()).unwrap();
        assert!(matches!(FileStore::open(dir.path()), Err(OpenError::Locked(_))));
    }

    #[test]
    fn watchers_see_every_committed_change_after_their_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let s = FileStore::open(dir.path()).unwrap();
            s.write(Write::Put(pod("a", "10.0.0.1"))).await.unwrap();
            let mut w = s.watch();
            assert_eq!(w.objects.len(), 1);
            s.write(Write::Put(pod("a", "10.0.0.9"))).await.unwrap();
            s.write(Write::Put(pod("a", "10.0.0.9"))).await.unwrap(); // unchanged: no event
            s.write(Write::Delete { key: ObjectKey::new(Kind::Pod, "t", "a"), resource_version: None }).await.unwrap();
            let e1 = w.events.recv().await.unwrap();
            assert_eq!(e1.kind, EventType::Modified);
            assert!(e1.previous.is_some());
            let e2 = w.events.recv().await.unwrap();
            assert_eq!(e2.kind, EventType::Deleted);
            assert!(w.events.try_recv().is_err());
        });
    }
}
