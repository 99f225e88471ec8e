//! Logging setup: `tracing` to stderr, plain or JSON, filtered by the configured level.

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber once; later calls (tests) are ignored.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
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
