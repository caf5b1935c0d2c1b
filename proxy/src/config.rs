//! Proxy settings: every `SIDEMESH_*` variable of DESIGN.md, each with its
//! matching flag. An empty variable counts as unset.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use sidemesh_identity_client::settings::IdentityArgs;
use sidemesh_telemetry::flags::parse_duration;

/// Ports whose servers speak first (SMTP, MySQL, PostgreSQL, Redis, …): never
/// wait for the client's first bytes there. Linkerd's default list.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 4567, 4568, 5432, 6379, 9300, 11211];

/// Inbound policy for plaintext and foreign TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundPolicy {
    /// Plaintext accepted, marked unauthenticated.
    Permissive,
    /// mTLS from mesh peers only.
    Strict,
}

/// Whether the data plane records metrics and spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TelemetryMode {
    /// Request, TCP, TLS and retry metrics, and spans when exported (the default).
    On,
    /// Nothing recorded on the data path (a baseline for measuring telemetry's cost);
    /// process and certificate gauges are still served.
    Off,
}

/// `sidemesh-proxy run` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Identity settings shared with other workloads.
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Destination service `host:port`; unset = no discovery, forward to original destinations.
    #[arg(long, env = "SIDEMESH_DESTINATION_ADDR")]
    pub destination_addr: Option<String>,
    /// SPIFFE ID the destination server must present [default: spiffe://<td>/ns/sidemesh-system/sa/sidemesh-destination].
    #[arg(long, env = "SIDEMESH_DESTINATION_SERVER_ID")]
    pub destination_server_id: Option<String>,
    /// Inbound listener.
    #[arg(long, env = "SIDEMESH_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,
    /// Outbound listener.
    #[arg(long, env = "SIDEMESH_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    /// Admin listener (/ready, /live, /metrics, /debug/state, POST /shutdown).
    #[arg(long, env = "SIDEMESH_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,
    /// `permissive` or `strict`.
    #[arg(long, env = "SIDEMESH_INBOUND_POLICY", value_enum, default_value = "permissive")]
    pub inbound_policy: InboundPolicy,
    /// Extra ports proxied as plain TCP without protocol detection (comma list).
    #[arg(long, env = "SIDEMESH_OPAQUE_PORTS", value_delimiter = ',', value_parser = parse_port)]
    pub opaque_ports: Vec<u16>,
    /// Where inbound traffic is delivered: an IP (the original port is kept)
    /// or `ip:port` (everything to that port; for proxies without iptables).
    #[arg(long, env = "SIDEMESH_APP_ADDR", default_value = "127.0.0.1", value_parser = parse_app_addr)]
    pub app_addr: AppAddr,
    /// Runtime worker threads.
    #[arg(long, env = "SIDEMESH_WORKERS", default_value = "1")]
    pub workers: usize,
    /// Drain time on SIGTERM.
    #[arg(long, env = "SIDEMESH_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// How long to wait for a client's first bytes before treating the connection as opaque.
    #[arg(long, env = "SIDEMESH_DETECT_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub detect_timeout: Duration,
    /// A destination no connection follows and nobody asked for this long is
    /// forgotten and unsubscribed (the next connection to it asks again).
    #[arg(long, env = "SIDEMESH_DISCOVERY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub discovery_idle_timeout: Duration,
    /// A pooled HTTP/2 connection to a peer proxy that no request took for
    /// this long (up to twice this) is closed (0s: never).
    #[arg(long, env = "SIDEMESH_MESH_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub mesh_idle_timeout: Duration,
    /// `on` or `off`: data-plane metrics and spans.
    #[arg(long, env = "SIDEMESH_TELEMETRY", value_enum, default_value = "on")]
    pub telemetry: TelemetryMode,
    /// A counter or histogram series that has not changed for this long leaves `/metrics` (0s: never).
    #[arg(long, env = "SIDEMESH_METRICS_IDLE_EXPIRY", default_value = "10m", value_parser = parse_duration)]
    pub metrics_idle_expiry: Duration,
}

/// Where inbound traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppAddr {
    /// The application's address.
    pub ip: std::net::IpAddr,
    /// A fixed port, or `None` for the connection's original port.
    pub port: Option<u16>,
}

fn parse_app_addr(s: &str) -> Result<AppAddr, String> {
    if let Ok(ip) = s.parse() {
        return Ok(AppAddr { ip, port: None });
    }
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() > 0 => Ok(AppAddr {
            ip: a.ip(),
            port: Some(a.port()),
        }),
        _ => Err(format!("{s:?} is neither an IP address nor ip:port")),
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    let s = s.trim();
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

impl ProxyArgs {
    /// All opaque ports: the defaults and the configured ones.
    pub fn opaque_port_set(&self) -> BTreeSet<u16> {
        DEFAULT_OPAQUE_PORTS.iter().chain(&self.opaque_ports).copied().collect()
    }
}
