//! `sidemesh trust`: make and inspect roots, issuers and bundles.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use sidemesh_identity::ca;
use sidemesh_identity_client::bundle::TrustBundle;
use sidemesh_identity_client::fingerprint;
use sidemesh_telemetry::flags::parse_duration;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::files::{read_text, write_atomic};

/// `sidemesh trust` subcommands.
#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Make a new self-signed root CA.
    NewRoot {
        /// Where to write the root certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the root key (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Trust domain the root is for.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Validity.
        #[arg(long, default_value = "87600h", value_parser = parse_duration)]
        lifetime: Duration,
    },
    /// Make a new issuer signed by a root.
    NewIssuer {
        /// The root certificate (PEM).
        #[arg(long)]
        root_cert: PathBuf,
        /// The root key (PEM).
        #[arg(long)]
        root_key: PathBuf,
        /// Where to write the issuer certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the issuer key (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Validity (never past the root's).
        #[arg(long, default_value = "8760h", value_parser = parse_duration)]
        lifetime: Duration,
    },
    /// Merge roots into one bundle, deduplicated.
    Bundle {
        /// PEM files holding roots.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show certificates: subject, SANs, validity, fingerprint, chain check.
    Inspect {
        /// A PEM file of one or more certificates.
        file: PathBuf,
        /// Check the chain against this bundle too.
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// Guided, resumable zero-downtime root rotation (docs/trust-rotation.md).
    Rotate(Box<crate::rotate::RotateArgs>),
}

/// Runs a `trust` subcommand.
pub fn run(cmd: TrustCommand) -> anyhow::Result<()> {
    match cmd {
        TrustCommand::NewRoot {
            cert,
            key,
            trust_domain,
            lifetime,
        } => {
            sidemesh_identity_client::SpiffeId::new(&trust_domain, "x", "x").context("--trust-domain")?;
            let pair = ca::new_root(&trust_domain, lifetime)?;
            write_atomic(&key, pair.key.as_bytes(), true)?;
            write_atomic(&cert, pair.cert.as_bytes(), false)?;
            print!("{}", describe(pair.cert.as_bytes(), None)?);
            Ok(())
        }
        TrustCommand::NewIssuer {
            root_cert,
            root_key,
            cert,
            key,
            lifetime,
        } => {
            let pair = ca::new_issuer(&read_text(&root_cert)?, &read_text(&root_key)?, lifetime)?;
            write_atomic(&key, pair.key.as_bytes(), true)?;
            write_atomic(&cert, pair.cert.as_bytes(), false)?;
            let bundle = TrustBundle::from_pem(read_text(&root_cert)?.as_bytes())?;
            print!("{}", describe(pair.cert.as_bytes(), Some(&bundle))?);
            Ok(())
        }
        TrustCommand::Bundle { files, out } => {
            let mut ders = Vec::new();
            for f in &files {
                let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let bundle = TrustBundle::from_pem(&text).with_context(|| f.display().to_string())?;
                for root in bundle.roots() {
                    let cert = parse(&root.der)?;
                    anyhow::ensure!(
                        cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok(),
                        "{}: {} is not a root (it is not self-signed); a bundle holds roots only",
                        f.display(),
                        root.subject
                    );
                }
                ders.extend(bundle.roots().iter().map(|r| r.der.clone()));
            }
            let bundle = TrustBundle::from_der(ders)?;
            let pem = bundle.to_pem();
            match out {
                Some(path) => {
                    write_atomic(&path, pem.as_bytes(), false)?;
                    eprintln!("wrote {} root(s) to {}", bundle.roots().len(), path.display());
                }
                None => print!("{pem}"),
            }
            Ok(())
        }
        TrustCommand::Inspect { file, bundle } => {
            let text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let bundle = bundle
                .map(|b| TrustBundle::from_file(&b).with_context(|| format!("--bundle {}", b.display())))
                .transpose()?;
            print!("{}", describe(&text, bundle.as_ref())?);
            Ok(())
        }
        TrustCommand::Rotate(args) => crate::rotate::run(*args),
    }
}

fn parse(der: &[u8]) -> anyhow::Result<X509Certificate<'_>> {
    Ok(x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?
        .1)
}

/// A human description of each certificate of a PEM file and of its chain.
fn describe(pem: &[u8], bundle: Option<&TrustBundle>) -> anyhow::Result<String> {
    let mut ders: Vec<CertificateDer<'static>> = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem) {
        ders.push(c.context("not valid PEM")?);
    }
    anyhow::ensure!(!ders.is_empty(), "no CERTIFICATE block found");
    let mut out = String::new();
    for (i, der) in ders.iter().enumerate() {
        let cert = parse(der)?;
        let ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .map(|b| b.value.ca)
            .unwrap_or(false);
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::URI(u) => format!("URI:{u}"),
                        GeneralName::DNSName(d) => format!("DNS:{d}"),
                        other => format!("{other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let v = cert.validity();
        let _ = writeln!(out, "certificate #{}", i + 1);
        let _ = writeln!(out, "  subject:     {}", cert.subject());
        let _ = writeln!(out, "  issuer:      {}", cert.issuer());
        let _ = writeln!(
            out,
            "  SANs:        {}",
            if sans.is_empty() { "-".into() } else { sans.join(", ") }
        );
        let _ = writeln!(out, "  CA:          {}", if ca { "yes" } else { "no" });
        let _ = writeln!(out, "  not before:  {}", v.not_before);
        let _ = writeln!(out, "  not after:   {}", v.not_after);
        let left = v.time_to_expiration().map(|d| d.whole_days());
        let _ = writeln!(
            out,
            "  valid now:   {}",
            match left {
                Some(days) => format!("yes ({days} days left)"),
                None => "NO".into(),
            }
        );
        let _ = writeln!(out, "  sha256:      {}", fingerprint(der));
    }
    // The file's own chain: each certificate signed by the next one.
    let mut chain_ok = true;
    for pair in ders.windows(2) {
        let (child, parent) = (parse(&pair[0])?, parse(&pair[1])?);
        if child.verify_signature(Some(parent.public_key())).is_err() {
            chain_ok = false;
            let _ = writeln!(out, "chain: {} is NOT signed by {}", child.subject(), parent.subject());
        }
    }
    if chain_ok && ders.len() > 1 {
        let _ = writeln!(out, "chain: each certificate is signed by the next");
    }
    let last = parse(&ders[ders.len() - 1])?;
    if last.subject() == last.issuer() && last.verify_signature(None).is_ok() {
        let _ = writeln!(out, "chain: ends in a self-signed root");
    }
    if let Some(bundle) = bundle {
        let top = &ders[ders.len() - 1];
        let top_fp = fingerprint(top);
        let top_cert = parse(top)?;
        let root = bundle.roots().iter().find(|r| {
            r.fingerprint == top_fp
                || parse(&r.der).is_ok_and(|root| top_cert.verify_signature(Some(root.public_key())).is_ok())
        });
        match root {
            Some(r) => {
                let _ = writeln!(out, "bundle: chains to root {} ({})", r.subject, r.fingerprint);
            }
            None => {
                let _ = writeln!(
                    out,
                    "bundle: does NOT chain to any of the bundle's {} root(s)",
                    bundle.roots().len()
                );
                anyhow::bail!("{out}the certificate does not chain to the bundle");
            }
        }
    }
    Ok(out)
}
