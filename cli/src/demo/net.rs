//! The demo's network: a "switch" namespace holding a bridge, and one
//! namespace per Pod with a veth into it — nothing in the host's own
//! namespace. Namespaces left by a demo that was killed outright are removed
//! before a new one starts.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::Context as _;

/// Pods live in 10.213.250.0/24 (the addresses of `examples/demo/mesh.yaml`).
pub const POD_PREFIX: [u8; 3] = [10, 213, 250];
const PREFIX: &str = "smdemo-";
const SWITCH: &str = "smdemo-switch";

/// The address of the Pod with last octet `octet`.
pub fn pod_ip(octet: u8) -> Ipv4Addr {
    Ipv4Addr::new(POD_PREFIX[0], POD_PREFIX[1], POD_PREFIX[2], octet)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The namespaces of one demo run, deleted on drop.
#[derive(Debug)]
pub struct Net {
    namespaces: Vec<String>,
}

impl Net {
    /// Creates the switch and the Pods `(name, last octet)`.
    pub fn create(pods: &[(&str, u8)]) -> anyhow::Result<Self> {
        remove_leftovers();
        let mut net = Self { namespaces: Vec::new() };
        ip(&["netns", "add", SWITCH])?;
        net.namespaces.push(SWITCH.to_owned());
        let gw = format!("{}/24", pod_ip(1));
        ip(&["-n", SWITCH, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", SWITCH, "addr", "add", &gw, "dev", "br0"])?;
        ip(&["-n", SWITCH, "link", "set", "br0", "up"])?;
        ip(&["-n", SWITCH, "link", "set", "lo", "up"])?;
        for (name, octet) in pods {
            let ns = net.ns(name);
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let host_end = format!("v{octet}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &host_end, "netns", SWITCH,
            ])?;
            ip(&["-n", SWITCH, "link", "set", &host_end, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", pod_ip(*octet)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &pod_ip(1).to_string()])?;
        }
        Ok(net)
    }

    /// The namespace of Pod `pod`.
    pub fn ns(&self, pod: &str) -> String {
        format!("{PREFIX}{pod}")
    }

    /// A command that runs in Pod `pod`'s network namespace (the program
    /// and its arguments follow). `nsenter --net`, not `ip netns exec`:
    /// that also gives every process its own mount namespace with /sys
    /// remounted, which nothing here needs and which makes every later
    /// `ip netns add`/`del` propagate into each copy.
    pub fn enter(&self, pod: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns(pod))).arg("--");
        cmd
    }

    /// How many namespaces exist.
    pub fn len(&self) -> usize {
        self.namespaces.len()
    }
}

fn remove_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(PREFIX)) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Pods first, the switch last; deleting a namespace removes its veths
        // and its iptables rules with it.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
