//! Logging set-up. Human-readable lines (or JSON, `[log] format = "json"`) on stderr (stdout is kept for what `mangoo` prints for
//! people and scripts: the start-up banner, tokens). `MANGOO_LOG` or `RUST_LOG` filter.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(format: crate::config::LogFormat) {
    let filter = std::env::var("MANGOO_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // A second init (tests that start several servers) is harmless.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        crate::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
