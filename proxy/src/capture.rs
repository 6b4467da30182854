//! Traffic capture: the iptables rules that send a pod's TCP through its sidecar (`remora init`).
//!
//! A [`Capture`] (from the command line) becomes one `iptables-restore` script per address family
//! ([`Capture::rules`]), applied with `--noflush` so the pod's other rules are left alone. All of
//! Remora's rules live in its own `nat` chains (`REMORA_*`), entered from one jump each in
//! `PREROUTING` (inbound) and `OUTPUT` (outbound):
//!
//! - inbound: TCP arriving for the pod is redirected to the inbound listener (15006), except the
//!   excluded ports (always the admin port, which kubelet probes and Prometheus reach directly, and
//!   the HBONE port 15008, whose tunnels the HBONE listener takes directly);
//! - outbound: TCP the pod opens is redirected to the outbound listener (15001), except traffic of
//!   the proxy's own uid and gid (1337: its upstream connections are never captured again, so there
//!   is no loop), traffic on the loopback device (the app talking to itself, by `localhost` or its own
//!   pod IP, goes straight to itself), and the excluded ports and CIDRs.
//!
//! Installing first removes whatever Remora installed before ([`cleanup`] reads `iptables-save` and
//! deletes exactly the jumps to, and the chains of, `REMORA_*`), so `remora init` can be run again
//! and `remora init --cleanup` leaves the table as it found it. UDP (DNS) is never captured.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

pub use remora_control_api::capture::{
    Cidr, Cidrs, ParseError, Ports, parse_cidr_set, parse_cidrs, parse_port_set, parse_ports,
};

/// The prefix of every chain Remora installs.
const CHAIN_PREFIX: &str = "REMORA_";
const INBOUND: &str = "REMORA_INBOUND";
const IN_REDIRECT: &str = "REMORA_IN_REDIRECT";
const OUTPUT: &str = "REMORA_OUTPUT";
const REDIRECT: &str = "REMORA_REDIRECT";

/// What `remora init` captures, and what it leaves alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// The proxy's uid (and gid): its own traffic is never captured.
    pub proxy_uid: u32,
    /// The outbound listener's port.
    pub outbound_port: u16,
    /// The inbound listener's port.
    pub inbound_port: u16,
    /// The inbound ports to capture (`*`: all).
    pub inbound_ports: Ports,
    /// Inbound ports never captured (the admin port is always among them).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// The outbound destinations to capture (`*`: all).
    pub include_outbound_cidrs: Cidrs,
    /// Outbound destinations never captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Whether to install the IPv6 rules too (with `ip6tables`): IPv6 redirected to `[::1]:15001`
    /// and `[::]:15006`, where the built-in defaults listen when IPv6 is on. `remora init` turns it
    /// on when the pod has a global IPv6 address ([`has_global_ipv6`]); off in [`Capture::default`].
    pub ipv6: bool,
}

/// The defaults of [`Capture`]: Remora's ports and uid, everything captured but the admin port.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// The admin port, never captured inbound.
pub const ADMIN_PORT: u16 = 15000;
/// The HBONE port, never captured inbound: peers' tunnels reach the HBONE listener on it directly.
pub const HBONE_PORT: u16 = 15008;

impl Default for Capture {
    fn default() -> Self {
        Capture {
            proxy_uid: DEFAULT_PROXY_UID,
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_ports: Ports::All,
            exclude_inbound_ports: vec![ADMIN_PORT, HBONE_PORT],
            exclude_outbound_ports: Vec::new(),
            include_outbound_cidrs: Cidrs::All,
            exclude_outbound_cidrs: Vec::new(),
            ipv6: false,
        }
    }
}

/// An address family, and the iptables commands for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4: `iptables`.
    V4,
    /// IPv6: `ip6tables`.
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

impl Family {
    /// The command for this family, from the IPv4 command's name (`iptables`, `iptables-legacy`,
    /// `iptables-nft`).
    pub fn command(self, iptables: &str) -> String {
        match self {
            Family::V4 => iptables.to_owned(),
            Family::V6 => format!("ip6{}", iptables.strip_prefix("ip").unwrap_or(iptables)),
        }
    }

    fn includes(self, address: IpAddr) -> bool {
        matches!((self, address), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)))
    }
}

/// Why installing or removing the rules failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// An iptables command could not be started.
    #[error("cannot run {command}: {error}")]
    Spawn {
        /// The command.
        command: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// An iptables command failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// What it printed.
        stderr: String,
    },
}

impl Capture {
    /// The families to install: IPv4, and IPv6 if asked.
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 { vec![Family::V4, Family::V6] } else { vec![Family::V4] }
    }

    /// The `iptables-restore` script for `family` (its `nat` table, to apply with `--noflush`).
    pub fn rules(&self, family: Family) -> String {
        let mut out = String::from("*nat\n");
        for chain in [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT] {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        let mut rule = |chain: &str, spec: &str| {
            let _ = writeln!(out, "-A {chain} {spec}");
        };
        rule("PREROUTING", &format!("-p tcp -j {INBOUND}"));
        rule("OUTPUT", &format!("-p tcp -j {OUTPUT}"));

        // Inbound: excluded ports first, then the captured ones.
        let mut excluded = self.exclude_inbound_ports.clone();
        excluded.sort_unstable();
        excluded.dedup();
        for port in excluded {
            rule(INBOUND, &format!("-p tcp --dport {port} -j RETURN"));
        }
        match &self.inbound_ports {
            Ports::All => rule(INBOUND, &format!("-p tcp -j {IN_REDIRECT}")),
            Ports::List(ports) => {
                for port in ports {
                    rule(INBOUND, &format!("-p tcp --dport {port} -j {IN_REDIRECT}"));
                }
            }
        }
        rule(IN_REDIRECT, &format!("-p tcp -j REDIRECT --to-ports {}", self.inbound_port));

        // Outbound: the proxy's own traffic, loopback, and the exclusions go straight out.
        let uid = self.proxy_uid;
        rule(OUTPUT, &format!("-m owner --uid-owner {uid} -j RETURN"));
        rule(OUTPUT, &format!("-m owner --gid-owner {uid} -j RETURN"));
        rule(OUTPUT, "-o lo -j RETURN");
        let mut ports = self.exclude_outbound_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        for port in ports {
            rule(OUTPUT, &format!("-p tcp --dport {port} -j RETURN"));
        }
        for cidr in self.exclude_outbound_cidrs.iter().filter(|c| family.includes(c.address)) {
            rule(OUTPUT, &format!("-d {cidr} -j RETURN"));
        }
        match &self.include_outbound_cidrs {
            Cidrs::All => rule(OUTPUT, &format!("-j {REDIRECT}")),
            Cidrs::List(cidrs) => {
                for cidr in cidrs.iter().filter(|c| family.includes(c.address)) {
                    rule(OUTPUT, &format!("-d {cidr} -j {REDIRECT}"));
                }
            }
        }
        rule(REDIRECT, &format!("-p tcp -j REDIRECT --to-ports {}", self.outbound_port));
        out.push_str("COMMIT\n");
        out
    }

    /// Installs the rules for every family, replacing any Remora installed before. `iptables` names
    /// the IPv4 command (`iptables`, or `iptables-legacy` / `iptables-nft` to pick a backend).
    pub fn install(&self, iptables: &str) -> Result<(), CaptureError> {
        for family in self.families() {
            let command = family.command(iptables);
            cleanup_family(&command)?;
            restore(&command, &self.rules(family))?;
        }
        Ok(())
    }
}

/// Where the kernel lists this network namespace's IPv6 addresses (absent when IPv6 is off).
const IF_INET6: &str = "/proc/net/if_inet6";

/// Whether this network namespace has a global IPv6 address: a dual-stack or IPv6-only pod, whose
/// IPv6 traffic would bypass the proxy without the IPv6 rules. Loopback and link-local addresses,
/// which every IPv4-only pod has, do not count.
pub fn has_global_ipv6() -> bool {
    std::fs::read_to_string(IF_INET6).is_ok_and(|text| lists_global_ipv6(&text))
}

/// Whether `/proc/net/if_inet6` text lists an address of global scope (its fourth field, `00`;
/// unique local `fd00::/8` addresses are global too).
fn lists_global_ipv6(text: &str) -> bool {
    text.lines().any(|line| line.split_whitespace().nth(3) == Some("00"))
}

/// Removes every rule and chain Remora installed, for IPv4 and (if `ipv6`) IPv6. Nothing installed:
/// nothing to do.
pub fn cleanup(iptables: &str, ipv6: bool) -> Result<(), CaptureError> {
    let families: &[Family] = if ipv6 { &[Family::V4, Family::V6] } else { &[Family::V4] };
    for family in families {
        cleanup_family(&family.command(iptables))?;
    }
    Ok(())
}

fn cleanup_family(command: &str) -> Result<(), CaptureError> {
    let saved = run(&format!("{command}-save"), &["-t", "nat"], None)?;
    let script = cleanup_rules(&saved);
    if script.is_empty() { Ok(()) } else { restore(command, &script).map(drop) }
}

/// The `iptables-restore --noflush` script that removes what Remora installed, from the output of
/// `iptables-save -t nat`: every rule jumping to a `REMORA_*` chain is deleted, then every such chain
/// flushed and deleted. Empty if none is installed.
pub fn cleanup_rules(saved: &str) -> String {
    let mut deletes = String::new();
    let mut chains = Vec::new();
    for line in saved.lines() {
        if let Some(chain) = line.strip_prefix(':').and_then(|rest| rest.split_whitespace().next()) {
            if chain.starts_with(CHAIN_PREFIX) {
                chains.push(chain.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let jumps_to_ours =
                rule.split_whitespace().skip_while(|w| *w != "-j").nth(1).is_some_and(|t| t.starts_with(CHAIN_PREFIX));
            if jumps_to_ours && !chain.starts_with(CHAIN_PREFIX) {
                let _ = writeln!(deletes, "-D {rule}");
            }
        }
    }
    if deletes.is_empty() && chains.is_empty() {
        return String::new();
    }
    let mut out = String::from("*nat\n");
    out.push_str(&deletes);
    for chain in &chains {
        let _ = writeln!(out, "-F {chain}");
    }
    for chain in &chains {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

fn restore(command: &str, script: &str) -> Result<String, CaptureError> {
    run(&format!("{command}-restore"), &["--noflush"], Some(script))
}

/// Runs `program args`, feeding it `input`; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, CaptureError> {
    let name = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| CaptureError::Spawn { command: name(), error })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|error| CaptureError::Spawn { command: name(), error })?;
    }
    let output = child.wait_with_output().map_err(|error| CaptureError::Spawn { command: name(), error })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(CaptureError::Failed { command: name(), stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned() })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn default_rules_capture_everything_but_the_proxy_loopback_admin_and_hbone() {
        let rules = Capture::default().rules(Family::V4);
        assert_eq!(
            rules,
            "*nat
:REMORA_INBOUND - [0:0]
:REMORA_IN_REDIRECT - [0:0]
:REMORA_OUTPUT - [0:0]
:REMORA_REDIRECT - [0:0]
-A PREROUTING -p tcp -j REMORA_INBOUND
-A OUTPUT -p tcp -j REMORA_OUTPUT
-A REMORA_INBOUND -p tcp --dport 15000 -j RETURN
-A REMORA_INBOUND -p tcp --dport 15008 -j RETURN
-A REMORA_INBOUND -p tcp -j REMORA_IN_REDIRECT
-A REMORA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A REMORA_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A REMORA_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A REMORA_OUTPUT -o lo -j RETURN
-A REMORA_OUTPUT -j REMORA_REDIRECT
-A REMORA_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"
        );
    }

    #[test]
    fn include_and_exclude_lists_become_rules_of_their_family() {
        let capture = Capture {
            ipv6: true,
            inbound_ports: parse_port_set("8080, 9090").unwrap(),
            exclude_inbound_ports: vec![15000, 8081, 15000],
            exclude_outbound_ports: parse_ports("5432").unwrap(),
            include_outbound_cidrs: parse_cidr_set("10.0.0.0/8,fd00::/64").unwrap(),
            exclude_outbound_cidrs: parse_cidrs("10.96.0.1, ::1/128").unwrap(),
            ..Capture::default()
        };
        let v4 = capture.rules(Family::V4);
        for line in [
            "-A REMORA_INBOUND -p tcp --dport 8081 -j RETURN\n-A REMORA_INBOUND -p tcp --dport 15000 -j RETURN\n",
            "-A REMORA_INBOUND -p tcp --dport 8080 -j REMORA_IN_REDIRECT\n-A REMORA_INBOUND -p tcp --dport 9090 -j REMORA_IN_REDIRECT\n",
            "-A REMORA_OUTPUT -p tcp --dport 5432 -j RETURN\n-A REMORA_OUTPUT -d 10.96.0.1/32 -j RETURN\n-A REMORA_OUTPUT -d 10.0.0.0/8 -j REMORA_REDIRECT\n",
        ] {
            assert!(v4.contains(line), "{line} in\n{v4}");
        }
        assert!(!v4.contains("fd00") && !v4.contains("::1"), "{v4}");
        let v6 = capture.rules(Family::V6);
        assert!(
            v6.contains("-A REMORA_OUTPUT -d ::1/128 -j RETURN\n-A REMORA_OUTPUT -d fd00::/64 -j REMORA_REDIRECT\n"),
            "{v6}"
        );
        assert!(!v6.contains("10.0.0.0"), "{v6}");
    }

    #[test]
    fn cleanup_deletes_exactly_what_remora_installed() {
        let saved = "# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:REMORA_INBOUND - [0:0]
:REMORA_OUTPUT - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A PREROUTING -p tcp -j REMORA_INBOUND
-A OUTPUT -p tcp -j REMORA_OUTPUT
-A REMORA_INBOUND -p tcp -j RETURN
COMMIT
";
        assert_eq!(
            cleanup_rules(saved),
            "*nat
-D PREROUTING -p tcp -j REMORA_INBOUND
-D OUTPUT -p tcp -j REMORA_OUTPUT
-F REMORA_INBOUND
-F REMORA_OUTPUT
-X REMORA_INBOUND
-X REMORA_OUTPUT
COMMIT
"
        );
        assert_eq!(cleanup_rules("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n"), "");
    }

    #[test]
    fn only_a_global_ipv6_address_asks_for_the_ipv6_rules() {
        let loopback_and_link = "00000000000000000000000000000001 01 80 10 80       lo\n\
                                 fe80000000000000a8c1abfffe123456 02 40 20 80     eth0\n";
        assert!(!lists_global_ipv6(loopback_and_link), "an IPv4-only pod");
        let dual_stack = format!("{loopback_and_link}fd000000000000000000000000000020 02 40 00 80     eth0\n");
        assert!(lists_global_ipv6(&dual_stack));
        assert!(!lists_global_ipv6(""), "IPv6 off");
    }

    #[test]
    fn the_ipv6_command_is_named_after_the_ipv4_one() {
        assert_eq!(Family::V6.command("iptables"), "ip6tables");
        assert_eq!(Family::V6.command("iptables-legacy"), "ip6tables-legacy");
        assert_eq!(Family::V4.command("iptables-nft"), "iptables-nft");
    }
}
