//! Throw-away PKIs written to a temporary directory: roots, issuers, bundles
//! and token files, made with sidemesh's own CA code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sidemesh_identity::ca::{self, PemPair};

/// A root and an issuer under it, as files.
#[derive(Debug)]
pub struct Pki {
    /// The directory holding the files.
    pub dir: PathBuf,
    /// Root certificate PEM.
    pub root: PemPair,
    /// Issuer certificate PEM.
    pub issuer: PemPair,
}

impl Pki {
    /// Makes a root and issuer for `cluster.local` and writes `root.crt`,
    /// `root.key`, `issuer.crt`, `issuer.key` and `bundle.pem` in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self::with_issuer_lifetime(dir, Duration::from_secs(365 * 86400))
    }

    /// As [`Pki::new`], with the issuer's lifetime chosen.
    pub fn with_issuer_lifetime(dir: &Path, lifetime: Duration) -> Self {
        let root = ca::new_root("cluster.local", Duration::from_secs(10 * 365 * 86400)).expect("root");
        let issuer = ca::new_issuer(&root.cert, &root.key, lifetime).expect("issuer");
        let pki = Self {
            dir: dir.to_owned(),
            root,
            issuer,
        };
        write(&pki.path("root.crt"), &pki.root.cert);
        write(&pki.path("root.key"), &pki.root.key);
        write(&pki.path("issuer.crt"), &pki.issuer.cert);
        write(&pki.path("issuer.key"), &pki.issuer.key);
        write(&pki.path("bundle.pem"), &pki.root.cert);
        pki
    }

    /// A file in the PKI directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Writes a file atomically (temp + rename), as Kubernetes volume updates are.
pub fn write(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename temp file");
}

/// A token file line for the file token reviewer.
pub fn token_line(token: &str, namespace: &str, service_account: &str) -> String {
    format!("{token:?}: {{ namespace: {namespace}, serviceAccount: {service_account} }}\n")
}
