//! `sidemesh-proxy init`: programs the Pod's nat table (not built yet).

/// Flags of `sidemesh-proxy init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {}

/// Runs `init`.
pub fn run(_args: InitArgs) -> anyhow::Result<()> {
    anyhow::bail!("`sidemesh-proxy init` is not built yet")
}
