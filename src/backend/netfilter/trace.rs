//! What both packet tracers (iptables' and nftables', after upstream's test tracers) take and
//! report.

use std::net::IpAddr;

use crate::model::Protocol;

/// A packet to trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub source: IpAddr,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination address.
    pub destination: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// Input interface, for `-i` / `iifname` matches (interface-based local detection);
    /// `None` matches no positive one.
    pub in_interface: Option<String>,
}

impl Packet {
    /// A TCP packet with no known input interface.
    pub fn tcp(source: IpAddr, destination: IpAddr, dport: u16) -> Self {
        Packet {
            source,
            protocol: Protocol::Tcp,
            destination,
            dport,
            in_interface: None,
        }
    }
}

/// What happened to a packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// Terminal results in order: DNAT destinations (`ip:port`) or `ACCEPT`/`DROP`/`REJECT`.
    pub outputs: Vec<String>,
    /// Whether the masquerade mark was set (iptables: KUBE-MARK-MASQ hit; nftables:
    /// `nat-postrouting` masqueraded).
    pub masquerade: bool,
    /// Every matched rule, in order (iptables: its raw text; nftables: `chain: rule`).
    pub matched_rules: Vec<String>,
    /// Every chain entered, in order (iptables: `table/chain`).
    pub chains: Vec<String>,
}

impl Trace {
    /// Upstream's output string: outputs joined with `", "` (empty when nothing matched).
    pub fn output(&self) -> String {
        self.outputs.join(", ")
    }
}
