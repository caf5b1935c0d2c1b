//! `sidemesh trust`: roots, issuers, bundles and inspection, run as the
//! operator runs them, with the identity service accepting what it makes.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use sidemesh_identity_client::TrustBundle;
use sidemesh_tests::process::run;

const T: Duration = Duration::from_secs(30);

fn sidemesh(args: &[&str]) -> (bool, String, String) {
    let (status, out, err) = run("sidemesh", args, T);
    (status.success(), out, err)
}

#[test]
fn roots_issuers_and_bundles_made_with_the_cli_work_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).display().to_string();
    let (ok, out, err) = sidemesh(&[
        "trust",
        "new-root",
        "--cert",
        &p("a.crt"),
        "--key",
        &p("a.key"),
        "--trust-domain",
        "mesh.example",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("URI:spiffe://mesh.example") && out.contains("CA:          yes"),
        "{out}"
    );
    let mode = std::fs::metadata(p("a.key")).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keys are private");
    let (ok, out, err) = sidemesh(&[
        "trust",
        "new-root",
        "--cert",
        &p("b.crt"),
        "--key",
        &p("b.key"),
        "--lifetime",
        "48h",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("(1 days left)") || out.contains("(2 days left)"), "{out}");

    let (ok, out, err) = sidemesh(&[
        "trust",
        "new-issuer",
        "--root-cert",
        &p("a.crt"),
        "--root-key",
        &p("a.key"),
        "--cert",
        &p("i.crt"),
        "--key",
        &p("i.key"),
        "--lifetime",
        "100000h",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("bundle: chains to root"), "{out}");
    // The issuer does not outlive its root (10 years).
    let pem = std::fs::read(p("i.crt")).expect("issuer");
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
        .map(|d: rustls_pki_types::CertificateDer<'static>| d)
        .expect("pem");
    let (_, issuer) = x509_parser::parse_x509_certificate(&der).expect("issuer");
    let root_pem = std::fs::read(p("a.crt")).expect("root");
    let root_der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(&root_pem).expect("pem");
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).expect("root");
    assert!(issuer.validity().not_after <= root.validity().not_after);
    assert!(issuer.basic_constraints().expect("bc").expect("present").value.ca);

    // A+B+A → two roots, A first; to stdout and to a file.
    let (ok, out, err) = sidemesh(&["trust", "bundle", &p("a.crt"), &p("b.crt"), &p("a.crt")]);
    assert!(ok, "{err}");
    let bundle = TrustBundle::from_pem(out.as_bytes()).expect("stdout is a bundle");
    assert_eq!(bundle.roots().len(), 2);
    let (ok, _, err) = sidemesh(&["trust", "bundle", &p("a.crt"), &p("b.crt"), "--out", &p("ab.pem")]);
    assert!(ok && err.contains("2 root(s)"), "{err}");
    assert_eq!(
        TrustBundle::from_file(dir.path().join("ab.pem").as_path())
            .expect("file")
            .roots()
            .len(),
        2
    );

    // Inspect checks the chain against a bundle.
    let (ok, out, _) = sidemesh(&["trust", "inspect", &p("i.crt"), "--bundle", &p("ab.pem")]);
    assert!(ok && out.contains("bundle: chains to root"), "{out}");
    let (ok, out, err) = sidemesh(&["trust", "inspect", &p("i.crt"), "--bundle", &p("b.crt")]);
    assert!(!ok, "an issuer of A must not chain to B: {out}");
    assert!(err.contains("does NOT chain"), "{err}");
}

#[test]
fn bad_inputs_get_one_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n).display().to_string();
    std::fs::write(p("garbage.pem"), "hello").expect("write");
    assert!(sidemesh(&["trust", "new-root", "--cert", &p("a.crt"), "--key", &p("a.key")]).0);
    assert!(sidemesh(&["trust", "new-root", "--cert", &p("b.crt"), "--key", &p("b.key")]).0);
    assert!(
        sidemesh(&[
            "trust",
            "new-issuer",
            "--root-cert",
            &p("a.crt"),
            "--root-key",
            &p("a.key"),
            "--cert",
            &p("i.crt"),
            "--key",
            &p("i.key")
        ])
        .0
    );
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["trust".into(), "inspect".into(), p("garbage.pem")],
            "no CERTIFICATE",
        ),
        (vec!["trust".into(), "inspect".into(), p("missing.pem")], "missing.pem"),
        (vec!["trust".into(), "bundle".into(), p("garbage.pem")], "garbage.pem"),
        (
            vec!["trust".into(), "bundle".into(), p("i.crt"), p("a.crt")],
            "not a root",
        ),
        (
            vec![
                "trust".into(),
                "new-issuer".into(),
                "--root-cert".into(),
                p("a.crt"),
                "--root-key".into(),
                p("b.key"),
                "--cert".into(),
                p("x.crt"),
                "--key".into(),
                p("x.key"),
            ],
            "does not match",
        ),
        (
            vec![
                "trust".into(),
                "new-root".into(),
                "--cert".into(),
                p("r.crt"),
                "--key".into(),
                p("r.key"),
                "--trust-domain".into(),
                "Bad Domain".into(),
            ],
            "trust domain",
        ),
        (
            vec![
                "trust".into(),
                "new-root".into(),
                "--cert".into(),
                p("r.crt"),
                "--key".into(),
                p("r.key"),
                "--lifetime".into(),
                "ten years".into(),
            ],
            "duration",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = sidemesh(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    }
    assert!(!dir.path().join("x.key").exists(), "nothing written on failure");
}
