//! Authenticating the token sent with a CSR: the Kubernetes TokenReview API
//! (audience `sidemesh-identity`) or, for local meshes and tests, a YAML map
//! of tokens re-read when it changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

/// The audience projected tokens must carry.
pub const AUDIENCE: &str = "sidemesh-identity";

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountRef {
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount name.
    pub service_account: String,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token is not valid (unknown, expired, wrong audience, not a ServiceAccount).
    #[error("{0}")]
    Rejected(String),
    /// The reviewer could not answer (API server unreachable).
    #[error("token review unavailable: {0}")]
    Unavailable(String),
}

/// Why a reviewer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReviewerError {
    /// The flag value is neither `kubernetes` nor `file:PATH`.
    #[error("--token-reviewer {0:?} must be `kubernetes` or `file:<path>`")]
    Spec(String),
    /// The token file is unusable.
    #[error("token file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No Kubernetes client configuration.
    #[error("kubernetes token reviewer: {0}")]
    Kube(String),
}

/// A token reviewer.
#[derive(Clone)]
pub enum TokenReviewer {
    /// TokenReview through the API server.
    Kubernetes(kube::Client),
    /// A local YAML map.
    File(FileTokens),
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kubernetes(_) => f.write_str("TokenReviewer::Kubernetes"),
            Self::File(t) => write!(f, "TokenReviewer::File({})", t.path.display()),
        }
    }
}

impl TokenReviewer {
    /// Builds the reviewer a `--token-reviewer` value names.
    pub async fn from_spec(spec: &str) -> Result<Self, ReviewerError> {
        if spec == "kubernetes" {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| ReviewerError::Kube(e.to_string()))?;
            Ok(Self::Kubernetes(client))
        } else if let Some(path) = spec.strip_prefix("file:").filter(|p| !p.is_empty()) {
            Ok(Self::File(FileTokens::watch(Path::new(path))?))
        } else {
            Err(ReviewerError::Spec(spec.to_owned()))
        }
    }

    /// Says whose token this is.
    pub async fn review(&self, token: &[u8]) -> Result<ServiceAccountRef, ReviewError> {
        match self {
            Self::File(tokens) => tokens.review(token),
            Self::Kubernetes(client) => review_kubernetes(client, token).await,
        }
    }
}

/// `system:serviceaccount:<ns>:<name>` → namespace and name.
pub fn parse_username(username: &str) -> Option<ServiceAccountRef> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| ServiceAccountRef {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
    })
}

async fn review_kubernetes(client: &kube::Client, token: &[u8]) -> Result<ServiceAccountRef, ReviewError> {
    let token = std::str::from_utf8(token).map_err(|_| ReviewError::Rejected("token is not UTF-8 text".into()))?;
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.trim().to_owned()),
            audiences: Some(vec![AUDIENCE.to_owned()]),
        },
        ..Default::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let done = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
    let status = done.status.unwrap_or_default();
    if let Some(err) = status.error.filter(|e| !e.is_empty()) {
        return Err(ReviewError::Rejected(format!("token review failed: {err}")));
    }
    if status.authenticated != Some(true) {
        return Err(ReviewError::Rejected(
            "token is not authenticated by the API server".into(),
        ));
    }
    if !status.audiences.unwrap_or_default().iter().any(|a| a == AUDIENCE) {
        return Err(ReviewError::Rejected(format!("token is not for audience {AUDIENCE}")));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    parse_username(&username)
        .ok_or_else(|| ReviewError::Rejected(format!("token belongs to {username:?}, not a ServiceAccount")))
}

/// Tokens from a YAML file (`"<token>": { namespace: ns, serviceAccount: sa }`).
#[derive(Clone)]
pub struct FileTokens {
    path: PathBuf,
    map: Arc<RwLock<HashMap<Vec<u8>, ServiceAccountRef>>>,
}

fn parse_tokens(text: &[u8]) -> Result<HashMap<Vec<u8>, ServiceAccountRef>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8 text".to_owned())?;
    if text.trim().is_empty() {
        return Ok(HashMap::new());
    }
    let map: HashMap<String, ServiceAccountRef> = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    Ok(map.into_iter().map(|(k, v)| (k.into_bytes(), v)).collect())
}

impl FileTokens {
    /// Loads `path` and re-reads it when it changes; a change that does not
    /// parse is logged and the previous tokens stay.
    pub fn watch(path: &Path) -> Result<Self, ReviewerError> {
        let file_err = |reason: String| ReviewerError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read(path).map_err(|e| file_err(e.to_string()))?;
        let map = Arc::new(RwLock::new(parse_tokens(&text).map_err(file_err)?));
        let weak = Arc::downgrade(&map);
        let shown = path.display().to_string();
        sidemesh_identity_client::watch::spawn(path.to_owned(), move |bytes| {
            let Some(map) = weak.upgrade() else {
                return false;
            };
            match parse_tokens(bytes) {
                Ok(new) => {
                    tracing::info!(path = %shown, tokens = new.len(), "token file reloaded");
                    if let Ok(mut m) = map.write() {
                        *m = new;
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %shown, error = %e, "token file refused; keeping the previous tokens")
                }
            }
            true
        });
        Ok(Self {
            path: path.to_owned(),
            map,
        })
    }

    fn review(&self, token: &[u8]) -> Result<ServiceAccountRef, ReviewError> {
        let token = token.trim_ascii();
        let map = self
            .map
            .read()
            .map_err(|_| ReviewError::Unavailable("token table poisoned".into()))?;
        map.get(token)
            .cloned()
            .ok_or_else(|| ReviewError::Rejected("token is not known".into()))
    }
}
