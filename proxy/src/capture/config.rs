//! The validated configuration of `init`, parsed from the raw flag strings so
//! that every bad value becomes one error naming the flag and the value.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::CaptureError;

/// A TCP destination port or an inclusive range of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (equal to `first` for a single port).
    pub last: u16,
}

impl PortRange {
    /// A single port.
    pub const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }
}

impl fmt::Display for PortRange {
    /// The iptables `--dport` form: `80` or `8000:8100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// An address block, stored with its host bits cleared (as iptables prints it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Whether this is an IPv4 block.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which iptables variant to program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The variant that already holds rules, else what `iptables` is.
    Auto,
    /// iptables-nft (the nf_tables kernel API).
    Nft,
    /// iptables-legacy (the x_tables kernel API).
    Legacy,
}

/// Everything `init` needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// UID the proxy runs as; its traffic is never redirected outbound.
    pub proxy_uid: u32,
    /// Port the inbound listener owns.
    pub inbound_port: u16,
    /// Port the outbound listener owns.
    pub outbound_port: u16,
    /// Port the admin server owns (probes, Prometheus); never captured.
    pub admin_port: u16,
    /// Inbound destination ports delivered straight to the application.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports that bypass the proxy.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destinations that bypass the proxy (both families).
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Also program ip6tables.
    pub ipv6: bool,
    /// Which iptables variant.
    pub mode: Mode,
}

impl Default for Config {
    /// The DESIGN.md defaults.
    fn default() -> Self {
        Self {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
            ipv6: false,
            mode: Mode::Auto,
        }
    }
}

/// The error for one entry of a list: names the entry when the list has several.
fn invalid_item(flag: &'static str, value: &str, item: &str, reason: &str) -> CaptureError {
    if value.trim() == item {
        invalid(flag, value, reason)
    } else {
        invalid(flag, value, format!("entry {item:?}: {reason}"))
    }
}

fn invalid(flag: &'static str, value: &str, reason: impl Into<String>) -> CaptureError {
    CaptureError::InvalidFlag {
        flag,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a port number (1-65535).
pub fn parse_port(flag: &'static str, value: &str) -> Result<u16, CaptureError> {
    parse_port_number(value.trim()).ok_or_else(|| invalid(flag, value, "not a port number (1-65535)"))
}

fn parse_port_number(s: &str) -> Option<u16> {
    // u16::from_str accepts a leading '+', which no port list should contain.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Parses a UID.
pub fn parse_uid(flag: &'static str, value: &str) -> Result<u32, CaptureError> {
    let s = value.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(flag, value, "not a numeric user id"));
    }
    s.parse::<u32>()
        .map_err(|_| invalid(flag, value, "not a numeric user id (0-4294967295)"))
}

/// Splits repeated, comma-separated flag values into trimmed items; an
/// entirely empty value means "none", an empty item inside a list is an error.
fn items<'a>(flag: &'static str, values: &'a [String]) -> Result<Vec<(&'a str, &'a str)>, CaptureError> {
    let mut out = Vec::new();
    for value in values {
        if value.trim().is_empty() {
            continue;
        }
        for item in value.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(invalid(flag, value, "empty entry in the comma-separated list"));
            }
            out.push((value.as_str(), item));
        }
    }
    Ok(out)
}

/// Parses comma lists of ports and ranges (`80,8000-8100`; `8000:8100` too).
pub fn parse_port_list(flag: &'static str, values: &[String]) -> Result<Vec<PortRange>, CaptureError> {
    let mut out: Vec<PortRange> = Vec::new();
    for (value, item) in items(flag, values)? {
        let range = match item.split_once(['-', ':']) {
            None => parse_port_number(item).map(PortRange::single),
            Some((a, b)) => match (parse_port_number(a.trim()), parse_port_number(b.trim())) {
                (Some(first), Some(last)) if first <= last => Some(PortRange { first, last }),
                (Some(_), Some(_)) => {
                    return Err(invalid_item(flag, value, item, "the range ends before it starts"));
                }
                _ => None,
            },
        };
        let range =
            range.ok_or_else(|| invalid_item(flag, value, item, "not a port number (1-65535) or a range A-B"))?;
        if !out.contains(&range) {
            out.push(range);
        }
    }
    Ok(out)
}

/// Parses comma lists of IPv4/IPv6 addresses and CIDR blocks.
pub fn parse_cidr_list(flag: &'static str, values: &[String]) -> Result<Vec<Cidr>, CaptureError> {
    let mut out: Vec<Cidr> = Vec::new();
    for (value, item) in items(flag, values)? {
        let cidr = parse_cidr(item).map_err(|why| invalid_item(flag, value, item, why))?;
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok(out)
}

fn parse_cidr(item: &str) -> Result<Cidr, &'static str> {
    let (addr, prefix) = match item.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (item, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| "not an IP address or CIDR block")?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err("the prefix length is not a number");
            }
            match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ if max == 32 => return Err("the prefix length is above 32, the maximum for IPv4"),
                _ => return Err("the prefix length is above 128, the maximum for IPv6"),
            }
        }
    };
    Ok(Cidr {
        addr: mask(addr, prefix),
        prefix,
    })
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// Parses `auto`, `nft` or `legacy`.
pub fn parse_mode(flag: &'static str, value: &str) -> Result<Mode, CaptureError> {
    match value.trim() {
        "auto" => Ok(Mode::Auto),
        "nft" => Ok(Mode::Nft),
        "legacy" => Ok(Mode::Legacy),
        _ => Err(invalid(flag, value, "not one of auto, nft, legacy")),
    }
}

/// Rejects configurations whose ports collide (the proxy could not listen).
pub fn check_ports(config: &Config) -> Result<(), CaptureError> {
    let named = [
        ("--inbound-port", config.inbound_port),
        ("--outbound-port", config.outbound_port),
        ("--admin-port", config.admin_port),
    ];
    for (i, (flag, port)) in named.iter().enumerate() {
        if let Some((other, _)) = named[..i].iter().find(|(_, p)| p == port) {
            return Err(invalid(flag, &port.to_string(), format!("the same port as {other}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> Vec<String> {
        vec![s.to_owned()]
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("--inbound-port", "15006").ok(), Some(15006));
        assert_eq!(parse_port("--inbound-port", " 80 ").ok(), Some(80));
        for bad in ["70000", "0", "", "-1", "+80", "8o", "65536", "1e3"] {
            let err = parse_port("--inbound-port", bad).err().map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(
                err.contains("--inbound-port") && err.contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn port_lists() {
        let got = parse_port_list("--skip-inbound-ports", &list("80, 8000-8100,9000:9001,80")).ok();
        assert_eq!(
            got,
            Some(vec![
                PortRange::single(80),
                PortRange {
                    first: 8000,
                    last: 8100
                },
                PortRange {
                    first: 9000,
                    last: 9001
                }
            ])
        );
        assert_eq!(parse_port_list("--skip-inbound-ports", &list("")).ok(), Some(vec![]));
        let two = vec!["80".to_owned(), "81".to_owned()];
        assert_eq!(
            parse_port_list("--skip-inbound-ports", &two).map(|v| v.len()).ok(),
            Some(2)
        );
        for bad in ["80,70000", "80,,81", "8100-8000", "a-b", "80-", "garbage", "80,"] {
            let err = parse_port_list("--skip-inbound-ports", &list(bad))
                .err()
                .map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(
                err.contains("--skip-inbound-ports") && err.contains(bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn cidrs() {
        let got = parse_cidr_list(
            "--skip-outbound-cidrs",
            &list("10.0.0.0/8,192.168.1.7,10.1.2.3/16,fd00::1/8"),
        )
        .ok()
        .unwrap_or_default();
        let text: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.0.0.0/8", "192.168.1.7/32", "10.1.0.0/16", "fd00::/8"]);
        let all = parse_cidr_list("--skip-outbound-cidrs", &list("0.0.0.0/0,::/0")).ok();
        assert_eq!(all.map(|v| v.len()), Some(2));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0",
            "garbage",
            "10.0.0.0/-1",
        ] {
            let err = parse_cidr_list("--skip-outbound-cidrs", &list(bad))
                .err()
                .map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(
                err.contains("--skip-outbound-cidrs") && err.contains(bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn uid_and_mode() {
        assert_eq!(parse_uid("--proxy-uid", "1337").ok(), Some(1337));
        assert!(parse_uid("--proxy-uid", "-5").is_err());
        assert!(parse_uid("--proxy-uid", "99999999999").is_err());
        assert_eq!(parse_mode("--iptables-mode", "legacy").ok(), Some(Mode::Legacy));
        assert!(parse_mode("--iptables-mode", "ebpf").is_err());
    }

    #[test]
    fn colliding_ports() {
        let config = Config {
            outbound_port: 15006,
            ..Config::default()
        };
        let err = check_ports(&config).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("--outbound-port") && err.contains("--inbound-port"),
            "{err}"
        );
        assert!(check_ports(&Config::default()).is_ok());
    }
}
