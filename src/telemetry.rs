//! Logging setup: `tracing` to stderr, plain or JSON, filtered by the configured level.

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber once; later calls (tests) are ignored.
pub fn init(settings: &LogSettings) {
    let filter = filter(&settings.level);
    // Colours only for a terminal: a log file or the journal gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = if settings.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// RabbitMQ's client logs every message the broker returns (a task published while its queue is
/// missing, which dstore handles and logs itself) with its whole body: item contents, megabytes a
/// line. Its returns are logged at error level only, whatever the configured level.
const QUIET: &str = "lapin::returned_messages=error";

/// The configured level (a `tracing` filter; `info` when it does not parse), with [`QUIET`].
fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(format!("{level},{QUIET}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_messages_are_not_logged_whole_at_any_level() {
        for level in ["debug", "trace", "lapin=trace", "not a filter ["] {
            let filter = filter(level).to_string();
            assert!(filter.contains(QUIET), "{level}: {filter}");
        }
    }
}
