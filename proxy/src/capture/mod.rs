//! `sidemesh-proxy init`: programs the Pod's nat table so that its TCP
//! traffic passes through the proxy (what the injected init container runs).
//!
//! # The rules (IPv4; IPv6 is the same with `::1/128` and `::6/128`)
//!
//! ```text
//! -A PREROUTING -p tcp -j SIDEMESH_INBOUND
//! -A OUTPUT -p tcp -j SIDEMESH_OUTBOUND
//! -A SIDEMESH_INBOUND -p tcp -m tcp --dport 15001 -j RETURN         proxy ports: probes and
//! -A SIDEMESH_INBOUND -p tcp -m tcp --dport 15006 -j RETURN         Prometheus reach the admin
//! -A SIDEMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN         port, nothing loops
//! -A SIDEMESH_INBOUND -p tcp -m tcp --dport <skip-inbound> -j RETURN
//! -A SIDEMESH_INBOUND -p tcp -j SIDEMESH_IN_REDIRECT
//! -A SIDEMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
//! -A SIDEMESH_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN                                  (1)
//! -A SIDEMESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 1337 -j SIDEMESH_INBOUND (2)
//! -A SIDEMESH_OUTBOUND -m owner --uid-owner 1337 -j RETURN                               (3)
//! -A SIDEMESH_OUTBOUND -d 127.0.0.0/8 -j RETURN                                          (4)
//! -A SIDEMESH_OUTBOUND -d <skip-cidr> -j RETURN
//! -A SIDEMESH_OUTBOUND -p tcp -m tcp --dport <skip-outbound> -j RETURN
//! -A SIDEMESH_OUTBOUND -p tcp -j SIDEMESH_OUT_REDIRECT
//! -A SIDEMESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001
//! ```
//!
//! # Loopback and the Pod's own IP
//!
//! The nat table is consulted once per connection, at the first nat hook its
//! first packet meets: OUTPUT for a locally originated one. Its packets do
//! come back through PREROUTING on `lo`, but nat no longer looks at them, so
//! inbound capture of a connection the Pod makes to itself must happen in
//! OUTPUT. A connection to the Pod's own IP is routed over `lo`.
//!
//! - App → its own Pod IP (`-o lo`, not the proxy UID): falls through to the
//!   outbound redirect like any other destination, so self-calls get the same
//!   routing, mTLS and metrics as calls to other Pods. Istio and
//!   linkerd2-proxy-init instead RETURN all non-proxy `-o lo` traffic, i.e.
//!   such calls bypass the mesh; DESIGN.md asks us to redirect them.
//! - Outbound proxy → the Pod's own IP (rule 2; also when a Service's
//!   endpoint is this very Pod): `-o lo`, proxy UID, not to 127/8. It enters
//!   SIDEMESH_INBOUND, so it lands on the inbound port unless the port is one
//!   of the proxy's own or skipped inbound, exactly as if it came from another
//!   Pod (Istio's `-o lo ! -d 127.0.0.1 --uid-owner 1337 -j ISTIO_IN_REDIRECT`,
//!   but with the inbound exclusions applied). When SIDEMESH_INBOUND returns,
//!   rule 3 lets it through untouched.
//! - Inbound proxy → app on 127.0.0.1 (the default `SIDEMESH_APP_ADDR`):
//!   proxy UID to 127/8, rule 3. If the inbound proxy must deliver to the Pod
//!   IP instead (apps listening only there), it binds its source to 127.0.0.6
//!   and rule 1 lets it through; without that it would loop into itself.
//! - Everything of the proxy UID that is not rule 2 (rule 3) and all traffic
//!   to loopback (rule 4) is left alone, so the proxy's own upstream
//!   connections never loop.
//!
//! So app → own Pod IP:8080 goes app → 127.0.0.1:15001 (outbound proxy, which
//! sees 10.x:8080 as original destination) → 127.0.0.1:15006 (inbound proxy,
//! same original destination) → 127.0.0.1:8080 (app), one hop each.
//! The redirect target is 127.0.0.1 (`::1`) for locally originated connections
//! and the receiving interface's address for inbound ones, so the inbound
//! listener binds the wildcard address; the outbound one may bind 127.0.0.1.
//!
//! # Applying
//!
//! Per family one `iptables-restore --noflush` transaction, which the kernel
//! commits whole or not at all. Declaring our chains creates or flushes them;
//! the jumps from PREROUTING/OUTPUT are added only when missing (read first
//! with `iptables-save`), so running twice yields identical tables. If
//! ip6tables fails after iptables succeeded, the IPv4 nat table is restored
//! from the snapshot taken just before. `--uninstall` deletes the jumps into
//! `SIDEMESH_*` chains and those chains, nothing else. Every flag is checked
//! before any tool runs.

mod config;
mod iptables;
mod rules;

use std::fmt::Write as _;

pub use config::{Cidr, Config, Mode, PortRange};
pub use iptables::Variant;
pub use rules::{
    CHAIN_IN_REDIRECT, CHAIN_INBOUND, CHAIN_OUT_REDIRECT, CHAIN_OUTBOUND, CHAIN_PREFIX, Family, NatState,
    install as install_rules, uninstall as uninstall_rules,
};

use iptables::Iptables;

/// Why `init` could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A flag has a value that cannot be used.
    #[error("invalid {flag} {value:?}: {reason}")]
    InvalidFlag {
        /// The flag, e.g. `--inbound-port`.
        flag: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No usable iptables tools.
    #[error("cannot program iptables: {0}")]
    NoIptables(String),
    /// An iptables tool failed.
    #[error("{program} failed: {detail}")]
    Tool {
        /// The tool.
        program: String,
        /// Its exit status and error output.
        detail: String,
    },
    /// ip6tables failed after iptables was programmed; IPv4 was put back.
    #[error("{cause} (the IPv4 nat table was rolled back; nothing changed)")]
    RolledBack {
        /// What failed.
        cause: Box<CaptureError>,
    },
    /// ip6tables failed and putting IPv4 back failed too.
    #[error("{cause}; rolling back the IPv4 nat table failed too: {rollback}")]
    RollbackFailed {
        /// What failed first.
        cause: Box<CaptureError>,
        /// What failed while rolling back.
        rollback: Box<CaptureError>,
    },
}

/// Flags of `sidemesh-proxy init`.
///
/// Values are taken as text and checked by [`InitArgs::config`], so a bad one
/// is a single line naming the flag rather than a usage dump.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// UID the proxy runs as; its own connections are never redirected outbound.
    #[arg(long, value_name = "UID", default_value = "1337")]
    pub proxy_uid: String,
    /// Port of the proxy's inbound listener; inbound TCP is redirected here.
    #[arg(long, value_name = "PORT", default_value = "15006")]
    pub inbound_port: String,
    /// Port of the proxy's outbound listener; outbound TCP is redirected here.
    #[arg(long, value_name = "PORT", default_value = "15001")]
    pub outbound_port: String,
    /// Port of the proxy's admin server; never redirected, so probes reach it.
    #[arg(long, value_name = "PORT", default_value = "15020")]
    pub admin_port: String,
    /// Inbound ports delivered straight to the app (comma list; ranges like 8000-8100).
    #[arg(long, value_name = "PORTS")]
    pub skip_inbound_ports: Vec<String>,
    /// Outbound destination ports that bypass the proxy (comma list; ranges like 8000-8100).
    #[arg(long, value_name = "PORTS")]
    pub skip_outbound_ports: Vec<String>,
    /// Outbound destinations that bypass the proxy (comma list of IPv4/IPv6 CIDRs or addresses).
    #[arg(long, value_name = "CIDRS")]
    pub skip_outbound_cidrs: Vec<String>,
    /// Also program ip6tables.
    #[arg(long)]
    pub ipv6: bool,
    /// Print the exact iptables-restore input and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove sidemesh's chains and the jumps into them, and nothing else.
    #[arg(long)]
    pub uninstall: bool,
    /// Which iptables: auto (the variant already holding rules, else `iptables`), nft or legacy.
    #[arg(long, value_name = "auto|nft|legacy", default_value = "auto")]
    pub iptables_mode: String,
}

impl InitArgs {
    /// Checks every flag; the first bad one is the error.
    pub fn config(&self) -> Result<Config, CaptureError> {
        let config = Config {
            proxy_uid: config::parse_uid("--proxy-uid", &self.proxy_uid)?,
            inbound_port: config::parse_port("--inbound-port", &self.inbound_port)?,
            outbound_port: config::parse_port("--outbound-port", &self.outbound_port)?,
            admin_port: config::parse_port("--admin-port", &self.admin_port)?,
            skip_inbound_ports: config::parse_port_list("--skip-inbound-ports", &self.skip_inbound_ports)?,
            skip_outbound_ports: config::parse_port_list("--skip-outbound-ports", &self.skip_outbound_ports)?,
            skip_outbound_cidrs: config::parse_cidr_list("--skip-outbound-cidrs", &self.skip_outbound_cidrs)?,
            ipv6: self.ipv6,
            mode: config::parse_mode("--iptables-mode", &self.iptables_mode)?,
        };
        config::check_ports(&config)?;
        Ok(config)
    }
}

/// What to do to the nat tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Install,
    Uninstall,
}

/// Runs `init`.
pub fn run(args: InitArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    sidemesh_telemetry::logging::init()?;
    let action = if args.uninstall {
        Action::Uninstall
    } else {
        Action::Install
    };
    if args.dry_run {
        print!("{}", dry_run(&config, action));
        Ok(())
    } else {
        apply(&config, action).map_err(Into::into)
    }
}

fn families(config: &Config) -> Vec<Family> {
    if config.ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

fn plan(config: &Config, action: Action, family: Family, state: &NatState) -> Option<String> {
    match action {
        Action::Install => Some(rules::install(config, family, state)),
        Action::Uninstall => rules::uninstall(state),
    }
}

/// The restore input per family with a comment header; reads the current
/// tables when it can (to show exactly what would run), else shows a fresh install.
fn dry_run(config: &Config, action: Action) -> String {
    let mut out = String::new();
    let tools = Iptables::detect(config.mode, config.ipv6);
    match &tools {
        Ok(t) => {
            let _ = writeln!(out, "# using {} ({}): {}", t.variant, t.version, t.reason);
        }
        Err(e) => {
            tracing::warn!("{e}; showing the rules for an empty nat table");
            let _ = writeln!(out, "# {e}; showing the rules for an empty nat table");
        }
    }
    for family in families(config) {
        let state = match &tools {
            Ok(t) => t.save_nat(family).map(|s| NatState::parse(&s)).unwrap_or_else(|e| {
                tracing::warn!("reading the {} nat table: {e}; assuming it is empty", family.name());
                NatState::default()
            }),
            Err(_) => NatState::default(),
        };
        let restore = tools
            .as_ref()
            .map(|t| t.restore_name(family))
            .unwrap_or_else(|_| "iptables-restore".to_owned());
        match plan(config, action, family, &state) {
            Some(text) => {
                let _ = writeln!(out, "# {} nat table, input for `{restore} --noflush`", family.name());
                out.push_str(&text);
            }
            None => {
                let _ = writeln!(out, "# {} nat table: nothing of sidemesh's to remove", family.name());
            }
        }
    }
    warn_unused_cidrs(config);
    out
}

fn warn_unused_cidrs(config: &Config) {
    if !config.ipv6 {
        for cidr in config.skip_outbound_cidrs.iter().filter(|c| !c.is_ipv4()) {
            tracing::warn!("--skip-outbound-cidrs {cidr} is IPv6 and ignored without --ipv6");
        }
    }
}

/// Reads, plans and applies per family; a later family's failure rolls the
/// earlier ones back to their snapshots.
fn apply(config: &Config, action: Action) -> Result<(), CaptureError> {
    warn_unused_cidrs(config);
    let tools = Iptables::detect(config.mode, config.ipv6)?;
    tracing::info!("using {} ({}): {}", tools.variant, tools.version, tools.reason);

    // Read everything first so a failure here changes nothing.
    let mut steps = Vec::new();
    for family in families(config) {
        let snapshot = tools.save_nat(family)?;
        let state = NatState::parse(&snapshot);
        steps.push((family, snapshot, plan(config, action, family, &state)));
    }

    let mut done: Vec<(Family, &str)> = Vec::new();
    for (family, snapshot, input) in &steps {
        let Some(input) = input else {
            tracing::info!("{} nat table: nothing of sidemesh's to remove", family.name());
            continue;
        };
        tracing::debug!(
            "{} nat table, `{} --noflush` input:\n{input}",
            family.name(),
            tools.restore_name(*family)
        );
        if let Err(e) = tools.restore(*family, input, true) {
            return Err(roll_back(&tools, &done, e));
        }
        done.push((*family, snapshot));
        match action {
            Action::Install => tracing::info!(
                "{} nat table programmed: inbound TCP → {}, outbound TCP → {}, uid {} and loopback exempt, \
                 {} inbound / {} outbound ports and {} CIDRs skipped",
                family.name(),
                config.inbound_port,
                config.outbound_port,
                config.proxy_uid,
                config.skip_inbound_ports.len(),
                config.skip_outbound_ports.len(),
                config
                    .skip_outbound_cidrs
                    .iter()
                    .filter(|c| c.is_ipv4() == (*family == Family::V4))
                    .count(),
            ),
            Action::Uninstall => tracing::info!("{} nat table: sidemesh's chains removed", family.name()),
        }
    }
    Ok(())
}

fn roll_back(tools: &Iptables, done: &[(Family, &str)], error: CaptureError) -> CaptureError {
    if done.is_empty() {
        return error;
    }
    for (family, snapshot) in done.iter().rev() {
        tracing::warn!("{error}; restoring the {} nat table as it was", family.name());
        if let Err(rollback) = tools.restore(*family, snapshot, false) {
            return CaptureError::RollbackFailed {
                cause: Box::new(error),
                rollback: Box::new(rollback),
            };
        }
    }
    CaptureError::RolledBack { cause: Box::new(error) }
}
