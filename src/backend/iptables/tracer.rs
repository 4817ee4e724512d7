//! Runs a packet through a parsed ruleset the way upstream's test `tracePacket` does:
//! nat PREROUTING (or KUBE-SERVICES when the dump has no PREROUTING, as in our own restore
//! input), then the DNAT, then filter KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-NODEPORTS
//! and KUBE-PROXY-FIREWALL. Probability jumps do not end a chain, so every candidate
//! endpoint is collected. Matches on history (`--rcheck`, `--mark`, `--ctstate`) never
//! match; anything not understood is assumed to match.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::backend::netfilter::names::*;
use crate::backend::netfilter::parse::{Dump, Rule};

pub use crate::backend::netfilter::trace::{Packet, Trace};

const MAX_DEPTH: usize = 64;

struct Tracer<'a> {
    dump: &'a Dump,
    local_ips: BTreeSet<IpAddr>,
    trace: Trace,
}

impl Tracer<'_> {
    fn rule_matches(&self, rule: &Rule, pkt: &Packet, dst: &IpAddr, proto: &str) -> bool {
        let addr_type = |ip: &IpAddr| {
            if self.local_ips.contains(ip) {
                "LOCAL"
            } else {
                "not-matched"
            }
        };
        let dport = pkt.dport.to_string();
        rule.source
            .as_ref()
            .is_none_or(|v| v.matches_ip(&pkt.source))
            && rule
                .src_type
                .as_ref()
                .is_none_or(|v| v.matches(addr_type(&pkt.source)))
            && rule.protocol.as_ref().is_none_or(|v| v.matches(proto))
            && rule.destination.as_ref().is_none_or(|v| v.matches_ip(dst))
            && rule
                .dst_type
                .as_ref()
                .is_none_or(|v| v.matches(addr_type(dst)))
            && rule.dport.as_ref().is_none_or(|v| v.matches(&dport))
            && rule
                .in_interface
                .as_ref()
                .is_none_or(|v| v.matches_interface(pkt.in_interface.as_deref()))
            && !rule.recent.as_ref().is_some_and(|r| r.rcheck)
            && rule.mark.is_none()
            && rule.ctstate.is_none()
    }

    /// Runs one chain; true if a terminal target was reached.
    fn run_chain(
        &mut self,
        table: &str,
        chain: &str,
        pkt: &Packet,
        dst: &IpAddr,
        depth: usize,
    ) -> bool {
        let dump = self.dump;
        let Some(c) = dump.chain(table, chain) else {
            return false;
        };
        if depth > MAX_DEPTH {
            return false;
        }
        self.trace.chains.push(format!("{table}/{chain}"));
        let proto = pkt.protocol.lower();
        for rule in &c.rules {
            let Some(target) = rule.target() else {
                continue;
            };
            if !self.rule_matches(rule, pkt, dst, proto) {
                continue;
            }
            self.trace.matched_rules.push(rule.raw.clone());
            match target {
                KUBE_MARK_MASQ => {
                    self.trace.masquerade = true;
                }
                "ACCEPT" | "REJECT" | "DROP" => {
                    self.trace.outputs.push(target.to_string());
                    return true;
                }
                "DNAT" => {
                    let to = rule.to_destination.clone().unwrap_or_default();
                    self.trace.outputs.push(to);
                    return true;
                }
                "RETURN" => return false,
                _ => {
                    let terminated = self.run_chain(table, target, pkt, dst, depth + 1);
                    if rule.goto.is_some() {
                        return terminated;
                    }
                    if terminated && rule.probability.is_none() {
                        return true;
                    }
                }
            }
        }
        false
    }
}

/// The address part of a DNAT destination (`10.0.0.1:80`, `[fd00::1]:80`, or a bare IP).
fn dnat_address(dest: &str) -> Option<IpAddr> {
    if let Ok(ip) = dest.parse() {
        return Some(ip);
    }
    if let Some(rest) = dest.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    dest.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok())
}

/// Traces `pkt` through `dump`. `node_ips` are this node's addresses (for `--src-type` and
/// `--dst-type LOCAL`); 127.0.0.1 and ::1 are always local.
pub fn trace_packet(dump: &Dump, node_ips: &[IpAddr], pkt: &Packet) -> Trace {
    let mut local_ips: BTreeSet<IpAddr> = node_ips.iter().copied().collect();
    local_ips.insert(IpAddr::V4(Ipv4Addr::LOCALHOST));
    local_ips.insert(IpAddr::V6(Ipv6Addr::LOCALHOST));
    let mut tracer = Tracer {
        dump,
        local_ips,
        trace: Trace::default(),
    };

    let start = if dump.chain("nat", "PREROUTING").is_some() {
        "PREROUTING"
    } else {
        KUBE_SERVICES
    };
    let mut dst = pkt.destination;
    tracer.run_chain("nat", start, pkt, &dst, 0);
    if let Some(first) = tracer.trace.outputs.first()
        && let Some(ip) = dnat_address(first)
    {
        dst = ip;
    }
    for chain in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        tracer.run_chain("filter", chain, pkt, &dst, 0);
    }
    tracer.trace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnat_address_forms() {
        assert_eq!(
            dnat_address("10.0.0.1:80"),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            dnat_address("[fd00::1]:80"),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(dnat_address("10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(dnat_address("junk"), None);
    }

    #[test]
    fn return_goto_and_loops() {
        let dump = Dump::parse(
            "*nat\n:KUBE-SERVICES - [0:0]\n:A - [0:0]\n:B - [0:0]\n:LOOP - [0:0]\n\
             -A KUBE-SERVICES -j LOOP\n\
             -A KUBE-SERVICES -d 1.1.1.1 -j A\n\
             -A KUBE-SERVICES -g B\n\
             -A KUBE-SERVICES -j DNAT --to-destination 9.9.9.9:9\n\
             -A LOOP -d 7.7.7.7 -j LOOP\n\
             -A A -j RETURN\n-A A -j DNAT --to-destination 2.2.2.2:2\n\
             -A B -d 3.3.3.3 -j DNAT --to-destination 3.3.3.3:3\n\
             COMMIT\n",
        )
        .unwrap();
        let ip = |s: &str| s.parse().unwrap();
        // RETURN leaves A without a result and the caller goes on; goto B ends the caller.
        let t = trace_packet(&dump, &[], &Packet::tcp(ip("5.5.5.5"), ip("1.1.1.1"), 80));
        assert_eq!(t.output(), "");
        let t = trace_packet(&dump, &[], &Packet::tcp(ip("5.5.5.5"), ip("3.3.3.3"), 80));
        assert_eq!(t.output(), "3.3.3.3:3");
        assert_eq!(t.chains, ["nat/KUBE-SERVICES", "nat/LOOP", "nat/B"]);
        // A self-referencing chain terminates.
        let t = trace_packet(&dump, &[], &Packet::tcp(ip("5.5.5.5"), ip("7.7.7.7"), 80));
        assert_eq!(t.output(), "");
    }
}
