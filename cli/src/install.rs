//! `sidemesh install`: renders the control-plane manifests of
//! `deploy/kubernetes/` (embedded at build time, so the files and the
//! command never drift apart) with the trust root, the issuer, the webhook's
//! serving certificate and its caBundle filled in, for `kubectl apply -f -`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use clap::ValueEnum;
use serde_json::Value;
use sidemesh_identity::ca;
use sidemesh_telemetry::flags::parse_duration;

use crate::files::{read_text, write_atomic};

/// The manifests, in the kustomization's order.
const MANIFESTS: &[(&str, &str)] = &[
    ("namespace.yaml", include_str!("../../deploy/kubernetes/namespace.yaml")),
    ("trust.yaml", include_str!("../../deploy/kubernetes/trust.yaml")),
    ("identity.yaml", include_str!("../../deploy/kubernetes/identity.yaml")),
    (
        "destination.yaml",
        include_str!("../../deploy/kubernetes/destination.yaml"),
    ),
    ("injector.yaml", include_str!("../../deploy/kubernetes/injector.yaml")),
    ("webhook.yaml", include_str!("../../deploy/kubernetes/webhook.yaml")),
];

/// The image named in the manifests, replaced by `--image`.
const MANIFEST_IMAGE: &str = "sidemesh/sidemesh:0.1.0";
/// The control plane's namespace (fixed: SPIFFE IDs and DNS names use it).
const NAMESPACE: &str = "sidemesh-system";

/// What the webhook does when the injector cannot be reached.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FailurePolicy {
    /// Create the Pod without the mesh.
    Ignore,
    /// Refuse the Pod.
    Fail,
}

/// `sidemesh install` flags.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Trust root certificate (PEM), e.g. from `sidemesh trust new-root`; generated when absent.
    #[arg(long, requires = "root_key")]
    root_cert: Option<PathBuf>,
    /// Trust root key (PEM); used here to sign the issuer, never written into the manifests.
    #[arg(long, requires = "root_cert")]
    root_key: Option<PathBuf>,
    /// Where to keep a generated root (`root.crt`, `root.key`); without it its key is discarded.
    #[arg(long, conflicts_with = "root_cert")]
    save_root: Option<PathBuf>,
    /// Trust domain of a generated root.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of the issuer (never past the root's).
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    issuer_lifetime: Duration,
    /// Lifetime of the webhook's serving certificate and its CA.
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    webhook_cert_lifetime: Duration,
    /// Image of every component and of the injected proxy.
    #[arg(long, default_value_t = sidemesh_injector::inject::default_proxy_image())]
    image: String,
    /// The webhook's failurePolicy.
    #[arg(long, value_enum, default_value = "ignore")]
    failure_policy: FailurePolicy,
}

fn b64(s: &str) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(s))
}

/// Loads every embedded manifest as JSON values.
pub fn manifests() -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (name, text) in MANIFESTS {
        let docs: Vec<Value> = serde_saphyr::from_multiple(text).with_context(|| format!("embedded {name}"))?;
        out.extend(docs.into_iter().filter(|d| !d.is_null()));
    }
    Ok(out)
}

fn is(object: &Value, kind: &str, name: &str) -> bool {
    object["kind"] == kind && object["metadata"]["name"] == name
}

/// Replaces the image in every container, and the injector's `--proxy-image`.
fn set_images(object: &mut Value, image: &str) {
    let Some(containers) = object
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for c in containers {
        if c["image"] == MANIFEST_IMAGE {
            c["image"] = Value::String(image.to_owned());
        }
        if let Some(args) = c.get_mut("args").and_then(Value::as_array_mut) {
            for a in args {
                if a.as_str().is_some_and(|s| s.starts_with("--proxy-image=")) {
                    *a = Value::String(format!("--proxy-image={image}"));
                }
            }
        }
    }
}

fn set_trust_domain(object: &mut Value, trust_domain: &str) {
    let Some(containers) = object
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for c in containers {
        if let Some(args) = c.get_mut("args").and_then(Value::as_array_mut) {
            for a in args {
                if a.as_str().is_some_and(|s| s.starts_with("--trust-domain=")) {
                    *a = Value::String(format!("--trust-domain={trust_domain}"));
                }
            }
        }
        if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
            for e in env {
                if e["name"] == "SIDEMESH_TRUST_DOMAIN" {
                    e["value"] = Value::String(trust_domain.to_owned());
                }
            }
        }
    }
}

/// Renders the manifests; the root's key is only used to sign the issuer.
pub fn render(args: &InstallArgs) -> anyhow::Result<String> {
    let (root, generated) = match (&args.root_cert, &args.root_key) {
        (Some(cert), Some(key)) => (
            ca::PemPair {
                cert: read_text(cert)?,
                key: read_text(key)?,
            },
            false,
        ),
        _ => {
            sidemesh_identity_client::SpiffeId::new(&args.trust_domain, "x", "x").context("--trust-domain")?;
            (
                ca::new_root(&args.trust_domain, Duration::from_secs(10 * 365 * 86400))?,
                true,
            )
        }
    };
    let issuer = ca::new_issuer(&root.cert, &root.key, args.issuer_lifetime).context("making the issuer")?;
    let bundle = sidemesh_identity_client::TrustBundle::from_pem(root.cert.as_bytes()).context("the root")?;
    let root_der = bundle
        .roots()
        .first()
        .map(|r| r.der.clone())
        .context("the root holds no certificate")?;
    let trust_domain = sidemesh_identity_client::verify::uri_sans(&root_der)
        .ok()
        .and_then(|u| {
            u.into_iter()
                .find_map(|u| u.strip_prefix("spiffe://").map(str::to_owned))
        })
        .unwrap_or_else(|| args.trust_domain.clone());
    let webhook = sidemesh_injector::certs::webhook_pki(
        &sidemesh_injector::certs::service_dns_names("sidemesh-injector", NAMESPACE),
        args.webhook_cert_lifetime,
    )?;
    if generated {
        match &args.save_root {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                write_atomic(&dir.join("root.key"), root.key.as_bytes(), true)?;
                write_atomic(&dir.join("root.crt"), root.cert.as_bytes(), false)?;
                eprintln!("sidemesh: generated a trust root; kept in {}", dir.display());
            }
            None => eprintln!(
                "sidemesh: generated a trust root whose key is now discarded; to renew the issuer later, \
                 make a root with `sidemesh trust new-root` and pass --root-cert/--root-key (or use --save-root)"
            ),
        }
    }

    let mut objects = manifests()?;
    for o in &mut objects {
        if is(o, "ConfigMap", "sidemesh-trust-bundle") {
            o["data"]["ca-bundle.crt"] = Value::String(bundle.to_pem());
        } else if is(o, "Secret", "sidemesh-issuer") {
            o["data"]["tls.crt"] = b64(&issuer.cert);
            o["data"]["tls.key"] = b64(&issuer.key);
        } else if is(o, "Secret", "sidemesh-injector-tls") {
            o["data"]["tls.crt"] = b64(&webhook.cert);
            o["data"]["tls.key"] = b64(&webhook.key);
        } else if is(o, "MutatingWebhookConfiguration", "sidemesh-injector") {
            if let Some(hooks) = o["webhooks"].as_array_mut() {
                for h in hooks {
                    h["clientConfig"]["caBundle"] = b64(&webhook.ca_cert);
                    h["failurePolicy"] = Value::String(
                        match args.failure_policy {
                            FailurePolicy::Ignore => "Ignore",
                            FailurePolicy::Fail => "Fail",
                        }
                        .to_owned(),
                    );
                }
            }
        } else if o["kind"] == "Deployment" {
            set_images(o, &args.image);
            set_trust_domain(o, &trust_domain);
        }
    }

    let mut out = format!(
        "# sidemesh {} control plane, rendered by `sidemesh install`.\n# trust domain {trust_domain}; root {}\n",
        env!("CARGO_PKG_VERSION"),
        bundle.fingerprints().join(", ")
    );
    for o in &objects {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(o).context("writing YAML")?);
    }
    Ok(out)
}

/// Prints the rendered manifests.
pub fn run(args: InstallArgs) -> anyhow::Result<()> {
    print!("{}", render(&args)?);
    Ok(())
}
