//! Costly work run off the HTTP workers: checking a large item, decoding or answering one. Each
//! HTTP worker is a single-threaded runtime that every request on it shares, so such work runs on a
//! blocking thread instead, at most one per core at once in the whole process: further work waits
//! for a place rather than starting threads (each worker's runtime would start up to 512, and as
//! many busy threads would leave the workers a sliver of the CPU).

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

/// Items longer than this (a body, a stored record) are prepared, decoded or answered here; shorter
/// ones, nearly every item, cost less than the hand-over and stay on their worker.
pub const LARGE_BYTES: usize = 64 * 1024;

/// Runs `work` on a blocking thread once a place is free. The place is held by the work itself,
/// so a request dropped meanwhile still counts until its work ends. An error only if the work
/// panicked.
pub async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    static PLACES: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let places = PLACES.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Semaphore::new(cores))
    });
    // The semaphore is never closed; the error exists only in its type.
    let place = places
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || {
        let _place = place;
        work()
    })
    .await
    .map_err(|e| e.to_string())
}

/// [`run`] for work on `bytes` of data: on the calling worker when they are few (at most
/// [`LARGE_BYTES`]: nearly every item, where the hand-over would cost more than the work).
pub async fn sized<T: Send + 'static>(
    bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if bytes <= LARGE_BYTES {
        return Ok(work());
    }
    run(work).await
}
