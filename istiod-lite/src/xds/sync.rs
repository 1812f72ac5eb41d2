//! Keeps the xDS cache in step with the store: one task, store events in, cache updates out.
//! Events that arrive together are translated as one batch, which is what keeps a bulk apply of
//! thousands of objects from turning into thousands of pushes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;

use super::cache::Cache;
use super::translate::{Output, Settings, Translator};
use super::TYPES;
use crate::store::Store;

/// Largest number of events folded into one translation batch.
const MAX_BATCH: usize = 8192;

fn publish(cache: &Cache, outputs: Vec<Output>, replace: bool) {
    let mut by_type: BTreeMap<&'static str, Vec<_>> = BTreeMap::new();
    for (t, name, body) in outputs {
        by_type.entry(t).or_default().push((name, body));
    }
    // Policies first: a workload may reference a policy, and a client applying them in order
    // should never see a dangling reference.
    for t in TYPES {
        let mut list = by_type.remove(t).unwrap_or_default();
        if replace {
            let keep: HashSet<String> = list.iter().map(|(n, _)| n.clone()).collect();
            let (all, _) = cache.all(t);
            list.extend(all.into_iter().filter(|(n, _)| !keep.contains(n)).map(|(n, _)| (n, None)));
        }
        cache.apply(t, list);
    }
}

pub async fn run(store: Arc<dyn Store>, cache: Arc<Cache>, settings: Settings) {
    loop {
        let watch = store.watch();
        let mut translator = Translator::new(settings.clone());
        let started = std::time::Instant::now();
        publish(&cache, translator.load(watch.objects), true);
        tracing::info!(
            revision = watch.revision,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "xDS state rebuilt from store"
        );
        let mut events = watch.events;
        loop {
            let first = match events.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "translator fell behind the store; rebuilding");
                    break;
                }
                Err(RecvError::Closed) => return,
            };
            let mut batch = vec![first];
            let mut lagged = false;
            while batch.len() < MAX_BATCH {
                match events.try_recv() {
                    Ok(ev) => batch.push(ev),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                        lagged = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if lagged {
                break;
            }
            publish(&cache, translator.apply(&batch), false);
        }
    }
}
