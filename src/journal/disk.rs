//! The journal's free disk space: writes that add data are refused (503) while the journal's
//! filesystem has less than `storage.min_free_disk_mb` free, so a flood of writes can never fill
//! the disk that every acknowledged write lives on.
//!
//! A full disk is the one state RocksDB cannot always restart from (opening writes a new log and
//! manifest, compactions need room to merge); stopping short of it keeps room to restart, to
//! compact, and to delete. Deletes and project drops are still accepted; item writes, freezes (a
//! freeze back-fills its version) and blueprint edits (a blueprint may take a MiB of catalog, and
//! projects are many) are not.
//! Deletes stop too below [`FLOOR`]: the disk filled by something else, each delete still adds a
//! change to the log, and RocksDB resumes writing after a full disk only once that much is free.
//! Free space is measured at most every [`MEASURE_EVERY`], by the write that finds the last
//! measurement old: one `statvfs` call, with no thread of its own.
//!
//! One measurement is not enough on its own: many large `_bulk` requests admitted at the same
//! moment all saw the same free space, and together wrote past it (each item lands several times:
//! the log, the items, a task per store, the keyspaces, then compactions). So each write is
//! admitted with an estimate of what it will take ([`DiskGuard::admit`]), and the estimates of
//! writes under way, and of those done since the last measurement, count as used until a
//! measurement sees them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::JournalError;

/// How old a measurement of the free space may be when a write is checked against it. At a few
/// hundred MB/s of writes, a quarter of a second is far below the default margin.
pub const MEASURE_EVERY: Duration = Duration::from_millis(250);

/// The free space RocksDB needs before it writes again after running out (its reserved disk
/// buffer): deletes are refused below it, or below the minimum when that is smaller.
pub const FLOOR: u64 = 64 << 20;

pub struct DiskGuard {
    dir: PathBuf,
    /// Bytes that must stay free; 0: never refuse.
    min_free: u64,
    since: Instant,
    /// When the free space was last measured, in milliseconds after `since`.
    measured_at: AtomicU64,
    /// The free space then, in bytes available to an unprivileged process.
    free: AtomicU64,
    /// Whether writes are refused now (to log the change once).
    low: AtomicBool,
    /// Estimated bytes of the writes admitted and not yet done.
    underway: AtomicU64,
    /// Estimated bytes of the writes done since the last measurement began.
    unmeasured: AtomicU64,
}

/// A write admitted by [`DiskGuard::admit`]: its estimate counts as used while it lives, and until
/// the next measurement after it.
pub struct Admitted<'a> {
    guard: &'a DiskGuard,
    bytes: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.guard
                .unmeasured
                .fetch_add(self.bytes, Ordering::AcqRel);
            self.guard.underway.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

impl DiskGuard {
    /// A guard of the filesystem that holds `dir`, measured once now.
    pub fn new(dir: &Path, min_free: u64) -> DiskGuard {
        let guard = DiskGuard {
            dir: dir.to_path_buf(),
            min_free,
            since: Instant::now(),
            measured_at: AtomicU64::new(0),
            free: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
            underway: AtomicU64::new(0),
            unmeasured: AtomicU64::new(0),
        };
        if min_free > 0 {
            guard.measure();
        }
        guard
    }

    /// Whether a write that adds data is accepted now.
    pub fn check(&self) -> Result<(), JournalError> {
        self.admit(0).map(drop)
    }

    /// Whether a write that adds next to nothing (a delete) is accepted now: unless the disk
    /// has less than [`FLOOR`] free (or than the minimum, when smaller; never with no minimum).
    pub fn check_floor(&self) -> Result<(), JournalError> {
        let floor = FLOOR.min(self.min_free);
        if floor == 0 {
            return Ok(());
        }
        self.measure_if_stale();
        let free = self.free.load(Ordering::Acquire);
        if free < floor {
            return Err(JournalError::DiskFull {
                free_mb: free >> 20,
                floor_mb: floor >> 20,
            });
        }
        Ok(())
    }

    /// Measures the free space if the last measurement is older than [`MEASURE_EVERY`]; one
    /// caller measures, the others go by the last measurement meanwhile.
    fn measure_if_stale(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.measured_at.load(Ordering::Acquire);
        let stale = now.saturating_sub(last) >= MEASURE_EVERY.as_millis() as u64;
        if stale
            && self
                .measured_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.measure();
        }
    }

    /// Admits a write estimated to take `bytes` on disk, unless it would leave less than the
    /// minimum free once the writes under way, and those not yet measured, are counted too.
    pub fn admit(&self, bytes: u64) -> Result<Admitted<'_>, JournalError> {
        if self.min_free == 0 {
            return Ok(Admitted {
                guard: self,
                bytes: 0,
            });
        }
        self.measure_if_stale();
        let underway = self.underway.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let free = self
            .free
            .load(Ordering::Acquire)
            .saturating_sub(underway)
            .saturating_sub(self.unmeasured.load(Ordering::Acquire));
        if free < self.min_free {
            self.underway.fetch_sub(bytes, Ordering::AcqRel);
            // What is free before this write (`free` may have stopped at 0 counting it).
            let before = self
                .free
                .load(Ordering::Acquire)
                .saturating_sub(underway - bytes)
                .saturating_sub(self.unmeasured.load(Ordering::Acquire));
            let going_on = going_on(self.min_free);
            return Err(if before < self.min_free {
                JournalError::DiskLow {
                    free_mb: before >> 20,
                    min_mb: self.min_free >> 20,
                    going_on,
                }
            } else {
                JournalError::DiskTooSmallFor {
                    needed_mb: bytes.div_ceil(1 << 20),
                    free_mb: before >> 20,
                    min_mb: self.min_free >> 20,
                    going_on,
                }
            });
        }
        Ok(Admitted { guard: self, bytes })
    }

    fn measure(&self) {
        // What was written before now is on the disk the measurement sees (or in RocksDB's
        // memory, which the minimum leaves room for).
        self.unmeasured.store(0, Ordering::Release);
        let free = match available(&self.dir) {
            Ok(free) => free,
            Err(error) => {
                // Not knowing is no reason to refuse writes; RocksDB reports a write it cannot do.
                tracing::warn!(dir = %self.dir.display(), %error, "cannot measure the journal's free disk space");
                u64::MAX
            }
        };
        self.free.store(free, Ordering::Release);
        let low = free < self.min_free;
        if self.low.swap(low, Ordering::AcqRel) != low {
            let free_mb = free >> 20;
            let min_mb = self.min_free >> 20;
            if low {
                tracing::error!(free_mb, min_mb, dir = %self.dir.display(), "the journal's disk is nearly full: item writes, blueprint edits and freezes are refused until space is freed (storage.min_free_disk_mb)");
            } else {
                tracing::info!(
                    free_mb,
                    min_mb,
                    "the journal's disk has room again: writes are accepted"
                );
            }
        }
    }
}

/// What the journal still accepts below a minimum of `min_free` bytes: deletes too while the
/// minimum is above [`FLOOR`]; below it, deletes stop with the other writes.
fn going_on(min_free: u64) -> &'static str {
    if min_free > FLOOR {
        "reads, deletes and project drops go on"
    } else {
        "reads and project drops go on"
    }
}

/// Bytes an unprivileged process may still write on the filesystem of `dir`.
fn available(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` is written by the call before it is read.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stat.assume_init()
    };
    #[allow(clippy::useless_conversion)] // the fields' types differ between platforms
    Ok(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_measured_and_a_margin_above_it_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let free = available(dir.path()).unwrap();
        assert!(free > 0 && free < u64::MAX);
        DiskGuard::new(dir.path(), 0)
            .check()
            .expect("0 never refuses");
        DiskGuard::new(dir.path(), 1 << 20)
            .check()
            .expect("a MiB is free");
        let refused = DiskGuard::new(dir.path(), free.saturating_mul(4)).check();
        let Err(JournalError::DiskLow {
            free_mb, min_mb, ..
        }) = refused
        else {
            panic!("refused: {refused:?}");
        };
        assert_eq!(min_mb, free.saturating_mul(4) >> 20);
        // Other writers on the same disk move the free space between the two measurements.
        assert!(
            free_mb.abs_diff(free >> 20) < 1024,
            "{free_mb} MiB free, {free} bytes before"
        );
    }

    /// Writes admitted together count against the free space together: the one that would take
    /// the disk under the minimum is refused, and a write done still counts until the next
    /// measurement.
    #[test]
    fn writes_under_way_count_against_the_free_space() {
        let dir = tempfile::tempdir().unwrap();
        // 100 MiB free as far as the guard knows, 36 MiB to keep: 64 MiB of room.
        let guard = DiskGuard::new(dir.path(), 36 << 20);
        let known = |guard: &DiskGuard| {
            guard.free.store(100 << 20, Ordering::Release);
            // Measured "in the future": nothing measures again during the test.
            guard.measured_at.store(u64::MAX, Ordering::Release);
        };
        known(&guard);
        let first = guard.admit(40 << 20).expect("40 MiB fit");
        let refused = guard.admit(40 << 20);
        assert!(
            matches!(
                refused,
                Err(JournalError::DiskTooSmallFor {
                    needed_mb: 40,
                    free_mb: 60,
                    min_mb: 36,
                    ..
                })
            ),
            "two writes of 40 MiB do not fit in 64: {:?}",
            refused.map(|_| ())
        );
        // A write larger than what is free is told what is free, not what it needs less one.
        let refused = guard.admit(500 << 20).map(|_| ());
        assert!(
            matches!(
                refused,
                Err(JournalError::DiskTooSmallFor {
                    needed_mb: 500,
                    free_mb: 60,
                    ..
                })
            ),
            "{refused:?}"
        );
        drop(guard.admit(8 << 20).expect("8 more MiB fit"));
        drop(first);
        assert!(
            guard.admit(40 << 20).is_err(),
            "writes done count until a measurement sees them"
        );
        guard.measure();
        known(&guard);
        guard
            .admit(40 << 20)
            .expect("measured again: what was written is in the measurement");
    }

    /// Deletes go on while the disk is low, until it is all but full.
    #[test]
    fn deletes_stop_only_below_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let at = |free: u64, min_free: u64| {
            let guard = DiskGuard::new(dir.path(), min_free);
            guard.free.store(free, Ordering::Release);
            guard.measured_at.store(u64::MAX, Ordering::Release);
            guard
        };
        let low = at(100 << 20, 1 << 30);
        assert!(low.check().is_err(), "item writes are refused");
        low.check_floor().expect("deletes go on");
        let full = at(10 << 20, 1 << 30);
        assert!(
            matches!(
                full.check_floor(),
                Err(JournalError::DiskFull {
                    free_mb: 10,
                    floor_mb: 64
                })
            ),
            "{:?}",
            full.check_floor()
        );
        // Refusals say what goes on: deletes only while the minimum is above the floor.
        let said = |guard: DiskGuard| guard.check().unwrap_err().to_string();
        assert!(said(at(100 << 20, 1 << 30)).contains("reads, deletes and project drops go on"));
        let small = said(at(10 << 20, 16 << 20));
        assert!(
            small.contains("reads and project drops go on") && !small.contains("deletes and"),
            "{small}"
        );
        // A minimum under the floor is the floor; none refuses nothing.
        assert!(at(20 << 20, 16 << 20).check_floor().is_ok());
        assert!(at(10 << 20, 16 << 20).check_floor().is_err());
        assert!(at(0, 0).check_floor().is_ok());
    }

    #[test]
    fn a_directory_that_cannot_be_measured_refuses_nothing() {
        let guard = DiskGuard::new(Path::new("/nonexistent/dstore"), u64::MAX);
        guard.check().expect("unknown free space is no refusal");
    }
}
