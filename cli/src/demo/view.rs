//! The demo's live view and final summary, from the frontend's snapshots:
//! what its users saw (requests, answers, latency, which backend answered)
//! and what its proxy reports (attempts before retries, retries, budget,
//! identities, certificate).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::app::Snapshot;

/// Sum of the samples of `name` whose labels contain every `needle`.
fn metric(text: &str, name: &str, needles: &[&str]) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.split(['{', ' ']).next() != Some(name) || !needles.iter().all(|n| line.contains(n)) {
            continue;
        }
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
            found = true;
        }
    }
    found.then_some(sum)
}

/// Attempts that succeeded over all attempts, from the proxy's metrics.
fn success_before_retries(metrics: &str) -> Option<f64> {
    let all = metric(metrics, "sidemesh_http_attempts_total", &["reviews"])?;
    let ok = metric(
        metrics,
        "sidemesh_http_attempts_total",
        &["reviews", "http_response_status_code=\"2"],
    )
    .unwrap_or(0.0);
    (all > 0.0).then(|| ok / all)
}

/// The view's state: the latest snapshot and the one a second before.
#[derive(Debug, Default)]
pub struct View {
    prev: Option<Snapshot>,
    cur: Snapshot,
}

fn pct(part: f64, whole: f64) -> String {
    if whole > 0.0 {
        format!("{:.2}%", 100.0 * part / whole)
    } else {
        "-".into()
    }
}

impl View {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a new snapshot.
    pub fn update(&mut self, snap: Snapshot) {
        self.prev = Some(std::mem::replace(&mut self.cur, snap));
    }

    /// Whole seconds of load so far.
    pub fn seconds(&self) -> u64 {
        self.cur.elapsed as u64
    }

    fn rps(&self) -> f64 {
        match &self.prev {
            Some(p) if self.cur.elapsed > p.elapsed => {
                (self.cur.requests - p.requests.min(self.cur.requests)) as f64 / (self.cur.elapsed - p.elapsed)
            }
            _ => 0.0,
        }
    }

    fn shares(&self) -> BTreeMap<String, f64> {
        let ok: u64 = self.cur.by_backend.values().sum();
        self.cur
            .by_backend
            .iter()
            .map(|(k, v)| (k.clone(), if ok > 0 { *v as f64 / ok as f64 } else { 0.0 }))
            .collect()
    }

    fn edges(&self) -> Vec<String> {
        let state = &self.cur.state;
        let me = state["identity"].as_str().unwrap_or("?");
        let mut lines = Vec::new();
        for t in state["discovery"]["targets"].as_array().into_iter().flatten() {
            let service = t["service"].as_str().unwrap_or("-");
            let mut ids: Vec<String> = Vec::new();
            let eps = t["endpoints"].as_array().into_iter().flatten();
            let backends = t["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|b| b["endpoints"].as_array().into_iter().flatten());
            for ep in eps.chain(backends) {
                if let Some(id) = ep["identity"].as_str().filter(|s| !s.is_empty()) {
                    let id = id.to_owned();
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            lines.push(format!(
                "{me} → {service}: {}",
                if ids.is_empty() { "-".into() } else { ids.join(", ") }
            ));
        }
        lines
    }

    fn certificate(&self) -> String {
        let c = &self.cur.state["certificate"];
        let secs = c["expires_in_seconds"].as_u64().unwrap_or(0);
        let short = |v: &serde_json::Value| {
            v.as_str()
                .map(|s| s.chars().take(12).collect::<String>())
                .unwrap_or_default()
        };
        format!(
            "expires in {}h{:02}m, issuer {}…, root {}…",
            secs / 3600,
            (secs % 3600) / 60,
            short(&c["issuer_fingerprint"]),
            short(&c["root_fingerprint"])
        )
    }

    /// The full-screen view.
    pub fn render(&self) -> String {
        let c = &self.cur;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "sidemesh demo — network-namespace Pods, iptables capture, mTLS between proxies   t={:.0}s\n",
            c.elapsed
        );
        let _ = writeln!(
            out,
            "route shop/reviews-canary → reviews-v1 80 / reviews-v2 20, 2 retries on 503 (reviews-v2 fails 15%)"
        );
        let _ = writeln!(
            out,
            "  {:<12} {:<10} {:<24} {:<10} {:<10} {:<8} budget exhausted",
            "requests/s", "success", "success before retries", "p50", "p99", "retries"
        );
        let before = success_before_retries(&c.metrics)
            .map(|s| format!("{:.2}%", 100.0 * s))
            .unwrap_or_else(|| "n/a".into());
        let retries = metric(&c.metrics, "sidemesh_retries_total", &[])
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "n/a".into());
        let exhausted = metric(&c.metrics, "sidemesh_retry_budget_exhausted_total", &[])
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "0".into());
        let _ = writeln!(
            out,
            "  {:<12.1} {:<10} {:<24} {:<10} {:<10} {:<8} {}",
            self.rps(),
            pct(c.ok as f64, c.requests as f64),
            before,
            format!("{:.2} ms", c.p50_ms),
            format!("{:.2} ms", c.p99_ms),
            retries,
            exhausted
        );
        let _ = writeln!(out, "\n  backend          share     answers");
        for (name, share) in self.shares() {
            let _ = writeln!(
                out,
                "  {:<16} {:<9} {}",
                name,
                format!("{:.1}%", 100.0 * share),
                c.by_backend.get(&name).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "\nTCP shop/ratings:9000 (opaque, mTLS)   exchanges ok {}   failed {}",
            c.tcp_ok, c.tcp_failed
        );
        let _ = writeln!(out, "\nmTLS edges (client identity → service: server identities)");
        for e in self.edges() {
            let _ = writeln!(out, "  {e}");
        }
        let _ = writeln!(
            out,
            "  backends saw the client as: {}",
            if c.client_id.is_empty() { "-" } else { &c.client_id }
        );
        let _ = writeln!(out, "\nfrontend certificate: {}", self.certificate());
        out
    }

    /// One line, for a non-terminal output.
    pub fn line(&self) -> String {
        let c = &self.cur;
        format!(
            "t={:.0}s rps={:.0} success={} p99={:.1}ms shares={:?}",
            c.elapsed,
            self.rps(),
            pct(c.ok as f64, c.requests as f64),
            c.p99_ms,
            self.shares()
                .iter()
                .map(|(k, v)| format!("{k}={:.1}%", 100.0 * v))
                .collect::<Vec<_>>()
        )
    }

    /// The final summary: stable `key=value` lines a script (or a test) can read.
    pub fn summary(&self) -> String {
        let c = &self.cur;
        let mut out = String::from("\nsummary\n");
        let _ = writeln!(
            out,
            "requests={} ok={} success={}",
            c.requests,
            c.ok,
            pct(c.ok as f64, c.requests as f64)
        );
        if let Some(s) = success_before_retries(&c.metrics) {
            let _ = writeln!(out, "success_before_retries={:.2}%", 100.0 * s);
        }
        for (name, share) in self.shares() {
            let _ = writeln!(out, "share {name}={:.1}%", 100.0 * share);
        }
        let _ = writeln!(out, "tcp ok={} failed={}", c.tcp_ok, c.tcp_failed);
        let _ = writeln!(out, "identity frontend={}", c.state["identity"].as_str().unwrap_or("-"));
        let _ = writeln!(
            out,
            "identity seen-by-backends={}",
            if c.client_id.is_empty() { "-" } else { &c.client_id }
        );
        for e in self.edges() {
            let _ = writeln!(out, "edge {e}");
        }
        let _ = writeln!(out, "certificate {}", self.certificate());
        out
    }
}
