//! The process's allocator, told to give memory back promptly.
//!
//! Everything allocates through mimalloc: Rust code as the global allocator, and RocksDB's C++
//! (and any other C code in the process) because dstore's binaries replace `malloc` and `free`
//! with mimalloc's (the crate's `override` feature). The journal, the projectors and `_bulk`
//! allocate many short-lived buffers, which mimalloc serves fast; by default it also keeps freed
//! pages for a second and commits whole arenas up front, which a `_bulk` load turns into a resident
//! set well above what is live. `tune` makes freed pages go back to the kernel after 10 ms and
//! commits arena memory as it is used. At once (a delay of 0), the journal's writer re-faulted the
//! pages of every group commit's batch and keys it had freed the group before (page faults, zeroing
//! and TLB shootdowns were about 7 % of dstore's CPU under `_bulk`); 10 ms keeps them across
//! groups, and cost 8-9 % less of dstore's CPU per PUT and 7 % per `_bulk` item, for about 12 MiB
//! more after a short `_bulk` and the same peak over 60 s of `_bulk` with PostgreSQL
//! (docs/performance.md). A second, mimalloc's default, kept a resident set well above what is live.
//! Before, RocksDB allocated through glibc's malloc, whose arenas kept what RocksDB freed: under `_bulk` with the PostgreSQL projector, peak RSS was 221–257 MiB
//! against 173–243 with one allocator (under 200 in about half the runs), at the same end-to-end
//! rate (docs/performance.md).
//!
//! `tune` also turns transparent huge pages off for the process. mimalloc asks for them on its
//! arenas by default (`madvise(MADV_HUGEPAGE)`), and then every 2 MiB region a few live blocks
//! touch is resident, and zeroed, whole; purging gives back 4 KiB pages the next fault takes back
//! as a huge one. Without them, peak RSS under `_bulk` with the PostgreSQL projector fell from
//! 203–207 to 154–158 MiB, and after the PUT run from 166–182 to 127–132, at the same rates.
//! `MIMALLOC_PURGE_DELAY`, `MIMALLOC_ARENA_EAGER_COMMIT` and `MIMALLOC_ALLOW_THP` in the environment
//! still win.

/// The global allocator of dstore's binaries.
pub type Allocator = mimalloc::MiMalloc;

// mimalloc 3's option numbers (`mi_option_t` in its mimalloc.h); the Rust bindings name only a few.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Sets dstore's allocator defaults; call first thing in `main`.
pub fn tune() {
    // SAFETY: mimalloc's option setters are plain stores into its option table, called before any
    // other thread starts; `_default` leaves an option the environment set alone.
    unsafe {
        libmimalloc_sys::mi_option_set_default(PURGE_DELAY, 10);
        libmimalloc_sys::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set_default(ALLOW_THP, 0);
        if libmimalloc_sys::mi_option_get(ALLOW_THP) == 0 {
            no_huge_pages();
        }
    }
}

/// Turns transparent huge pages off for this process and its children. mimalloc's own switch is
/// read when it starts, before `main`, and its first arena is advised for huge pages by then; the
/// kernel's per-process flag covers every mapping from the next page fault on.
fn no_huge_pages() {
    // SAFETY: `PR_SET_THP_DISABLE` takes plain integers and changes only this process's flag.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_numbers_are_mimallocs() {
        // Reading an option back through its number: a wrong number would read another option's
        // default. Unit tests never call `tune`, so these are mimalloc's own defaults.
        let (purge, eager, thp) = unsafe {
            (
                libmimalloc_sys::mi_option_get(super::PURGE_DELAY),
                libmimalloc_sys::mi_option_get(super::ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(super::ALLOW_THP),
            )
        };
        assert_eq!(purge, 1000, "purge_delay");
        assert_eq!(eager, 2, "arena_eager_commit");
        assert_eq!(thp, 1, "allow_thp");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_off_for_the_process() {
        super::no_huge_pages();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }

    #[test]
    fn c_code_allocates_through_mimalloc() {
        // What RocksDB's C++ does: `malloc` from C. Were the override lost, glibc's malloc would
        // answer and RocksDB's memory would go back to living in glibc's arenas.
        unsafe {
            let block = libc::malloc(4096);
            assert!(!block.is_null());
            assert!(
                libmimalloc_sys::mi_is_in_heap_region(block),
                "malloc is not mimalloc's"
            );
            libc::free(block);
        }
    }
}
