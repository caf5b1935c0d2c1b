//! Traces: a tracer provider exporting spans over OTLP/gRPC when the standard
//! variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_TRACES_EXPORTER=none` turns it
//! off), W3C trace context in HTTP headers, and the sampler of
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
//!
//! The default sampler differs from the SDK's on purpose: a mesh proxy sits
//! on every request of every application, so it follows the caller's
//! decision (`traceparent` with the sampled flag) and never starts a trace on
//! its own — `parentbased_always_off`. Requests without trace context then
//! cost nothing.

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::TelemetryError;
use crate::logging::non_empty_env;
use crate::otlp::{self, ExportRuntime, Signal};

/// The W3C `traceparent` header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What a request's `traceparent` says, read without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// No header, or one that is not a valid version-00 `traceparent`.
    None,
    /// A valid parent with the sampled flag.
    Sampled,
    /// A valid parent without it.
    NotSampled,
}

/// Reads the `traceparent` header: `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
pub fn parent(headers: &HeaderMap) -> Parent {
    let Some(v) = headers.get(TRACEPARENT) else {
        return Parent::None;
    };
    let b = v.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|c| *c != b'0');
    // Later versions may append fields; version 00 has exactly 55 bytes.
    let ok = b.len() >= 55
        && (b.len() == 55 || b[0..2] != *b"00")
        && b[0..2] != *b"ff"
        && hex(&b[0..2])
        && b[2] == b'-'
        && hex(&b[3..35])
        && nonzero(&b[3..35])
        && b[35] == b'-'
        && hex(&b[36..52])
        && nonzero(&b[36..52])
        && b[52] == b'-'
        && hex(&b[53..55]);
    if !ok {
        return Parent::None;
    }
    let flags = u8::from_str_radix(std::str::from_utf8(&b[53..55]).unwrap_or("00"), 16).unwrap_or(0);
    if flags & 1 == 1 {
        Parent::Sampled
    } else {
        Parent::NotSampled
    }
}

/// Reads trace context from HTTP headers.
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes trace context into HTTP headers.
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// The root sampler of `OTEL_TRACES_SAMPLER`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Root {
    On,
    Off,
    Ratio(f64),
}

/// `OTEL_TRACES_SAMPLER` as understood.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SamplerChoice {
    parent_based: bool,
    root: Root,
}

impl SamplerChoice {
    fn from_env() -> Result<Self, TelemetryError> {
        let name = non_empty_env("OTEL_TRACES_SAMPLER").unwrap_or_else(|| "parentbased_always_off".to_owned());
        let ratio = || -> Result<f64, TelemetryError> {
            let arg = non_empty_env("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|| "1.0".to_owned());
            match arg.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(TelemetryError::Config(format!(
                    "OTEL_TRACES_SAMPLER_ARG={arg:?} is not a ratio between 0 and 1"
                ))),
            }
        };
        let (parent_based, root) = match name.trim() {
            "always_on" => (false, Root::On),
            "always_off" => (false, Root::Off),
            "traceidratio" => (false, Root::Ratio(ratio()?)),
            "parentbased_always_on" => (true, Root::On),
            "parentbased_always_off" => (true, Root::Off),
            "parentbased_traceidratio" => (true, Root::Ratio(ratio()?)),
            other => {
                return Err(TelemetryError::Config(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                )));
            }
        };
        Ok(Self { parent_based, root })
    }

    fn sampler(self) -> Sampler {
        let root = match self.root {
            Root::On => Sampler::AlwaysOn,
            Root::Off => Sampler::AlwaysOff,
            Root::Ratio(r) => Sampler::TraceIdRatioBased(r),
        };
        if self.parent_based {
            Sampler::ParentBased(Box::new(root))
        } else {
            root
        }
    }
}

/// The process's tracer, when spans are exported.
#[derive(Debug, Clone)]
pub struct Traces {
    // Declared first so it drops (and flushes) before the export runtime it uses.
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    choice: SamplerChoice,
    _rt: Arc<ExportRuntime>,
}

/// A span being recorded; ends with [`ActiveSpan::finish`] (or when dropped).
#[derive(Debug)]
pub struct ActiveSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl ActiveSpan {
    /// Ends the span with `attributes`, its name (e.g. `GET shop/reviews`),
    /// and an error status when `error` (per the HTTP conventions: 5xx on
    /// servers, 4xx and 5xx on clients).
    pub fn finish(mut self, name: Option<String>, attributes: &[KeyValue], error: bool) {
        if let Some(name) = name {
            self.span.update_name(name);
        }
        self.span.set_attributes(attributes.iter().cloned());
        if error {
            self.span.set_status(Status::error(""));
        }
        self.span.end();
    }
}

impl Traces {
    /// The tracer of `OTEL_*`, or `None` when traces are not exported.
    pub fn from_env(service_name: &'static str) -> Result<Option<Self>, TelemetryError> {
        let choice = SamplerChoice::from_env()?;
        if !otlp::enabled(Signal::Traces)? {
            return Ok(None);
        }
        let rt = ExportRuntime::start()?;
        let exporter = rt.span_exporter()?;
        let provider = SdkTracerProvider::builder()
            .with_resource(otlp::resource(service_name))
            .with_sampler(choice.sampler())
            .with_batch_exporter(exporter)
            .build();
        let tracer = provider.tracer(service_name);
        tracing::info!(sampler = ?choice, "exporting spans over OTLP");
        Ok(Some(Self {
            provider,
            tracer,
            choice,
            _rt: rt,
        }))
    }

    /// Starts a span of `kind` for a request with `headers`, continuing the
    /// trace context they carry, when the sampler records it; the headers
    /// then carry the new span as parent. Without a recorded span nothing is
    /// touched: the `traceparent` passes on as it came.
    pub fn start(&self, headers: &mut HeaderMap, kind: SpanKind, name: &'static str) -> Option<ActiveSpan> {
        let parent = parent(headers);
        // The common cases decided without the SDK: no context and roots never
        // sampled, or a parent that says "not sampled" to a parent-based sampler.
        match parent {
            Parent::None if self.choice.root == Root::Off => return None,
            Parent::NotSampled if self.choice.parent_based => return None,
            _ => {}
        }
        let propagator = TraceContextPropagator::new();
        let cx = if parent == Parent::None {
            Context::new()
        } else {
            propagator.extract(&HeaderExtractor(headers))
        };
        let span = self
            .tracer
            .span_builder(Cow::Borrowed(name))
            .with_kind(kind)
            .start_with_context(&self.tracer, &cx);
        if !span.span_context().is_sampled() {
            return None;
        }
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        propagator.inject_context(&cx, &mut HeaderInjector(headers));
        Some(ActiveSpan { span })
    }

    /// Exports what is left and stops; see [`crate::Metrics::shutdown`].
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => tracing::debug!("spans flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing spans over OTLP"),
            Err(e) => tracing::warn!(error = %e, "flushing spans over OTLP"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_str(tp).expect("header"));
        h
    }

    #[test]
    fn traceparent_is_read_strictly() {
        assert_eq!(parent(&HeaderMap::new()), Parent::None);
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parent(&headers(ok)), Parent::Sampled);
        assert_eq!(parent(&headers(&ok.replace("-01", "-00"))), Parent::NotSampled);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert_eq!(parent(&headers(bad)), Parent::None, "{bad}");
        }
        assert_eq!(
            parent(&headers(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"
            )),
            Parent::Sampled,
            "a later version may carry more fields"
        );
    }
}
