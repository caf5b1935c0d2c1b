//! `sidemesh inject`: offline injection of YAML, through the webhook's own
//! code path (`sidemesh_injector::offline`). Without an API server the
//! Namespace's annotation cannot be read, so a workload is injected unless
//! its Pod template says `sidemesh.io/inject: disabled` (as `linkerd inject`
//! does); the injected YAML goes to standard output, a line per document to
//! standard error.

use std::io::Read as _;

use anyhow::Context as _;
use sidemesh_injector::InjectorConfig;
use sidemesh_injector::offline;

/// Reads `file` (`-` for standard input), injects, prints.
pub fn run(file: &str) -> anyhow::Result<()> {
    let input = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    let source = if file == "-" { "standard input" } else { file };
    let (out, reports) =
        offline::inject_yaml(&InjectorConfig::default(), &input).with_context(|| format!("injecting {source}"))?;
    print!("{out}");
    for r in &reports {
        let what = match (r.kind.as_str(), r.name.as_str()) {
            ("", _) => "(no kind)".to_owned(),
            (k, "") => k.to_lowercase(),
            (k, n) => format!("{}/{n}", k.to_lowercase()),
        };
        eprintln!("{what} {}", r.result);
    }
    Ok(())
}
