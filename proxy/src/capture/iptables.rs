//! Finding and running the iptables tools: which variant (nft or legacy) to
//! use, reading the nat table, and applying restore input, every call bounded
//! in time.

use std::fmt;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::CaptureError;
use super::config::Mode;
use super::rules::Family;

/// Upper bound for one iptables tool invocation (it waits at most
/// [`LOCK_WAIT_SECS`] for the xtables lock itself).
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `iptables-restore` waits for the xtables lock.
const LOCK_WAIT_SECS: &str = "10";
/// Where the tools live when PATH (as in some init containers) lacks the sbin directories.
const SBIN_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// The two iptables implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// iptables-nft: rules live in nf_tables.
    Nft,
    /// iptables-legacy: rules live in x_tables.
    Legacy,
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Variant::Nft => "iptables-nft",
            Variant::Legacy => "iptables-legacy",
        })
    }
}

impl Variant {
    fn suffix(self) -> &'static str {
        match self {
            Variant::Nft => "nft",
            Variant::Legacy => "legacy",
        }
    }
}

/// The tools of one variant, resolved to paths.
#[derive(Debug, Clone)]
pub struct Iptables {
    /// Which variant.
    pub variant: Variant,
    /// Why this variant was chosen, for the log.
    pub reason: String,
    /// What the tools report as their version.
    pub version: String,
    save_v4: PathBuf,
    restore_v4: PathBuf,
    save_v6: Option<PathBuf>,
    restore_v6: Option<PathBuf>,
}

impl Iptables {
    /// Picks the variant as `mode` says; `need_v6` requires the ip6tables tools too.
    ///
    /// In `auto` mode the variant that already holds rules wins (the node's
    /// kube-proxy/CNI picked it, and mixing both makes the kernel evaluate
    /// two rule sets), as linkerd2-proxy-init and the Kubernetes
    /// iptables-wrapper do; when neither holds rules, whatever `iptables` is.
    pub fn detect(mode: Mode, need_v6: bool) -> Result<Self, CaptureError> {
        let (variant, reason) = match mode {
            Mode::Nft => (Variant::Nft, "--iptables-mode nft".to_owned()),
            Mode::Legacy => (Variant::Legacy, "--iptables-mode legacy".to_owned()),
            Mode::Auto => auto_variant()?,
        };
        let tool = |family: &str, op: &str| -> Option<PathBuf> {
            find_program(&format!("{family}-{}-{op}", variant.suffix()))
                .or_else(|| find_program(&format!("{family}-{op}")))
        };
        let missing = |name: &str| CaptureError::NoIptables(format!("{name} for {variant} not found"));
        let save_v4 = tool("iptables", "save").ok_or_else(|| missing("iptables-save"))?;
        let restore_v4 = tool("iptables", "restore").ok_or_else(|| missing("iptables-restore"))?;
        let (save_v6, restore_v6) = (tool("ip6tables", "save"), tool("ip6tables", "restore"));
        if need_v6 && save_v6.is_none() {
            return Err(missing("ip6tables-save (needed by --ipv6)"));
        }
        if need_v6 && restore_v6.is_none() {
            return Err(missing("ip6tables-restore (needed by --ipv6)"));
        }
        let version = run_tool(&save_v4, &["--version"], None)
            .map(|out| out.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown version ({e})"));
        Ok(Self {
            variant,
            reason,
            version,
            save_v4,
            restore_v4,
            save_v6,
            restore_v6,
        })
    }

    fn tools(&self, family: Family) -> Result<(&Path, &Path), CaptureError> {
        match family {
            Family::V4 => Ok((&self.save_v4, &self.restore_v4)),
            Family::V6 => match (&self.save_v6, &self.restore_v6) {
                (Some(save), Some(restore)) => Ok((save, restore)),
                _ => Err(CaptureError::NoIptables(format!(
                    "ip6tables for {} not found",
                    self.variant
                ))),
            },
        }
    }

    /// The restore tool's file name, for messages.
    pub fn restore_name(&self, family: Family) -> String {
        self.tools(family)
            .ok()
            .and_then(|(_, restore)| restore.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "iptables-restore".to_owned())
    }

    /// The nat table of `family`, as `iptables-save -t nat` prints it.
    pub fn save_nat(&self, family: Family) -> Result<String, CaptureError> {
        let (save, _) = self.tools(family)?;
        run_tool(save, &["-t", "nat"], None)
    }

    /// Applies restore input: `--noflush` changes only what the input names;
    /// without it the tables in the input are replaced whole (rollback).
    pub fn restore(&self, family: Family, input: &str, noflush: bool) -> Result<(), CaptureError> {
        let (_, restore) = self.tools(family)?;
        let mut args = vec!["-w", LOCK_WAIT_SECS];
        if noflush {
            args.push("--noflush");
        }
        run_tool(restore, &args, Some(input)).map(|_| ())
    }
}

/// Counts the rules each variant holds in this network namespace.
fn auto_variant() -> Result<(Variant, String), CaptureError> {
    let count = |variant: Variant| -> usize {
        ["iptables", "ip6tables"]
            .iter()
            .filter_map(|family| find_program(&format!("{family}-{}-save", variant.suffix())))
            .filter_map(|save| run_tool(&save, &[], None).ok())
            .map(|out| out.lines().filter(|l| l.starts_with("-A ")).count())
            .sum()
    };
    let (legacy, nft) = (count(Variant::Legacy), count(Variant::Nft));
    if legacy > nft {
        return Ok((
            Variant::Legacy,
            format!("iptables-legacy holds {legacy} rules, iptables-nft {nft}"),
        ));
    }
    if nft > legacy {
        return Ok((
            Variant::Nft,
            format!("iptables-nft holds {nft} rules, iptables-legacy {legacy}"),
        ));
    }
    let default = find_program("iptables").ok_or_else(|| {
        let other = [Variant::Nft, Variant::Legacy]
            .into_iter()
            .find(|v| find_program(&format!("iptables-{}-restore", v.suffix())).is_some());
        match other {
            Some(v) => CaptureError::NoIptables(format!("no `iptables` binary (but {v} exists: --iptables-mode)")),
            None => CaptureError::NoIptables("neither iptables, iptables-nft nor iptables-legacy found".to_owned()),
        }
    })?;
    let version = run_tool(&default, &["--version"], None)?;
    // iptables before 1.8 had only the legacy backend and no "(legacy)" suffix.
    let variant = if version.contains("nf_tables") {
        Variant::Nft
    } else {
        Variant::Legacy
    };
    let held = if legacy == 0 {
        "no rules in either variant".to_owned()
    } else {
        format!("both variants hold {legacy} rules")
    };
    Ok((variant, format!("{held}; `iptables` is {variant}")))
}

/// Looks a program up in PATH, then in the usual sbin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs a tool to completion within [`TOOL_TIMEOUT`], feeding it `input`;
/// its stdout on success, its stderr in the error otherwise.
fn run_tool(program: &Path, args: &[&str], input: Option<&str>) -> Result<String, CaptureError> {
    let name = program.display().to_string();
    let failed = |detail: String| CaptureError::Tool {
        program: name.clone(),
        detail,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("could not start: {e}")))?;

    // Pipes are drained on their own threads so a chatty tool never blocks
    // on a full pipe while we wait for it.
    let writer = child
        .stdin
        .take()
        .zip(input.map(str::to_owned))
        .map(|(mut stdin, text)| {
            std::thread::spawn(move || {
                let _ = stdin.write_all(text.as_bytes());
            })
        });
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    );

    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!("did not finish within {}s", TOOL_TIMEOUT.as_secs())));
            }
            Err(e) => return Err(failed(format!("could not be waited for: {e}"))),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        let detail = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("Try `"))
            .collect::<Vec<_>>()
            .join("; ");
        Err(failed(format!("{status}: {detail}")))
    }
}
