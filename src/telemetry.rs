//! Logging setup: `tracing` to stderr, plain or JSON, filtered by the configured level, without
//! the RabbitMQ client's errors for what dstore asks expecting a refusal ([`ExpectedRefusals`]).

use std::fmt::Debug;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber once; later calls (tests) are ignored.
pub fn init(settings: &LogSettings) {
    let filter = filter(&settings.level);
    // Colours only for a terminal: a log file or the journal gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(ExpectedRefusals);
    let _ = if settings.json {
        registry.with(output.json()).try_init()
    } else {
        registry.with(output).try_init()
    };
}

/// Drops the RabbitMQ client's error "Channel closed" when the broker closed the channel because a
/// queue does not exist (`NOT_FOUND - no queue '…'`): dstore asks that way, by a passive declare,
/// whether a projector's queue or a project's parking queue exists, expecting that answer
/// (`queue::rabbitmq`), and says itself what it means (a worker waiting for its queue). Logged at
/// error level, each new project's first task and every fresh start raised alerts.
struct ExpectedRefusals;

impl<S: Subscriber> Layer<S> for ExpectedRefusals {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        if event.metadata().target() != "lapin::channel" {
            return true;
        }
        let mut absent = NoQueue(false);
        event.record(&mut absent);
        !absent.0
    }
}

/// Whether an event's `error` is the broker's "no queue" refusal.
struct NoQueue(bool);

impl Visit for NoQueue {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "error" {
            let text = format!("{value:?}");
            self.0 |= text.contains("NOT_FOUND - no queue '");
        }
    }
}

/// RabbitMQ's client logs every message the broker returns (a task published while its queue is
/// missing, which dstore handles and logs itself) with its whole body: item contents, megabytes a
/// line. Its returns are logged at error level only, whatever the configured level.
const QUIET: &str = "lapin::returned_messages=error";

/// Whether `level` is a `tracing` filter; the error says why not. Checked before dstore starts
/// (`startup::check_settings`), so a misspelt level stops it rather than logging at `info`.
pub fn check_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The configured level (a `tracing` filter; `info` when it does not parse), with [`QUIET`].
fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(format!("{level},{QUIET}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the events that reach it.
    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl<S: Subscriber> Layer<S> for Count {
        fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn a_closed_channel_is_not_logged_when_it_answered_that_a_queue_does_not_exist() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct AmqpError {
            message: &'static str,
        }
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(ExpectedRefusals)
            .with(Count(count.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let absent = AmqpError {
                message: "NOT_FOUND - no queue 'ns.postgresql.parked.blog' in vhost '/'",
            };
            tracing::error!(target: "lapin::channel", channel = 3, error = ?absent, "Channel closed");
            let other = AmqpError {
                message: "PRECONDITION_FAILED - inequivalent arg 'x-max-length'",
            };
            tracing::error!(target: "lapin::channel", channel = 3, error = ?other, "Channel closed");
            // The same words from anywhere else are kept.
            tracing::error!(error = ?absent, "Channel closed");
        });
        assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn returned_messages_are_not_logged_whole_at_any_level() {
        for level in ["debug", "trace", "lapin=trace", "not a filter ["] {
            let filter = filter(level).to_string();
            assert!(filter.contains(QUIET), "{level}: {filter}");
        }
    }
}
