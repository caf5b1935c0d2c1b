//! Where objects come from: `--source kubernetes` (watches on the API server)
//! or `--source file:<path>` (a multi-document YAML file, re-read when it
//! changes). Both hand typed objects to the same [`crate::indexer::Feed`].

pub mod file;
pub mod kubernetes;

use std::path::PathBuf;
use std::str::FromStr;

/// A `--source` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// Watch the Kubernetes API (kubeconfig or in-cluster configuration).
    Kubernetes,
    /// Read a YAML file.
    File(PathBuf),
}

/// Why a `--source` value is not usable.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Neither `kubernetes` nor `file:<path>`.
    #[error("--source {0:?} must be `kubernetes` or `file:<path>`")]
    Spec(String),
    /// The file could not be read or parsed at start-up.
    #[error("--source file:{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No usable Kubernetes client configuration.
    #[error("--source kubernetes: {0}")]
    Kube(String),
}

impl FromStr for SourceSpec {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "kubernetes" {
            Ok(Self::Kubernetes)
        } else if let Some(path) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
            Ok(Self::File(PathBuf::from(path)))
        } else {
            Err(SourceError::Spec(s.chars().take(200).collect()))
        }
    }
}

impl SourceSpec {
    /// The name used in logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kubernetes => "kubernetes",
            Self::File(_) => "file",
        }
    }
}
