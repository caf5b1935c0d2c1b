//! OTLP/gRPC export settings from the standard `OTEL_*` variables, the
//! resource every signal carries, and the small runtime the exporters run on.
//!
//! The exporters' gRPC channels live on a dedicated thread with its own
//! current-thread tokio runtime rather than on the component's runtime: the
//! SDK's periodic metric reader and batch span processor export from their
//! own threads and block on the result, so a channel driven by the
//! component's runtime could deadlock a current-thread runtime (the proxy's
//! default) at shutdown, and encoding and sending would compete with the
//! proxy's data plane on its one thread.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithTonicConfig as _;
use opentelemetry_sdk::Resource;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::TelemetryError;
use crate::logging::non_empty_env;

/// A signal exported over OTLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Metrics,
    Traces,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Metrics => "METRICS",
            Self::Traces => "TRACES",
        }
    }

    /// `OTEL_METRICS_EXPORTER` / `OTEL_TRACES_EXPORTER`.
    fn exporter_var(self) -> &'static str {
        match self {
            Self::Metrics => "OTEL_METRICS_EXPORTER",
            Self::Traces => "OTEL_TRACES_EXPORTER",
        }
    }
}

/// Whether `OTEL_SDK_DISABLED` turns all OpenTelemetry export off.
pub(crate) fn sdk_disabled() -> bool {
    non_empty_env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// A signal-specific variable, else its generic `OTEL_EXPORTER_OTLP_*` form.
fn signal_env(signal: Signal, suffix: &str) -> Option<String> {
    non_empty_env(&format!("OTEL_EXPORTER_OTLP_{}_{suffix}", signal.name()))
        .or_else(|| non_empty_env(&format!("OTEL_EXPORTER_OTLP_{suffix}")))
}

/// Whether `signal` is exported over OTLP: an endpoint is set, and neither
/// `OTEL_SDK_DISABLED` nor `OTEL_<SIGNAL>_EXPORTER` says otherwise. Errors
/// name the variable that is wrong.
pub(crate) fn enabled(signal: Signal) -> Result<bool, TelemetryError> {
    if sdk_disabled() {
        return Ok(false);
    }
    if let Some(exporters) = non_empty_env(signal.exporter_var()) {
        let list: Vec<&str> = exporters.split(',').map(str::trim).collect();
        for e in &list {
            // `prometheus` names the admin endpoint's page, which is always served.
            if !matches!(*e, "otlp" | "none" | "prometheus" | "console") {
                return Err(TelemetryError::Config(format!(
                    "{}={exporters:?}: sidemesh exports otlp (or none)",
                    signal.exporter_var()
                )));
            }
        }
        if !list.contains(&"otlp") {
            return Ok(false);
        }
    }
    if signal_env(signal, "ENDPOINT").is_none() {
        return Ok(false);
    }
    if let Some(protocol) = signal_env(signal, "PROTOCOL")
        && protocol != "grpc"
    {
        return Err(TelemetryError::Config(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={protocol:?}: sidemesh exports OTLP over gRPC only (grpc)"
        )));
    }
    Ok(true)
}

/// TLS settings for an `https` endpoint from `OTEL_EXPORTER_OTLP[_<SIGNAL>]_CERTIFICATE`
/// (CA bundle) and `…_CLIENT_CERTIFICATE` / `…_CLIENT_KEY` (client identity).
pub(crate) fn tls_config(signal: Signal) -> Result<Option<ClientTlsConfig>, TelemetryError> {
    let endpoint = signal_env(signal, "ENDPOINT").unwrap_or_default();
    let read = |var: &str, path: String| {
        std::fs::read(&path).map_err(|e| TelemetryError::Config(format!("{var}={path:?}: {e}")))
    };
    let ca = signal_env(signal, "CERTIFICATE");
    if !endpoint.starts_with("https://") {
        return Ok(None);
    }
    let Some(ca) = ca else {
        return Err(TelemetryError::Config(format!(
            "OTLP endpoint {endpoint:?} is https: set OTEL_EXPORTER_OTLP_CERTIFICATE to the CA bundle that signs the collector's certificate"
        )));
    };
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("OTEL_EXPORTER_OTLP_CERTIFICATE", ca)?));
    match (
        signal_env(signal, "CLIENT_CERTIFICATE"),
        signal_env(signal, "CLIENT_KEY"),
    ) {
        (Some(cert), Some(key)) => {
            let cert = read("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert)?;
            let key = read("OTEL_EXPORTER_OTLP_CLIENT_KEY", key)?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => {
            return Err(TelemetryError::Config(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together".into(),
            ));
        }
    }
    Ok(Some(tls))
}

/// The resource of every signal: `OTEL_RESOURCE_ATTRIBUTES` and
/// `OTEL_SERVICE_NAME` as the SDK reads them, `service.name` defaulting to the
/// component, and a `service.instance.id` when none is given, so that the
/// series of many proxies stay apart after OTLP → Prometheus (where it
/// becomes the `instance` label): `<namespace>/<pod>` in Kubernetes (the
/// hostname is the Pod's name), `<hostname>/<pid>` elsewhere.
pub(crate) fn resource(service_name: &'static str) -> Resource {
    let attrs = non_empty_env("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let given = |key: &str| {
        attrs
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .any(|(k, _)| k.trim() == key)
    };
    let mut builder = Resource::builder();
    if non_empty_env("OTEL_SERVICE_NAME").is_none() && !given("service.name") {
        builder = builder.with_service_name(service_name);
    }
    if !given("service.instance.id") {
        builder = builder.with_attribute(KeyValue::new("service.instance.id", instance_id()));
    }
    builder.build()
}

fn instance_id() -> String {
    let host = non_empty_env("POD_NAME")
        .or_else(|| non_empty_env("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "localhost".to_owned());
    if non_empty_env("KUBERNETES_SERVICE_HOST").is_some() {
        format!("{}/{host}", non_empty_env("POD_NAMESPACE").unwrap_or_default())
    } else {
        format!("{host}/{}", std::process::id())
    }
}

/// The thread the exporters' gRPC channels run on; stops when the last
/// handle is dropped (after the providers that use it have shut down).
#[derive(Debug)]
pub(crate) struct ExportRuntime {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ExportRuntime {
    /// Starts the thread.
    pub(crate) fn start() -> Result<Arc<Self>, TelemetryError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TelemetryError::Config(format!("starting the OTLP export runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| TelemetryError::Config(format!("starting the OTLP export thread: {e}")))?;
        Ok(Arc::new(Self { handle, _stop: stop }))
    }

    /// Builds the metric exporter on this runtime.
    pub(crate) fn metric_exporter(&self) -> Result<opentelemetry_otlp::MetricExporter, TelemetryError> {
        let _entered = self.handle.enter();
        let mut builder = opentelemetry_otlp::MetricExporter::builder().with_tonic();
        if let Some(tls) = tls_config(Signal::Metrics)? {
            builder = builder.with_tls_config(tls);
        }
        builder
            .build()
            .map_err(|e| TelemetryError::Config(format!("OTLP metrics exporter: {e}")))
    }

    /// Builds the span exporter on this runtime.
    pub(crate) fn span_exporter(&self) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
        let _entered = self.handle.enter();
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(tls) = tls_config(Signal::Traces)? {
            builder = builder.with_tls_config(tls);
        }
        builder
            .build()
            .map_err(|e| TelemetryError::Config(format!("OTLP span exporter: {e}")))
    }
}
