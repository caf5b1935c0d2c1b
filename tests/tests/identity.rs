//! The identity service, driven over gRPC + TLS as workloads drive it: the
//! real `sidemesh-identity` binary, real certificates, real token reviewers.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use sidemesh_identity_client::manager::{CertManager, CertManagerConfig};
use sidemesh_identity_client::{SpiffeId, TrustBundle, TrustStore};
use sidemesh_proto::identity::v1::identity_client::IdentityClient;
use sidemesh_proto::identity::v1::{CertifyRequest, CertifyResponse, WatchIssuerRequest};
use sidemesh_tests::pki::{self, Pki};
use sidemesh_tests::process::{Proc, http_get, metric_value, run};
use sidemesh_tests::{apiserver::ApiServer, free_port};
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::extensions::GeneralName;

const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";
const SERVER_ID: &str = "spiffe://cluster.local/ns/sidemesh-system/sa/sidemesh-identity";

struct Identity {
    proc: Proc,
    addr: String,
    admin: String,
    pki: Pki,
    _dir: tempfile::TempDir,
}

impl Identity {
    fn start(extra: &[&str]) -> Self {
        Self::start_with(extra, &[], |_| {})
    }

    /// Starts the real binary with a fresh PKI and a token file holding the
    /// `frontend` token; `prepare` may change the files first.
    fn start_with(extra: &[&str], env: &[(&str, &str)], prepare: impl FnOnce(&Pki)) -> Self {
        sidemesh_identity_client::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(dir.path());
        pki::write(
            &pki.path("tokens.yaml"),
            &pki::token_line("token-of-frontend", "default", "frontend"),
        );
        prepare(&pki);
        let addr = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let reviewer = format!("file:{}", pki.path("tokens.yaml").display());
        let (cert, key, bundle) = (pki.path("issuer.crt"), pki.path("issuer.key"), pki.path("bundle.pem"));
        let mut args: Vec<&str> = vec![
            "--listen",
            &addr,
            "--admin-addr",
            &admin,
            "--token-reviewer",
            &reviewer,
            "--trust-bundle",
            bundle.to_str().unwrap_or_default(),
        ];
        let has_reviewer = extra.contains(&"--token-reviewer");
        if has_reviewer {
            args.drain(4..6);
        }
        if !extra.contains(&"--issuer-dir") {
            args.extend([
                "--issuer-cert",
                cert.to_str().unwrap_or_default(),
                "--issuer-key",
                key.to_str().unwrap_or_default(),
            ]);
        }
        args.extend(extra);
        let mut proc = Proc::start("sidemesh-identity", &args, env, dir.path());
        proc.wait_ready(&admin, Duration::from_secs(20));
        Self {
            proc,
            addr,
            admin,
            pki,
            _dir: dir,
        }
    }

    fn trust(&self) -> TrustStore {
        TrustStore::new(TrustBundle::from_pem(self.pki.root.cert.as_bytes()).expect("bundle"))
    }

    fn client(&self) -> IdentityClient<Channel> {
        sidemesh_identity_client::client::identity_client(&self.addr, SERVER_ID.parse().expect("id"), self.trust())
            .expect("client")
    }

    fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics").map(|(_, b)| b).unwrap_or_default()
    }
}

fn csr_with(sans: Vec<SanType>, ca: bool) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    params.serialize_request(&key).expect("csr").der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("uri"))
}

fn request(identity: &str, token: &str, csr: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        identity: identity.to_owned(),
        token: token.as_bytes().to_vec(),
        certificate_signing_request: csr,
    }
}

async fn certify(client: &mut IdentityClient<Channel>, req: CertifyRequest) -> Result<CertifyResponse, tonic::Status> {
    client.certify(req).await.map(|r| r.into_inner())
}

fn leaf_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("leaf");
    cert.subject_alternative_name()
        .expect("san")
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => format!("URI:{u}"),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn issuer_of(rsp: &CertifyResponse) -> String {
    sidemesh_identity_client::fingerprint(&rsp.intermediate_certificates[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_a_spiffe_leaf_that_chains_to_the_bundle() {
    let id = Identity::start(&["--leaf-lifetime", "2h"]);
    let mut client = id.client();
    let before = SystemTime::now();
    let rsp = certify(
        &mut client,
        request(FRONTEND, "token-of-frontend", csr_with(vec![uri(FRONTEND)], false)),
    )
    .await
    .expect("certify");
    assert_eq!(
        rsp.intermediate_certificates.len(),
        1,
        "the issuer is sent with the leaf"
    );
    let (_, leaf) = x509_parser::parse_x509_certificate(&rsp.leaf_certificate).expect("leaf parses");
    assert_eq!(leaf_sans(&rsp.leaf_certificate), vec![format!("URI:{FRONTEND}")]);
    let bc = leaf.basic_constraints().expect("bc").expect("basicConstraints present");
    assert!(!bc.value.ca, "a workload leaf is not a CA");
    let eku = leaf.extended_key_usage().expect("eku").expect("EKU present").value;
    assert!(eku.server_auth && eku.client_auth);
    // 2h lifetime, backdated one minute.
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let now = before.duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs() as i64;
    assert!((now - 60 - nb).abs() <= 2, "not_before {nb} vs now-60 {}", now - 60);
    assert!((na - nb - 7200 - 60).abs() <= 2, "lifetime {}", na - nb);
    assert_eq!(rsp.valid_until.as_ref().map(|t| t.seconds), Some(na));

    // The chain verifies as a client certificate against the bundle, with the
    // same verifier the proxies use.
    let bundle = id.trust().current();
    let root = sidemesh_identity_client::verify::verify_chain(
        &bundle,
        &rsp.leaf_certificate.clone().into(),
        &[rsp.intermediate_certificates[0].clone().into()],
        rustls_pki_types::UnixTime::now(),
        webpki_client_auth(),
    )
    .expect("leaf chains to the root");
    assert_eq!(
        root.fingerprint,
        sidemesh_identity_client::fingerprint(&bundle.roots()[0].der)
    );

    let metrics = id.metrics();
    assert_eq!(
        metric_value(&metrics, "sidemesh_identity_certificates_issued_total", &[]),
        1.0,
        "{metrics}"
    );
}

fn webpki_client_auth() -> sidemesh_identity_client::verify::KeyUsage {
    sidemesh_identity_client::verify::KeyUsage::client_auth()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_bad_requests_with_clear_reasons_and_keeps_serving() {
    let id = Identity::start(&[]);
    let mut client = id.client();
    let good_csr = || csr_with(vec![uri(FRONTEND)], false);
    let mut truncated = good_csr();
    truncated.truncate(truncated.len() / 2);
    let mut bad_sig = good_csr();
    let last = bad_sig.len() - 3;
    bad_sig[last] ^= 0x55;
    let ed_key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
    let mut ed_params = CertificateParams::default();
    ed_params.subject_alt_names = vec![uri(FRONTEND)];
    let ed_csr = ed_params.serialize_request(&ed_key).expect("csr").der().to_vec();
    let backend = "spiffe://cluster.local/ns/default/sa/backend";

    let cases: Vec<(&str, CertifyRequest, Code, &str)> = vec![
        (
            "unknown token",
            request(FRONTEND, "nope", good_csr()),
            Code::PermissionDenied,
            "token",
        ),
        (
            "empty token",
            request(FRONTEND, "", good_csr()),
            Code::InvalidArgument,
            "token is empty",
        ),
        (
            "empty identity",
            request("", "token-of-frontend", good_csr()),
            Code::InvalidArgument,
            "identity is empty",
        ),
        (
            "not a SPIFFE ID",
            request("frontend", "token-of-frontend", good_csr()),
            Code::InvalidArgument,
            "spiffe://",
        ),
        (
            "someone else's identity",
            request(backend, "token-of-frontend", csr_with(vec![uri(backend)], false)),
            Code::PermissionDenied,
            "may not request",
        ),
        (
            "CSR for another identity",
            request(FRONTEND, "token-of-frontend", csr_with(vec![uri(backend)], false)),
            Code::PermissionDenied,
            "the CSR asks for",
        ),
        (
            "CSR with a DNS name too",
            request(
                FRONTEND,
                "token-of-frontend",
                csr_with(
                    vec![uri(FRONTEND), SanType::DnsName("evil.example".try_into().expect("dns"))],
                    false,
                ),
            ),
            Code::InvalidArgument,
            "only SAN",
        ),
        (
            "CSR without SAN",
            request(FRONTEND, "token-of-frontend", csr_with(vec![], false)),
            Code::InvalidArgument,
            "only SAN",
        ),
        (
            "empty CSR",
            request(FRONTEND, "token-of-frontend", vec![]),
            Code::InvalidArgument,
            "empty",
        ),
        (
            "garbage CSR",
            request(FRONTEND, "token-of-frontend", b"\x30\x82garbage-garbage".to_vec()),
            Code::InvalidArgument,
            "PKCS#10",
        ),
        (
            "truncated CSR",
            request(FRONTEND, "token-of-frontend", truncated),
            Code::InvalidArgument,
            "PKCS#10",
        ),
        (
            "CSR with a broken signature",
            request(FRONTEND, "token-of-frontend", bad_sig),
            Code::InvalidArgument,
            "signature",
        ),
        (
            "Ed25519 key",
            request(FRONTEND, "token-of-frontend", ed_csr),
            Code::InvalidArgument,
            "P-256",
        ),
        (
            "foreign trust domain",
            request(
                "spiffe://evil.org/ns/default/sa/frontend",
                "token-of-frontend",
                good_csr(),
            ),
            Code::PermissionDenied,
            "trust domain",
        ),
    ];
    for (what, req, code, needle) in cases {
        let err = certify(&mut client, req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{what}: message {:?} lacks {needle:?}",
            err.message()
        );
    }
    // Still serving, and a CSR that asks for CA rights gets a plain leaf.
    let rsp = certify(
        &mut client,
        request(FRONTEND, "token-of-frontend", csr_with(vec![uri(FRONTEND)], true)),
    )
    .await
    .expect("still serving");
    let (_, leaf) = x509_parser::parse_x509_certificate(&rsp.leaf_certificate).expect("leaf");
    assert!(!leaf.basic_constraints().expect("bc").expect("present").value.ca);
    assert!(leaf.key_usage().expect("ku").is_some_and(|k| !k.value.key_cert_sign()));

    let metrics = id.metrics();
    for reason in [
        "bad_token",
        "missing_field",
        "bad_identity",
        "identity_mismatch",
        "csr_identity_mismatch",
        "bad_csr",
        "foreign_trust_domain",
    ] {
        assert!(
            metric_value(
                &metrics,
                "sidemesh_identity_certificates_refused_total",
                &[&format!("reason=\"{reason}\"")]
            ) >= 1.0,
            "no refusal counted for {reason}:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_tls_garbage_and_half_open_connections() {
    use tokio::io::AsyncWriteExt as _;
    let id = Identity::start(&[]);
    for payload in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0u8; 4096],
        b"",
    ] {
        let mut s = tokio::net::TcpStream::connect(&id.addr).await.expect("connect");
        let _ = s.write_all(payload).await;
        drop(s);
    }
    // A connection that never finishes its handshake must not block others.
    let _idle = tokio::net::TcpStream::connect(&id.addr).await.expect("connect");
    let mut client = id.client();
    certify(
        &mut client,
        request(FRONTEND, "token-of-frontend", csr_with(vec![uri(FRONTEND)], false)),
    )
    .await
    .expect("serving after garbage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_grpc_clients_verify_the_server_by_dns_name() {
    let id = Identity::start(&[]);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&id.pki.root.cert))
        .domain_name("sidemesh-identity.sidemesh-system.svc");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", id.addr))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("a plain TLS client trusting the bundle connects by DNS name");
    let mut client = IdentityClient::new(channel);
    certify(
        &mut client,
        request(FRONTEND, "token-of-frontend", csr_with(vec![uri(FRONTEND)], false)),
    )
    .await
    .expect("certify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_never_outlive_the_issuer() {
    let id = Identity::start_with(&["--leaf-lifetime", "24h"], &[], |pki| {
        let short = sidemesh_identity::ca::new_issuer(&pki.root.cert, &pki.root.key, Duration::from_secs(3600))
            .expect("issuer");
        pki::write(&pki.path("issuer.crt"), &short.cert);
        pki::write(&pki.path("issuer.key"), &short.key);
    });
    let mut client = id.client();
    let rsp = certify(
        &mut client,
        request(FRONTEND, "token-of-frontend", csr_with(vec![uri(FRONTEND)], false)),
    )
    .await
    .expect("certify");
    let (_, issuer) = x509_parser::parse_x509_certificate(&rsp.intermediate_certificates[0]).expect("issuer");
    let (_, leaf) = x509_parser::parse_x509_certificate(&rsp.leaf_certificate).expect("leaf");
    assert_eq!(leaf.validity().not_after, issuer.validity().not_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_bundle_reload_without_restart_and_bad_issuers_are_refused() {
    let id = Identity::start(&[]);
    let pid = id.proc.pid();
    let mut client = id.client();
    let csr = || csr_with(vec![uri(FRONTEND)], false);
    let first = certify(&mut client, request(FRONTEND, "token-of-frontend", csr()))
        .await
        .expect("certify");
    let old_issuer = issuer_of(&first);
    let mut issuers = client
        .watch_issuer(WatchIssuerRequest {})
        .await
        .expect("watch")
        .into_inner();
    let announced = issuers.message().await.expect("stream").expect("first state");
    assert_eq!(announced.issuer_fingerprint, old_issuer);

    // 1. A key that is not the certificate's: refused, old issuer stays.
    let other = sidemesh_identity::ca::new_issuer(&id.pki.root.cert, &id.pki.root.key, Duration::from_secs(86400))
        .expect("issuer");
    pki::write(&id.pki.path("issuer.key"), &other.key);
    // 2. An issuer from a root outside the bundle: refused.
    let foreign_root = sidemesh_identity::ca::new_root("cluster.local", Duration::from_secs(86400)).expect("root");
    let foreign = sidemesh_identity::ca::new_issuer(&foreign_root.cert, &foreign_root.key, Duration::from_secs(86400))
        .expect("issuer");
    tokio::time::sleep(Duration::from_millis(400)).await;
    pki::write(&id.pki.path("issuer.crt"), &foreign.cert);
    pki::write(&id.pki.path("issuer.key"), &foreign.key);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // 3. A root certificate that is not a CA: garbage bundle, refused.
    pki::write(
        &id.pki.path("bundle.pem"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let still = certify(&mut client, request(FRONTEND, "token-of-frontend", csr()))
        .await
        .expect("certify");
    assert_eq!(
        issuer_of(&still),
        old_issuer,
        "refused issuers must not replace the one in service"
    );
    let log = id.proc.log();
    assert!(log.contains("issuer key does not match"), "{log}");
    assert!(log.contains("does not chain to any root"), "{log}");
    assert!(log.contains("trust bundle refused"), "{log}");

    // 4. Bundle A+foreign, then the foreign issuer becomes valid: switch.
    pki::write(
        &id.pki.path("bundle.pem"),
        &format!("{}{}", id.pki.root.cert, foreign_root.cert),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let switched = loop {
        let next = tokio::time::timeout_at(deadline, issuers.message())
            .await
            .expect("issuer switch announced within 15s");
        let state = next.expect("stream").expect("state");
        if state.issuer_fingerprint != old_issuer {
            break state.issuer_fingerprint;
        }
    };
    let issued = certify(&mut client, request(FRONTEND, "token-of-frontend", csr()))
        .await
        .expect("certify");
    assert_eq!(issuer_of(&issued), switched);
    assert_eq!(switched, sidemesh_identity_client::fingerprint(&pem_der(&foreign.cert)));
    assert_eq!(id.proc.pid(), pid);
    let metrics = id.metrics();
    assert!(
        metric_value(
            &metrics,
            "sidemesh_identity_issuer_reloads_total",
            &["result=\"refused\""]
        ) >= 2.0,
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "sidemesh_identity_issuer_reloads_total",
            &["result=\"accepted\""]
        ) >= 1.0,
        "{metrics}"
    );
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_changes_apply_without_restart() {
    let id = Identity::start(&[]);
    let mut client = id.client();
    let backend = "spiffe://cluster.local/ns/shop/sa/backend";
    let req = || request(backend, "token-of-backend", csr_with(vec![uri(backend)], false));
    assert_eq!(
        certify(&mut client, req()).await.expect_err("unknown yet").code(),
        Code::PermissionDenied
    );
    pki::write(
        &id.pki.path("tokens.yaml"),
        &format!(
            "{}{}",
            pki::token_line("token-of-frontend", "default", "frontend"),
            pki::token_line("token-of-backend", "shop", "backend")
        ),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match certify(&mut client, req()).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.code(), Code::PermissionDenied);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("token file change not picked up: {e}"),
        }
    }
    // A broken token file is refused; the tokens in force stay.
    pki::write(&id.pki.path("tokens.yaml"), "{ this is: [not, valid");
    tokio::time::sleep(Duration::from_millis(400)).await;
    certify(&mut client, req()).await.expect("old tokens still valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_token_review_through_the_api_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = ApiServer::start(dir.path()).await.expect("stand-in API server");
    api.add_token("sa-token-frontend", "default", "frontend", &["sidemesh-identity"]);
    api.add_token(
        "sa-token-wrong-audience",
        "default",
        "frontend",
        &["https://kubernetes.default.svc"],
    );
    let kubeconfig = api.kubeconfig.display().to_string();
    let id = Identity::start_with(
        &["--token-reviewer", "kubernetes"],
        &[("KUBECONFIG", &kubeconfig)],
        |_| {},
    );
    let mut client = id.client();
    let csr = || csr_with(vec![uri(FRONTEND)], false);
    certify(&mut client, request(FRONTEND, "sa-token-frontend", csr()))
        .await
        .expect("reviewed token accepted");
    let err = certify(&mut client, request(FRONTEND, "sa-token-wrong-audience", csr()))
        .await
        .expect_err("audience");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("audience"), "{}", err.message());
    let err = certify(&mut client, request(FRONTEND, "forged", csr()))
        .await
        .expect_err("forged");
    assert_eq!(err.code(), Code::PermissionDenied);
    let backend = "spiffe://cluster.local/ns/default/sa/backend";
    let err = certify(
        &mut client,
        request(backend, "sa-token-frontend", csr_with(vec![uri(backend)], false)),
    )
    .await
    .expect_err("spoof");
    assert_eq!(err.code(), Code::PermissionDenied);
    let reviews = api
        .requests()
        .iter()
        .filter(|r| *r == "POST /apis/authentication.k8s.io/v1/tokenreviews")
        .count();
    assert_eq!(reviews, 4, "one TokenReview per request: {:?}", api.requests());

    api.stop();
    let err = certify(&mut client, request(FRONTEND, "sa-token-frontend", csr()))
        .await
        .expect_err("API server down");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_obtains_renews_and_follows_issuer_switches() {
    let id = Identity::start(&["--leaf-lifetime", "6s"]);
    let trust = id.trust();
    let manager = CertManager::spawn(CertManagerConfig {
        identity_addr: id.addr.clone(),
        identity_server_id: SERVER_ID.parse().expect("id"),
        token_path: id.pki.path("tokens-of-frontend"),
        workload_id: FRONTEND.parse::<SpiffeId>().expect("id"),
        trust,
        renew_jitter: Duration::from_millis(500),
    });
    // No token file yet: the manager retries with backoff.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(manager.current().is_none());
    std::fs::write(id.pki.path("tokens-of-frontend"), "token-of-frontend\n").expect("token");
    let first = tokio::time::timeout(Duration::from_secs(10), manager.ready())
        .await
        .expect("certificate within 10s");
    assert_eq!(first.id.to_string(), FRONTEND);

    // Lifetime 6s + 60s backdate: renewal at 65-75% of 66s is ~40s away; a
    // new issuer must trigger re-certification within the jitter instead.
    let new_issuer = sidemesh_identity::ca::new_issuer(&id.pki.root.cert, &id.pki.root.key, Duration::from_secs(86400))
        .expect("issuer");
    pki::write(&id.pki.path("issuer.crt"), &new_issuer.cert);
    pki::write(&id.pki.path("issuer.key"), &new_issuer.key);
    let want = sidemesh_identity_client::fingerprint(&pem_der(&new_issuer.cert));
    let mut rx = manager.subscribe();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(c) = rx.borrow_and_update().clone()
                && c.issuer_fingerprint == want
            {
                return c;
            }
            rx.changed().await.expect("manager alive");
        }
    })
    .await
    .expect("re-certified on the new issuer within 10s");
    assert_ne!(got.chain[0], first.chain[0], "a new leaf");
    assert_ne!(got.issuer_fingerprint, first.issuer_fingerprint);
}

#[test]
fn startup_with_unusable_files_is_one_clear_line_and_nonzero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let other =
        sidemesh_identity::ca::new_issuer(&pki.root.cert, &pki.root.key, Duration::from_secs(86400)).expect("issuer");
    pki::write(&pki.path("other.key"), &other.key);
    pki::write(&pki.path("garbage.pem"), "not pem at all");
    pki::write(&pki.path("tokens.yaml"), "");
    let p = |n: &str| pki.path(n).display().to_string();
    let reviewer = format!("file:{}", p("tokens.yaml"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--issuer-cert".into(),
                p("issuer.crt"),
                "--issuer-key".into(),
                p("other.key"),
                "--trust-bundle".into(),
                p("bundle.pem"),
            ],
            "does not match",
        ),
        (
            vec![
                "--issuer-cert".into(),
                p("issuer.crt"),
                "--issuer-key".into(),
                p("issuer.key"),
                "--trust-bundle".into(),
                p("garbage.pem"),
            ],
            "trust bundle",
        ),
        (
            vec![
                "--issuer-cert".into(),
                p("missing.crt"),
                "--issuer-key".into(),
                p("issuer.key"),
                "--trust-bundle".into(),
                p("bundle.pem"),
            ],
            "missing.crt",
        ),
        (
            vec![
                "--issuer-cert".into(),
                p("root.crt"),
                "--issuer-key".into(),
                p("issuer.key"),
                "--trust-bundle".into(),
                p("bundle.pem"),
            ],
            "does not match",
        ),
        (
            vec![
                "--issuer-cert".into(),
                p("issuer.crt"),
                "--issuer-key".into(),
                p("issuer.key"),
                "--trust-bundle".into(),
                p("bundle.pem"),
                "--leaf-lifetime".into(),
                "forever".into(),
            ],
            "duration",
        ),
    ];
    for (mut args, needle) in cases {
        args.extend([
            "--token-reviewer".into(),
            reviewer.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, _, stderr) = run("sidemesh-identity", &args, Duration::from_secs(20));
        assert!(!status.success(), "{args:?} started");
        assert!(stderr.contains(needle), "{args:?}: stderr {stderr:?} lacks {needle:?}");
        assert!(stderr.trim().lines().count() <= 3, "not one clear line: {stderr}");
    }
}

#[test]
fn sigterm_stops_the_service_cleanly() {
    let id = Identity::start(&[]);
    let mut proc = id.proc;
    let status = proc
        .terminate(Duration::from_secs(10))
        .expect("exited within 10s of SIGTERM");
    assert!(status.success(), "{status}");
}
