//! Moving the local keyspaces into the journal when it starts writing them itself, and back out.
//!
//! Older data directories keep the keyspaces in a database of their own (`keyspaces/`), fed by
//! tasks. When the journal writes them (`JournalSettings::keyspaces`), start-up moves them in: the
//! keyspace tasks still pending in the journal are applied to the old database, in order and each
//! removed only once durable, then what it holds is copied. Every copy keeps the newer revision of
//! a key, so a crash part-way and a second run give the same result; the old directory goes only
//! once everything is in the journal and synced. With a broker
//! the keyspaces are fed by tasks again, and start-up moves what the journal kept into their own
//! database (`release_keyspaces`); with nowhere to go (a `rocksdb` worker, the keyspaces turned
//! off) they go, and a meta key records that they are no longer current. A journal that starts
//! keeping keyspaces that are not current rebuilds them from its items by back-fills
//! (`keep_keyspaces`). All of it runs before the service takes writes.

use std::path::Path;

use rocksdb::WriteBatch;

use super::task::TaskOp;
use super::{keys, Command, Journal, JournalError, CF_META, CF_TASKS};
use crate::catalog::MigrationState;
use crate::projector::rocksdb::RocksProjector;
use crate::projector::ProjectorKind;

/// Keys moved per batch.
const CHUNK: usize = 4096;

/// Where a moved keyspaces directory goes before it is removed.
fn moved_aside(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".moved");
    path.with_file_name(name)
}

impl Journal {
    /// Applies the pending keyspace tasks and moves the keyspaces of the database at `path` (if
    /// there is one) into the journal's keyspaces, then removes `path`. Answers how many tasks and
    /// keys it moved.
    pub fn import_keyspaces(&self, path: &Path) -> Result<(u64, u64), JournalError> {
        let Some(into) = self.keyspaces() else {
            return Ok((0, 0));
        };
        // Tasks go into the old database first, as its projector would have applied them: a
        // dropped project is then gone from it before it is copied, whenever a crash interrupts.
        let old = path
            .is_dir()
            .then(|| RocksProjector::open(path))
            .transpose()?;
        let tasks = self.import_pending(old.as_ref().unwrap_or(&into))?;
        // What an earlier move left when its removal was cut short goes first: the rename below
        // cannot replace it.
        let leftover = moved_aside(path);
        if leftover.is_dir() {
            std::fs::remove_dir_all(&leftover).map_err(|source| JournalError::Leftover {
                path: leftover.clone(),
                source,
            })?;
        }
        let mut keys_moved = 0;
        if let Some(old) = old {
            // The old database is the whole truth: what the journal kept from an earlier time
            // without a broker (or half of an interrupted move) goes first.
            let mut clear = WriteBatch::default();
            into.clear(&mut clear);
            self.db.write(clear)?;
            let mut entries = old.entries().peekable();
            while entries.peek().is_some() {
                let chunk = entries
                    .by_ref()
                    .take(CHUNK)
                    .collect::<Result<Vec<_>, _>>()?;
                let mut batch = WriteBatch::default();
                into.merge(&chunk, &mut batch)?;
                self.db.write(batch)?;
                keys_moved += chunk.len() as u64;
            }
            // What the old database held is current: the journal keeps it from here on.
            self.db.put_cf(self.cf(CF_META), keys::KEYSPACES_KEPT, [])?;
            self.db.flush_wal(true)?;
            drop(entries);
            drop(old);
            // Renamed first, in one step: a removal cut short never leaves a half database where
            // the next start would look for one.
            let moved = moved_aside(path);
            std::fs::rename(path, &moved)
                .and_then(|()| std::fs::remove_dir_all(&moved))
                .map_err(|source| JournalError::Leftover {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        if keys_moved > 0 || tasks > 0 {
            tracing::info!(
                keys = keys_moved,
                tasks,
                "the local keyspaces moved into the journal"
            );
        }
        Ok((tasks, keys_moved))
    }

    /// Makes sure the journal's keyspaces are current when it keeps them: when they were not kept
    /// (a journal from before, with nothing to import; a time with a broker or a `rocksdb` worker,
    /// or with the keyspaces turned off), they are emptied and every live version is back-filled
    /// into them.
    pub async fn keep_keyspaces(&self) -> Result<(), JournalError> {
        if self.keyspaces().is_none() || self.keyspaces_kept()? {
            return Ok(());
        }
        if self.last_seq() > 0 {
            tracing::info!("rebuilding the local keyspaces in the journal from its items");
        }
        self.send(|reply| Command::KeepKeyspaces { reply }).await
    }

    fn keyspaces_kept(&self) -> Result<bool, JournalError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_META), keys::KEYSPACES_KEPT)?
            .is_some())
    }

    /// The way back, when the journal stops keeping the keyspaces: moves what they hold into the
    /// keyspaces' own database `to` (a broker carries their tasks again), newer revisions winning,
    /// or, with nowhere to go (a `rocksdb` worker keeps them, or they are turned off), lets them go
    /// to be rebuilt when the journal keeps them again. Answers how many keys moved.
    pub fn release_keyspaces(&self, to: Option<&RocksProjector>) -> Result<u64, JournalError> {
        if self.keyspaces().is_some() || !self.keyspaces_kept()? {
            return Ok(0);
        }
        let from = RocksProjector::in_journal(self.db.clone());
        let mut moved = 0;
        if let Some(to) = to {
            let mut entries = from.entries().peekable();
            while entries.peek().is_some() {
                let chunk = entries
                    .by_ref()
                    .take(CHUNK)
                    .collect::<Result<Vec<_>, _>>()?;
                let mut batch = WriteBatch::default();
                to.merge(&chunk, &mut batch)?;
                to.write_now(batch)?;
                moved += chunk.len() as u64;
            }
            tracing::info!(
                keys = moved,
                "the local keyspaces moved out of the journal into their own database"
            );
        } else {
            tracing::info!("the journal no longer keeps the local keyspaces; they are rebuilt when it does again");
        }
        let mut batch = WriteBatch::default();
        from.clear(&mut batch);
        batch.delete_cf(self.cf(CF_META), keys::KEYSPACES_KEPT);
        let mut synced = rocksdb::WriteOptions::default();
        synced.set_sync(true);
        self.db.write_opt(batch, &synced)?;
        Ok(moved)
    }

    /// Applies the keyspace tasks still pending to `target`, in order, then removes them.
    fn import_pending(&self, target: &RocksProjector) -> Result<u64, JournalError> {
        let name = ProjectorKind::Rocksdb.name();
        let mut moved = 0;
        loop {
            let pending = self.pending_from(name, 0, CHUNK, |_| false)?;
            if pending.first_seen.is_none() {
                return Ok(moved);
            }
            // Runs of item tasks go through the revision guard together; a drop or a migration
            // ends a run, so everything is applied in task order.
            let mut applied = WriteBatch::default();
            let mut run = Vec::new();
            for task in pending.tasks {
                applied.delete_cf(self.cf(CF_TASKS), keys::task(name, task.seq));
                moved += 1;
                match &task.op {
                    TaskOp::Upsert { .. } | TaskOp::Delete { .. } => {
                        run.push(task);
                        continue;
                    }
                    TaskOp::DropProject => {}
                    TaskOp::Migrate { version } => {
                        let marked = self.catalog.set_migration(
                            &task.project,
                            *version,
                            name,
                            (MigrationState::Done, Some(task.seq)),
                        );
                        // The project or version may be gone since.
                        if let Err(error) = marked {
                            tracing::debug!(%error, "a keyspace migration of something gone");
                        }
                    }
                }
                target.write_now(target.stage(&run)?)?;
                run.clear();
                if matches!(task.op, TaskOp::DropProject) {
                    let mut drop = WriteBatch::default();
                    target.drop_range(&task.project, &mut drop);
                    target.write_now(drop)?;
                }
            }
            target.write_now(target.stage(&run)?)?;
            // The tasks go once what they did is durable: a crash before leaves them to apply again.
            self.db.write(applied)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::blueprint::{parse_blueprint, Ident};
    use crate::catalog::Catalog;
    use crate::journal::{Durability, JournalSettings};
    use crate::projector::Projector;
    use crate::storage::embedded::EmbeddedStorage;
    use crate::storage::Storage;
    use crate::write::{prepare_delete, prepare_upsert};

    fn ident(name: &str) -> Ident {
        Ident::parse(name).unwrap()
    }

    fn open(dir: &Path, keyspaces: bool) -> Arc<Journal> {
        // The previous opening's background tasks may hold the catalog for a moment longer.
        let mut tries = 0;
        let catalog = loop {
            match Catalog::open(&dir.join("catalog")) {
                Ok(catalog) => break Arc::new(catalog),
                Err(e) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    let _ = e;
                }
                Err(e) => panic!("the catalog does not open: {e}"),
            }
        };
        let lanes = if keyspaces { vec![] } else { vec!["rocksdb"] };
        let settings = JournalSettings {
            durability: Durability::Buffered,
            max_pending: u64::MAX,
            keyspaces,
            min_free_bytes: 0,
        };
        Journal::open(&dir.join("journal"), catalog, lanes, settings).unwrap()
    }

    async fn write(storage: &EmbeddedStorage, project: &Ident, id: Uuid, title: &str) {
        let snapshot = storage.snapshot();
        let body = json!({"project_version": 1, "title": title});
        let entry = prepare_upsert(&snapshot, project, &ident("article"), id, &body).unwrap();
        let epoch = snapshot.projects[project].epoch;
        storage.write(project, epoch, vec![entry]).await.unwrap();
    }

    #[tokio::test]
    async fn keyspaces_of_their_own_and_pending_tasks_move_into_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (p, q, article) = (ident("p"), ident("q"), ident("article"));
        let [a, b, c, d] = [(); 4].map(|_| Uuid::new_v4());
        // An older dstore: keyspaces in their own database, fed by tasks.
        {
            let journal = open(dir.path(), false);
            let storage = EmbeddedStorage::open(journal.clone());
            let blueprint = json!({"postgresql": {"table": "articles"},
                "elasticsearch": {"type": "article"}, "columns": {"title": {"type": "string"}}});
            for project in [&p, &q] {
                let input = parse_blueprint(&blueprint, "").unwrap();
                storage
                    .put_blueprint(project, &article, input)
                    .await
                    .unwrap();
                storage.freeze(project, false).await.unwrap();
            }
            write(&storage, &p, a, "a1").await;
            write(&storage, &p, b, "b1").await;
            write(&storage, &q, c, "c1").await;
            // The keyspace projector applied all of that...
            let own = RocksProjector::open(&dir.path().join("keyspaces")).unwrap();
            let tasks = journal.pending("rocksdb", 100).unwrap();
            let snapshot = journal.catalog().snapshot();
            own.apply(&snapshot, &tasks).await.unwrap();
            let seqs: Vec<u64> = tasks.iter().map(|t| t.seq).collect();
            journal.ack("rocksdb", &seqs, Vec::new()).unwrap();
            // ...but not what came after: a newer `a`, `b` deleted, `q` dropped.
            write(&storage, &p, a, "a2").await;
            let record = storage.item(&p, &article, &b).await.unwrap().unwrap();
            let snapshot = storage.snapshot();
            let delete =
                prepare_delete(&snapshot, &p, &article, b, Some(record.blueprint_uid)).unwrap();
            let epoch = snapshot.projects[&p].epoch;
            storage.write(&p, epoch, vec![delete]).await.unwrap();
            storage.drop_project(&q).await.unwrap();
            assert_eq!(journal.pending("rocksdb", 100).unwrap().len(), 3);
            assert!(own.get(&q, 1, &article, &c).is_some());
            journal.close().await;
        }

        // This dstore: the journal writes the keyspaces.
        let journal = open(dir.path(), true);
        let moved = journal
            .import_keyspaces(&dir.path().join("keyspaces"))
            .unwrap();
        assert_eq!(moved.0, 3, "the pending tasks were applied");
        assert!(moved.1 >= 2, "the keys were copied: {moved:?}");
        assert!(!dir.path().join("keyspaces").exists());
        assert!(journal.pending("rocksdb", 10).unwrap().is_empty());
        let keyspaces = journal.keyspaces().unwrap();
        assert_eq!(keyspaces.get(&p, 1, &article, &a).unwrap()["title"], "a2");
        assert!(keyspaces.get(&p, 1, &article, &b).is_none());
        assert!(keyspaces.get(&q, 1, &article, &c).is_none());
        // A second start finds nothing to move and changes nothing.
        assert_eq!(
            journal
                .import_keyspaces(&dir.path().join("keyspaces"))
                .unwrap(),
            (0, 0)
        );

        // A write is in the keyspaces the moment it is acknowledged, without a task.
        let storage = EmbeddedStorage::open(journal.clone());
        write(&storage, &p, d, "d1").await;
        assert_eq!(keyspaces.get(&p, 1, &article, &d).unwrap()["title"], "d1");
        assert!(journal.pending("rocksdb", 10).unwrap().is_empty());

        journal.close().await;
        drop((storage, keyspaces, journal));

        // And back, when a broker carries the keyspace tasks again.
        let journal = open(dir.path(), false);
        let own = RocksProjector::open(&dir.path().join("keyspaces")).unwrap();
        assert!(journal.release_keyspaces(Some(&own)).unwrap() >= 2);
        assert_eq!(own.get(&p, 1, &article, &a).unwrap()["title"], "a2");
        assert_eq!(own.get(&p, 1, &article, &d).unwrap()["title"], "d1");
        assert!(own.get(&p, 1, &article, &b).is_none());
        let left = RocksProjector::in_journal(journal.db.clone());
        assert!(left.get(&p, 1, &article, &d).is_none());
        assert_eq!(journal.release_keyspaces(Some(&own)).unwrap(), 0);
        journal.close().await;
    }

    /// What a move cut short while it removed the old database left aside does not stop the
    /// next move (of keyspaces a broker-fed time made again) at every start.
    #[tokio::test]
    async fn a_move_goes_on_past_what_an_earlier_one_left_aside() {
        let dir = tempfile::tempdir().unwrap();
        let aside = dir.path().join("keyspaces.moved");
        std::fs::create_dir_all(aside.join("half")).unwrap();
        std::fs::write(aside.join("half").join("000001.sst"), b"left").unwrap();
        drop(RocksProjector::open(&dir.path().join("keyspaces")).unwrap());
        let journal = open(dir.path(), true);
        journal
            .import_keyspaces(&dir.path().join("keyspaces"))
            .expect("the move goes on");
        assert!(!aside.exists() && !dir.path().join("keyspaces").exists());
        journal.close().await;
    }

    #[tokio::test]
    async fn a_retried_keyspace_dead_letter_never_undoes_a_newer_change() {
        let dir = tempfile::tempdir().unwrap();
        let (p, article) = (ident("p"), ident("article"));
        let [x, y] = [(); 2].map(|_| Uuid::new_v4());
        // Keyspaces fed by tasks refused two writes for good; one item was deleted after.
        {
            let journal = open(dir.path(), false);
            let storage = EmbeddedStorage::open(journal.clone());
            let blueprint = json!({"postgresql": {"table": "articles"},
                "elasticsearch": {"type": "article"}, "columns": {"title": {"type": "string"}}});
            let input = parse_blueprint(&blueprint, "").unwrap();
            storage.put_blueprint(&p, &article, input).await.unwrap();
            storage.freeze(&p, false).await.unwrap();
            write(&storage, &p, x, "x1").await;
            write(&storage, &p, y, "y1").await;
            let (upserts, others): (Vec<_>, Vec<_>) = journal
                .pending("rocksdb", 100)
                .unwrap()
                .into_iter()
                .partition(|t| matches!(t.op, TaskOp::Upsert { .. }));
            let letters = upserts
                .into_iter()
                .map(|task| crate::journal::DeadLetter {
                    projector: "rocksdb".into(),
                    seq: task.seq,
                    task: Some(task),
                    reason: "refused".into(),
                    at: crate::journal::now(),
                })
                .collect();
            let others: Vec<u64> = others.iter().map(|t| t.seq).collect();
            journal.ack("rocksdb", &others, letters).unwrap();
            let record = storage.item(&p, &article, &x).await.unwrap().unwrap();
            let snapshot = storage.snapshot();
            let delete =
                prepare_delete(&snapshot, &p, &article, x, Some(record.blueprint_uid)).unwrap();
            let epoch = snapshot.projects[&p].epoch;
            storage.write(&p, epoch, vec![delete]).await.unwrap();
            journal.close().await;
        }

        // The journal keeps the keyspaces now; the letters are retried there.
        let journal = open(dir.path(), true);
        journal
            .import_keyspaces(&dir.path().join("keyspaces"))
            .unwrap();
        assert_eq!(
            journal
                .retry_dead_letters(crate::journal::LetterFilter::projector("rocksdb"))
                .await
                .unwrap(),
            2
        );
        let keyspaces = journal.keyspaces().unwrap();
        assert!(
            keyspaces.get(&p, 1, &article, &x).is_none(),
            "the older write stays out after the delete"
        );
        assert_eq!(keyspaces.get(&p, 1, &article, &y).unwrap()["title"], "y1");
        assert!(journal.pending("rocksdb", 10).unwrap().is_empty());
        journal.close().await;
    }
}
