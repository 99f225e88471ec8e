//! The journal's free disk space: writes that add data are refused (503) while the journal's
//! filesystem has less than `storage.min_free_disk_mb` free, so a flood of writes can never fill
//! the disk that every acknowledged write lives on.
//!
//! A full disk is the one state RocksDB cannot always restart from (opening writes a new log and
//! manifest, compactions need room to merge); stopping short of it keeps room to restart, to
//! compact, and to delete. Deletes and project drops are still accepted, as are blueprint edits
//! (a few bytes of catalog); item writes and freezes (a freeze back-fills its version) are not.
//! Free space is measured at most every [`MEASURE_EVERY`], by the write that finds the last
//! measurement old: one `statvfs` call, with no thread of its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::JournalError;

/// How old a measurement of the free space may be when a write is checked against it. At a few
/// hundred MB/s of writes, a quarter of a second is far below the default margin.
pub const MEASURE_EVERY: Duration = Duration::from_millis(250);

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
        };
        if min_free > 0 {
            guard.measure();
        }
        guard
    }

    /// Whether a write that adds data is accepted now.
    pub fn check(&self) -> Result<(), JournalError> {
        if self.min_free == 0 {
            return Ok(());
        }
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.measured_at.load(Ordering::Acquire);
        let stale = now.saturating_sub(last) >= MEASURE_EVERY.as_millis() as u64;
        // One caller measures; the others go by the last measurement meanwhile.
        if stale
            && self
                .measured_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.measure();
        }
        let free = self.free.load(Ordering::Acquire);
        if free < self.min_free {
            return Err(JournalError::DiskLow {
                free_mb: free >> 20,
                min_mb: self.min_free >> 20,
            });
        }
        Ok(())
    }

    fn measure(&self) {
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
                tracing::error!(free_mb, min_mb, dir = %self.dir.display(), "the journal's disk is nearly full: item writes and freezes are refused until space is freed (storage.min_free_disk_mb)");
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
        let Err(JournalError::DiskLow { free_mb, min_mb }) = refused else {
            panic!("refused: {refused:?}");
        };
        assert_eq!(min_mb, free.saturating_mul(4) >> 20);
        // Other writers on the same disk move the free space between the two measurements.
        assert!(
            free_mb.abs_diff(free >> 20) < 1024,
            "{free_mb} MiB free, {free} bytes before"
        );
    }

    #[test]
    fn a_directory_that_cannot_be_measured_refuses_nothing() {
        let guard = DiskGuard::new(Path::new("/nonexistent/dstore"), u64::MAX);
        guard.check().expect("unknown free space is no refusal");
    }
}
