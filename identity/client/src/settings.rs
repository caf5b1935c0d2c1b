//! The identity settings every workload (proxy, destination service) takes,
//! each an environment variable with a matching flag (`SIDEMESH_FOO_BAR` ↔
//! `--foo-bar`); an empty variable counts as unset.

use std::path::PathBuf;
use std::time::Duration;

use sidemesh_telemetry::flags::parse_duration;

use crate::manager::CertManagerConfig;
use crate::{SpiffeId, TrustStore};

/// Flags and variables naming the identity service and this workload.
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityArgs {
    /// Identity service `host:port`.
    #[arg(long, env = "SIDEMESH_IDENTITY_ADDR")]
    pub identity_addr: Option<String>,
    /// SPIFFE ID the identity server must present [default: spiffe://<td>/ns/sidemesh-system/sa/sidemesh-identity].
    #[arg(long, env = "SIDEMESH_IDENTITY_SERVER_ID")]
    pub identity_server_id: Option<String>,
    /// Projected ServiceAccount token file, re-read on each renewal.
    #[arg(long, env = "SIDEMESH_TOKEN_PATH")]
    pub token_path: Option<PathBuf>,
    /// PEM file of the trusted roots, re-read when it changes.
    #[arg(long, env = "SIDEMESH_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// SPIFFE ID to request [default: from POD_NAMESPACE and POD_SERVICE_ACCOUNT].
    #[arg(long, env = "SIDEMESH_WORKLOAD_ID")]
    pub workload_id: Option<String>,
    /// Trust domain.
    #[arg(long, env = "SIDEMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The Pod's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// The Pod's ServiceAccount (downward API).
    #[arg(long, env = "POD_SERVICE_ACCOUNT")]
    pub pod_service_account: Option<String>,
    /// How soon after an issuer switch this workload re-certifies (random within).
    #[arg(long, env = "SIDEMESH_RENEW_JITTER", default_value = "30s", value_parser = parse_duration)]
    pub renew_jitter: Duration,
}

/// Why the settings do not add up.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A required setting is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A SPIFFE ID setting is malformed.
    #[error("{setting}: {source}")]
    BadId {
        /// Which setting.
        setting: &'static str,
        /// The parse error.
        source: crate::spiffe::SpiffeIdError,
    },
    /// The trust bundle could not be loaded.
    #[error("SIDEMESH_TRUST_BUNDLE: {0}")]
    Bundle(#[from] crate::bundle::BundleError),
}

impl IdentityArgs {
    /// The workload's SPIFFE ID: `--workload-id`, else from the Pod's
    /// namespace and ServiceAccount.
    pub fn workload_id(&self) -> Result<SpiffeId, SettingsError> {
        if let Some(id) = self.workload_id.as_deref().filter(|s| !s.is_empty()) {
            return id.parse().map_err(|source| SettingsError::BadId {
                setting: "SIDEMESH_WORKLOAD_ID",
                source,
            });
        }
        let ns = self.pod_namespace.as_deref().filter(|s| !s.is_empty());
        let sa = self.pod_service_account.as_deref().filter(|s| !s.is_empty());
        match (ns, sa) {
            (Some(ns), Some(sa)) => SpiffeId::new(&self.trust_domain, ns, sa).map_err(|source| SettingsError::BadId {
                setting: "POD_NAMESPACE/POD_SERVICE_ACCOUNT",
                source,
            }),
            _ => Err(SettingsError::Missing(
                "SIDEMESH_WORKLOAD_ID (or POD_NAMESPACE and POD_SERVICE_ACCOUNT)",
            )),
        }
    }

    /// Loads the trust bundle and watches it.
    pub fn trust_store(&self) -> Result<TrustStore, SettingsError> {
        let path = self
            .trust_bundle
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or(SettingsError::Missing("SIDEMESH_TRUST_BUNDLE"))?;
        Ok(TrustStore::watch_file(path)?)
    }

    /// Everything a [`crate::CertManager`] needs; `trust` from [`Self::trust_store`].
    pub fn cert_manager_config(&self, trust: TrustStore) -> Result<CertManagerConfig, SettingsError> {
        let identity_addr = self
            .identity_addr
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(SettingsError::Missing("SIDEMESH_IDENTITY_ADDR"))?;
        let identity_server_id = match self.identity_server_id.as_deref().filter(|s| !s.is_empty()) {
            Some(id) => id.parse().map_err(|source| SettingsError::BadId {
                setting: "SIDEMESH_IDENTITY_SERVER_ID",
                source,
            })?,
            None => SpiffeId::new(&self.trust_domain, "sidemesh-system", "sidemesh-identity").map_err(|source| {
                SettingsError::BadId {
                    setting: "SIDEMESH_TRUST_DOMAIN",
                    source,
                }
            })?,
        };
        let token_path = self
            .token_path
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or(SettingsError::Missing("SIDEMESH_TOKEN_PATH"))?;
        Ok(CertManagerConfig {
            identity_addr,
            identity_server_id,
            token_path,
            workload_id: self.workload_id()?,
            trust,
            renew_jitter: self.renew_jitter,
        })
    }
}
