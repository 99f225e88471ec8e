//! The process's allocator, told to give memory back promptly.
//!
//! Everything allocates through mimalloc: Rust code as the global allocator, and RocksDB's C++
//! (and any other C code in the process) because dstore's binaries replace `malloc` and `free`
//! with mimalloc's (the crate's `override` feature). The journal, the projectors and `_bulk`
//! allocate many short-lived buffers, which mimalloc serves fast; by default it also keeps freed
//! pages for a second and commits whole arenas up front, which a `_bulk` load turns into a resident
//! set well above what is live. `tune` makes freed pages go back to the kernel at once and commits
//! arena memory as it is used. Before, RocksDB allocated through glibc's malloc, whose arenas kept
//! what RocksDB freed: under `_bulk` with the PostgreSQL projector, peak RSS was 221–257 MiB
//! against 173–243 with one allocator (under 200 in about half the runs), at the same end-to-end
//! rate (README, Performance).
//! `MIMALLOC_PURGE_DELAY` and `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still win.

/// The global allocator of dstore's binaries.
pub type Allocator = mimalloc::MiMalloc;

// mimalloc 3's option numbers (`mi_option_t` in its mimalloc.h); the Rust bindings name only a few.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets dstore's allocator defaults; call first thing in `main`.
pub fn tune() {
    // SAFETY: mimalloc's option setters are plain stores into its option table, called before any
    // other thread starts; `_default` leaves an option the environment set alone.
    unsafe {
        libmimalloc_sys::mi_option_set_default(PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_numbers_are_mimallocs() {
        // Reading an option back through its number: a wrong number would read another option's
        // default. Unit tests never call `tune`, so these are mimalloc's own defaults.
        let (purge, eager) = unsafe {
            (
                libmimalloc_sys::mi_option_get(super::PURGE_DELAY),
                libmimalloc_sys::mi_option_get(super::ARENA_EAGER_COMMIT),
            )
        };
        assert_eq!(purge, 1000, "purge_delay");
        assert_eq!(eager, 2, "arena_eager_commit");
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
