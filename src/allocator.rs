//! The process's allocators, told to give memory back promptly.
//!
//! Rust code allocates through mimalloc: the journal, the projectors and `_bulk` allocate many
//! short-lived buffers, which it serves fast; by default it also keeps freed pages for a second and
//! commits whole arenas up front, which a `_bulk` load turns into a resident set well above what is
//! live. `tune` makes freed pages go back to the kernel at once and commits arena memory as it is
//! used. RocksDB (C++) allocates through glibc's malloc, which by default gives each thread that
//! contends an arena of its own (up to 8 per core) and keeps what is freed in each; `tune` caps them
//! at two. Measured under `_bulk` (README, Performance): 20–35 MiB less peak RSS from each, at no
//! cost in items/s from the cap and 3–7 % from the prompt purge. `MIMALLOC_PURGE_DELAY`,
//! `MIMALLOC_ARENA_EAGER_COMMIT` and `MALLOC_ARENA_MAX` in the environment still win.

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
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes glibc's allocator settings; called before RocksDB starts
        // its threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
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
}
