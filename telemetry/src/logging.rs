//! Logging set-up from `SIDEMESH_LOG` (an env-filter, default `info`) and
//! `SIDEMESH_LOG_FORMAT` (`plain`, the default, or `json`).

use tracing_subscriber::EnvFilter;

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
    let filter = EnvFilter::builder()
        .parse(&value)
        .map_err(|source| LogError::Filter { value, source })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests start several components in one process) is harmless.
    match non_empty_env("SIDEMESH_LOG_FORMAT").as_deref() {
        None | Some("plain") => {
            let _ = builder.try_init();
        }
        Some("json") => {
            let _ = builder.json().try_init();
        }
        Some(other) => return Err(LogError::Format(other.to_owned())),
    }
    Ok(())
}

/// Reads an environment variable, treating an empty value as unset.
pub fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}
