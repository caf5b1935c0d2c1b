//! The injection itself, shared by the webhook and `sidemesh inject`: decide
//! whether a Pod (or Pod template) gets the mesh, validate its overrides, and
//! produce the RFC 6902 JSON Patch that adds the init step, the proxy, their
//! volumes and the marker annotation. Application containers are never
//! touched: the patch only adds.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ExecAction, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection,
    Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::annotations::{self, InjectMode, InvalidAnnotation, Layered, Origin, Overrides};

/// UID (and GID) the proxy runs as; its own traffic is never captured.
pub const PROXY_UID: i64 = 1337;
/// The proxy's inbound listener port.
pub const INBOUND_PORT: u16 = 15006;
/// The proxy's outbound listener port.
pub const OUTBOUND_PORT: u16 = 15001;
/// The proxy's admin port (probes, Prometheus).
pub const ADMIN_PORT: i32 = 15020;
/// `GLIBC_TUNABLES` of the proxy container: glibc's memcpy never uses `rep
/// movsb`. The proxy copies every TLS record's plaintext (16 KiB, at the odd
/// offsets a 5-byte record header leaves), and on AMD Zen 3/4 `rep movsb`
/// to an unaligned destination runs many times slower than the vector loop
/// glibc uses otherwise; the image's glibc 2.36, linked into the static
/// binary, still picks it above 2 KiB. Measured: bulk TCP through two
/// proxies +26 %, median of three A/B pairs (docs/performance.md#memcpy).
/// Intel CPUs copy as fast either way at these sizes.
pub const PROXY_GLIBC_TUNABLES: &str = "glibc.cpu.x86_rep_movsb_threshold=0x10000000";
/// Name of the proxy container.
pub const PROXY_CONTAINER: &str = "sidemesh-proxy";
/// Name of the iptables init container.
pub const INIT_CONTAINER: &str = "sidemesh-init";
/// Volume holding the projected ServiceAccount token for the identity service.
pub const TOKEN_VOLUME: &str = "sidemesh-identity-token";
/// Volume holding the trust bundle ConfigMap.
pub const TRUST_VOLUME: &str = "sidemesh-trust-bundle";
/// Writable `/run` for the init container (iptables' `xtables.lock`) under a
/// read-only root filesystem.
pub const XTABLES_VOLUME: &str = "sidemesh-xtables-lock";
/// Audience of the projected token, as the identity service checks it.
pub const TOKEN_AUDIENCE: &str = "sidemesh-identity";
/// Where the token directory is mounted in the proxy.
pub const TOKEN_DIR: &str = "/var/run/secrets/sidemesh.io/identity";
/// Where the trust bundle directory is mounted in the proxy.
pub const TRUST_DIR: &str = "/var/run/sidemesh.io/trust-bundle";
/// The trust-bundle ConfigMap's key holding the PEM roots.
pub const TRUST_BUNDLE_KEY: &str = "ca-bundle.crt";
/// Namespaces never injected: the cluster's own and the mesh's control plane.
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "sidemesh-system"];
/// The annotation kubectl reads to pick the container for `logs`/`exec`:
/// with the proxy first in the list it would otherwise be picked.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
/// How long the postStart hook waits for the proxy to become ready.
pub const READY_WAIT_SECS: u32 = 120;

/// What the injector is configured with (its flags).
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    /// Image holding `sidemesh-proxy` (and bash, for the postStart wait).
    pub proxy_image: String,
    /// Name of the trust-bundle ConfigMap in each Pod's namespace.
    pub trust_bundle_configmap: String,
    /// Identity service `host:port`.
    pub identity_addr: String,
    /// Destination service `host:port`.
    pub destination_addr: String,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            proxy_image: default_proxy_image(),
            trust_bundle_configmap: "sidemesh-trust-bundle".to_owned(),
            identity_addr: "sidemesh-identity.sidemesh-system.svc:8443".to_owned(),
            destination_addr: "sidemesh-destination.sidemesh-system.svc:8086".to_owned(),
        }
    }
}

/// The image built by `deploy/Dockerfile` for this version.
pub fn default_proxy_image() -> String {
    format!("sidemesh/sidemesh:{}", env!("CARGO_PKG_VERSION"))
}

/// What is known of the Pod's Namespace.
#[derive(Debug, Clone, Copy)]
pub enum NamespaceView<'a> {
    /// Read from the API server (through the cache).
    Known {
        /// Its name.
        name: &'a str,
        /// Its annotations.
        annotations: &'a BTreeMap<String, String>,
    },
    /// The API server does not know it (or could not be asked).
    Unknown(&'a str),
    /// No API server (offline injection): the Namespace counts as
    /// `enabled` and contributes no overrides.
    Offline,
}

/// The parts of a Pod (or Pod template) injection looks at.
#[derive(Debug, Clone, Copy)]
pub struct PodParts<'a> {
    /// The namespace the Pod is created in, when known.
    pub namespace: Option<&'a str>,
    /// Its annotations.
    pub annotations: Option<&'a BTreeMap<String, String>>,
    /// Whether the object has a `metadata` member at all (templates may not).
    pub has_metadata: bool,
    /// Its `spec`, as JSON.
    pub spec: &'a Value,
}

/// Why a Pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// In `kube-system` or `sidemesh-system`.
    SystemNamespace,
    /// Carries the marker annotation or already has the proxy.
    AlreadyInjected,
    /// Uses the node's network namespace: capturing it would capture the node.
    HostNetwork,
    /// `sidemesh.io/inject: disabled` on the Pod.
    PodDisabled,
    /// `sidemesh.io/inject: disabled` on the Namespace.
    NamespaceDisabled,
    /// Neither the Pod nor its Namespace asks for injection.
    NotEnabled,
}

impl SkipReason {
    /// The reason as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SystemNamespace => "system-namespace",
            Self::AlreadyInjected => "already-injected",
            Self::HostNetwork => "host-network",
            Self::PodDisabled => "pod-disabled",
            Self::NamespaceDisabled => "namespace-disabled",
            Self::NotEnabled => "not-enabled",
        }
    }
}

/// Why a Pod is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// An annotation value is invalid.
    #[error(transparent)]
    Annotation(#[from] InvalidAnnotation),
    /// The Pod already uses a name the injection needs.
    #[error("the Pod already has a {kind} named {name}, which sidemesh injection needs")]
    NameTaken {
        /// `volume` or `init container`.
        kind: &'static str,
        /// The name.
        name: &'static str,
    },
    /// The spec is not shaped like a Pod spec.
    #[error("the Pod spec is malformed: {0}")]
    Malformed(String),
}

impl Denial {
    /// The reason as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Annotation(_) => "invalid-annotation",
            Self::NameTaken { .. } => "name-taken",
            Self::Malformed(_) => "malformed-pod",
        }
    }
}

/// Which annotation turned injection on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectReason {
    /// `sidemesh.io/inject: enabled` on the Pod.
    PodEnabled,
    /// `sidemesh.io/inject: enabled` on the Namespace.
    NamespaceEnabled,
    /// Offline injection without a `disabled` on the template.
    Offline,
}

impl InjectReason {
    /// The reason as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PodEnabled => "pod-enabled",
            Self::NamespaceEnabled => "namespace-enabled",
            Self::Offline => "offline",
        }
    }
}

/// The outcome for one Pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Inject: apply this patch (paths relative to the Pod or template).
    Inject {
        /// The JSON Patch.
        patch: Patch,
        /// Why.
        reason: InjectReason,
        /// The settings used.
        overrides: Box<Overrides>,
    },
    /// Leave the Pod as it is.
    Skip(SkipReason),
    /// Refuse the Pod.
    Deny(Denial),
}

/// Decides and builds the patch for one Pod or Pod template.
pub fn plan(config: &InjectorConfig, pod: PodParts<'_>, namespace: NamespaceView<'_>) -> Plan {
    let ns_name = pod.namespace.or(match namespace {
        NamespaceView::Known { name, .. } | NamespaceView::Unknown(name) => Some(name),
        NamespaceView::Offline => None,
    });
    if ns_name.is_some_and(|ns| SYSTEM_NAMESPACES.contains(&ns)) {
        return Plan::Skip(SkipReason::SystemNamespace);
    }
    let Some(spec) = pod.spec.as_object() else {
        return Plan::Deny(Denial::Malformed("spec is not an object".into()));
    };
    let containers = match names(spec.get("containers"), "containers") {
        Ok(n) => n,
        Err(e) => return Plan::Deny(e),
    };
    let init_containers = match names(spec.get("initContainers"), "initContainers") {
        Ok(n) => n,
        Err(e) => return Plan::Deny(e),
    };
    if pod.annotations.is_some_and(|a| a.contains_key(annotations::INJECTED))
        || containers.contains(&PROXY_CONTAINER)
        || init_containers.contains(&PROXY_CONTAINER)
    {
        return Plan::Skip(SkipReason::AlreadyInjected);
    }
    match spec.get("hostNetwork") {
        Some(Value::Bool(true)) => return Plan::Skip(SkipReason::HostNetwork),
        None | Some(Value::Bool(false) | Value::Null) => {}
        Some(_) => return Plan::Deny(Denial::Malformed("hostNetwork is not a boolean".into())),
    }

    let pod_mode = match pod.annotations.and_then(|a| a.get(annotations::INJECT)) {
        Some(v) => match annotations::parse_inject(v, Origin::Pod) {
            Ok(m) => Some(m),
            Err(e) => return Plan::Deny(e.into()),
        },
        None => None,
    };
    let reason = match (pod_mode, namespace) {
        (Some(InjectMode::Disabled), _) => return Plan::Skip(SkipReason::PodDisabled),
        (Some(InjectMode::Enabled), _) => InjectReason::PodEnabled,
        (None, NamespaceView::Offline) => InjectReason::Offline,
        (None, NamespaceView::Unknown(_)) => return Plan::Skip(SkipReason::NotEnabled),
        (None, NamespaceView::Known { name, annotations }) => match annotations.get(annotations::INJECT) {
            None => return Plan::Skip(SkipReason::NotEnabled),
            Some(v) => match annotations::parse_inject(v, Origin::Namespace(name.to_owned())) {
                Ok(InjectMode::Enabled) => InjectReason::NamespaceEnabled,
                Ok(InjectMode::Disabled) => return Plan::Skip(SkipReason::NamespaceDisabled),
                Err(e) => return Plan::Deny(e.into()),
            },
        },
    };

    let layered = Layered {
        pod: pod.annotations,
        namespace: match namespace {
            NamespaceView::Known { name, annotations } => Some((name, annotations)),
            _ => None,
        },
    };
    let overrides = match Overrides::from_annotations(layered) {
        Ok(o) => o,
        Err(e) => return Plan::Deny(e.into()),
    };
    if init_containers.contains(&INIT_CONTAINER) {
        return Plan::Deny(Denial::NameTaken {
            kind: "init container",
            name: INIT_CONTAINER,
        });
    }
    let volumes = match names(spec.get("volumes"), "volumes") {
        Ok(n) => n,
        Err(e) => return Plan::Deny(e),
    };
    for name in [TOKEN_VOLUME, TRUST_VOLUME, XTABLES_VOLUME] {
        if volumes.contains(&name) {
            return Plan::Deny(Denial::NameTaken { kind: "volume", name });
        }
    }
    let patch = build_patch(config, &pod, spec, containers.first().copied(), &overrides);
    Plan::Inject {
        patch,
        reason,
        overrides: Box::new(overrides),
    }
}

/// [`plan`] for a Pod or Pod template given as JSON (`metadata` and `spec`);
/// `namespace` overrides the object's own `metadata.namespace`.
pub fn plan_json(config: &InjectorConfig, object: &Value, namespace: Option<&str>, view: NamespaceView<'_>) -> Plan {
    let meta: ObjectMeta = match object.get("metadata") {
        None | Some(Value::Null) => ObjectMeta::default(),
        Some(m) => match ObjectMeta::deserialize(m) {
            Ok(m) => m,
            Err(e) => return Plan::Deny(Denial::Malformed(format!("metadata: {e}"))),
        },
    };
    let no_spec = Value::Null;
    let pod = PodParts {
        namespace: namespace.or(meta.namespace.as_deref()),
        annotations: meta.annotations.as_ref(),
        has_metadata: object.get("metadata").is_some_and(Value::is_object),
        spec: object.get("spec").unwrap_or(&no_spec),
    };
    plan(config, pod, view)
}

/// The `name`s of the objects in a Pod spec list (containers, volumes).
fn names<'v>(list: Option<&'v Value>, field: &str) -> Result<Vec<&'v str>, Denial> {
    match list {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items
            .iter()
            .filter_map(|i| i.get("name").and_then(Value::as_str))
            .collect()),
        Some(_) => Err(Denial::Malformed(format!("{field} is not a list"))),
    }
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

/// The patch: prepend to or create each list, add the annotations.
fn build_patch(
    config: &InjectorConfig,
    pod: &PodParts<'_>,
    spec: &serde_json::Map<String, Value>,
    first_app_container: Option<&str>,
    overrides: &Overrides,
) -> Patch {
    let mut ops = Vec::with_capacity(8);
    let init = to_json(&init_container(config, overrides));
    let proxy = to_json(&proxy_container(config, overrides));
    let has = |field: &str| spec.get(field).is_some_and(Value::is_array);

    // initContainers: the iptables step first, then (native sidecar) the
    // proxy, so the Pod's own init containers already run behind a proxy.
    let mut firsts = vec![init];
    if overrides.native_sidecar {
        firsts.push(proxy.clone());
    }
    if has("initContainers") {
        for (i, c) in firsts.into_iter().enumerate() {
            ops.push(add(&["spec", "initContainers", &i.to_string()], c));
        }
    } else {
        ops.push(add(&["spec", "initContainers"], Value::Array(firsts)));
    }
    if !overrides.native_sidecar {
        // First in the list: the kubelet starts containers in order and runs
        // the postStart hook (wait until ready) before starting the next one.
        if has("containers") {
            ops.push(add(&["spec", "containers", "0"], proxy));
        } else {
            ops.push(add(&["spec", "containers"], Value::Array(vec![proxy])));
        }
    }
    let volumes: Vec<Value> = volumes(config).iter().map(to_json).collect();
    if has("volumes") {
        for v in volumes {
            ops.push(add(&["spec", "volumes", "-"], v));
        }
    } else {
        ops.push(add(&["spec", "volumes"], Value::Array(volumes)));
    }

    let mut marks = vec![(annotations::INJECTED, "true".to_owned())];
    if !overrides.native_sidecar
        && let Some(first) = first_app_container
        && !pod.annotations.is_some_and(|a| a.contains_key(DEFAULT_CONTAINER))
    {
        marks.push((DEFAULT_CONTAINER, first.to_owned()));
    }
    if pod.annotations.is_some() {
        for (k, v) in marks {
            ops.push(add(&["metadata", "annotations", k], Value::String(v)));
        }
    } else {
        let map: serde_json::Map<String, Value> = marks
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v)))
            .collect();
        if pod.has_metadata {
            ops.push(add(&["metadata", "annotations"], Value::Object(map)));
        } else {
            ops.push(add(&["metadata"], json!({ "annotations": map })));
        }
    }
    Patch(ops)
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    // k8s-openapi types serialise infallibly to JSON (string keys, no NaN).
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn quantity_map(pairs: &[(&str, Option<&annotations::Quantity>)]) -> Option<BTreeMap<String, Quantity>> {
    let map: BTreeMap<String, Quantity> = pairs
        .iter()
        .filter_map(|(k, q)| q.map(|q| ((*k).to_owned(), Quantity(q.text.clone()))))
        .collect();
    (!map.is_empty()).then_some(map)
}

fn quantities(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
            .collect(),
    )
}

fn join<T: ToString>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The init container: `sidemesh-proxy init`, with only the capabilities
/// iptables needs, as root (the nat table is not writable otherwise).
pub fn init_container(config: &InjectorConfig, o: &Overrides) -> Container {
    let mut args: Vec<String> = [
        "init",
        "--proxy-uid",
        &PROXY_UID.to_string(),
        "--inbound-port",
        &INBOUND_PORT.to_string(),
        "--outbound-port",
        &OUTBOUND_PORT.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (flag, value) in [
        ("--skip-inbound-ports", join(&o.skip_inbound_ports)),
        ("--skip-outbound-ports", join(&o.skip_outbound_ports)),
        ("--skip-outbound-cidrs", o.skip_outbound_cidrs.join(",")),
    ] {
        if !value.is_empty() {
            args.push(flag.to_owned());
            args.push(value);
        }
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(config.proxy_image.clone()),
        command: Some(vec!["sidemesh-proxy".to_owned()]),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: quantities(&[("cpu", "10m"), ("memory", "16Mi")]),
            limits: quantities(&[("cpu", "100m"), ("memory", "64Mi")]),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_VOLUME.to_owned(),
            mount_path: "/run".to_owned(),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32, initial_delay: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(ADMIN_PORT),
            ..Default::default()
        }),
        initial_delay_seconds: initial_delay,
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

/// The postStart hook's command: polls `/ready` on the admin port with
/// bash's `/dev/tcp` (the image needs no HTTP client), so the kubelet starts
/// the application only once the proxy holds a certificate and listens.
pub fn wait_ready_command() -> Vec<String> {
    let attempts = READY_WAIT_SECS * 10;
    let script = format!(
        "for i in $(seq {attempts}); do \
         if (exec 3<>/dev/tcp/127.0.0.1/{ADMIN_PORT} && printf 'GET /ready HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 \
         && read -r _ code _ <&3 && [ \"$code\" = 200 ]) 2>/dev/null; then exit 0; fi; sleep 0.1; done; \
         echo 'sidemesh-proxy not ready after {READY_WAIT_SECS}s' >&2; exit 1"
    );
    vec!["bash".to_owned(), "-c".to_owned(), script]
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..Default::default()
    }
}

fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The proxy container (a regular container, or a native sidecar).
pub fn proxy_container(config: &InjectorConfig, o: &Overrides) -> Container {
    let mut env_vars = vec![
        env("SIDEMESH_IDENTITY_ADDR", &config.identity_addr),
        env("SIDEMESH_DESTINATION_ADDR", &config.destination_addr),
        env("SIDEMESH_TOKEN_PATH", &format!("{TOKEN_DIR}/token")),
        env("SIDEMESH_TRUST_BUNDLE", &format!("{TRUST_DIR}/{TRUST_BUNDLE_KEY}")),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env("SIDEMESH_INBOUND_POLICY", o.inbound_policy),
    ];
    if !o.opaque_ports.is_empty() {
        env_vars.push(env("SIDEMESH_OPAQUE_PORTS", &join(&o.opaque_ports)));
    }
    env_vars.push(env("SIDEMESH_LOG", &o.log_level));
    env_vars.push(env("GLIBC_TUNABLES", PROXY_GLIBC_TUNABLES));
    let r = &o.resources;
    let mut c = Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(config.proxy_image.clone()),
        command: Some(vec!["sidemesh-proxy".to_owned()]),
        args: Some(vec!["run".to_owned()]),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("sidemesh-admin".to_owned()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        readiness_probe: Some(http_probe("/ready", 5, 3, None)),
        liveness_probe: Some(http_probe("/live", 10, 3, Some(10))),
        resources: Some(ResourceRequirements {
            requests: quantity_map(&[("cpu", r.cpu_request.as_ref()), ("memory", r.memory_request.as_ref())]),
            limits: quantity_map(&[("cpu", r.cpu_limit.as_ref()), ("memory", r.memory_limit.as_ref())]),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: TRUST_VOLUME.to_owned(),
                mount_path: TRUST_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Default::default()
    };
    if o.native_sidecar {
        // A native sidecar: started before the app's containers, its
        // startupProbe gates them, and it stops after them (Jobs complete).
        c.restart_policy = Some("Always".to_owned());
        c.startup_probe = Some(http_probe("/ready", 1, (READY_WAIT_SECS) as i32, None));
    } else {
        c.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(wait_ready_command()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    c
}

/// The volumes the proxy and init container mount.
pub fn volumes(config: &InjectorConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(3600),
                        path: "token".to_owned(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: TRUST_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: config.trust_bundle_configmap.clone(),
                items: Some(vec![KeyToPath {
                    key: TRUST_BUNDLE_KEY.to_owned(),
                    path: TRUST_BUNDLE_KEY.to_owned(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: XTABLES_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                size_limit: Some(Quantity("1Mi".to_owned())),
            }),
            ..Default::default()
        },
    ]
}
