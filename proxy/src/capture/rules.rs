//! The rule text itself: pure functions from a [`Config`] and the current nat
//! table (as `iptables-save` printed it) to `iptables-restore --noflush` input.
//!
//! Rules are written in the exact form `iptables-save` prints them back
//! (`-p tcp -m tcp --dport`, `-s` before `-o`, no `-d` for a /0), builtin
//! chains first and our chains in name order, so a fresh `--dry-run` is
//! byte-for-byte what `iptables-save -t nat` shows after the real run.

use super::config::{Config, PortRange};

/// Chain hooked from PREROUTING: decides which inbound connections go to the inbound port.
pub const CHAIN_INBOUND: &str = "SIDEMESH_INBOUND";
/// Chain that redirects to the inbound port.
pub const CHAIN_IN_REDIRECT: &str = "SIDEMESH_IN_REDIRECT";
/// Chain hooked from OUTPUT: decides which outbound connections go to the outbound port.
pub const CHAIN_OUTBOUND: &str = "SIDEMESH_OUTBOUND";
/// Chain that redirects to the outbound port.
pub const CHAIN_OUT_REDIRECT: &str = "SIDEMESH_OUT_REDIRECT";
/// Every chain whose name starts with this is ours (also those of older versions).
pub const CHAIN_PREFIX: &str = "SIDEMESH_";

/// Our chains, in the order `iptables-save` lists them.
const CHAINS: [&str; 4] = [CHAIN_INBOUND, CHAIN_IN_REDIRECT, CHAIN_OUTBOUND, CHAIN_OUT_REDIRECT];

/// The jumps from builtin chains into ours: `(chain, rule spec)`.
const HOOKS: [(&str, &str); 2] = [
    ("PREROUTING", "-p tcp -j SIDEMESH_INBOUND"),
    ("OUTPUT", "-p tcp -j SIDEMESH_OUTBOUND"),
];

/// An address family, i.e. iptables or ip6tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl Family {
    /// `IPv4` or `IPv6`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// Source address the inbound proxy may bind to when it must deliver to
    /// the Pod IP rather than to loopback (Istio's 127.0.0.6 convention).
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
}

/// One `-A` line of a saved table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    /// The chain it is in.
    pub chain: String,
    /// Everything after `-A <chain> `.
    pub spec: String,
}

/// The nat table as `iptables-save -t nat` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatState {
    /// Chain names (builtin and user-defined).
    pub chains: Vec<String>,
    /// Rules, in order.
    pub rules: Vec<SavedRule>,
}

impl NatState {
    /// Parses the `*nat` section of `iptables-save` output; other tables and comments are ignored.
    pub fn parse(save: &str) -> Self {
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if line == "COMMIT" {
                in_nat = false;
            } else if !in_nat {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    state.chains.push(name.to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                state.rules.push(SavedRule {
                    chain: chain.to_owned(),
                    spec: spec.trim().to_owned(),
                });
            }
        }
        state
    }

    /// Our chains present in the table.
    pub fn our_chains(&self) -> impl Iterator<Item = &str> {
        self.chains.iter().map(String::as_str).filter(|c| is_ours(c))
    }

    /// Rules outside our chains that jump or go to one of ours.
    fn hooks(&self) -> impl Iterator<Item = &SavedRule> {
        self.rules
            .iter()
            .filter(|r| !is_ours(&r.chain) && target(&r.spec).is_some_and(is_ours))
    }

    /// Whether anything of ours is in the table.
    pub fn has_ours(&self) -> bool {
        self.our_chains().next().is_some() || self.hooks().next().is_some()
    }
}

fn is_ours(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// The `-j`/`-g` target of a rule spec.
fn target(spec: &str) -> Option<&str> {
    let mut tokens = spec.split_whitespace();
    while let Some(t) = tokens.next() {
        if t == "-j" || t == "-g" || t == "--jump" || t == "--goto" {
            return tokens.next();
        }
    }
    None
}

/// The `iptables-restore --noflush` input that installs our rules for
/// `family` over `current`: declaring our chains creates or flushes them,
/// the jumps into them are added only when missing (stale or duplicate ones
/// are deleted), and chains of ours this version no longer uses are removed.
pub fn install(config: &Config, family: Family, current: &NatState) -> String {
    let mut out = vec!["*nat".to_owned()];
    out.extend(CHAINS.iter().map(|c| format!(":{c} - [0:0]")));

    let mut kept = [false; HOOKS.len()];
    for rule in current.hooks() {
        let wanted = HOOKS
            .iter()
            .position(|(chain, spec)| *chain == rule.chain && *spec == rule.spec);
        match wanted {
            Some(i) if !kept[i] => kept[i] = true,
            _ => out.push(format!("-D {} {}", rule.chain, rule.spec)),
        }
    }
    for ((chain, spec), kept) in HOOKS.iter().zip(kept) {
        if !kept {
            out.push(format!("-A {chain} {spec}"));
        }
    }

    out.extend(chain_rules(config, family));

    let stale: Vec<&str> = current.our_chains().filter(|c| !CHAINS.contains(c)).collect();
    out.extend(stale.iter().map(|c| format!("-F {c}")));
    out.extend(stale.iter().map(|c| format!("-X {c}")));
    out.push("COMMIT".to_owned());
    lines(out)
}

/// The `iptables-restore --noflush` input that removes the jumps into our
/// chains and our chains, touching nothing else; `None` when nothing is ours.
pub fn uninstall(current: &NatState) -> Option<String> {
    if !current.has_ours() {
        return None;
    }
    let mut out = vec!["*nat".to_owned()];
    out.extend(current.hooks().map(|r| format!("-D {} {}", r.chain, r.spec)));
    out.extend(current.our_chains().map(|c| format!("-F {c}")));
    out.extend(current.our_chains().map(|c| format!("-X {c}")));
    out.push("COMMIT".to_owned());
    Some(lines(out))
}

fn lines(out: Vec<String>) -> String {
    let mut text = out.join("\n");
    text.push('\n');
    text
}

/// The contents of our chains (see the module docs of `capture` for why).
fn chain_rules(config: &Config, family: Family) -> Vec<String> {
    let mut out = Vec::new();
    let uid = config.proxy_uid;

    // SIDEMESH_INBOUND: the proxy's own ports and the skip list go straight through.
    let mut passed: Vec<PortRange> = Vec::new();
    let own = [config.outbound_port, config.inbound_port, config.admin_port].map(PortRange::single);
    for port in own.iter().chain(&config.skip_inbound_ports) {
        if !passed.contains(port) {
            passed.push(*port);
            out.push(format!("-A {CHAIN_INBOUND} -p tcp -m tcp --dport {port} -j RETURN"));
        }
    }
    out.push(format!("-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}"));

    out.push(format!(
        "-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        config.inbound_port
    ));

    // SIDEMESH_OUTBOUND: order matters, the first matching rule decides.
    let lo = family.loopback();
    out.push(format!(
        "-A {CHAIN_OUTBOUND} -s {} -o lo -j RETURN",
        family.passthrough_source()
    ));
    out.push(format!(
        "-A {CHAIN_OUTBOUND} ! -d {lo} -o lo -m owner --uid-owner {uid} -j {CHAIN_INBOUND}"
    ));
    out.push(format!("-A {CHAIN_OUTBOUND} -m owner --uid-owner {uid} -j RETURN"));
    out.push(format!("-A {CHAIN_OUTBOUND} -d {lo} -j RETURN"));
    let cidrs = config
        .skip_outbound_cidrs
        .iter()
        .filter(|c| c.is_ipv4() == (family == Family::V4));
    for cidr in cidrs {
        if cidr.prefix == 0 {
            // iptables-save prints "-d 0.0.0.0/0" as no -d at all.
            out.push(format!("-A {CHAIN_OUTBOUND} -j RETURN"));
        } else {
            out.push(format!("-A {CHAIN_OUTBOUND} -d {cidr} -j RETURN"));
        }
    }
    for port in &config.skip_outbound_ports {
        out.push(format!("-A {CHAIN_OUTBOUND} -p tcp -m tcp --dport {port} -j RETURN"));
    }
    out.push(format!("-A {CHAIN_OUTBOUND} -p tcp -j {CHAIN_OUT_REDIRECT}"));

    out.push(format!(
        "-A {CHAIN_OUT_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        config.outbound_port
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::config::{Cidr, parse_cidr_list, parse_port_list};

    const FRESH_V4: &str = "\
*nat
:SIDEMESH_INBOUND - [0:0]
:SIDEMESH_IN_REDIRECT - [0:0]
:SIDEMESH_OUTBOUND - [0:0]
:SIDEMESH_OUT_REDIRECT - [0:0]
-A PREROUTING -p tcp -j SIDEMESH_INBOUND
-A OUTPUT -p tcp -j SIDEMESH_OUTBOUND
-A SIDEMESH_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A SIDEMESH_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A SIDEMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A SIDEMESH_INBOUND -p tcp -j SIDEMESH_IN_REDIRECT
-A SIDEMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A SIDEMESH_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN
-A SIDEMESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 1337 -j SIDEMESH_INBOUND
-A SIDEMESH_OUTBOUND -m owner --uid-owner 1337 -j RETURN
-A SIDEMESH_OUTBOUND -d 127.0.0.0/8 -j RETURN
-A SIDEMESH_OUTBOUND -p tcp -j SIDEMESH_OUT_REDIRECT
-A SIDEMESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    fn list(s: &str) -> Vec<String> {
        vec![s.to_owned()]
    }

    fn custom() -> Config {
        Config {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            skip_inbound_ports: parse_port_list("x", &list("22,4191,8000-8100")).unwrap_or_default(),
            skip_outbound_ports: parse_port_list("x", &list("3306")).unwrap_or_default(),
            skip_outbound_cidrs: parse_cidr_list("x", &list("10.96.0.0/12,0.0.0.0/0,fd00::/8")).unwrap_or_default(),
            ipv6: true,
            ..Config::default()
        }
    }

    #[test]
    fn fresh_install_defaults() {
        assert_eq!(install(&Config::default(), Family::V4, &NatState::default()), FRESH_V4);
    }

    #[test]
    fn fresh_install_ipv6_uses_v6_loopback() {
        let text = install(&Config::default(), Family::V6, &NatState::default());
        let expected = FRESH_V4
            .replace("127.0.0.6/32", "::6/128")
            .replace("127.0.0.0/8", "::1/128");
        assert_eq!(text, expected);
    }

    #[test]
    fn skip_lists_and_custom_ports() {
        let v4 = install(&custom(), Family::V4, &NatState::default());
        let v6 = install(&custom(), Family::V6, &NatState::default());
        let want_v4 = [
            "-A SIDEMESH_INBOUND -p tcp -m tcp --dport 4140 -j RETURN",
            "-A SIDEMESH_INBOUND -p tcp -m tcp --dport 4143 -j RETURN",
            "-A SIDEMESH_INBOUND -p tcp -m tcp --dport 4191 -j RETURN",
            "-A SIDEMESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
            "-A SIDEMESH_INBOUND -p tcp -m tcp --dport 8000:8100 -j RETURN",
            "-A SIDEMESH_INBOUND -p tcp -j SIDEMESH_IN_REDIRECT",
            "-A SIDEMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
            "-A SIDEMESH_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN",
            "-A SIDEMESH_OUTBOUND ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 2102 -j SIDEMESH_INBOUND",
            "-A SIDEMESH_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
            "-A SIDEMESH_OUTBOUND -d 127.0.0.0/8 -j RETURN",
            "-A SIDEMESH_OUTBOUND -d 10.96.0.0/12 -j RETURN",
            "-A SIDEMESH_OUTBOUND -j RETURN",
            "-A SIDEMESH_OUTBOUND -p tcp -m tcp --dport 3306 -j RETURN",
            "-A SIDEMESH_OUTBOUND -p tcp -j SIDEMESH_OUT_REDIRECT",
            "-A SIDEMESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 4140",
        ];
        let got: Vec<&str> = v4.lines().filter(|l| l.starts_with("-A SIDEMESH_")).collect();
        assert_eq!(got, want_v4);
        // 4191 is both the admin port and in the skip list: one rule.
        assert_eq!(v4.matches("--dport 4191 ").count(), 1);
        // Each family gets only its own CIDRs.
        assert!(v6.contains("-A SIDEMESH_OUTBOUND -d fd00::/8 -j RETURN"));
        assert!(!v6.contains("10.96.0.0/12") && !v4.contains("fd00::"));
    }

    #[test]
    fn reinstall_keeps_existing_jumps_and_deletes_duplicates() {
        let saved = format!(
            "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n\
             :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:FOREIGN - [0:0]\n{}\
             -A OUTPUT -p udp -j FOREIGN\n-A OUTPUT -p tcp -j SIDEMESH_OUTBOUND\n\
             -A OUTPUT -j SIDEMESH_OUTBOUND\n-A FOREIGN -j RETURN\nCOMMIT\n",
            FRESH_V4.replace("*nat\n", "").replace("COMMIT\n", "")
        );
        let state = NatState::parse(&saved);
        let text = install(&Config::default(), Family::V4, &state);
        assert!(!text.contains("-A PREROUTING") && !text.contains("-A OUTPUT"), "{text}");
        let deletes: Vec<&str> = text.lines().filter(|l| l.starts_with("-D")).collect();
        assert_eq!(
            deletes,
            [
                "-D OUTPUT -p tcp -j SIDEMESH_OUTBOUND",
                "-D OUTPUT -j SIDEMESH_OUTBOUND"
            ]
        );
        assert!(!text.contains("FOREIGN"));
        // The chains are redeclared (so flushed) and refilled exactly as fresh.
        let body = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with(":SIDEMESH") || l.starts_with("-A SIDEMESH"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(body(&text), body(FRESH_V4));
    }

    #[test]
    fn install_removes_stale_chains_of_ours() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:SIDEMESH_OLD - [0:0]\n-A PREROUTING -j SIDEMESH_OLD\n\
                     -A SIDEMESH_OLD -j RETURN\nCOMMIT\n";
        let text = install(&Config::default(), Family::V4, &NatState::parse(saved));
        let tail: Vec<&str> = text.lines().rev().take(4).collect();
        assert_eq!(
            tail,
            [
                "COMMIT",
                "-X SIDEMESH_OLD",
                "-F SIDEMESH_OLD",
                "-A SIDEMESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
            ]
        );
        assert!(text.contains("-D PREROUTING -j SIDEMESH_OLD\n"));
    }

    #[test]
    fn uninstall_removes_only_ours() {
        let saved = format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:FOREIGN - [0:0]\n{}\
             -A PREROUTING -p udp -j FOREIGN\n-A FOREIGN -j SIDEMESH_INBOUND\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n\
             -A INPUT -j SIDEMESH_NOT_NAT\nCOMMIT\n",
            FRESH_V4
                .replace("*nat\n", "")
                .replace("COMMIT\n", "")
                .replace("-A PREROUTING", "-A PREROUTING -s 10.0.0.0/8 -j ACCEPT\n-A PREROUTING")
        );
        let text = uninstall(&NatState::parse(&saved)).unwrap_or_default();
        let expected = "\
*nat
-D PREROUTING -p tcp -j SIDEMESH_INBOUND
-D OUTPUT -p tcp -j SIDEMESH_OUTBOUND
-D FOREIGN -j SIDEMESH_INBOUND
-F SIDEMESH_INBOUND
-F SIDEMESH_IN_REDIRECT
-F SIDEMESH_OUTBOUND
-F SIDEMESH_OUT_REDIRECT
-X SIDEMESH_INBOUND
-X SIDEMESH_IN_REDIRECT
-X SIDEMESH_OUTBOUND
-X SIDEMESH_OUT_REDIRECT
COMMIT
";
        assert_eq!(text, expected);
        assert_eq!(uninstall(&NatState::default()), None);
        let foreign_only = "*nat\n:PREROUTING ACCEPT [0:0]\n:FOREIGN - [0:0]\n-A PREROUTING -j FOREIGN\nCOMMIT\n";
        assert_eq!(uninstall(&NatState::parse(foreign_only)), None);
    }

    #[test]
    fn parse_ignores_comments_and_other_tables() {
        let state = NatState::parse(
            "# Warning: iptables-legacy tables present\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n\
             *nat\n:OUTPUT ACCEPT [3:180]\n-A OUTPUT -d 10.0.0.0/8 -j RETURN\nCOMMIT\n",
        );
        assert_eq!(state.chains, ["OUTPUT"]);
        assert_eq!(
            state.rules,
            [SavedRule {
                chain: "OUTPUT".to_owned(),
                spec: "-d 10.0.0.0/8 -j RETURN".to_owned()
            }]
        );
    }

    #[test]
    fn cidr_zero_prefix_omits_destination() {
        let config = Config {
            skip_outbound_cidrs: vec![Cidr {
                addr: std::net::Ipv6Addr::UNSPECIFIED.into(),
                prefix: 0,
            }],
            ..Config::default()
        };
        let v6 = install(&config, Family::V6, &NatState::default());
        assert!(v6.contains("\n-A SIDEMESH_OUTBOUND -j RETURN\n"));
    }
}
