//! End-to-end tests of the injector: the real `sidemesh-injector` binary,
//! AdmissionReviews over real HTTPS as the API server sends them, Namespace
//! annotations from the stand-in API server's watch, the patched Pods
//! validated against the Kubernetes schemas; `sidemesh inject` and
//! `sidemesh install` as an operator runs them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use sidemesh_injector::certs::{WebhookPki, service_dns_names, webhook_pki};
use sidemesh_tests::apiserver::ApiServer;
use sidemesh_tests::process::{Proc, http_get, metric_value, run};
use sidemesh_tests::webhook::{WebhookClient, decode_patch, have_kubernetes_validate, kubernetes_validate, pod_review};
use sidemesh_tests::{free_port, pki};

const SERVER_NAME: &str = "sidemesh-injector.sidemesh-system.svc";

fn namespace(name: &str, annotations: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name},
            "annotations": annotations,
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A Pod as it reaches a mutating webhook: defaults applied, a
/// ServiceAccount token volume already added by the admission chain.
fn pod(name: &str, annotations: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": format!("{name}-7d9c8b6f5-"),
            "labels": {"app": name, "pod-template-hash": "7d9c8b6f5"},
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-7d9c8b6f5"),
                "uid": "6f2d1f7a-1111-2222-3333-444455556666", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "containers": [{
                "name": name,
                "image": "registry.example/web:1.2.3",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "50m"}},
                "volumeMounts": [{
                    "name": "kube-api-access-abcde",
                    "readOnly": true,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"
                }],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "volumes": [{
                "name": "kube-api-access-abcde",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
                    ],
                    "defaultMode": 420
                }
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "web",
            "serviceAccount": "web",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0
        }
    })
}

/// A running injector against a stand-in API server with a set of Namespaces.
struct Env {
    api: ApiServer,
    proc: Proc,
    addr: SocketAddr,
    admin: String,
    webhook: WebhookPki,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = ApiServer::start(dir.path()).await.expect("stand-in API server");
        for ns in [
            namespace("apps", &[("sidemesh.io/inject", "enabled")]),
            namespace("off", &[("sidemesh.io/inject", "disabled")]),
            namespace("plain", &[]),
            namespace("kube-system", &[("sidemesh.io/inject", "enabled")]),
            namespace("sidemesh-system", &[]),
            namespace("typo", &[("sidemesh.io/inject", "on")]),
            namespace(
                "tuned",
                &[
                    ("sidemesh.io/inject", "enabled"),
                    ("config.sidemesh.io/inbound-policy", "strict"),
                    ("config.sidemesh.io/log-level", "debug"),
                    ("config.sidemesh.io/opaque-ports", "6379"),
                ],
            ),
            namespace(
                "broken",
                &[
                    ("sidemesh.io/inject", "enabled"),
                    ("config.sidemesh.io/skip-outbound-cidrs", "10.0.0.0/40"),
                ],
            ),
        ] {
            api.create(ns).expect("namespace");
        }
        let webhook = webhook_pki(
            &[
                service_dns_names("sidemesh-injector", "sidemesh-system"),
                vec!["127.0.0.1".to_owned()],
            ]
            .concat(),
            Duration::from_secs(86400),
        )
        .expect("webhook certificates");
        pki::write(&dir.path().join("tls.crt"), &webhook.cert);
        pki::write(&dir.path().join("tls.key"), &webhook.key);
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let admin = format!("127.0.0.1:{}", free_port());
        let (listen, cert, key) = (
            addr.to_string(),
            dir.path().join("tls.crt").display().to_string(),
            dir.path().join("tls.key").display().to_string(),
        );
        let kubeconfig = api.kubeconfig.display().to_string();
        let mut proc = Proc::start(
            "sidemesh-injector",
            &[
                "--listen",
                &listen,
                "--admin-addr",
                &admin,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--proxy-image",
                "sidemesh/sidemesh:test",
                "--workers",
                "2",
            ],
            &[("KUBECONFIG", &kubeconfig)],
            dir.path(),
        );
        proc.wait_ready(&admin, Duration::from_secs(20));
        Self {
            api,
            proc,
            addr,
            admin,
            webhook,
            dir,
        }
    }

    async fn client(&self) -> WebhookClient {
        WebhookClient::connect(self.addr, &self.webhook.ca_cert, SERVER_NAME)
            .await
            .expect("TLS connection to the webhook")
    }

    fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics").map(|(_, b)| b).unwrap_or_default()
    }
}

/// Sends a Pod CREATE review; returns the answer.
async fn review(client: &mut WebhookClient, namespace: &str, pod: &Value) -> Value {
    let (status, body) = client
        .review(&pod_review("0c9a8d74-9cb7-44dd-b98e-09fd62def2f4", namespace, pod))
        .await
        .expect("review");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("answer is JSON")
}

fn patched(pod: &Value, answer: &Value) -> Option<Value> {
    let patch = decode_patch(answer).expect("patch decodes")?;
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("a JSON Patch");
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).expect("the patch applies to the Pod");
    Some(out)
}

fn allowed_unchanged(answer: &Value) {
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    assert!(answer["response"].get("patchType").is_none(), "{answer}");
}

fn env_of(c: &Value, name: &str) -> Option<String> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

fn validate(dir: &Path, name: &str, objects: &[Value]) {
    if !have_kubernetes_validate() {
        eprintln!("SKIP schema validation: kubernetes-validate is not installed (pip install kubernetes-validate)");
        return;
    }
    if let Err(report) = kubernetes_validate(dir, name, objects) {
        panic!("{name} does not validate against the Kubernetes 1.34 schemas (strict):\n{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_pod_annotations_decide() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let injected = |a: &Value| a["response"]["allowed"] == true && a["response"]["patchType"] == "JSONPatch";

    // The Namespace says enabled.
    assert!(injected(&review(&mut c, "apps", &pod("web", &[])).await));
    // The Namespace says disabled, or nothing.
    allowed_unchanged(&review(&mut c, "off", &pod("web", &[])).await);
    allowed_unchanged(&review(&mut c, "plain", &pod("web", &[])).await);
    // A Namespace the API server does not know: not enabled.
    allowed_unchanged(&review(&mut c, "nowhere", &pod("web", &[])).await);
    // The Pod's annotation wins, both ways.
    assert!(injected(
        &review(&mut c, "plain", &pod("web", &[("sidemesh.io/inject", "enabled")])).await
    ));
    assert!(injected(
        &review(&mut c, "off", &pod("web", &[("sidemesh.io/inject", "enabled")])).await
    ));
    allowed_unchanged(&review(&mut c, "apps", &pod("web", &[("sidemesh.io/inject", "disabled")])).await);
    // Never twice.
    allowed_unchanged(&review(&mut c, "apps", &pod("web", &[("sidemesh.io/injected", "true")])).await);
    // Never into hostNetwork Pods, nor the system namespaces, whatever they say.
    let mut host = pod("web", &[("sidemesh.io/inject", "enabled")]);
    host["spec"]["hostNetwork"] = json!(true);
    allowed_unchanged(&review(&mut c, "apps", &host).await);
    allowed_unchanged(&review(&mut c, "kube-system", &pod("dns", &[])).await);
    allowed_unchanged(&review(&mut c, "kube-system", &pod("dns", &[("sidemesh.io/inject", "enabled")])).await);
    allowed_unchanged(
        &review(
            &mut c,
            "sidemesh-system",
            &pod("x", &[("sidemesh.io/inject", "enabled")]),
        )
        .await,
    );
    // Reviews of anything but a Pod CREATE pass unchanged.
    let mut update = pod_review("u-1", "apps", &pod("web", &[]));
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = pod("web", &[]);
    let (status, body) = c.review(&update).await.expect("review");
    assert_eq!(status, 200);
    allowed_unchanged(&serde_json::from_slice(&body).expect("json"));

    // Every admission is counted by outcome and reason.
    let m = env.metrics();
    let count = |outcome: &str, reason: &str| {
        metric_value(
            &m,
            "sidemesh_injector_admissions_total",
            &[&format!("outcome=\"{outcome}\""), &format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(count("injected", "namespace-enabled"), 1.0, "{m}");
    assert_eq!(count("injected", "pod-enabled"), 2.0, "{m}");
    assert_eq!(count("skipped", "namespace-disabled"), 1.0, "{m}");
    assert_eq!(count("skipped", "not-enabled"), 2.0, "{m}");
    assert_eq!(count("skipped", "pod-disabled"), 1.0, "{m}");
    assert_eq!(count("skipped", "already-injected"), 1.0, "{m}");
    assert_eq!(count("skipped", "host-network"), 1.0, "{m}");
    assert_eq!(count("skipped", "system-namespace"), 3.0, "{m}");
    assert_eq!(count("skipped", "not-pod-create"), 1.0, "{m}");
    assert!(
        metric_value(&m, "sidemesh_injector_admission_duration_seconds_count", &[]) >= 13.0,
        "{m}"
    );
    // And logged with outcome, reason and latency.
    let log = env.proc.log();
    assert!(
        log.lines().any(|l| l.contains("admission")
            && l.contains("namespace=apps")
            && l.contains("outcome=\"injected\"")
            && l.contains("reason=\"namespace-enabled\"")
            && l.contains("latency_us=")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_bytes_on_the_wire() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let uid = "705ab4f5-6393-11e8-b7cc-42010a800002";

    // A skipped Pod: the whole answer, byte for byte.
    let (status, body) = c
        .review(&pod_review(uid, "plain", &pod("web", &[])))
        .await
        .expect("review");
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{{"allowed":true,"status":{{}},"uid":"{uid}"}}}}"#
        )
    );

    // A denied Pod: allowed false, code 400, a message naming the annotation.
    let (status, body) = c
        .review(&pod_review(
            uid,
            "apps",
            &pod("web", &[("config.sidemesh.io/inbound-policy", "open")]),
        ))
        .await
        .expect("review");
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{{"allowed":false,"status":{{"code":400,"message":"annotation config.sidemesh.io/inbound-policy on the Pod has an invalid value \"open\": must be permissive or strict","reason":"Invalid"}},"uid":"{uid}"}}}}"#
        )
    );

    // An injected Pod: `patch` is a base64 string (not an array of numbers),
    // standard alphabet with padding, of a JSON Patch array.
    let input = pod("web", &[]);
    let (status, body) = c.review(&pod_review(uid, "apps", &input)).await.expect("review");
    assert_eq!(status, 200);
    let text = String::from_utf8(body.clone()).expect("UTF-8");
    let answer: Value = serde_json::from_slice(&body).expect("JSON");
    let keys: BTreeSet<&str> = answer["response"]
        .as_object()
        .expect("response")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["allowed", "patch", "patchType", "status", "uid"]),
        "{text}"
    );
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], uid);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let b64 = answer["response"]["patch"].as_str().expect("patch is a string");
    assert!(
        b64.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
        "not standard base64: {b64}"
    );
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
    assert_eq!(
        base64::engine::general_purpose::STANDARD.encode(&raw),
        b64,
        "canonical base64"
    );
    assert!(
        text.contains(&format!(r#""patch":"{b64}","patchType":"JSONPatch""#)),
        "{text}"
    );
    // The patch is exactly what the library's plan produces for this Pod
    // (the same code path as `sidemesh inject`).
    let ops: Value = serde_json::from_slice(&raw).expect("patch JSON");
    let summary: Vec<(String, String)> = ops
        .as_array()
        .expect("array")
        .iter()
        .map(|o| {
            (
                o["op"].as_str().unwrap_or_default().to_owned(),
                o["path"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expect = |p: &str| ("add".to_owned(), p.to_owned());
    assert_eq!(
        summary,
        vec![
            expect("/spec/initContainers"),
            expect("/spec/containers/0"),
            expect("/spec/volumes/-"),
            expect("/spec/volumes/-"),
            expect("/spec/volumes/-"),
            expect("/metadata/annotations/sidemesh.io~1injected"),
            expect("/metadata/annotations/kubectl.kubernetes.io~1default-container"),
        ]
    );
    let config = sidemesh_injector::InjectorConfig {
        proxy_image: "sidemesh/sidemesh:test".into(),
        ..Default::default()
    };
    let plan = sidemesh_injector::inject::plan_json(
        &config,
        &input,
        Some("apps"),
        sidemesh_injector::inject::NamespaceView::Offline,
    );
    let sidemesh_injector::Plan::Inject { patch, .. } = plan else {
        panic!("the library does not inject: {plan:?}");
    };
    assert_eq!(
        raw,
        serde_json::to_vec(&patch).expect("patch"),
        "wire patch differs from the library's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patched_pods_are_valid_complete_and_idempotent() {
    let env = Env::start().await;
    let mut c = env.client().await;

    // A Pod with init containers and annotations of its own.
    let mut busy = pod("api", &[("prometheus.io/scrape", "true")]);
    busy["spec"]["initContainers"] = json!([{"name": "migrate", "image": "registry.example/migrate:1"}]);
    let cases = [
        ("plain", "apps", pod("web", &[])),
        ("busy", "apps", busy),
        (
            "overrides",
            "plain",
            pod(
                "web",
                &[
                    ("sidemesh.io/inject", "enabled"),
                    ("config.sidemesh.io/skip-inbound-ports", "9090, 9091"),
                    ("config.sidemesh.io/skip-outbound-ports", "3306,5000-5010"),
                    (
                        "config.sidemesh.io/skip-outbound-cidrs",
                        "169.254.169.254/32,10.96.0.0/12,fd00::/8",
                    ),
                    ("config.sidemesh.io/opaque-ports", "4222,7000-7001"),
                    ("config.sidemesh.io/inbound-policy", "strict"),
                    ("config.sidemesh.io/proxy-cpu-request", "200m"),
                    ("config.sidemesh.io/proxy-cpu-limit", "1"),
                    ("config.sidemesh.io/proxy-memory-request", "128Mi"),
                    ("config.sidemesh.io/proxy-memory-limit", "1Gi"),
                    ("config.sidemesh.io/log-level", "info,sidemesh_proxy=debug"),
                ],
            ),
        ),
        (
            "native",
            "apps",
            pod("job", &[("config.sidemesh.io/native-sidecar", "true")]),
        ),
        ("namespace-overrides", "tuned", pod("cache", &[])),
    ];
    let mut valid = Vec::new();
    for (name, ns, input) in cases {
        let answer = review(&mut c, ns, &input).await;
        assert_eq!(answer["response"]["allowed"], true, "{name}: {answer}");
        let out = patched(&input, &answer).unwrap_or_else(|| panic!("{name}: no patch: {answer}"));
        let native = name == "native";

        // The application containers are untouched, in their order.
        let apps: Vec<&Value> = out["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .filter(|c| c["name"] != "sidemesh-proxy")
            .collect();
        let before: Vec<&Value> = input["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .collect();
        assert_eq!(apps, before, "{name}: app containers changed");
        let before_init = input["spec"]["initContainers"].as_array().cloned().unwrap_or_default();
        let after_init: Vec<Value> = out["spec"]["initContainers"]
            .as_array()
            .expect("initContainers")
            .iter()
            .filter(|c| !c["name"].as_str().unwrap_or_default().starts_with("sidemesh-"))
            .cloned()
            .collect();
        assert_eq!(after_init, before_init, "{name}: app init containers changed");

        // The init step first, with only NET_ADMIN and NET_RAW.
        let init = &out["spec"]["initContainers"][0];
        assert_eq!(init["name"], "sidemesh-init", "{name}");
        assert_eq!(init["image"], "sidemesh/sidemesh:test");
        assert_eq!(init["command"], json!(["sidemesh-proxy"]));
        assert_eq!(
            init["securityContext"]["capabilities"],
            json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
        );
        assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(init["securityContext"]["privileged"], false);
        let args: Vec<&str> = init["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            &args[..7],
            &[
                "init",
                "--proxy-uid",
                "1337",
                "--inbound-port",
                "15006",
                "--outbound-port",
                "15001"
            ]
        );

        // The proxy: first container, or the second init container (native).
        let proxy = if native {
            assert_eq!(out["spec"]["initContainers"][1]["name"], "sidemesh-proxy");
            assert!(
                out["spec"]["containers"]
                    .as_array()
                    .expect("c")
                    .iter()
                    .all(|c| c["name"] != "sidemesh-proxy")
            );
            &out["spec"]["initContainers"][1]
        } else {
            assert_eq!(out["spec"]["containers"][0]["name"], "sidemesh-proxy", "{name}");
            &out["spec"]["containers"][0]
        };
        let sc = &proxy["securityContext"];
        assert_eq!(sc["runAsUser"], 1337);
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
        assert_eq!(
            proxy["readinessProbe"]["httpGet"],
            json!({"path": "/ready", "port": 15020})
        );
        assert_eq!(
            proxy["livenessProbe"]["httpGet"],
            json!({"path": "/live", "port": 15020})
        );
        if native {
            assert_eq!(proxy["restartPolicy"], "Always");
            assert_eq!(
                proxy["startupProbe"]["httpGet"],
                json!({"path": "/ready", "port": 15020})
            );
            assert!(proxy.get("lifecycle").is_none());
        } else {
            let hook = proxy["lifecycle"]["postStart"]["exec"]["command"].to_string();
            assert!(
                hook.contains("/dev/tcp/127.0.0.1/15020") && hook.contains("/ready"),
                "{hook}"
            );
        }
        assert_eq!(
            env_of(proxy, "SIDEMESH_IDENTITY_ADDR").as_deref(),
            Some("sidemesh-identity.sidemesh-system.svc:8443")
        );
        assert_eq!(
            env_of(proxy, "SIDEMESH_DESTINATION_ADDR").as_deref(),
            Some("sidemesh-destination.sidemesh-system.svc:8086")
        );
        assert_eq!(
            env_of(proxy, "SIDEMESH_TOKEN_PATH").as_deref(),
            Some("/var/run/secrets/sidemesh.io/identity/token")
        );
        assert_eq!(
            env_of(proxy, "SIDEMESH_TRUST_BUNDLE").as_deref(),
            Some("/var/run/sidemesh.io/trust-bundle/ca-bundle.crt")
        );
        let field = |n: &str| {
            proxy["env"]
                .as_array()
                .and_then(|e| e.iter().find(|e| e["name"] == n))
                .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
        };
        assert_eq!(field("POD_NAMESPACE"), Some(json!("metadata.namespace")));
        assert_eq!(field("POD_SERVICE_ACCOUNT"), Some(json!("spec.serviceAccountName")));
        // Only the proxy's memcpy is tuned; the application's environment is its own.
        assert_eq!(
            env_of(proxy, "GLIBC_TUNABLES").as_deref(),
            Some("glibc.cpu.x86_rep_movsb_threshold=0x10000000")
        );
        for app in out["spec"]["containers"].as_array().into_iter().flatten() {
            if app["name"] != "sidemesh-proxy" {
                assert_eq!(env_of(app, "GLIBC_TUNABLES"), None, "{name}: app env touched");
            }
        }
        // The token and trust bundle volumes, mounted.
        let volume = |n: &str| {
            out["spec"]["volumes"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["name"] == n).cloned())
                .unwrap_or_else(|| panic!("{name}: no volume {n}"))
        };
        assert_eq!(
            volume("sidemesh-identity-token")["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "sidemesh-identity"
        );
        assert_eq!(
            volume("sidemesh-trust-bundle")["configMap"]["name"],
            "sidemesh-trust-bundle"
        );
        assert!(volume("kube-api-access-abcde").is_object(), "existing volumes kept");
        let mounts = proxy["volumeMounts"].to_string();
        assert!(mounts.contains("/var/run/secrets/sidemesh.io/identity"), "{mounts}");
        assert!(mounts.contains("/var/run/sidemesh.io/trust-bundle"), "{mounts}");
        assert_eq!(out["metadata"]["annotations"]["sidemesh.io/injected"], "true");
        for (k, v) in input["metadata"]["annotations"].as_object().expect("annotations") {
            assert_eq!(&out["metadata"]["annotations"][k], v, "{name}: annotation {k} changed");
        }

        match name {
            "plain" | "busy" => {
                assert_eq!(env_of(proxy, "SIDEMESH_INBOUND_POLICY").as_deref(), Some("permissive"));
                assert_eq!(env_of(proxy, "SIDEMESH_LOG").as_deref(), Some("info"));
                assert_eq!(env_of(proxy, "SIDEMESH_OPAQUE_PORTS"), None);
                assert_eq!(
                    proxy["resources"],
                    json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
                );
                assert_eq!(args.len(), 7, "{args:?}");
                assert_eq!(
                    out["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
                    input["spec"]["containers"][0]["name"]
                );
            }
            "overrides" => {
                assert_eq!(
                    &args[7..],
                    &[
                        "--skip-inbound-ports",
                        "9090,9091",
                        "--skip-outbound-ports",
                        "3306,5000-5010",
                        "--skip-outbound-cidrs",
                        "169.254.169.254/32,10.96.0.0/12,fd00::/8"
                    ]
                );
                assert_eq!(
                    env_of(proxy, "SIDEMESH_OPAQUE_PORTS").as_deref(),
                    Some("4222,7000,7001")
                );
                assert_eq!(env_of(proxy, "SIDEMESH_INBOUND_POLICY").as_deref(), Some("strict"));
                assert_eq!(
                    env_of(proxy, "SIDEMESH_LOG").as_deref(),
                    Some("info,sidemesh_proxy=debug")
                );
                assert_eq!(
                    proxy["resources"],
                    json!({"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}})
                );
            }
            "namespace-overrides" => {
                assert_eq!(env_of(proxy, "SIDEMESH_INBOUND_POLICY").as_deref(), Some("strict"));
                assert_eq!(env_of(proxy, "SIDEMESH_LOG").as_deref(), Some("debug"));
                assert_eq!(env_of(proxy, "SIDEMESH_OPAQUE_PORTS").as_deref(), Some("6379"));
            }
            _ => {}
        }

        // Reviewing the patched Pod again changes nothing.
        let again = review(&mut c, ns, &out).await;
        allowed_unchanged(&again);
        let mut out = out;
        out["metadata"]["name"] = json!(format!("{name}-x"));
        out["metadata"]["namespace"] = json!(ns);
        valid.push(out);
    }
    validate(env.dir.path(), "patched-pod", &valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_annotations_are_denied_by_name() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let cases: &[(&str, &str)] = &[
        ("config.sidemesh.io/skip-inbound-ports", "80,http"),
        ("config.sidemesh.io/skip-inbound-ports", "0"),
        ("config.sidemesh.io/skip-outbound-ports", "70000"),
        ("config.sidemesh.io/skip-outbound-ports", "9000-8000"),
        ("config.sidemesh.io/skip-outbound-cidrs", "10.0.0.0/33"),
        ("config.sidemesh.io/skip-outbound-cidrs", "example.com"),
        ("config.sidemesh.io/opaque-ports", "6379,,6380"),
        ("config.sidemesh.io/opaque-ports", "1-65535"),
        ("config.sidemesh.io/inbound-policy", "Strict!"),
        ("config.sidemesh.io/proxy-cpu-request", "lots"),
        ("config.sidemesh.io/proxy-cpu-limit", "-1"),
        ("config.sidemesh.io/proxy-memory-request", "64MB"),
        ("config.sidemesh.io/proxy-memory-limit", "1.2.3Gi"),
        ("config.sidemesh.io/log-level", "verbose"),
        ("config.sidemesh.io/native-sidecar", "yes"),
        ("sidemesh.io/inject", "true"),
    ];
    for (annotation, value) in cases {
        let answer = review(&mut c, "apps", &pod("web", &[(annotation, value)])).await;
        let r = &answer["response"];
        assert_eq!(r["allowed"], false, "{annotation}={value}: {answer}");
        assert!(r.get("patch").is_none());
        assert_eq!(r["status"]["code"], 400);
        let message = r["status"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(annotation) && message.contains(&format!("{value:?}")) && message.contains("on the Pod"),
            "{annotation}={value}: {message}"
        );
    }
    // A request above its limit.
    let answer = review(
        &mut c,
        "apps",
        &pod(
            "web",
            &[
                ("config.sidemesh.io/proxy-memory-request", "2Gi"),
                ("config.sidemesh.io/proxy-memory-limit", "1Gi"),
            ],
        ),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("proxy-memory-request") && m.contains("above the limit 1Gi")),
        "{answer}"
    );
    // On the Namespace: named with the Namespace; the Pod may override it.
    let answer = review(&mut c, "broken", &pod("web", &[])).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(
        answer["response"]["status"]["message"],
        "annotation config.sidemesh.io/skip-outbound-cidrs on Namespace broken has an invalid value \"10.0.0.0/40\": \"10.0.0.0/40\": the prefix length is above 32"
    );
    let answer = review(
        &mut c,
        "broken",
        &pod("web", &[("config.sidemesh.io/skip-outbound-cidrs", "10.0.0.0/8")]),
    )
    .await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let answer = review(&mut c, "typo", &pod("web", &[])).await;
    assert_eq!(
        answer["response"]["status"]["message"],
        "annotation sidemesh.io/inject on Namespace typo has an invalid value \"on\": must be enabled or disabled"
    );
    // Overrides are only read when injecting: a Pod that is not injected is admitted.
    allowed_unchanged(
        &review(
            &mut c,
            "plain",
            &pod("web", &[("config.sidemesh.io/log-level", "verbose")]),
        )
        .await,
    );
    let m = env.metrics();
    assert_eq!(
        metric_value(
            &m,
            "sidemesh_injector_admissions_total",
            &["outcome=\"denied\"", "reason=\"invalid-annotation\""]
        ),
        (cases.len() + 3) as f64,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_reviews_get_400_and_never_kill_the_webhook() {
    let env = Env::start().await;
    let mut c = env.client().await;
    let good = pod_review("uid-1", "apps", &pod("web", &[]));
    let mut no_uid = good.clone();
    no_uid["request"]["uid"] = json!("");
    let mut v1beta1 = good.clone();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut wrong_kind = good.clone();
    wrong_kind["kind"] = json!("TokenReview");
    let mut no_request = good.clone();
    no_request.as_object_mut().expect("object").remove("request");
    let mut bad_op = good.clone();
    bad_op["request"]["operation"] = json!("EXPLODE");
    let mut annotations_not_strings = good.clone();
    annotations_not_strings["request"]["object"]["metadata"]["annotations"] = json!({"sidemesh.io/inject": 1});
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty body", Vec::new(), "EOF"),
        ("not JSON", b"<AdmissionReview/>".to_vec(), "expected value"),
        ("JSON array", b"[1,2,3]".to_vec(), "malformed AdmissionReview"),
        (
            "truncated",
            serde_json::to_vec(&good).expect("json")[..100].to_vec(),
            "EOF",
        ),
        (
            "no request",
            serde_json::to_vec(&no_request).expect("json"),
            "no request",
        ),
        ("empty uid", serde_json::to_vec(&no_uid).expect("json"), "uid"),
        (
            "v1beta1",
            serde_json::to_vec(&v1beta1).expect("json"),
            "admission.k8s.io/v1beta1",
        ),
        (
            "wrong kind",
            serde_json::to_vec(&wrong_kind).expect("json"),
            "TokenReview",
        ),
        (
            "unknown operation",
            serde_json::to_vec(&bad_op).expect("json"),
            "EXPLODE",
        ),
        (
            "annotation not a string",
            serde_json::to_vec(&annotations_not_strings).expect("json"),
            "invalid type",
        ),
        (
            "deep nesting",
            [
                &br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"options":"#[..],
                &[b'['; 100_000][..],
            ]
            .concat(),
            "recursion limit",
        ),
    ];
    for (what, body, needle) in cases {
        let (status, content_type, rsp) = c.request("POST", "/inject", body).await.expect("request");
        let text = String::from_utf8_lossy(&rsp);
        assert_eq!(status, 400, "{what}: {text}");
        assert!(content_type.starts_with("text/plain"), "{what}: {content_type}");
        assert!(text.starts_with("malformed AdmissionReview: "), "{what}: {text}");
        assert!(text.contains(needle), "{what}: {text}");
    }
    let (status, _, _) = c.request("GET", "/inject", Vec::new()).await.expect("request");
    assert_eq!(status, 405);
    let (status, _, _) = c.request("POST", "/mutate", b"{}".to_vec()).await.expect("request");
    assert_eq!(status, 404);
    let (status, _, _) = c
        .request("POST", "/inject", vec![b' '; 9 << 20])
        .await
        .expect("request");
    assert_eq!(status, 413);

    // Still serving, on a fresh connection too.
    let mut c = env.client().await;
    let answer = review(&mut c, "apps", &pod("web", &[])).await;
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let mut env = env;
    assert!(env.proc.is_running());
    assert_eq!(
        metric_value(
            &env.metrics(),
            "sidemesh_injector_admissions_total",
            &["outcome=\"malformed\""]
        ),
        12.0
    );
}

/// Waits until `f` holds, polling.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {timeout:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_cache_follows_the_api_server() {
    let env = Env::start().await;
    let addr = env.addr;
    let ca = env.webhook.ca_cert.clone();
    let is_injected = move |ns: &'static str| {
        let ca = ca.clone();
        async move {
            let mut c = WebhookClient::connect(addr, &ca, SERVER_NAME).await.expect("connect");
            review(&mut c, ns, &pod("web", &[])).await["response"]["patchType"] == "JSONPatch"
        }
    };
    // The cache was filled by the initial list: no GET per admission.
    let gets_before = env
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/namespaces/"))
        .count();
    for _ in 0..20 {
        assert!(is_injected("apps").await);
    }
    let gets_after = env
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/namespaces/"))
        .count();
    assert_eq!(
        gets_before,
        gets_after,
        "admissions asked the API server: {:?}",
        env.api.requests()
    );

    // The annotation changes while the injector runs: enabled → disabled → removed → enabled.
    assert!(!is_injected("plain").await);
    env.api
        .update(namespace("plain", &[("sidemesh.io/inject", "enabled")]))
        .expect("update");
    eventually("plain enabled", Duration::from_secs(5), || is_injected("plain")).await;
    env.api
        .update(namespace("plain", &[("sidemesh.io/inject", "disabled")]))
        .expect("update");
    eventually("plain disabled", Duration::from_secs(5), || async {
        !is_injected("plain").await
    })
    .await;
    env.api
        .update(namespace("plain", &[("sidemesh.io/inject", "enabled")]))
        .expect("update");
    eventually("plain enabled again", Duration::from_secs(5), || is_injected("plain")).await;
    env.api.update(namespace("plain", &[])).expect("update");
    eventually("plain annotation removed", Duration::from_secs(5), || async {
        !is_injected("plain").await
    })
    .await;
    // A Namespace created while it runs.
    env.api
        .create(namespace("fresh", &[("sidemesh.io/inject", "enabled")]))
        .expect("create");
    eventually("fresh", Duration::from_secs(5), || is_injected("fresh")).await;
    // A watch that breaks is resumed; changes made meanwhile are seen.
    env.api.drop_watches();
    env.api.delete("v1", "Namespace", "", "fresh").expect("delete");
    eventually("fresh deleted", Duration::from_secs(10), || async {
        !is_injected("fresh").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_certificate_is_reloaded_without_restart() {
    let env = Env::start().await;
    let pid = env.proc.pid();
    // A new CA and certificate, written as a Secret update writes them.
    let next = webhook_pki(
        &[
            service_dns_names("sidemesh-injector", "sidemesh-system"),
            vec!["127.0.0.1".to_owned()],
        ]
        .concat(),
        Duration::from_secs(86400),
    )
    .expect("certificates");
    assert!(
        WebhookClient::connect(env.addr, &next.ca_cert, SERVER_NAME)
            .await
            .is_err()
    );
    pki::write(&env.dir.path().join("tls.key"), &next.key);
    pki::write(&env.dir.path().join("tls.crt"), &next.cert);
    let addr = env.addr;
    let ca = next.ca_cert.clone();
    eventually("the new certificate served", Duration::from_secs(10), || {
        let ca = ca.clone();
        async move { WebhookClient::connect(addr, &ca, SERVER_NAME).await.is_ok() }
    })
    .await;
    let mut c = WebhookClient::connect(env.addr, &next.ca_cert, SERVER_NAME)
        .await
        .expect("connect");
    assert_eq!(
        review(&mut c, "apps", &pod("web", &[])).await["response"]["allowed"],
        true
    );
    assert_eq!(env.proc.pid(), pid);
    // A broken pair is refused; the current certificate stays in service.
    pki::write(
        &env.dir.path().join("tls.key"),
        "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut c = WebhookClient::connect(env.addr, &next.ca_cert, SERVER_NAME)
        .await
        .expect("connect");
    assert_eq!(
        review(&mut c, "apps", &pod("web", &[])).await["response"]["allowed"],
        true
    );
    let m = env.metrics();
    assert!(
        metric_value(&m, "sidemesh_injector_tls_reloads_total", &["result=\"accepted\""]) >= 1.0,
        "{m}"
    );
    assert!(
        metric_value(&m, "sidemesh_injector_tls_reloads_total", &["result=\"refused\""]) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully() {
    let mut env = Env::start().await;
    let mut c = env.client().await;
    assert_eq!(
        review(&mut c, "apps", &pod("web", &[])).await["response"]["allowed"],
        true
    );
    let status = env
        .proc
        .terminate(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", env.proc.log());
}

#[test]
fn bad_configuration_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.crt");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n",
    )
    .expect("kubeconfig");
    let (status, _, err) = run(
        "sidemesh-injector",
        &[
            "--tls-cert",
            missing.to_str().unwrap_or_default(),
            "--tls-key",
            "/nonexistent.key",
        ],
        Duration::from_secs(20),
    );
    assert!(!status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("sidemesh-injector: "), "{err}");
    let (status, _, err) = run("sidemesh-injector", &[], Duration::from_secs(20));
    assert!(!status.success());
    assert!(err.contains("--tls-cert"), "{err}");
}

/// The postStart command, run by bash against a stand-in admin server that
/// is not ready at first: it returns once `/ready` says 200.
#[test]
fn post_start_hook_waits_for_ready() {
    use std::io::{Read as _, Write as _};
    if std::process::Command::new("bash")
        .arg("-c")
        .arg("true")
        .status()
        .is_err()
    {
        eprintln!("SKIP post_start_hook_waits_for_ready: no bash");
        return;
    }
    let command = sidemesh_injector::inject::wait_ready_command();
    let script = command[2].replace("15020", "{port}");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let script = script.replace("{port}", &port.to_string());
    let served = std::thread::spawn(move || {
        let mut asked = 0;
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            // Read the whole request head (it may arrive in pieces).
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if !head.starts_with(b"GET /ready HTTP/1.0\r\n") {
                continue;
            }
            asked += 1;
            let rsp: &[u8] = if asked < 5 {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10\r\n\r\nnot ready\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n"
            };
            let _ = s.write_all(rsp);
            if asked >= 5 {
                return asked;
            }
        }
        asked
    });
    let started = Instant::now();
    let status = std::process::Command::new("bash")
        .args(["-c", &script])
        .status()
        .expect("bash");
    assert!(status.success());
    assert_eq!(served.join().expect("server"), 5);
    assert!(started.elapsed() >= Duration::from_millis(400));
    // Nothing listening: it keeps trying (bounded by the hook's timeout).
    let dead = free_port();
    let mut child = std::process::Command::new("bash")
        .args(["-c", &command[2].replace("15020", &dead.to_string())])
        .spawn()
        .expect("bash");
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().expect("wait").is_none(), "gave up at once");
    let _ = child.kill();
    let _ = child.wait();
}

fn cli(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(sidemesh_tests::process::binary("sidemesh"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sidemesh");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.unwrap_or_default().as_bytes());
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const WORKLOADS: &str = r#"# every kind with a Pod template, and some without
apiVersion: v1
kind: Pod
metadata:
  name: solo
  labels: {app: solo}
spec:
  containers:
  - name: solo
    image: registry.example/solo:1
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: registry.example/web:1
        ports: [{containerPort: 8080}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata:
      labels: {app: db}
      annotations:
        config.sidemesh.io/opaque-ports: "5432"
    spec:
      containers:
      - {name: db, image: registry.example/db:1}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      hostNetwork: true
      containers:
      - {name: agent, image: registry.example/agent:1}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: rs}
spec:
  selector: {matchLabels: {app: rs}}
  template:
    metadata: {labels: {app: rs}}
    spec:
      containers:
      - {name: rs, image: registry.example/rs:1}
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  template:
    metadata:
      annotations: {config.sidemesh.io/native-sidecar: "true"}
    spec:
      restartPolicy: Never
      containers:
      - {name: once, image: registry.example/once:1}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
          - {name: nightly, image: registry.example/nightly:1}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy}
spec:
  selector: {matchLabels: {app: legacy}}
  template:
    metadata:
      labels: {app: legacy}
      annotations: {sidemesh.io/inject: disabled}
    spec:
      containers:
      - {name: legacy, image: registry.example/legacy:1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data:
  enabled: "true"
  port: "8080"
---
"#;

fn template(doc: &Value) -> &Value {
    let path = match doc["kind"].as_str().unwrap_or_default() {
        "Pod" => "",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => "/spec/template",
    };
    doc.pointer(path).expect("template")
}

#[test]
fn offline_inject_of_multi_document_yaml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("workloads.yaml");
    std::fs::write(&file, WORKLOADS).expect("write");
    let (ok, out, err) = cli(&["inject", "-f", file.to_str().unwrap_or_default()], None);
    assert!(ok, "{err}");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&out).expect("output is YAML");
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let input: Vec<Value> = serde_saphyr::from_multiple(WORKLOADS).expect("input");
    let input: Vec<Value> = input.into_iter().filter(|d| !d.is_null()).collect();
    assert_eq!(docs.len(), 10, "{out}");
    let names = |t: &Value, list: &str| -> Vec<String> {
        t["spec"][list]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    for (before, after) in input.iter().zip(&docs) {
        let kind = after["kind"].as_str().unwrap_or_default();
        let name = after["metadata"]["name"].as_str().unwrap_or_default();
        match (kind, name) {
            ("Service" | "ConfigMap", _) | (_, "legacy" | "agent") => {
                assert_eq!(before, after, "{kind}/{name} changed")
            }
            ("Job", _) => {
                let t = template(after);
                assert_eq!(names(t, "initContainers"), ["sidemesh-init", "sidemesh-proxy"]);
                assert_eq!(names(t, "containers"), ["once"]);
            }
            _ => {
                let t = template(after);
                assert_eq!(names(t, "initContainers"), ["sidemesh-init"], "{kind}/{name}");
                assert_eq!(names(t, "containers")[0], "sidemesh-proxy", "{kind}/{name}");
                assert_eq!(t["metadata"]["annotations"]["sidemesh.io/injected"], "true");
                // Everything outside the template is as it was.
                let mut outside = after.clone();
                let mut outside_before = before.clone();
                let path = match kind {
                    "Pod" => None,
                    "CronJob" => Some("/spec/jobTemplate/spec/template"),
                    _ => Some("/spec/template"),
                };
                if let Some(p) = path {
                    *outside.pointer_mut(p).expect("t") = Value::Null;
                    *outside_before.pointer_mut(p).expect("t") = Value::Null;
                    assert_eq!(outside, outside_before, "{kind}/{name}");
                }
            }
        }
    }
    // Quoted strings stay strings.
    assert_eq!(docs[9]["data"]["enabled"], "true");
    let db = template(&docs[2]);
    let proxy = &db["spec"]["containers"][0];
    assert_eq!(env_of(proxy, "SIDEMESH_OPAQUE_PORTS").as_deref(), Some("5432"));
    // One line per document on stderr.
    assert!(err.contains("deployment/web injected"), "{err}");
    assert!(err.contains("deployment/legacy skipped: pod-disabled"), "{err}");
    assert!(err.contains("daemonset/agent skipped: host-network"), "{err}");
    assert!(err.contains("service/web passed through"), "{err}");
    validate(dir.path(), "offline", &docs);

    // From standard input, and idempotent: injecting the output again changes nothing.
    let (ok, again, err) = cli(&["inject", "-f", "-"], Some(&out));
    assert!(ok, "{err}");
    assert_eq!(again, out);
    assert_eq!(err.matches("already-injected").count(), 6, "{err}");
}

#[test]
fn offline_inject_refuses_broken_input() {
    for (input, needle) in [
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x\n", "not valid YAML"),
        ("kind: Pod\n  bad indent: [\n", "not valid YAML"),
        ("- just\n- a list\n", "not a Kubernetes object"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n  annotations: {config.sidemesh.io/skip-inbound-ports: \"http\"}\nspec:\n  containers: [{name: a, image: b}]\n",
            "document 1 (Pod x): annotation config.sidemesh.io/skip-inbound-ports on the Pod has an invalid value \"http\"",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      containers: 7\n",
            "containers is not a list",
        ),
    ] {
        let (ok, out, err) = cli(&["inject", "-f", "-"], Some(input));
        assert!(!ok, "{input}");
        assert!(out.is_empty(), "{out}");
        assert!(err.starts_with("sidemesh: injecting standard input: "), "{err}");
        assert!(err.contains(needle), "{input}: {err}");
    }
    let (ok, _, err) = cli(&["inject", "-f", "/nonexistent/file.yaml"], None);
    assert!(!ok);
    assert!(err.contains("reading /nonexistent/file.yaml"), "{err}");
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn b64(v: &Value) -> String {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("base64");
    String::from_utf8(raw).expect("PEM")
}

#[test]
fn install_renders_valid_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, out, err) = cli(
        &[
            "install",
            "--save-root",
            dir.path().join("root").to_str().unwrap_or_default(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&out).expect("YAML");
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let kinds: BTreeSet<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    for want in [
        "Namespace/sidemesh-system",
        "Deployment/sidemesh-identity",
        "Deployment/sidemesh-destination",
        "Deployment/sidemesh-injector",
        "Service/sidemesh-identity",
        "Service/sidemesh-destination",
        "Service/sidemesh-injector",
        "ServiceAccount/sidemesh-injector",
        "ClusterRole/sidemesh-identity",
        "ClusterRole/sidemesh-injector",
        "ClusterRole/sidemesh-destination",
        "ClusterRoleBinding/sidemesh-injector",
        "MutatingWebhookConfiguration/sidemesh-injector",
        "ConfigMap/sidemesh-trust-bundle",
        "Secret/sidemesh-issuer",
        "Secret/sidemesh-injector-tls",
    ] {
        assert!(kinds.contains(want), "{want} missing: {kinds:?}");
    }
    validate(dir.path(), "install", &docs);

    // Least privilege.
    assert_eq!(
        find(&docs, "ClusterRole", "sidemesh-identity")["rules"],
        json!([{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}])
    );
    assert_eq!(
        find(&docs, "ClusterRole", "sidemesh-injector")["rules"],
        json!([{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}])
    );
    for rule in find(&docs, "ClusterRole", "sidemesh-destination")["rules"]
        .as_array()
        .expect("rules")
    {
        // Besides reading, only the route conditions it reports back.
        if rule["resources"] == json!(["httproutes/status"]) {
            assert_eq!(rule["verbs"], json!(["patch"]));
        } else {
            assert_eq!(rule["verbs"], json!(["get", "list", "watch"]));
        }
    }

    // The webhook: Pods, CREATE, v1 only, no side effects, system namespaces excluded.
    let hook = &find(&docs, "MutatingWebhookConfiguration", "sidemesh-injector")["webhooks"][0];
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(hook["rules"][0]["resources"], json!(["pods"]));
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert!(hook["timeoutSeconds"].as_i64().is_some_and(|t| (1..=30).contains(&t)));
    assert_eq!(hook["clientConfig"]["service"]["path"], "/inject");
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["kube-system", "sidemesh-system"])
    );

    // The caBundle verifies the injector's serving certificate for its Service name.
    let ca = b64(&hook["clientConfig"]["caBundle"]);
    let tls = find(&docs, "Secret", "sidemesh-injector-tls");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    let (cert, key) = (b64(&tls["data"]["tls.crt"]), b64(&tls["data"]["tls.key"]));
    pki::write(&dir.path().join("tls.crt"), &cert);
    pki::write(&dir.path().join("tls.key"), &key);
    let verified = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(write_tmp(dir.path(), "ca.pem", &ca))
        .arg("-verify_hostname")
        .arg("sidemesh-injector.sidemesh-system.svc")
        .arg(dir.path().join("tls.crt"))
        .output();
    match verified {
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => eprintln!("SKIP openssl verify: no openssl"),
    }
    sidemesh_injector::server::load_certified_key(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
        .expect("the serving pair loads");

    // The trust bundle holds the saved root; the issuer chains to it.
    let root = std::fs::read_to_string(dir.path().join("root/root.crt")).expect("saved root");
    let bundle = find(&docs, "ConfigMap", "sidemesh-trust-bundle")["data"]["ca-bundle.crt"]
        .as_str()
        .expect("bundle")
        .to_owned();
    assert_eq!(bundle.trim(), root.trim());
    let issuer = find(&docs, "Secret", "sidemesh-issuer");
    assert_eq!(issuer["type"], "kubernetes.io/tls");
    let issuer_cert = write_tmp(dir.path(), "issuer.crt", &b64(&issuer["data"]["tls.crt"]));
    let (ok, shown, err) = cli(
        &[
            "trust",
            "inspect",
            issuer_cert.to_str().unwrap_or_default(),
            "--bundle",
            dir.path().join("root/root.crt").to_str().unwrap_or_default(),
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(
        shown.contains("chain: ok") || shown.to_lowercase().contains("valid"),
        "{shown}"
    );

    // With a given root, the same root is published and no key is printed.
    let (ok, out2, err) = cli(
        &[
            "install",
            "--root-cert",
            dir.path().join("root/root.crt").to_str().unwrap_or_default(),
            "--root-key",
            dir.path().join("root/root.key").to_str().unwrap_or_default(),
            "--image",
            "registry.example/sidemesh:9.9",
            "--failure-policy",
            "fail",
        ],
        None,
    );
    assert!(ok, "{err}");
    let root_key = std::fs::read_to_string(dir.path().join("root/root.key")).expect("key");
    let key_body: String = root_key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!out2.contains(&key_body) && !out2.contains(&base64::engine::general_purpose::STANDARD.encode(&root_key)));
    let docs2: Vec<Value> = serde_saphyr::from_multiple(&out2).expect("YAML");
    let docs2: Vec<Value> = docs2.into_iter().filter(|d| !d.is_null()).collect();
    assert_eq!(
        find(&docs2, "ConfigMap", "sidemesh-trust-bundle")["data"]["ca-bundle.crt"]
            .as_str()
            .map(str::trim),
        Some(root.trim())
    );
    assert_eq!(
        find(&docs2, "MutatingWebhookConfiguration", "sidemesh-injector")["webhooks"][0]["failurePolicy"],
        "Fail"
    );
    let injector = find(&docs2, "Deployment", "sidemesh-injector");
    let c = &injector["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/sidemesh:9.9");
    assert!(
        c["args"]
            .to_string()
            .contains("--proxy-image=registry.example/sidemesh:9.9")
    );
    validate(dir.path(), "install-given-root", &docs2);

    let (ok, _, err) = cli(
        &[
            "install",
            "--root-cert",
            "/nonexistent.crt",
            "--root-key",
            "/nonexistent.key",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("/nonexistent.crt"), "{err}");
}

fn write_tmp(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("write");
    p
}

/// The image sets the proxies' memcpy tunable itself, to the value the
/// injector gives every proxy container, so a proxy started from the image
/// any other way copies as fast.
#[test]
fn image_sets_the_proxy_glibc_tunables() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    let dockerfile = std::fs::read_to_string(&path).expect("read deploy/Dockerfile");
    let value = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("ENV GLIBC_TUNABLES="))
        .expect("deploy/Dockerfile: no ENV GLIBC_TUNABLES= line");
    assert_eq!(value, sidemesh_injector::inject::PROXY_GLIBC_TUNABLES);
}

#[test]
fn kustomization_builds_and_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let dir = tempfile::tempdir().expect("tempdir");
    let built = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&root)
        .output()
    {
        Ok(o) => {
            assert!(
                o.status.success(),
                "kubectl kustomize: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
        Err(_) => {
            eprintln!("SKIP kubectl kustomize: no kubectl; validating the kustomization's resources instead");
            let k: Value =
                serde_saphyr::from_str(&std::fs::read_to_string(root.join("kustomization.yaml")).expect("read"))
                    .expect("kustomization");
            k["resources"]
                .as_array()
                .expect("resources")
                .iter()
                .map(|r| std::fs::read_to_string(root.join(r.as_str().unwrap_or_default())).expect("resource"))
                .collect::<Vec<_>>()
                .join("\n---\n")
        }
    };
    let docs: Vec<Value> = serde_saphyr::from_multiple(&built).expect("YAML");
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    assert_eq!(docs.len(), 20);
    validate(dir.path(), "kustomize", &docs);
}

/// The API server speaks HTTP/2 to webhooks when ALPN offers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_over_http2() {
    use http_body_util::BodyExt as _;
    let env = Env::start().await;
    let config = sidemesh_tests::webhook::tls_config(&env.webhook.ca_cert, &[b"h2"]).expect("tls");
    let tcp = tokio::net::TcpStream::connect(env.addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from(SERVER_NAME.to_owned()).expect("name"),
            tcp,
        )
        .await
        .expect("TLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    // Several reviews multiplexed on the one connection.
    let mut calls = Vec::new();
    for i in 0..8 {
        let body = serde_json::to_vec(&pod_review(&format!("uid-{i}"), "apps", &pod("web", &[]))).expect("json");
        let req = http::Request::post(format!("https://{SERVER_NAME}/inject"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .expect("request");
        calls.push(sender.send_request(req));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let rsp = call.await.expect("response");
        assert_eq!(rsp.status(), 200);
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        let answer: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(answer["response"]["uid"], format!("uid-{i}"));
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
    }
}
