//! The embedded backend: the catalog and the journal in RocksDB under the data directory, owned by
//! one process. The default; nothing else to run.
//!
//! Everything here delegates to [`Catalog`] and [`Journal`], which keep their own invariants (one
//! synced batch per catalog edit; one writer thread that group-commits the journal). Revisions are
//! the journal's sequence numbers: they strictly increase per project (and across projects), but a
//! project's revisions have gaps where other projects wrote.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::usage::{Usage, UsageMeter, UsageRow};
use super::{KeyReplaced, Refusal, Stats, Storage, StorageError};
use crate::auth::audit::AuditEntry;
use crate::auth::ApiKey;
use crate::blueprint::{BlueprintInput, Change, Ident};
use crate::catalog::{Catalog, Compatibility, MigrationState, Snapshot, Version};
use crate::feed::ChangesPage;
use crate::journal::backfill::BackfillState;
use crate::journal::{DeadLetter, Entry, ItemRecord, Journal, LetterFilter, ProjectorProgress};

pub struct EmbeddedStorage {
    catalog: Arc<Catalog>,
    journal: Arc<Journal>,
    /// Tells apart audit entries of the same microsecond.
    audit_seq: AtomicU64,
    /// Held while a key is read and written again, so a change or a use never brings back a key
    /// revoked in between.
    keys: std::sync::Mutex<()>,
    usage: UsageMeter,
}

/// API keys and the audit log live beside the catalog, under these prefixes.
const KEYS: &[u8] = b"key/";
const KEYS_END: &[u8] = b"key0";
const AUDIT: &[u8] = b"audit/";
const AUDIT_END: &[u8] = b"audit0";

fn decode_key(value: &[u8]) -> Result<ApiKey, StorageError> {
    serde_json::from_slice(value)
        .map_err(|e| StorageError::Corrupt(format!("an API key is unreadable: {e}")))
}

fn usage_record(project: &Ident, version: u32, hour: i64) -> Vec<u8> {
    format!("usage/{project}/{version:010}/{:012}", hour.max(0)).into_bytes()
}

/// Writes counted version use every few seconds, while the storage lives.
async fn flush_usage(storage: std::sync::Weak<EmbeddedStorage>) {
    loop {
        tokio::time::sleep(super::usage::FLUSH).await;
        let Some(storage) = storage.upgrade() else {
            return;
        };
        let rows = storage.usage.take();
        if !rows.is_empty() {
            if let Err(error) = storage.write_usage(rows) {
                tracing::warn!(%error, "cannot record the use of versions");
            }
        }
    }
}

fn key_record(id: &str) -> Vec<u8> {
    format!("key/{id}").into_bytes()
}

/// `audit/{microseconds:020}{n:020}`: in time order. Written digit by digit: one key per request.
fn audit_record(at: DateTime<Utc>, n: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(AUDIT.len() + 40);
    key.extend_from_slice(AUDIT);
    for number in [at.timestamp_micros().max(0) as u64, n] {
        let start = key.len();
        key.resize(start + 20, b'0');
        let mut rest = number;
        for digit in key[start..].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
    }
    key
}

impl EmbeddedStorage {
    /// Writes a key's record, synced.
    fn write_key(&self, key: &ApiKey) -> Result<(), StorageError> {
        let value = serde_json::to_vec(key).expect("keys serialize");
        Ok(self
            .catalog
            .put_records(&[(key_record(&key.id), value)], true)?)
    }

    /// The storage of `journal`; writes the counted use of versions in the background.
    pub fn open(journal: Arc<Journal>) -> Arc<EmbeddedStorage> {
        let storage = Arc::new(EmbeddedStorage {
            catalog: journal.catalog().clone(),
            journal,
            audit_seq: AtomicU64::new(0),
            keys: std::sync::Mutex::default(),
            usage: UsageMeter::default(),
        });
        tokio::spawn(flush_usage(Arc::downgrade(&storage)));
        storage
    }

    fn write_usage(&self, rows: Vec<UsageRow>) -> Result<(), StorageError> {
        let mut records = Vec::with_capacity(rows.len());
        let mut rows_written: Vec<(Ident, u32, i64)> = rows
            .iter()
            .map(|r| (r.project.clone(), r.version, r.hour))
            .collect();
        rows_written.sort();
        rows_written.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        for mut row in rows {
            let key = usage_record(&row.project, row.version, row.hour);
            if let Some(old) = self.catalog.record(&key)? {
                if let Ok(old) = serde_json::from_slice::<UsageRow>(&old) {
                    row.writes += old.writes;
                    row.last_write_at = row.last_write_at.max(old.last_write_at);
                }
            }
            records.push((key, serde_json::to_vec(&row).expect("rows serialize")));
        }
        self.catalog.put_records(&records, false)?;
        // Buckets too old to be shown.
        for row in &rows_written {
            self.catalog.delete_records(
                &usage_record(&row.0, row.1, 0),
                &usage_record(&row.0, row.1, row.2 - super::usage::KEEP_HOURS),
            )?;
        }
        Ok(())
    }

    /// The journal (for the dispatchers and the RabbitMQ relay, which only this backend has).
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }
}

#[async_trait]
impl Storage for EmbeddedStorage {
    fn backend(&self) -> &'static str {
        "rocksdb"
    }

    fn deployment(&self) -> &str {
        self.journal.id()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.catalog.snapshot()
    }

    fn catalog_bytes(&self) -> usize {
        self.catalog.bytes()
    }

    async fn refresh_catalog(&self) -> Result<(), StorageError> {
        // This process is the only writer: its copy is always current.
        Ok(())
    }

    async fn fresh_snapshot(&self, _project: &Ident) -> Result<Arc<Snapshot>, StorageError> {
        Ok(self.catalog.snapshot())
    }

    async fn put_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
        input: BlueprintInput,
    ) -> Result<Vec<Change>, StorageError> {
        // A blueprint may take a MiB of catalog, on the journal's disk (see `journal::disk`).
        self.journal.check_disk()?;
        Ok(self.catalog.put_blueprint(project, name, input)?)
    }

    async fn put_blueprints(
        &self,
        project: &Ident,
        inputs: Vec<(Ident, BlueprintInput)>,
    ) -> Result<Vec<Change>, StorageError> {
        self.journal.check_disk()?;
        Ok(self.catalog.put_blueprints(project, inputs)?)
    }

    async fn delete_blueprint(
        &self,
        project: &Ident,
        name: &Ident,
    ) -> Result<Vec<Change>, StorageError> {
        Ok(self.catalog.delete_blueprint(project, name)?)
    }

    async fn retire(&self, project: &Ident, version: u32) -> Result<(), StorageError> {
        self.catalog.retire(project, version)?;
        self.journal.nudge(project);
        Ok(())
    }

    async fn set_migration(
        &self,
        project: &Ident,
        version: u32,
        projector: &str,
        state: MigrationState,
        task: Option<u64>,
    ) -> Result<(), StorageError> {
        Ok(self
            .catalog
            .set_migration(project, version, projector, (state, task))?)
    }

    async fn write(
        &self,
        project: &Ident,
        epoch: u64,
        entries: Vec<Entry>,
    ) -> Result<Vec<u64>, StorageError> {
        let versions = UsageMeter::versions(&entries);
        let revisions = self.journal.write(epoch, project.clone(), entries).await?;
        self.usage.note(project, &versions);
        Ok(revisions)
    }

    async fn freeze_judged(
        &self,
        project: &Ident,
        forced: bool,
        judged: Option<crate::catalog::edit::Judged>,
    ) -> Result<(Arc<Version>, u64), StorageError> {
        Ok(self.journal.freeze(project.clone(), forced, judged).await?)
    }

    async fn set_compatibility(
        &self,
        project: &Ident,
        compatibility: Compatibility,
    ) -> Result<(), StorageError> {
        Ok(self.catalog.set_compatibility(project, compatibility)?)
    }

    async fn scan_items(
        &self,
        project: &Ident,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<(Vec<(Ident, ItemRecord)>, Option<Vec<u8>>), StorageError> {
        Ok(self.journal.scan_items(project, after, limit)?)
    }

    async fn remigrate(
        &self,
        project: &Ident,
        version: u32,
        projectors: Vec<String>,
    ) -> Result<u64, StorageError> {
        Ok(self
            .journal
            .remigrate(project.clone(), version, projectors)
            .await?)
    }

    async fn ensure_backfill(&self, project: &Ident, version: u32) -> Result<bool, StorageError> {
        Ok(self.journal.ensure_backfill(project, version).await?)
    }

    async fn changes(
        &self,
        project: &Ident,
        since: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ChangesPage, StorageError> {
        // A page can take tens of milliseconds to read and decode (`feed::PAGE_BYTES` of items):
        // off the HTTP worker, which every request on it shares (`crate::aside`).
        let (journal, project) = (self.journal.clone(), project.clone());
        crate::aside::run(move || journal.changes(&project, since, limit, max_bytes))
            .await
            .map_err(StorageError::Unavailable)?
            .map_err(StorageError::from)
    }

    async fn revision(&self, _project: &Ident) -> Result<u64, StorageError> {
        // Revisions are the journal's sequence numbers, shared by every project.
        Ok(self.journal.last_seq())
    }

    fn follow(&self, project: &Ident) -> tokio::sync::watch::Receiver<u64> {
        self.journal.follow(project)
    }

    async fn purge_tombstones(&self, before: DateTime<Utc>) -> Result<u64, StorageError> {
        let millis = before.timestamp_millis().max(0) as u64;
        Ok(self.journal.purge_tombstones(millis).await?)
    }

    async fn drop_project(&self, project: &Ident) -> Result<u64, StorageError> {
        let revision = self.journal.drop_project(project.clone()).await?;
        self.usage.forget(project);
        self.catalog.delete_records(
            format!("usage/{project}/").as_bytes(),
            format!("usage/{project}0").as_bytes(),
        )?;
        Ok(revision)
    }

    async fn item_bytes(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.journal.item_bytes(project, blueprint, id)?)
    }

    async fn item_blueprint_uid(
        &self,
        project: &Ident,
        blueprint: &Ident,
        id: &Uuid,
    ) -> Result<Option<u64>, StorageError> {
        Ok(self.journal.item_blueprint_uid(project, blueprint, id)?)
    }

    async fn backfill_state(
        &self,
        project: &Ident,
        version: u32,
    ) -> Result<Option<BackfillState>, StorageError> {
        Ok(self.journal.backfill_state(project, version)?)
    }

    async fn wait_projected(
        &self,
        _project: &Ident,
        revision: u64,
        timeout: Duration,
    ) -> Result<(), Vec<String>> {
        self.journal
            .wait_projected(revision, timeout)
            .await
            .map_err(|behind| behind.into_iter().map(String::from).collect())
    }

    async fn refusals(
        &self,
        _project: &Ident,
        revisions: &[u64],
    ) -> Result<Vec<Refusal>, StorageError> {
        Ok(self.journal.refusals(revisions)?)
    }

    async fn progress(&self, projector: &str) -> ProjectorProgress {
        self.journal.progress(projector)
    }

    fn check_backlog(&self) -> Result<(), StorageError> {
        self.journal.check_disk()?;
        Ok(self.journal.check_backlog()?)
    }

    fn held_by(&self, projector: &str) -> Vec<Ident> {
        self.journal.held_by(projector)
    }

    async fn dead_letters(
        &self,
        filter: LetterFilter<'_>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<String>), StorageError> {
        // The cursor is the last letter's key, in hex.
        let after = after
            .map(|cursor| {
                unhex(cursor).ok_or_else(|| {
                    StorageError::Cursor(format!(
                        "{:?} is not a cursor this node gave (the \"next\" of an earlier answer)",
                        crate::blueprint::value::excerpt_str(cursor)
                    ))
                })
            })
            .transpose()?;
        let (letters, next) = self.journal.dead_letters(filter, after.as_deref(), limit)?;
        Ok((letters, next.map(|key| crate::auth::hex(&key))))
    }

    async fn retry_dead_letters(&self, filter: LetterFilter<'_>) -> Result<usize, StorageError> {
        Ok(self.journal.retry_dead_letters(filter).await?)
    }

    fn reachable(&self) -> Result<(), String> {
        Ok(())
    }

    fn write_failure(&self) -> Option<String> {
        self.journal.write_failure()
    }

    async fn keys(&self) -> Result<Vec<ApiKey>, StorageError> {
        Ok(self
            .catalog
            .records(KEYS, KEYS_END, usize::MAX)?
            .into_iter()
            .filter_map(|(record, value)| super::readable_key(&record, decode_key(&value)))
            .collect())
    }

    async fn put_key(&self, key: &ApiKey, most: usize) -> Result<bool, StorageError> {
        let _held = self.keys.lock().expect("keys lock");
        if self.catalog.records(KEYS, KEYS_END, most)?.len() >= most {
            return Ok(false);
        }
        self.write_key(key)?;
        Ok(true)
    }

    async fn key(&self, id: &str) -> Result<Option<ApiKey>, StorageError> {
        self.catalog
            .record(&key_record(id))?
            .map(|value| decode_key(&value))
            .transpose()
    }

    async fn replace_key(&self, key: &ApiKey, was: &ApiKey) -> Result<KeyReplaced, StorageError> {
        let _held = self.keys.lock().expect("keys lock");
        let Some(value) = self.catalog.record(&key_record(&key.id))? else {
            return Ok(KeyReplaced::Revoked);
        };
        if !decode_key(&value)?.same_apart_from_use(was) {
            return Ok(KeyReplaced::Changed);
        }
        self.write_key(key)?;
        Ok(KeyReplaced::Done)
    }

    async fn touch_key(&self, id: &str, at: DateTime<Utc>) -> Result<(), StorageError> {
        let _held = self.keys.lock().expect("keys lock");
        let Some(value) = self.catalog.record(&key_record(id))? else {
            return Ok(());
        };
        let mut key = decode_key(&value)?;
        key.last_used_at = Some(at);
        let value = serde_json::to_vec(&key).expect("keys serialize");
        Ok(self
            .catalog
            .put_records(&[(key_record(id), value)], false)?)
    }

    async fn delete_key(&self, id: &str) -> Result<bool, StorageError> {
        let _held = self.keys.lock().expect("keys lock");
        let record = key_record(id);
        let existed = self.catalog.record(&record)?.is_some();
        let mut end = record.clone();
        end.push(0);
        self.catalog.delete_records(&record, &end)?;
        Ok(existed)
    }

    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StorageError> {
        // The log of writes refused for want of room must not use up the room the journal keeps
        // to restart: the writer keeps the entries and tries again (`auth::audit`).
        self.journal.check_disk()?;
        let records: Vec<(Vec<u8>, Vec<u8>)> = entries
            .iter()
            .map(|entry| {
                let n = self.audit_seq.fetch_add(1, Ordering::Relaxed);
                (audit_record(entry.at, n), entry.encode())
            })
            .collect();
        // Not synced: the batch survives a crash of dstore, not of the machine (see README).
        Ok(self.catalog.put_records(&records, false)?)
    }

    async fn audit(
        &self,
        since: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StorageError> {
        self.catalog
            .records(&audit_record(since, 0), AUDIT_END, limit)?
            .into_iter()
            .map(|(_, value)| {
                AuditEntry::decode(&value)
                    .ok_or_else(|| StorageError::Corrupt("an audit entry is unreadable".into()))
            })
            .collect()
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StorageError> {
        // Counted one entry at a time on a blocking thread: a busy deployment's hour of entries,
        // or a retention shortened by days, may be millions.
        let catalog = Arc::clone(&self.catalog);
        let end = audit_record(before, 0);
        let removed = tokio::task::spawn_blocking(move || {
            let count = catalog.count_records(AUDIT, &end)?;
            if count > 0 {
                catalog.delete_records(AUDIT, &end)?;
            }
            Ok::<_, crate::catalog::CatalogError>(count)
        })
        .await
        .map_err(|e| StorageError::Corrupt(format!("pruning the audit log failed: {e}")))??;
        Ok(removed)
    }

    async fn version_usage(&self, project: &Ident, version: u32) -> Result<Usage, StorageError> {
        let from = format!("usage/{project}/{version:010}/").into_bytes();
        let to = format!("usage/{project}/{version:010}0").into_bytes();
        let mut rows: Vec<UsageRow> = self
            .catalog
            .records(&from, &to, usize::MAX)?
            .into_iter()
            .filter_map(|(_, value)| serde_json::from_slice(&value).ok())
            .collect();
        rows.extend(self.usage.pending(project, version));
        Ok(Usage::of(&rows, Utc::now()))
    }

    async fn stats(&self) -> Stats {
        let (items, bytes) = self.journal.size();
        Stats {
            last_revision: self.journal.last_seq(),
            items,
            bytes,
            table_readers_bytes: self.journal.table_readers_bytes(),
        }
    }
}

/// Lowercase or uppercase hex digits as bytes; `None` for anything else.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::{embedded_storage, embedded_storage_keeping, test_key};

    /// While the journal's disk is nearly full the audit log is not written: the room the journal
    /// keeps to restart is not used up by the log of the writes it refuses.
    #[tokio::test]
    async fn the_audit_log_is_not_written_on_a_nearly_full_disk() {
        let entry = AuditEntry {
            at: Utc::now(),
            key_id: "-".into(),
            key_name: "-".into(),
            action: "-".into(),
            project: None,
            method: "PUT".into(),
            path: "/p/article/x".into(),
            status: 503,
            created: None,
        };
        let (storage, _dir) = embedded_storage_keeping(u64::MAX);
        let error = storage
            .append_audit(std::slice::from_ref(&entry))
            .await
            .expect_err("a nearly full disk");
        assert!(error.to_string().contains("min_free_disk_mb"), "{error}");
        let since = DateTime::from_timestamp(0, 0).unwrap();
        assert!(storage.audit(since, 10).await.unwrap().is_empty());
        let (roomy, _dir) = embedded_storage();
        roomy.append_audit(&[entry]).await.unwrap();
        assert_eq!(roomy.audit(since, 10).await.unwrap().len(), 1);
    }

    /// A key whose record this dstore cannot read (an action it does not know) is left out; the
    /// others still read, so their revocations still reach every node.
    #[tokio::test]
    async fn an_unreadable_key_is_left_out_and_the_others_read() {
        let (storage, _dir) = embedded_storage();
        assert!(storage
            .put_key(&test_key("0123456789abcdef"), 10)
            .await
            .unwrap());
        let unknown = br#"{"id": "fedcba9876543210", "actions": ["items.fly"]}"#.to_vec();
        storage
            .catalog
            .put_records(&[(key_record("fedcba9876543210"), unknown)], true)
            .unwrap();
        let keys = storage.keys().await.unwrap();
        let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["0123456789abcdef"]);
    }

    /// Pruning removes the entries before the time given, and counts them.
    #[tokio::test]
    async fn pruning_the_audit_log_removes_and_counts_the_older_entries() {
        let (storage, _dir) = embedded_storage();
        let at = |second: i64| AuditEntry {
            at: DateTime::from_timestamp(second, 0).unwrap(),
            key_id: "-".into(),
            key_name: "-".into(),
            action: "-".into(),
            project: None,
            method: "PUT".into(),
            path: format!("/p/{second}"),
            status: 200,
            created: None,
        };
        let entries: Vec<AuditEntry> = [100, 100, 200, 300].into_iter().map(at).collect();
        storage.append_audit(&entries).await.unwrap();
        let before = DateTime::from_timestamp(300, 0).unwrap();
        assert_eq!(storage.prune_audit(before).await.unwrap(), 3);
        assert_eq!(storage.prune_audit(before).await.unwrap(), 0);
        let left = storage.audit(DateTime::UNIX_EPOCH, 10).await.unwrap();
        assert_eq!(left, vec![at(300)]);
    }

    #[test]
    fn audit_keys_are_zero_padded_so_they_sort_by_time() {
        for (micros, n) in [
            (0, 0),
            (1_764_739_200_123_456, 7),
            (253_402_300_799_999_999, u64::MAX),
        ] {
            let at = DateTime::from_timestamp_micros(micros).unwrap();
            assert_eq!(
                audit_record(at, n),
                format!("audit/{micros:020}{n:020}").into_bytes()
            );
        }
        let before = DateTime::from_timestamp_micros(-5).unwrap();
        assert_eq!(
            audit_record(before, 1),
            audit_record(DateTime::UNIX_EPOCH, 1)
        );
    }
}
