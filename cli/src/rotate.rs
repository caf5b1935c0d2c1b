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
//! watch. Against a cluster the same steps would patch the trust-bundle
//! ConfigMaps and the issuer Secret; that mode is not built yet (see
//! docs/trust-rotation.md for doing those steps with kubectl).

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
    /// Bound on each wait; on expiry the progress is kept and a re-run resumes.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How often proxies are polled while waiting.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub poll: Duration,
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
    /// The files rotated: a re-run must name the same ones.
    bundle: PathBuf,
    issuer_cert: PathBuf,
    issuer_key: PathBuf,
    /// Fingerprints of the roots trusted before the rotation.
    old_roots: Vec<String>,
    /// Fingerprint of the issuer in service before the rotation.
    old_issuer: String,
    new_root: Option<Pair>,
    new_issuer: Option<Pair>,
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
    rt: tokio::runtime::Runtime,
}

/// Runs (or resumes) the rotation.
pub fn run(args: RotateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.local,
        "`sidemesh trust rotate` against a cluster is not built yet: run it with --local on the files, \
         or follow docs/trust-rotation.md with kubectl (`sidemesh check` reports each step)"
    );
    let need = |v: &Option<PathBuf>, flag: &str| {
        v.clone()
            .with_context(|| format!("{flag} is required with --local"))
            .and_then(|p| absolute(&p))
    };
    let bundle = need(&args.bundle, "--bundle")?;
    let issuer_cert = need(&args.issuer_cert, "--issuer-cert")?;
    let issuer_key = need(&args.issuer_key, "--issuer-key")?;
    anyhow::ensure!(
        !args.proxies.is_empty() || !args.tls_endpoints.is_empty() || args.identity_addr.is_some(),
        "nothing to watch: give the proxies' admin endpoints (--proxies), so that each step is seen \
         to be picked up before the next"
    );
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
                state.bundle == bundle && state.issuer_cert == issuer_cert && state.issuer_key == issuer_key,
                "{} belongs to a rotation of other files (bundle {}, issuer {} / {}); use another --state-dir",
                state_path.display(),
                state.bundle.display(),
                state.issuer_cert.display(),
                state.issuer_key.display()
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => begin(&args, &bundle, &issuer_cert, &issuer_key)?,
        Err(e) => return Err(e).with_context(|| format!("reading {}", state_path.display())),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut rotation = Rotation {
        args,
        state_path,
        state,
        rt,
    };
    rotation.save()?;
    rotation.run()
}

/// A new state: the roots and issuer in service now, backed up.
fn begin(args: &RotateArgs, bundle: &Path, issuer_cert: &Path, issuer_key: &Path) -> anyhow::Result<State> {
    let current = TrustBundle::from_file(bundle).with_context(|| format!("--bundle {}", bundle.display()))?;
    let cert_pem = std::fs::read(issuer_cert).with_context(|| format!("reading {}", issuer_cert.display()))?;
    let key_pem = std::fs::read(issuer_key).with_context(|| format!("reading {}", issuer_key.display()))?;
    let issuer = Issuer::from_pem(&cert_pem, &key_pem, &current)
        .context("the issuer in service is not usable with the bundle; fix that before rotating")?;
    let dir = &args.state_dir;
    write_atomic(&dir.join("old-bundle.pem"), current.to_pem().as_bytes(), false)?;
    write_atomic(&dir.join("old-issuer.crt"), &cert_pem, false)?;
    write_atomic(&dir.join("old-issuer.key"), &key_pem, true)?;
    println!(
        "starting a root rotation: {} root(s) trusted now [{}], issuer {} (backups in {})",
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
        bundle: bundle.to_owned(),
        issuer_cert: issuer_cert.to_owned(),
        issuer_key: issuer_key.to_owned(),
        old_roots: current.fingerprints(),
        old_issuer: issuer.fingerprint().to_owned(),
        new_root: None,
        new_issuer: None,
        done: Vec::new(),
        started_unix: now,
        updated_unix: now,
    })
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
        std::fs::read(&self.state.issuer_cert)
            .ok()
            .and_then(|pem| CertificateDer::from_pem_slice(&pem).ok())
            .and_then(|der| sidemesh_identity_client::verify::uri_sans(&der).ok())
            .and_then(|uris| {
                uris.into_iter().find_map(|u| {
                    u.strip_prefix("spiffe://")
                        .map(|td| td.trim_end_matches('/').to_owned())
                })
            })
            .unwrap_or_else(|| "cluster.local".to_owned())
    }

    /// The old roots' certificates: from the bundle file, else the backup.
    fn old_root_ders(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let mut found: Vec<CertificateDer<'static>> = Vec::new();
        for source in [self.state.bundle.clone(), self.args.state_dir.join("old-bundle.pem")] {
            if let Ok(b) = TrustBundle::from_file(&source) {
                for r in b.roots() {
                    if self.state.old_roots.contains(&r.fingerprint)
                        && !found.iter().any(|d| fingerprint(d) == r.fingerprint)
                    {
                        found.push(r.der.clone());
                    }
                }
            }
        }
        anyhow::ensure!(
            found.len() == self.state.old_roots.len(),
            "the old roots are neither in {} nor in the backup {}",
            self.state.bundle.display(),
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
        let path = self.state.bundle.clone();
        let current = TrustBundle::from_file(&path).ok();
        if current
            .as_ref()
            .is_some_and(|b| b.fingerprints().into_iter().collect::<BTreeSet<_>>() == want)
        {
            println!("      {} already holds {what}", path.display());
        } else {
            let bundle = TrustBundle::from_der(roots).context("building the bundle")?;
            self.confirm(step, &format!("write {what} to {}", path.display()))?;
            replace_file(&path, bundle.to_pem().as_bytes(), false)?;
            println!("      wrote {what} to {}", path.display());
        }
        let written = TrustBundle::from_file(&path).with_context(|| format!("re-reading {}", path.display()))?;
        anyhow::ensure!(
            written.fingerprints().into_iter().collect::<BTreeSet<_>>() == want,
            "{} does not hold {what} after writing it (another writer?)",
            path.display()
        );
        Ok(written)
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
            let proxies = observe_proxies(&self.args.proxies, request_timeout);
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
        let bundle = TrustBundle::from_file(&self.state.bundle)
            .with_context(|| format!("reading {}", self.state.bundle.display()))?;
        anyhow::ensure!(
            bundle.fingerprints().contains(&root.fingerprint),
            "{} no longer holds the new root {}: publish it again (step 2) before installing the new issuer",
            self.state.bundle.display(),
            short(Some(&root.fingerprint))
        );
        let issuer = Issuer::from_pem(&cert_pem, &key_pem, &bundle).context("the new issuer would be refused")?;
        anyhow::ensure!(
            issuer.fingerprint() == pair.fingerprint,
            "{} changed",
            pair.cert.display()
        );
        let installed = std::fs::read(&self.state.issuer_cert)
            .ok()
            .and_then(|pem| CertificateDer::from_pem_slice(&pem).ok())
            .map(|der| fingerprint(&der));
        let installed_key = std::fs::read(&self.state.issuer_key).ok();
        if installed.as_deref() == Some(pair.fingerprint.as_str()) && installed_key.as_deref() == Some(&key_pem[..]) {
            println!(
                "      the new issuer {} is installed already",
                short(Some(&pair.fingerprint))
            );
        } else {
            self.confirm(
                Step::NewIssuer,
                &format!(
                    "install issuer {} into {} and {}",
                    short(Some(&pair.fingerprint)),
                    self.state.issuer_cert.display(),
                    self.state.issuer_key.display()
                ),
            )?;
            // The key first: the identity service reloads once both files
            // settle, and refuses (keeping the old issuer) any mismatched pair
            // it might see in between.
            replace_file(&self.state.issuer_key, &key_pem, true)?;
            replace_file(&self.state.issuer_cert, &cert_pem, false)?;
            println!(
                "      installed issuer {} into {}",
                short(Some(&pair.fingerprint)),
                self.state.issuer_cert.display()
            );
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
        let bundle = TrustBundle::from_file(&self.state.bundle)
            .with_context(|| format!("reading {}", self.state.bundle.display()))?;
        let client = self.client_cert()?;
        self.wait_until(
            &format!("hold a certificate from the new issuer {}", short(Some(&issuer))),
            Some(&bundle),
            Some(&client),
            &|p| p.issuer.as_deref() == Some(issuer.as_str()),
            Some(&|s| s.issuer.as_deref() == Some(issuer.as_str()) && s.chain_error.is_none() && s.error.is_none()),
        )
    }

    /// Step 6.
    fn publish_new(&mut self) -> anyhow::Result<()> {
        let root = self.new_root_pair()?.fingerprint.clone();
        let issuer = self.new_issuer_pair()?.fingerprint.clone();
        // The old roots go only once nothing depends on them: re-check at once.
        let client = self.client_cert()?;
        let seen = self.observe(
            Some(
                &TrustBundle::from_file(&self.state.bundle)
                    .with_context(|| format!("reading {}", self.state.bundle.display()))?,
            ),
            Some(&client),
            true,
        );
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
        let installed = std::fs::read(&self.state.issuer_cert)
            .ok()
            .and_then(|pem| CertificateDer::from_pem_slice(&pem).ok())
            .map(|der| fingerprint(&der));
        anyhow::ensure!(
            installed.as_deref() == Some(issuer.as_str()),
            "{} no longer holds the new issuer {}: re-install it (step 4) before dropping the old roots",
            self.state.issuer_cert.display(),
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
