//! Background loops that start again after a panic: the dispatchers, the relay, the reports
//! collector, the consumers, each projector's cluster projection, and a cluster node's writer,
//! back-fill and listeners.
//!
//! A loop runs until it returns by itself: it returns once the service stops (`stop`), or once
//! what it works for is gone (a cluster node's loops hold it weakly). A loop that panics — a bug in
//! one round — is logged with its name and the panic's message and started again a second later,
//! from what is durable (the journal's pending tasks, the broker's queues, the cluster's rows).
//! Otherwise projection, or a cluster node's writes, would stop for good, without a word, while
//! the service still answers.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a loop that panicked waits before it starts again.
const RESTART_AFTER: Duration = Duration::from_secs(1);

/// Runs the loop `run` makes, handing it `stop`, until it returns; one that panics is started
/// again (see the module's documentation), unless the service is stopping by then. `what` names
/// it in the log (`"dispatcher postgresql"`).
pub fn supervised<F, Fut>(what: String, mut stop: watch::Receiver<bool>, run: F) -> JoinHandle<()>
where
    F: Fn(watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let error = match tokio::spawn(run(stop.clone())).await {
                Err(error) if error.is_panic() => error,
                _ => return,
            };
            if *stop.borrow() {
                return;
            }
            let payload = error.into_panic();
            tracing::error!(
                task = %what,
                panic = panic_message(payload.as_ref()),
                "a background loop panicked; starting it again"
            );
            tokio::select! {
                _ = tokio::time::sleep(RESTART_AFTER) => {}
                // A stop (or a sender gone) while it waits: the loop is not started again.
                _ = stop.changed() => return,
            }
        }
    })
}

/// The message a panic carries (`panic!` with a literal or a formatted text), or "(no message)".
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// [`supervised`] for a loop that has no stop signal of its own: it returns once what it works for
/// is gone.
pub fn supervised_until_gone<F, Fut>(what: String, run: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (never, stop) = watch::channel(false);
    supervised(what, stop, move |_| {
        // The sender lives as long as the loop: `stop` never changes, and never reads as closed.
        let _never = &never;
        run()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A background loop that panics is started again; one that returns is not.
    #[tokio::test]
    async fn a_background_loop_that_panics_is_started_again() {
        let (stop, stopped) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let task = supervised("test".into(), stopped, move |_| {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if run == 0 {
                    panic!("a bug in one round");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop ends once a run returns")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        drop(stop);
    }

    /// A loop that panics while the service stops, or whose stop comes while it waits to start
    /// again, is not started again.
    #[tokio::test(start_paused = true)]
    async fn a_loop_that_panics_while_stopping_is_not_started_again() {
        let (stop, stopped) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let task = supervised("test".into(), stopped, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { panic!("a bug in every round") }
        });
        tokio::time::sleep(RESTART_AFTER / 2).await;
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the supervisor ends at the stop")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// A loop without a stop of its own is started again after a panic too, and ends with its run.
    #[tokio::test]
    async fn a_loop_until_gone_is_started_again_after_a_panic() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let task = supervised_until_gone("test".into(), move || {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if run < 2 {
                    panic!("a bug in one round");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop ends once a run returns")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}
