//! `sidemesh trust rotate`: the zero-downtime root rotation of
//! docs/trust-rotation.md as a guided, resumable procedure.
//!
//! 1. make the new root B (or take one given);
//! 2. publish the bundle A+B;
//! 3. wait until every proxy trusts B;
//! 4. install a new issuer signed by B (the identity service switches live;
//!    with `--identity-addr`, wait until it announces the new issuer);
//! 5. wait until every proxy (and every `--tls-endpoints` server) holds a
//!    certificate from the new issuer;
//! 6. publish the bundle B alone, and wait until every proxy trusts only B.
//!
//! Each step is checked before the next. Progress is kept in `state.json` in
//! the state directory, together with the new root and issuer and a backup of
//! the files replaced, so a re-run (after a timeout, an interruption or
//! `--stop-after`) resumes where the last one stopped. Every wait is bounded
//! by `--timeout`.
//!
//! `--local` works on files: the bundle and issuer files the mesh components
//! watch. Without it, against the cluster of the kubeconfig: the
//! `sidemesh-trust-bundle` ConfigMap of every namespace that has one is
//! patched (key `ca-bundle.crt`), the issuer Secret is patched (`tls.crt` and
//! `tls.key` in one update, so the identity service never sees half of it),
//! and the proxies watched are every running Pod annotated
//! `sidemesh.io/injected`, read through the API server's Pod proxy. Objects
//! managed by trust-manager or cert-manager are refused: with those, edit the
//! `Bundle` and `Certificate` instead (docs/trust-rotation.md).

use std::collections::BTreeSet;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use sidemesh_identity::ca;
use sidemesh_identity::issuer::Issuer;
use sidemesh_identity_client::{SpiffeId, TrustBundle, TrustStore, fingerprint};
use sidemesh_proto::identity::v1::WatchIssuerRequest;
use sidemesh_telemetry::flags::parse_duration;

use crate::check::{ChainRecorder, ProxyView, SeenChain, ServerView, observe_proxies, server_name, short};
use crate::files::{read_text, write_atomic};

/// The steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Make (or take) the new root B.
    NewRoot,
    /// Publish the bundle holding the old roots and B.
    PublishBoth,
    /// Wait until every proxy trusts B.
    WaitTrust,
    /// Install a new issuer signed by B.
    NewIssuer,
    /// Wait until every proxy holds a certificate from the new issuer.
    WaitChain,
    /// Publish the bundle holding B alone; wait until every proxy trusts only B.
    PublishNew,
}

const STEPS: [Step; 6] = [
    Step::NewRoot,
    Step::PublishBoth,
    Step::WaitTrust,
    Step::NewIssuer,
    Step::WaitChain,
    Step::PublishNew,
];

impl Step {
    fn number(self) -> usize {
        STEPS.iter().position(|s| *s == self).map(|i| i + 1).unwrap_or(0)
    }

    fn title(self) -> &'static str {
        match self {
            Step::NewRoot => "make the new root",
            Step::PublishBoth => "publish the bundle with the old and the new root",
            Step::WaitTrust => "wait until every proxy trusts the new root",
            Step::NewIssuer => "install a new issuer signed by the new root",
            Step::WaitChain => "wait until every proxy holds a certificate from the new issuer",
            Step::PublishNew => "publish the bundle with the new root only, and wait until every proxy trusts only it",
        }
    }
}

/// Flags of `sidemesh trust rotate`.
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// Work on files (the bundle and issuer files the components watch), not on a cluster.
    #[arg(long)]
    pub local: bool,
    /// Directory keeping the progress (state.json), the new root and issuer, and backups.
    #[arg(long, default_value = "sidemesh-rotation")]
    pub state_dir: PathBuf,
    /// The trust bundle file every component watches (rewritten at steps 2 and 6).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// The issuer certificate file the identity service watches (rewritten at step 4).
    #[arg(long)]
    pub issuer_cert: Option<PathBuf>,
    /// The issuer key file the identity service watches (rewritten at step 4).
    #[arg(long)]
    pub issuer_key: Option<PathBuf>,
    /// Use this root as the new root instead of making one (PEM).
    #[arg(long, requires = "new_root_key")]
    pub new_root_cert: Option<PathBuf>,
    /// Key of `--new-root-cert` (PEM PKCS#8).
    #[arg(long, requires = "new_root_cert")]
    pub new_root_key: Option<PathBuf>,
    /// Trust domain of a new root made here [default: the current issuer's].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Validity of a new root made here.
    #[arg(long, default_value = "87600h", value_parser = parse_duration)]
    pub root_lifetime: Duration,
    /// Validity of the new issuer (never past the root's).
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub issuer_lifetime: Duration,
    /// Proxy admin endpoints to watch (`http://10.0.0.5:15020`, `host:port`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub proxies: Vec<String>,
    /// The identity service (`host:port`): at step 4, wait until it announces the new issuer.
    #[arg(long)]
    pub identity_addr: Option<String>,
    /// SPIFFE ID the identity service presents [default: spiffe://<td>/ns/sidemesh-system/sa/sidemesh-identity].
    #[arg(long)]
    pub identity_server_id: Option<String>,
    /// Control-plane TLS servers (`host:port`, e.g. the destination service) that must present a
    /// certificate from the new issuer, and accept one, before the old root is dropped.
    #[arg(long, value_delimiter = ',')]
    pub tls_endpoints: Vec<String>,
    /// The control plane's namespace, holding the issuer Secret (cluster mode).
    #[arg(long, default_value = "sidemesh-system")]
    pub control_plane_namespace: String,
    /// Name of the trust-bundle ConfigMaps, one per namespace (cluster mode).
    #[arg(long, default_value = "sidemesh-trust-bundle")]
    pub bundle_configmap: String,
    /// Name of the issuer Secret (cluster mode).
    #[arg(long, default_value = "sidemesh-issuer")]
    pub issuer_secret: String,
    /// The proxies' admin port (cluster mode).
    #[arg(long, default_value_t = crate::check::ADMIN_PORT)]
    pub admin_port: u16,
    /// Bound on each wait; on expiry the progress is kept and a re-run resumes.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How often proxies are polled while waiting.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub poll: Duration,
    /// `SIDEMESH_RENEW_JITTER` of the components not watched (the destination service): without
    /// `--tls-endpoints` to see them, step 5 lasts at least this long after the issuer switch.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub renew_jitter: Duration,
    /// Do not ask before the steps that change the mesh.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Stop after this step (re-run to continue).
    #[arg(long, value_enum)]
    pub stop_after: Option<Step>,
}

/// The rotation's progress, kept in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    version: u32,
    /// What is rotated (files, or a cluster's objects): a re-run must name the same.
    target: String,
    /// Fingerprints of the roots trusted before the rotation.
    old_roots: Vec<String>,
    /// Fingerprint of the issuer in service before the rotation.
    old_issuer: String,
    new_root: Option<Pair>,
    new_issuer: Option<Pair>,
    /// When the new issuer was installed (Unix seconds).
    #[serde(default)]
    issuer_installed_unix: Option<u64>,
    /// Steps completed.
    done: Vec<Step>,
    started_unix: u64,
    updated_unix: u64,
}

/// A certificate and key on disk, and the certificate's fingerprint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pair {
    fingerprint: String,
    cert: PathBuf,
    key: PathBuf,
}

const STATE_VERSION: u32 = 1;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// A rotation in progress.
struct Rotation {
    args: RotateArgs,
    state_path: PathBuf,
    state: State,
    target: Target,
    rt: tokio::runtime::Runtime,
}

/// Runs (or resumes) the rotation.
pub fn run(args: RotateArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let target = if args.local {
        let need = |v: &Option<PathBuf>, flag: &str| {
            v.clone()
                .with_context(|| format!("{flag} is required with --local"))
                .and_then(|p| absolute(&p))
        };
        let target = Target::Files {
            bundle: need(&args.bundle, "--bundle")?,
            issuer_cert: need(&args.issuer_cert, "--issuer-cert")?,
            issuer_key: need(&args.issuer_key, "--issuer-key")?,
        };
        anyhow::ensure!(
            !args.proxies.is_empty() || !args.tls_endpoints.is_empty() || args.identity_addr.is_some(),
            "nothing to watch: give the proxies' admin endpoints (--proxies), so that each step is seen \
             to be picked up before the next"
        );
        target
    } else {
        anyhow::ensure!(
            args.bundle.is_none() && args.issuer_cert.is_none() && args.issuer_key.is_none(),
            "--bundle, --issuer-cert and --issuer-key name files: add --local to rotate files, \
             or leave them out to rotate the cluster's ConfigMaps and Secret"
        );
        let client = rt
            .block_on(kube::Client::try_default())
            .context("no usable kubeconfig or in-cluster configuration (use --local to rotate files)")?;
        let target = Target::Cluster {
            client,
            namespace: args.control_plane_namespace.clone(),
            configmap: args.bundle_configmap.clone(),
            secret: args.issuer_secret.clone(),
        };
        rt.block_on(target.refuse_managed())?;
        target
    };
    if !args.yes && !std::io::stdin().is_terminal() {
        anyhow::bail!("standard input is not a terminal: pass --yes to run the steps without asking");
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state directory {}", args.state_dir.display()))?;
    let state_path = args.state_dir.join("state.json");
    let state = match std::fs::read(&state_path) {
        Ok(bytes) => {
            let state: State = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a rotation state file", state_path.display()))?;
            anyhow::ensure!(
                state.version == STATE_VERSION,
                "{}: state version {} is not {STATE_VERSION}",
                state_path.display(),
                state.version
            );
            anyhow::ensure!(
                state.target == target.describe(),
                "{} belongs to a rotation of {}, not of {}; use another --state-dir",
                state_path.display(),
                state.target,
                target.describe()
            );
            println!(
                "resuming the rotation recorded in {} (steps done: {})",
                state_path.display(),
                if state.done.is_empty() {
                    "none".to_owned()
                } else {
                    state
                        .done
                        .iter()
                        .map(|s| s.number().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            state
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => begin(&args, &target, &rt)?,
        Err(e) => return Err(e).with_context(|| format!("reading {}", state_path.display())),
    };
    let mut rotation = Rotation {
        args,
        state_path,
        state,
        target,
        rt,
    };
    rotation.save()?;
    rotation.run()
}

/// A new state: the roots and issuer in service now, backed up.
fn begin(args: &RotateArgs, target: &Target, rt: &tokio::runtime::Runtime) -> anyhow::Result<State> {
    let current = target.read_bundle(rt)?;
    let (cert_pem, key_pem) = target.read_issuer(rt)?;
    let issuer = Issuer::from_pem(&cert_pem, &key_pem, &current)
        .context("the issuer in service is not usable with the bundle; fix that before rotating")?;
    let dir = &args.state_dir;
    write_atomic(&dir.join("old-bundle.pem"), current.to_pem().as_bytes(), false)?;
    write_atomic(&dir.join("old-issuer.crt"), &cert_pem, false)?;
    write_atomic(&dir.join("old-issuer.key"), &key_pem, true)?;
    println!(
        "starting a root rotation of {}: {} root(s) trusted now [{}], issuer {} (backups in {})",
        target.describe(),
        current.roots().len(),
        current
            .fingerprints()
            .iter()
            .map(|f| short(Some(f)))
            .collect::<Vec<_>>()
            .join(", "),
        short(Some(issuer.fingerprint())),
        dir.display()
    );
    let now = now_unix();
    Ok(State {
        version: STATE_VERSION,
        target: target.describe(),
        old_roots: current.fingerprints(),
        old_issuer: issuer.fingerprint().to_owned(),
        new_root: None,
        new_issuer: None,
        issuer_installed_unix: None,
        done: Vec::new(),
        started_unix: now,
        updated_unix: now,
    })
}

/// Where the bundle and the issuer live.
enum Target {
    /// Files the components watch.
    Files {
        bundle: PathBuf,
        issuer_cert: PathBuf,
        issuer_key: PathBuf,
    },
    /// A cluster's trust-bundle ConfigMaps (one per namespace) and issuer Secret.
    Cluster {
        client: kube::Client,
        namespace: String,
        configmap: String,
        secret: String,
    },
}

/// Key of the issuer certificate and key in the Secret.
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Files {
                bundle,
                issuer_cert,
                issuer_key,
            } => format!(
                "files {}, {}, {}",
                bundle.display(),
                issuer_cert.display(),
                issuer_key.display()
            ),
            Target::Cluster {
                namespace,
                configmap,
                secret,
                ..
            } => format!("ConfigMaps */{configmap} and Secret {namespace}/{secret}"),
        }
    }

    /// Where the bundle is, for messages.
    fn bundle_name(&self) -> String {
        match self {
            Target::Files { bundle, .. } => bundle.display().to_string(),
            Target::Cluster { configmap, .. } => format!("the {configmap} ConfigMaps"),
        }
    }

    /// Where the issuer is, for messages.
    fn issuer_name(&self) -> String {
        match self {
            Target::Files {
                issuer_cert,
                issuer_key,
                ..
            } => format!("{} and {}", issuer_cert.display(), issuer_key.display()),
            Target::Cluster { namespace, secret, .. } => format!("Secret {namespace}/{secret}"),
        }
    }

    async fn configmaps(
        client: &kube::Client,
        name: &str,
    ) -> anyhow::Result<Vec<k8s_openapi::api::core::v1::ConfigMap>> {
        use kube::api::{Api, ListParams};
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::all(client.clone());
        Ok(api
            .list(&ListParams::default().fields(&format!("metadata.name={name}")))
            .await
            .with_context(|| format!("listing the {name} ConfigMaps"))?
            .items)
    }

    /// Refuses objects another controller owns: our writes would be undone.
    async fn refuse_managed(&self) -> anyhow::Result<()> {
        let Target::Cluster {
            client,
            namespace,
            configmap,
            secret,
        } = self
        else {
            return Ok(());
        };
        for cm in Self::configmaps(client, configmap).await? {
            let managed = cm
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.keys().any(|k| k.starts_with("trust.cert-manager.io/")));
            anyhow::ensure!(
                !managed,
                "ConfigMap {}/{configmap} is managed by trust-manager: rotate by editing its Bundle's sources \
                 (docs/trust-rotation.md), and watch with `sidemesh check --cluster`",
                cm.metadata.namespace.unwrap_or_default()
            );
        }
        let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), namespace);
        if let Some(s) = api
            .get_opt(secret)
            .await
            .with_context(|| format!("reading Secret {namespace}/{secret}"))?
        {
            let managed = s
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("cert-manager.io/certificate-name"));
            anyhow::ensure!(
                !managed,
                "Secret {namespace}/{secret} is issued by cert-manager: switch its Certificate's issuerRef instead \
                 (docs/trust-rotation.md)"
            );
        }
        Ok(())
    }

    /// The bundle in force: the file, or the control plane's ConfigMap.
    fn read_bundle(&self, rt: &tokio::runtime::Runtime) -> anyhow::Result<TrustBundle> {
        match self {
            Target::Files { bundle, .. } => {
                TrustBundle::from_file(bundle).with_context(|| format!("--bundle {}", bundle.display()))
            }
            Target::Cluster {
                client,
                namespace,
                configmap,
                ..
            } => {
                let maps = rt.block_on(Self::configmaps(client, configmap))?;
                let pem = maps
                    .into_iter()
                    .find(|cm| cm.metadata.namespace.as_deref() == Some(namespace.as_str()))
                    .and_then(|cm| cm.data)
                    .and_then(|mut d| d.remove(crate::check::BUNDLE_KEY))
                    .with_context(|| {
                        format!("ConfigMap {namespace}/{configmap} has no {}", crate::check::BUNDLE_KEY)
                    })?;
                TrustBundle::from_pem(pem.as_bytes()).with_context(|| format!("ConfigMap {namespace}/{configmap}"))
            }
        }
    }

    /// Where the bundle differs from `want` (file, or namespaces); empty when it holds exactly `want` everywhere.
    fn bundle_differs(&self, rt: &tokio::runtime::Runtime, want: &BTreeSet<String>) -> anyhow::Result<Vec<String>> {
        let holds = |pem: Option<&str>| {
            pem.and_then(|p| TrustBundle::from_pem(p.as_bytes()).ok())
                .is_some_and(|b| b.fingerprints().into_iter().collect::<BTreeSet<_>>() == *want)
        };
        match self {
            Target::Files { bundle, .. } => {
                let text = std::fs::read_to_string(bundle).ok();
                Ok(if holds(text.as_deref()) {
                    Vec::new()
                } else {
                    vec![bundle.display().to_string()]
                })
            }
            Target::Cluster { client, configmap, .. } => {
                let maps = rt.block_on(Self::configmaps(client, configmap))?;
                anyhow::ensure!(!maps.is_empty(), "there is no {configmap} ConfigMap in any namespace");
                Ok(maps
                    .into_iter()
                    .filter(|cm| {
                        !holds(
                            cm.data
                                .as_ref()
                                .and_then(|d| d.get(crate::check::BUNDLE_KEY))
                                .map(String::as_str),
                        )
                    })
                    .map(|cm| format!("{}/{configmap}", cm.metadata.namespace.unwrap_or_default()))
                    .collect())
            }
        }
    }

    /// Publishes `pem` as the bundle: the file, or every namespace's ConfigMap.
    fn write_bundle(&self, rt: &tokio::runtime::Runtime, pem: &str) -> anyhow::Result<()> {
        match self {
            Target::Files { bundle, .. } => replace_file(bundle, pem.as_bytes(), false),
            Target::Cluster { client, configmap, .. } => rt.block_on(async {
                use kube::api::{Api, Patch, PatchParams};
                for cm in Self::configmaps(client, configmap).await? {
                    let ns = cm.metadata.namespace.unwrap_or_default();
                    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
                    let patch = serde_json::json!({ "data": { crate::check::BUNDLE_KEY: pem } });
                    api.patch(configmap, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .with_context(|| format!("patching ConfigMap {ns}/{configmap}"))?;
                }
                Ok(())
            }),
        }
    }

    /// The issuer in service: certificate (with chain) and key, PEM.
    fn read_issuer(&self, rt: &tokio::runtime::Runtime) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        match self {
            Target::Files {
                issuer_cert,
                issuer_key,
                ..
            } => Ok((
                std::fs::read(issuer_cert).with_context(|| format!("reading {}", issuer_cert.display()))?,
                std::fs::read(issuer_key).with_context(|| format!("reading {}", issuer_key.display()))?,
            )),
            Target::Cluster {
                client,
                namespace,
                secret,
                ..
            } => {
                let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
                    kube::Api::namespaced(client.clone(), namespace);
                let found = rt
                    .block_on(api.get(secret))
                    .with_context(|| format!("reading Secret {namespace}/{secret}"))?;
                let mut data = found.data.unwrap_or_default();
                let mut take = |k: &str| {
                    data.remove(k)
                        .map(|v| v.0)
                        .with_context(|| format!("Secret {namespace}/{secret} has no {k}"))
                };
                Ok((take(TLS_CRT)?, take(TLS_KEY)?))
            }
        }
    }

    /// Installs a new issuer: the key file first then the certificate (the
    /// identity service refuses, keeping the old issuer, any mismatched pair
    /// it might see in between), or both Secret keys in one update.
    fn write_issuer(&self, rt: &tokio::runtime::Runtime, cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<()> {
        match self {
            Target::Files {
                issuer_cert,
                issuer_key,
                ..
            } => {
                replace_file(issuer_key, key_pem, true)?;
                replace_file(issuer_cert, cert_pem, false)
            }
            Target::Cluster {
                client,
                namespace,
                secret,
                ..
            } => {
                use base64::Engine as _;
                use kube::api::{Api, Patch, PatchParams};
                let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
                let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), namespace);
                let patch = serde_json::json!({ "data": { TLS_CRT: b64(cert_pem), TLS_KEY: b64(key_pem) } });
                rt.block_on(api.patch(secret, &PatchParams::default(), &Patch::Merge(&patch)))
                    .with_context(|| format!("patching Secret {namespace}/{secret}"))?;
                Ok(())
            }
        }
    }

    /// The fingerprint of the issuer certificate in service.
    fn installed_issuer(&self, rt: &tokio::runtime::Runtime) -> Option<(String, Vec<u8>)> {
        let (cert, key) = self.read_issuer(rt).ok()?;
        let der = CertificateDer::from_pem_slice(&cert).ok()?;
        Some((fingerprint(&der), key))
    }
}

/// Writes `contents` over `path` keeping the file's permission bits.
fn replace_file(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o777);
    write_atomic(path, contents, private)?;
    if let Some(mode) = mode {
        // Readers (proxies run as another user) keep the access they had.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(())
}

fn root_pem(pair: &Pair) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read(&pair.cert).with_context(|| format!("reading {}", pair.cert.display()))?;
    let der = CertificateDer::from_pem_slice(&text).with_context(|| format!("{}: not PEM", pair.cert.display()))?;
    anyhow::ensure!(
        fingerprint(&der) == pair.fingerprint,
        "{} changed since the rotation began (fingerprint {} expected)",
        pair.cert.display(),
        short(Some(&pair.fingerprint))
    );
    Ok(text)
}

/// What every watched component reports, once.
struct Observation {
    proxies: Vec<ProxyView>,
    servers: Vec<ServerView>,
}

/// A progress line: how many proxies (and servers) satisfy the condition,
/// and which do not yet.
fn progress(what: &str, proxies: (usize, usize), servers: (usize, usize), lagging: &[String]) -> String {
    let mut counts = Vec::new();
    if proxies.1 > 0 {
        counts.push(format!("{} of {} proxies", proxies.0, proxies.1));
    }
    if servers.1 > 0 {
        counts.push(format!("{} of {} servers", servers.0, servers.1));
    }
    let mut line = format!("      {} {what}", counts.join(", "));
    if !lagging.is_empty() {
        let shown: Vec<&str> = lagging.iter().take(5).map(String::as_str).collect();
        let more = if lagging.len() > 5 {
            format!(" and {} more", lagging.len() - 5)
        } else {
            String::new()
        };
        line.push_str(&format!(" (waiting for {}{more})", shown.join(", ")));
    }
    line
}

impl Rotation {
    fn save(&mut self) -> anyhow::Result<()> {
        self.state.updated_unix = now_unix();
        let json = serde_json::to_vec_pretty(&self.state).context("encoding the state")?;
        write_atomic(&self.state_path, &json, true)
    }

    fn done(&self, step: Step) -> bool {
        self.state.done.contains(&step)
    }

    fn mark(&mut self, step: Step) -> anyhow::Result<()> {
        if !self.done(step) {
            self.state.done.push(step);
        }
        self.save()
    }

    fn confirm(&self, step: Step, detail: &str) -> anyhow::Result<()> {
        if self.args.yes {
            return Ok(());
        }
        print!("step {}: {detail}\nproceed? [y/N] ", step.number());
        std::io::stdout().flush().ok();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .context("reading the answer")?;
        anyhow::ensure!(
            matches!(answer.trim(), "y" | "Y" | "yes"),
            "stopped before step {}; re-run to continue",
            step.number()
        );
        Ok(())
    }

    fn run(&mut self) -> anyhow::Result<()> {
        if self.done(Step::PublishNew) {
            println!("this rotation is complete; checking that the mesh still agrees");
        }
        for step in STEPS {
            // The waits, and the last step, are checks as much as actions: on
            // a re-run they pass at once while still true. The other steps
            // must not run twice (step 2 after step 6 would undo it).
            let skip = self.done(step) && matches!(step, Step::NewRoot | Step::PublishBoth | Step::NewIssuer);
            println!(
                "[{}/6] {}{}",
                step.number(),
                step.title(),
                if skip { ": done before" } else { "" }
            );
            if !skip {
                match step {
                    Step::NewRoot => self.new_root()?,
                    Step::PublishBoth => self.publish_both()?,
                    Step::WaitTrust => self.wait_trust()?,
                    Step::NewIssuer => self.new_issuer()?,
                    Step::WaitChain => self.wait_chain()?,
                    Step::PublishNew => self.publish_new()?,
                }
                self.mark(step)?;
            }
            if self.args.stop_after == Some(step) && !self.done(Step::PublishNew) {
                println!(
                    "stopped after step {} as asked; state in {} — re-run the same command to continue",
                    step.number(),
                    self.state_path.display()
                );
                return Ok(());
            }
        }
        let root = self.new_root_pair()?.fingerprint.clone();
        let issuer = self.new_issuer_pair()?.fingerprint.clone();
        println!(
            "rotation complete: every watched proxy trusts only root {} and holds a certificate from issuer {}.\n\
             The old root can be retired; the new root's key is {}.",
            short(Some(&root)),
            short(Some(&issuer)),
            self.new_root_pair()?.key.display()
        );
        Ok(())
    }

    fn new_root_pair(&self) -> anyhow::Result<&Pair> {
        self.state
            .new_root
            .as_ref()
            .context("the state has no new root (step 1 not done)")
    }

    fn new_issuer_pair(&self) -> anyhow::Result<&Pair> {
        self.state
            .new_issuer
            .as_ref()
            .context("the state has no new issuer (step 4 not done)")
    }

    /// Step 1.
    fn new_root(&mut self) -> anyhow::Result<()> {
        if let Some(pair) = &self.state.new_root {
            root_pem(pair)?;
            println!("      new root {} (made before)", short(Some(&pair.fingerprint)));
            return Ok(());
        }
        let pair = match (&self.args.new_root_cert, &self.args.new_root_key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read_text(cert)?;
                let key_pem = read_text(key)?;
                // A root is usable here when it can sign an issuer: the same
                // check as at step 4, done now rather than half-way through.
                ca::new_issuer(&cert_pem, &key_pem, Duration::from_secs(3600))
                    .with_context(|| format!("--new-root-cert {} / --new-root-key", cert.display()))?;
                let bundle = TrustBundle::from_pem(cert_pem.as_bytes())
                    .with_context(|| format!("--new-root-cert {}", cert.display()))?;
                let fp = bundle.fingerprints().into_iter().next().context("no root")?;
                Pair {
                    fingerprint: fp,
                    cert: absolute(cert)?,
                    key: absolute(key)?,
                }
            }
            _ => {
                let td = match &self.args.trust_domain {
                    Some(td) => td.clone(),
                    None => self.current_trust_domain(),
                };
                SpiffeId::new(&td, "x", "x").context("--trust-domain")?;
                let made = ca::new_root(&td, self.args.root_lifetime).context("making the new root")?;
                let dir = absolute(&self.args.state_dir)?;
                let (cert, key) = (dir.join("new-root.crt"), dir.join("new-root.key"));
                write_atomic(&key, made.key.as_bytes(), true)?;
                write_atomic(&cert, made.cert.as_bytes(), false)?;
                let bundle = TrustBundle::from_pem(made.cert.as_bytes())?;
                let fp = bundle.fingerprints().into_iter().next().context("no root")?;
                Pair {
                    fingerprint: fp,
                    cert,
                    key,
                }
            }
        };
        // A root given that is already published is not an "old" root.
        self.state.old_roots.retain(|r| *r != pair.fingerprint);
        anyhow::ensure!(
            !self.state.old_roots.is_empty(),
            "the bundle already holds only the new root: nothing to rotate"
        );
        println!(
            "      new root {} ({}, key {})",
            short(Some(&pair.fingerprint)),
            pair.cert.display(),
            pair.key.display()
        );
        self.state.new_root = Some(pair);
        Ok(())
    }

    /// The trust domain of the issuer in service (its URI SAN `spiffe://<td>`).
    fn current_trust_domain(&self) -> String {
        self.target
            .read_issuer(&self.rt)
            .ok()
            .or_else(|| {
                Some((
                    std::fs::read(self.args.state_dir.join("old-issuer.crt")).ok()?,
                    Vec::new(),
                ))
            })
            .and_then(|(pem, _)| CertificateDer::from_pem_slice(&pem).ok())
            .and_then(|der| sidemesh_identity_client::verify::uri_sans(&der).ok())
            .and_then(|uris| {
                uris.into_iter().find_map(|u| {
                    u.strip_prefix("spiffe://")
                        .map(|td| td.trim_end_matches('/').to_owned())
                })
            })
            .unwrap_or_else(|| "cluster.local".to_owned())
    }

    /// The old roots' certificates: from the bundle in force, else the backup.
    fn old_root_ders(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let mut found: Vec<CertificateDer<'static>> = Vec::new();
        let current = self.target.read_bundle(&self.rt).ok();
        let backup = TrustBundle::from_file(&self.args.state_dir.join("old-bundle.pem")).ok();
        for b in current.iter().chain(backup.iter()) {
            for r in b.roots() {
                if self.state.old_roots.contains(&r.fingerprint)
                    && !found.iter().any(|d| fingerprint(d) == r.fingerprint)
                {
                    found.push(r.der.clone());
                }
            }
        }
        anyhow::ensure!(
            found.len() == self.state.old_roots.len(),
            "the old roots are neither in {} nor in the backup {}",
            self.target.bundle_name(),
            self.args.state_dir.join("old-bundle.pem").display()
        );
        Ok(found)
    }

    fn new_root_der(&self) -> anyhow::Result<CertificateDer<'static>> {
        let pem = root_pem(self.new_root_pair()?)?;
        CertificateDer::from_pem_slice(&pem).context("the new root is not PEM")
    }

    /// Writes a bundle of exactly `roots` and reads it back.
    fn publish(&self, step: Step, roots: Vec<CertificateDer<'static>>, what: &str) -> anyhow::Result<TrustBundle> {
        let want: BTreeSet<String> = roots.iter().map(|d| fingerprint(d)).collect();
        let bundle = TrustBundle::from_der(roots).context("building the bundle")?;
        let name = self.target.bundle_name();
        if self.target.bundle_differs(&self.rt, &want)?.is_empty() {
            println!("      {name} already hold(s) {what}");
        } else {
            self.confirm(step, &format!("write {what} to {name}"))?;
            self.target.write_bundle(&self.rt, &bundle.to_pem())?;
            println!("      wrote {what} to {name}");
        }
        let differs = self.target.bundle_differs(&self.rt, &want)?;
        anyhow::ensure!(
            differs.is_empty(),
            "{} do(es) not hold {what} after writing it (another writer?)",
            differs.join(", ")
        );
        Ok(bundle)
    }

    /// Step 2.
    fn publish_both(&mut self) -> anyhow::Result<()> {
        let mut roots = self.old_root_ders()?;
        roots.push(self.new_root_der()?);
        self.publish(Step::PublishBoth, roots, "the old and the new roots")?;
        Ok(())
    }

    /// Polls until `ready` holds for every watched component, or the timeout.
    /// Polls until every proxy (and, with `ready_server`, every TLS
    /// endpoint) is ready, or the timeout.
    fn wait_until(
        &self,
        what: &str,
        bundle: Option<&TrustBundle>,
        client: Option<&ClientCert>,
        ready_proxy: &dyn Fn(&ProxyView) -> bool,
        ready_server: Option<&dyn Fn(&ServerView) -> bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.args.timeout;
        let mut last_line = String::new();
        loop {
            let seen = self.observe(bundle, client, ready_server.is_some());
            let server_ok = |s: &ServerView| ready_server.is_none_or(|f| f(s));
            let late_proxies: Vec<&ProxyView> = seen.proxies.iter().filter(|p| !ready_proxy(p)).collect();
            let late_servers: Vec<&ServerView> = seen.servers.iter().filter(|s| !server_ok(s)).collect();
            let lagging: Vec<String> = late_proxies
                .iter()
                .map(|p| p.endpoint.clone())
                .chain(late_servers.iter().map(|s| s.endpoint.clone()))
                .collect();
            let line = progress(
                what,
                (seen.proxies.len() - late_proxies.len(), seen.proxies.len()),
                (seen.servers.len() - late_servers.len(), seen.servers.len()),
                &lagging,
            );
            if line != last_line {
                println!("{line}");
                last_line = line;
            }
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let detail: String = late_proxies
                    .iter()
                    .map(|p| format!("\n  {}", p.line()))
                    .chain(late_servers.iter().map(|s| format!("\n  {}", s.line())))
                    .collect();
                anyhow::bail!(
                    "timed out after {:?} waiting until every component would {what}; lagging:{detail}\n\
                     progress is saved in {}: re-run the same command to resume",
                    self.args.timeout,
                    self.state_path.display()
                );
            }
            std::thread::sleep(self.args.poll);
        }
    }

    fn observe(&self, bundle: Option<&TrustBundle>, client: Option<&ClientCert>, servers: bool) -> Observation {
        let request_timeout = self.args.poll.max(Duration::from_secs(2)).min(Duration::from_secs(10));
        self.rt.block_on(async {
            let proxies = async {
                let mut seen = observe_proxies(&self.args.proxies, request_timeout).await;
                if let Target::Cluster { client, .. } = &self.target {
                    // Listed at each look: Pods come and go during a rotation.
                    match crate::check::meshed_pods(client).await {
                        Ok(pods) => seen.extend(
                            crate::check::observe_pods(client, &pods, self.args.admin_port, request_timeout).await,
                        ),
                        Err(e) => seen.push(ProxyView {
                            endpoint: "(Pod list)".into(),
                            error: Some(format!("{e:#}")),
                            ..ProxyView::default()
                        }),
                    }
                }
                seen
            };
            let servers = async {
                let mut out = Vec::new();
                for e in self.args.tls_endpoints.iter().filter(|_| servers) {
                    out.push(probe_server(e, bundle, client, request_timeout).await);
                }
                out
            };
            let (proxies, servers) = tokio::join!(proxies, servers);
            Observation { proxies, servers }
        })
    }

    /// Step 3.
    fn wait_trust(&mut self) -> anyhow::Result<()> {
        let b = self.new_root_pair()?.fingerprint.clone();
        self.wait_until(
            &format!("trust the new root {}", short(Some(&b))),
            None,
            None,
            &|p| p.trusts(&b),
            // Servers cannot say what they trust; step 5 shows they accept the new chain.
            None,
        )
    }

    /// Step 4.
    fn new_issuer(&mut self) -> anyhow::Result<()> {
        let root = self.new_root_pair()?.clone();
        let dir = absolute(&self.args.state_dir)?;
        let pair = match &self.state.new_issuer {
            Some(p) => p.clone(),
            None => {
                let made = ca::new_issuer(
                    &read_text(&root.cert)?,
                    &read_text(&root.key)?,
                    self.args.issuer_lifetime,
                )
                .context("making the new issuer")?;
                let (cert, key) = (dir.join("new-issuer.crt"), dir.join("new-issuer.key"));
                write_atomic(&key, made.key.as_bytes(), true)?;
                write_atomic(&cert, made.cert.as_bytes(), false)?;
                let der = CertificateDer::from_pem_slice(made.cert.as_bytes()).context("new issuer PEM")?;
                let pair = Pair {
                    fingerprint: fingerprint(&der),
                    cert,
                    key,
                };
                self.state.new_issuer = Some(pair.clone());
                self.save()?;
                pair
            }
        };
        let cert_pem = std::fs::read(&pair.cert).with_context(|| format!("reading {}", pair.cert.display()))?;
        let key_pem = std::fs::read(&pair.key).with_context(|| format!("reading {}", pair.key.display()))?;
        // The identity service's own acceptance test, against the bundle in
        // force: refuse here rather than have it refuse the files.
        let bundle = self.target.read_bundle(&self.rt)?;
        anyhow::ensure!(
            bundle.fingerprints().contains(&root.fingerprint),
            "{} no longer hold(s) the new root {}: publish it again (step 2) before installing the new issuer",
            self.target.bundle_name(),
            short(Some(&root.fingerprint))
        );
        let issuer = Issuer::from_pem(&cert_pem, &key_pem, &bundle).context("the new issuer would be refused")?;
        anyhow::ensure!(
            issuer.fingerprint() == pair.fingerprint,
            "{} changed",
            pair.cert.display()
        );
        let installed = self.target.installed_issuer(&self.rt);
        if installed
            .as_ref()
            .is_some_and(|(fp, key)| *fp == pair.fingerprint && *key == key_pem)
        {
            println!(
                "      the new issuer {} is installed already",
                short(Some(&pair.fingerprint))
            );
        } else {
            let name = self.target.issuer_name();
            self.confirm(
                Step::NewIssuer,
                &format!("install issuer {} into {name}", short(Some(&pair.fingerprint))),
            )?;
            self.target.write_issuer(&self.rt, &cert_pem, &key_pem)?;
            println!("      installed issuer {} into {name}", short(Some(&pair.fingerprint)));
            self.state.issuer_installed_unix = Some(now_unix());
            self.save()?;
        }
        if let Some(addr) = self.args.identity_addr.clone() {
            self.wait_identity(&addr, &bundle, &pair.fingerprint)?;
        }
        Ok(())
    }

    /// Waits until the identity service announces `issuer` on `WatchIssuer`.
    fn wait_identity(&self, addr: &str, bundle: &TrustBundle, issuer: &str) -> anyhow::Result<()> {
        let td = self.current_trust_domain();
        let server_id: SpiffeId = match &self.args.identity_server_id {
            Some(id) => id.parse().context("--identity-server-id")?,
            None => SpiffeId::new(&td, "sidemesh-system", "sidemesh-identity").context("trust domain")?,
        };
        let trust = TrustStore::new(TrustBundle::from_der(
            bundle.roots().iter().map(|r| r.der.clone()).collect(),
        )?);
        let deadline = Instant::now() + self.args.timeout;
        let mut last = String::new();
        self.rt.block_on(async {
            loop {
                let seen = async {
                    let mut client =
                        sidemesh_identity_client::client::identity_client(addr, server_id.clone(), trust.clone())?;
                    let mut stream = client.watch_issuer(WatchIssuerRequest {}).await?.into_inner();
                    // The first message is the issuer in service; later ones follow changes.
                    while let Some(state) = stream.message().await? {
                        if state.issuer_fingerprint == issuer {
                            return Ok::<_, anyhow::Error>(state.issuer_fingerprint);
                        }
                        let line = format!(
                            "      the identity service at {addr} still announces issuer {}",
                            short(Some(&state.issuer_fingerprint))
                        );
                        if line != last {
                            println!("{line}");
                            last = line;
                        }
                    }
                    anyhow::bail!("the issuer stream ended")
                };
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, seen).await {
                    Ok(Ok(_)) => {
                        println!(
                            "      the identity service at {addr} announces the new issuer {}",
                            short(Some(issuer))
                        );
                        return Ok(());
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "watching the identity service's issuer"),
                    Err(_) => {}
                }
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "timed out after {:?} waiting until the identity service at {addr} announces issuer {}; \
                         check its log for \"issuer refused\". Progress is saved: re-run to resume",
                        self.args.timeout,
                        short(Some(issuer))
                    );
                }
                tokio::time::sleep(self.args.poll).await;
            }
        })
    }

    /// A leaf from the new issuer, to show the TLS servers accept the new chain.
    fn client_cert(&self) -> anyhow::Result<ClientCert> {
        let pair = self.new_issuer_pair()?;
        ClientCert::new(
            &read_text(&pair.cert)?,
            &read_text(&pair.key)?,
            &self.current_trust_domain(),
        )
    }

    /// Step 5.
    fn wait_chain(&mut self) -> anyhow::Result<()> {
        let issuer = self.new_issuer_pair()?.fingerprint.clone();
        let bundle = self.target.read_bundle(&self.rt)?;
        let client = self.client_cert()?;
        self.wait_until(
            &format!("hold a certificate from the new issuer {}", short(Some(&issuer))),
            Some(&bundle),
            Some(&client),
            &|p| p.issuer.as_deref() == Some(issuer.as_str()),
            Some(&|s| s.issuer.as_deref() == Some(issuer.as_str()) && s.chain_error.is_none() && s.error.is_none()),
        )?;
        // What is not watched (the destination service, unless given as a
        // TLS endpoint) re-certifies within its jitter of the switch: let
        // that pass before the old roots can go.
        if self.args.tls_endpoints.is_empty()
            && let Some(at) = self.state.issuer_installed_unix
        {
            let until = at + self.args.renew_jitter.as_secs();
            let now = now_unix();
            if now < until {
                println!(
                    "      waiting {} s more for the control plane to re-certify (--renew-jitter; \
                     --tls-endpoints would show it instead)",
                    until - now
                );
                std::thread::sleep(Duration::from_secs(until - now));
            }
        }
        Ok(())
    }

    /// Step 6.
    fn publish_new(&mut self) -> anyhow::Result<()> {
        let root = self.new_root_pair()?.fingerprint.clone();
        let issuer = self.new_issuer_pair()?.fingerprint.clone();
        // The old roots go only once nothing depends on them: re-check at once.
        let client = self.client_cert()?;
        let seen = self.observe(Some(&self.target.read_bundle(&self.rt)?), Some(&client), true);
        let behind: Vec<String> = seen
            .proxies
            .iter()
            .filter(|p| p.issuer.as_deref() != Some(issuer.as_str()))
            .map(ProxyView::line)
            .chain(
                seen.servers
                    .iter()
                    .filter(|s| s.issuer.as_deref() != Some(issuer.as_str()) || s.error.is_some())
                    .map(ServerView::line),
            )
            .collect();
        let installed = self.target.installed_issuer(&self.rt).map(|(fp, _)| fp);
        anyhow::ensure!(
            installed.as_deref() == Some(issuer.as_str()),
            "{} no longer holds the new issuer {}: re-install it (step 4) before dropping the old roots",
            self.target.issuer_name(),
            short(Some(&issuer))
        );
        anyhow::ensure!(
            behind.is_empty(),
            "not every component is on the new chain; dropping the old roots now would break them:\n  {}",
            behind.join("\n  ")
        );
        let bundle = self.publish(Step::PublishNew, vec![self.new_root_der()?], "the new root only")?;
        let only: BTreeSet<String> = [root.clone()].into();
        self.wait_until(
            &format!("trust only the new root {} and keep the new chain", short(Some(&root))),
            Some(&bundle),
            Some(&client),
            &|p| p.trusts_exactly(&only) && p.issuer.as_deref() == Some(issuer.as_str()),
            Some(&|s| s.error.is_none() && s.chain_error.is_none() && s.issuer.as_deref() == Some(issuer.as_str())),
        )
    }
}

/// A client certificate from the new issuer, for probing servers.
struct ClientCert {
    key: Arc<rustls::sign::CertifiedKey>,
}

impl ClientCert {
    fn new(issuer_cert: &str, issuer_key: &str, trust_domain: &str) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::from_pem(issuer_key).context("the new issuer's key")?;
        let issuer_der =
            CertificateDer::from_pem_slice(issuer_cert.as_bytes()).context("the new issuer's certificate")?;
        let signer = rcgen::Issuer::from_ca_cert_der(&issuer_der, key).context("the new issuer")?;
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("a probe key")?;
        let id = SpiffeId::new(trust_domain, "sidemesh-system", "sidemesh-rotate").context("trust domain")?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
        params.not_after = (SystemTime::now() + Duration::from_secs(3600)).into();
        params.use_authority_key_identifier_extension = true;
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().context("SAN")?)];
        let leaf = params
            .signed_by(&leaf_key, &signer)
            .context("signing the probe certificate")?;
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())))
            .context("the probe key")?;
        Ok(Self {
            key: Arc::new(rustls::sign::CertifiedKey::new(
                vec![leaf.der().clone(), issuer_der],
                signing,
            )),
        })
    }
}

#[derive(Debug)]
struct Presents(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The chain a server presents and, with `client`, whether it accepts a
/// client certificate from the new chain (an HTTP/2 server answers the
/// connection preface with its SETTINGS; a refused certificate ends the
/// connection with an alert instead).
async fn probe_server(
    endpoint: &str,
    bundle: Option<&TrustBundle>,
    client: Option<&ClientCert>,
    timeout: Duration,
) -> ServerView {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let failed = |error: String| ServerView {
        endpoint: endpoint.to_owned(),
        error: Some(error),
        ..ServerView::default()
    };
    let Some(client) = client else {
        return match crate::check::server_chain(endpoint, timeout).await {
            Ok(chain) => crate::check::judge_chain(endpoint, &chain, bundle),
            Err(e) => failed(e),
        };
    };
    let seen = SeenChain::default();
    let config = match rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
    {
        Ok(b) => b,
        Err(e) => return failed(e.to_string()),
    };
    let mut config = config
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainRecorder::new(seen.clone())))
        .with_client_cert_resolver(Arc::new(Presents(client.key.clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = match server_name(endpoint) {
        Ok(n) => n,
        Err(e) => return failed(e),
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .map_err(|e| format!("writing: {e}"))?;
        let mut buf = [0u8; 9];
        match tls.read(&mut buf).await {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => Err("the server closed the connection: it refused the new-chain client certificate".to_owned()),
            Err(e) => Err(format!("the server refused the new-chain client certificate: {e}")),
        }
    };
    let outcome = match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    let chain = seen.lock().ok().and_then(|s| s.clone());
    match (chain, outcome) {
        (Some(chain), Ok(())) => crate::check::judge_chain(endpoint, &chain, bundle),
        (Some(chain), Err(e)) => {
            let mut view = crate::check::judge_chain(endpoint, &chain, bundle);
            view.error = Some(e);
            view
        }
        (None, Err(e)) => failed(e),
        (None, Ok(())) => failed("the server sent no certificate".into()),
    }
}
