//! The process's log filter (`RUST_LOG` syntax), changeable while it runs through the admin
//! `/logging` endpoint.
//!
//! [`init`] installs the global `tracing` subscriber: a reloadable `EnvFilter` in front of the text
//! formatter on stderr. The filter starts from `RUST_LOG` (or `info`); [`set`] swaps in a new one,
//! and [`current`] reads it back. Disabled call sites cost what they always do in `tracing` (one
//! cached check); the filter is consulted again only when it changes.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Why a filter could not be set.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The text is not a valid filter.
    #[error("invalid log filter {filter:?}: {message}")]
    Invalid {
        /// The text.
        filter: String,
        /// What is wrong with it.
        message: String,
    },
    /// The process's logging was not set up through [`init`] (a test, an embedding).
    #[error("the log filter cannot be changed in this process")]
    NotReloadable,
}

/// Installs the process's subscriber. Call once, first thing; later calls do nothing.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let format =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if tracing_subscriber::registry().with(filter).with(format).try_init().is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// The filter in force, if it can be changed.
pub fn current() -> Option<String> {
    FILTER.get()?.with_current(|filter| filter.to_string()).ok()
}

/// Replaces the filter: `info`, `debug`, `remora_proxy::http=debug,info`, ...
pub fn set(filter: &str) -> Result<(), LoggingError> {
    let handle = FILTER.get().ok_or(LoggingError::NotReloadable)?;
    let parsed = EnvFilter::builder()
        .parse(filter)
        .map_err(|e| LoggingError::Invalid { filter: filter.to_owned(), message: e.to_string() })?;
    handle.reload(parsed).map_err(|_| LoggingError::NotReloadable)
}
