//! How much each version is written to: the last write made at it and how many writes used it in
//! recent hours, so an operator knows whether clients still speak a version before retiring it.
//!
//! Writes are counted in memory as they are journaled and written to the storage every few seconds
//! in hourly buckets (one small write per version and hour, never one per request). Buckets older
//! than [`KEEP_HOURS`] are dropped when newer ones are written; a dropped project's buckets go with
//! it, so a project made again under the same name starts with no use.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::blueprint::Ident;
use crate::journal::Entry;

/// How often counted writes are written to the storage.
pub const FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// Hourly buckets kept: a week and a day, so "the last 7 days" is always complete.
pub const KEEP_HOURS: i64 = 24 * 8;

/// One version's writes in one hour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub project: Ident,
    pub version: u32,
    /// Hours since the Unix epoch.
    pub hour: i64,
    pub writes: u64,
    pub last_write_at: DateTime<Utc>,
}

/// What `GET /{project}/_version/{n}` shows of a version's use.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    pub last_write_at: Option<DateTime<Utc>>,
    pub writes_last_hour: u64,
    pub writes_last_24h: u64,
    pub writes_last_7d: u64,
}

impl Usage {
    /// Adds up hourly rows as of `now`.
    pub fn of(rows: &[UsageRow], now: DateTime<Utc>) -> Usage {
        let hour = now.timestamp().div_euclid(3600);
        let mut usage = Usage::default();
        for row in rows {
            usage.last_write_at = usage.last_write_at.max(Some(row.last_write_at));
            let age = hour - row.hour;
            if age < 1 {
                usage.writes_last_hour += row.writes;
            }
            if age < 24 {
                usage.writes_last_24h += row.writes;
            }
            if age < 24 * 7 {
                usage.writes_last_7d += row.writes;
            }
        }
        usage
    }
}

/// A project's counts: (version, hour since the Unix epoch) → (writes, the last one's time).
type Buckets = HashMap<(u32, i64), (u64, DateTime<Utc>), foldhash::fast::RandomState>;

/// Writes counted since the last flush, by project: a write finds its project's buckets by the
/// borrowed name, so counting it allocates nothing. Project names are the catalog's, hashed with
/// foldhash seeded per process.
#[derive(Default)]
pub struct UsageMeter {
    pending: Mutex<HashMap<Ident, Buckets, foldhash::fast::RandomState>>,
}

impl UsageMeter {
    /// The versions item writes were made at (deletes name none).
    pub fn versions(entries: &[Entry]) -> Vec<u32> {
        entries
            .iter()
            .filter_map(|entry| match entry {
                Entry::Upsert { version, .. } => Some(*version),
                Entry::Delete { .. } => None,
            })
            .collect()
    }

    /// Counts journaled writes made at `versions`. A `_bulk` names its items' versions one by one,
    /// most of them the same: each run of one version updates its bucket once (a bucket's key
    /// holds a copy of the project's name; made per item, it was 1.5 % of a `_bulk` item's
    /// instructions).
    pub fn note(&self, project: &Ident, versions: &[u32]) {
        if versions.is_empty() {
            return;
        }
        let now = Utc::now();
        let hour = now.timestamp().div_euclid(3600);
        let mut pending = self.pending.lock().expect("usage lock");
        if !pending.contains_key(project.as_str()) {
            pending.insert(project.clone(), Buckets::default());
        }
        let buckets = pending.get_mut(project.as_str()).expect("inserted above");
        for run in versions.chunk_by(|a, b| a == b) {
            let slot = buckets.entry((run[0], hour)).or_insert((0, now));
            slot.0 += run.len() as u64;
            slot.1 = now;
        }
    }

    /// The counts to write, emptied, in (project, version, hour) order: nodes that upsert the
    /// same rows at once lock them in one order, so they wait for each other rather than
    /// deadlock.
    pub fn take(&self) -> Vec<UsageRow> {
        let mut rows: Vec<UsageRow> = self
            .pending
            .lock()
            .expect("usage lock")
            .drain()
            .flat_map(|(project, buckets)| {
                buckets
                    .into_iter()
                    .map(move |((version, hour), (writes, last))| UsageRow {
                        project: project.clone(),
                        version,
                        hour,
                        writes,
                        last_write_at: last,
                    })
            })
            .collect();
        rows.sort_unstable_by(|a, b| {
            (a.project.as_str(), a.version, a.hour).cmp(&(b.project.as_str(), b.version, b.hour))
        });
        rows
    }

    /// Counts `rows` [`UsageMeter::take`] gave again, their writing having failed: the next flush
    /// writes them with what was counted meanwhile.
    pub fn put_back(&self, rows: Vec<UsageRow>) {
        let mut pending = self.pending.lock().expect("usage lock");
        for row in rows {
            let slot = pending
                .entry(row.project)
                .or_default()
                .entry((row.version, row.hour))
                .or_insert((0, row.last_write_at));
            slot.0 += row.writes;
            slot.1 = slot.1.max(row.last_write_at);
        }
    }

    /// Drops the counts not written yet of a project that is being dropped.
    pub fn forget(&self, project: &Ident) {
        self.pending
            .lock()
            .expect("usage lock")
            .remove(project.as_str());
    }

    /// Counts not written yet, of one version.
    pub fn pending(&self, project: &Ident, version: u32) -> Vec<UsageRow> {
        self.pending
            .lock()
            .expect("usage lock")
            .get(project.as_str())
            .into_iter()
            .flatten()
            .filter(|((v, _), _)| *v == version)
            .map(|((version, hour), (writes, last))| UsageRow {
                project: project.clone(),
                version: *version,
                hour: *hour,
                writes: *writes,
                last_write_at: *last,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_counted_per_version_whatever_their_order() {
        let meter = UsageMeter::default();
        let project = Ident::parse("p").unwrap();
        meter.note(&project, &[1, 1, 2, 1]);
        meter.note(&project, &[2]);
        // Summed per version: the two notes may fall on either side of an hour.
        let mut counted = std::collections::BTreeMap::new();
        for row in meter.take() {
            *counted.entry(row.version).or_insert(0) += row.writes;
        }
        assert_eq!(counted.into_iter().collect::<Vec<_>>(), [(1, 3), (2, 2)]);
        assert!(meter.take().is_empty(), "taken once");
    }

    /// Rows come in one order on every node (two nodes upserting the same rows in two orders
    /// could deadlock), and rows whose writing failed are counted again with the next ones.
    #[test]
    fn rows_are_taken_in_order_and_put_back_when_their_writing_failed() {
        let meter = UsageMeter::default();
        let names = ["shop_1", "shop1", "blog", "zeta", "a"];
        for name in names {
            meter.note(&Ident::parse(name).unwrap(), &[3, 1, 2]);
        }
        let rows = meter.take();
        let keys: Vec<(String, u32)> = rows
            .iter()
            .map(|r| (r.project.to_string(), r.version))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        meter.put_back(rows);
        meter.note(&Ident::parse("a").unwrap(), &[1]);
        let again = meter.take();
        assert_eq!(again.len(), names.len() * 3);
        let a1 = again
            .iter()
            .find(|r| r.project.as_str() == "a" && r.version == 1)
            .unwrap();
        assert_eq!(a1.writes, 2);
    }

    #[test]
    fn projects_are_counted_apart_and_forgotten_alone() {
        let meter = UsageMeter::default();
        let (blog, shop) = (Ident::parse("blog").unwrap(), Ident::parse("shop").unwrap());
        meter.note(&blog, &[1, 1]);
        meter.note(&shop, &[1]);
        meter.note(&shop, &[2, 2, 2]);
        let counts = |rows: Vec<UsageRow>| -> Vec<(String, u32, u64)> {
            let mut counts: Vec<_> = rows
                .into_iter()
                .map(|row| (row.project.to_string(), row.version, row.writes))
                .collect();
            counts.sort();
            counts
        };
        // Summed when the three notes fell within one hour, else split: compare totals.
        let total = |rows: Vec<UsageRow>| rows.iter().map(|row| row.writes).sum::<u64>();
        assert_eq!(total(meter.pending(&blog, 1)), 2);
        assert_eq!(total(meter.pending(&shop, 2)), 3);
        assert!(meter.pending(&blog, 2).is_empty());
        meter.forget(&blog);
        assert!(meter.pending(&blog, 1).is_empty());
        let left = counts(meter.take());
        assert!(
            left.iter().all(|(project, _, _)| project == "shop"),
            "{left:?}"
        );
        assert_eq!(left.iter().map(|(_, _, n)| n).sum::<u64>(), 4, "{left:?}");
    }
}
