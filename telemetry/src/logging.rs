//! Logging set-up from `SIDEMESH_LOG` (comma-separated directives, each a
//! level or `module::path=level`; default `info`) and `SIDEMESH_LOG_FORMAT`
//! (`plain`, the default, or `json`).
//!
//! The filter is `tracing_subscriber`'s `Targets`, not its `EnvFilter`: the
//! directives operators use are the same, and `EnvFilter`'s span and field
//! matching would link a regex engine into every binary, the proxy included.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `SIDEMESH_LOG` is not a valid filter.
    #[error("SIDEMESH_LOG={value:?} is not a valid log filter: {source}")]
    Filter {
        /// The rejected value.
        value: String,
        /// What the parser said.
        source: tracing_subscriber::filter::ParseError,
    },
    /// `SIDEMESH_LOG_FORMAT` is neither `plain` nor `json`.
    #[error("SIDEMESH_LOG_FORMAT={0:?} is not one of plain, json")]
    Format(String),
}

/// Installs the global subscriber; logs go to stderr.
pub fn init() -> Result<(), LogError> {
    let value = non_empty_env("SIDEMESH_LOG").unwrap_or_else(|| "info".to_owned());
    let filter = parse_filter(value)?;
    let layer = fmt::layer().with_writer(std::io::stderr);
    let layer = match non_empty_env("SIDEMESH_LOG_FORMAT").as_deref() {
        None | Some("plain") => layer.boxed(),
        Some("json") => layer.json().boxed(),
        Some(other) => return Err(LogError::Format(other.to_owned())),
    };
    // A second init (tests start several components in one process) is harmless.
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init();
    Ok(())
}

/// Parses a `SIDEMESH_LOG` value.
fn parse_filter(value: String) -> Result<Targets, LogError> {
    value.parse().map_err(|source| LogError::Filter { value, source })
}

/// Reads an environment variable, treating an empty value as unset.
pub fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn filter_takes_levels_and_module_directives() {
        let f = parse_filter("info,sidemesh_proxy::inbound=debug,h2=off".into()).unwrap();
        assert!(f.would_enable("sidemesh_proxy::inbound", &Level::DEBUG));
        assert!(!f.would_enable("sidemesh_proxy::outbound", &Level::DEBUG));
        assert!(f.would_enable("sidemesh_proxy::outbound", &Level::INFO));
        assert!(!f.would_enable("h2::codec", &Level::ERROR));
    }

    #[test]
    fn bad_filter_is_a_clear_error() {
        let err = parse_filter("info,sidemesh_proxy=loud".into()).unwrap_err();
        assert!(
            err.to_string().contains("SIDEMESH_LOG=\"info,sidemesh_proxy=loud\""),
            "{err}"
        );
    }
}
