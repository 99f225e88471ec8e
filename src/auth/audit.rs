//! The audit log: every request that changes something and every key change, with who did it.
//!
//! Entries are appended in the background in batches (one storage write per batch, never one per
//! request; a batch that is not full waits 5 ms for more, so an entry reaches the log a few
//! milliseconds after its request answered) and kept for `auth.audit_retention_days`; older ones
//! are removed once an hour. The queue is bounded: when the storage cannot keep up, requests wait
//! for room rather than entries being dropped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::storage::SharedStorage;

/// Entries written at once, at most.
const BATCH: usize = 500;
/// How long the writer lets entries gather before a batch that is not full.
const LINGER: Duration = Duration::from_millis(5);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// The API key's id, `master`, or `-` when authentication is off.
    pub key_id: String,
    pub key_name: String,
    /// The action the route needs (`items.write` …).
    pub action: String,
    pub project: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// Where handlers send audit entries.
#[derive(Clone)]
pub struct AuditLog {
    sender: mpsc::Sender<AuditEntry>,
}

impl AuditLog {
    /// Starts the writer of `storage`'s audit log, keeping `retention`.
    pub fn start(storage: SharedStorage, retention: Duration) -> AuditLog {
        let (sender, receiver) = mpsc::channel(10_000);
        tokio::spawn(write(storage.clone(), receiver));
        tokio::spawn(prune(Arc::downgrade(&storage), retention));
        AuditLog { sender }
    }

    pub async fn record(&self, entry: AuditEntry) {
        let _ = self.sender.send(entry).await;
    }
}

async fn write(storage: SharedStorage, mut receiver: mpsc::Receiver<AuditEntry>) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        if receiver.len() < BATCH {
            // Under load entries come one per request: a moment's wait makes one storage write of
            // many instead of one of a few.
            tokio::time::sleep(LINGER).await;
        }
        while batch.len() < BATCH {
            match receiver.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(_) => break,
            }
        }
        // The storage may be away for a moment: keep the entries and try again.
        let mut attempt = 0;
        while let Err(error) = storage.append_audit(&batch).await {
            tracing::warn!(%error, entries = batch.len(), "cannot write the audit log; retrying");
            tokio::time::sleep(crate::projector::backoff(attempt)).await;
            attempt += 1;
        }
    }
}

async fn prune(storage: std::sync::Weak<dyn crate::storage::Storage>, retention: Duration) {
    loop {
        let Some(storage) = storage.upgrade() else {
            return;
        };
        let before = Utc::now() - chrono::Duration::from_std(retention).unwrap_or_default();
        match storage.prune_audit(before).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "old audit entries removed"),
            Err(error) => tracing::warn!(%error, "cannot prune the audit log"),
        }
        drop(storage);
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
