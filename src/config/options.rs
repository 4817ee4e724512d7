//! The resolved, typed options the rest of the proxy runs on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::model::Cidr;

/// Proxy backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    /// iptables (the Linux default, also for `mode: ""`).
    Iptables,
    /// IPVS.
    Ipvs,
    /// nftables.
    Nftables,
}

impl ProxyMode {
    /// The configuration spelling (`iptables`, `ipvs`, `nftables`).
    pub fn as_str(&self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::Nftables => "nftables",
        }
    }

    /// Parses a validated mode (`""` is iptables).
    pub fn from_config(s: &str) -> Option<Self> {
        match s {
            "" | "iptables" => Some(ProxyMode::Iptables),
            "ipvs" => Some(ProxyMode::Ipvs),
            "nftables" => Some(ProxyMode::Nftables),
            _ => None,
        }
    }
}

impl fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// klog text.
    Text,
    /// JSON lines.
    Json,
}

/// How traffic from local pods is recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocal {
    /// Nothing is treated as local.
    None,
    /// Source in the cluster CIDR(s) (at most one per family).
    ClusterCidr(Vec<Cidr>),
    /// Source in the Node's podCIDRs (from the Node object).
    NodeCidr,
    /// Arriving from this bridge interface.
    BridgeInterface(String),
    /// Arriving from an interface with this name prefix.
    InterfaceNamePrefix(String),
}

/// Which node addresses accept NodePort traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address.
    All,
    /// The Node object's primary IP(s).
    Primary,
    /// Local addresses inside these prefixes.
    Cidrs(Vec<Cidr>),
}

/// IPVS options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsOptions {
    /// Scheduler (`rr` when unset).
    pub scheduler: String,
    /// Virtual server addresses never deleted.
    pub exclude_cidrs: Vec<Cidr>,
    /// arp_ignore=1, arp_announce=2.
    pub strict_arp: bool,
    /// `ipvsadm --set` TCP timeout (zero keeps the kernel value).
    pub tcp_timeout: Duration,
    /// TCP FIN timeout (zero keeps).
    pub tcp_fin_timeout: Duration,
    /// UDP timeout (zero keeps).
    pub udp_timeout: Duration,
}

/// conntrack sysctl options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackOptions {
    /// Entries per CPU (0 leaves nf_conntrack_max alone).
    pub max_per_core: i32,
    /// Floor for nf_conntrack_max.
    pub min: i32,
    /// nf_conntrack_tcp_timeout_established (zero leaves it).
    pub tcp_established_timeout: Duration,
    /// nf_conntrack_tcp_timeout_close_wait (zero leaves it).
    pub tcp_close_wait_timeout: Duration,
    /// nf_conntrack_tcp_be_liberal=1.
    pub tcp_be_liberal: bool,
    /// nf_conntrack_udp_timeout (zero leaves it).
    pub udp_timeout: Duration,
    /// nf_conntrack_udp_timeout_stream (zero leaves it).
    pub udp_stream_timeout: Duration,
}

/// Everything the proxy needs, resolved from flags and/or the config file and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyOptions {
    /// Backend.
    pub mode: ProxyMode,
    /// Node name: the override or the system hostname, trimmed and lowercased.
    pub hostname: String,
    /// kubeconfig path (`None`: in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// API server URL override (`--master`).
    pub master: Option<String>,
    /// Request content type.
    pub content_type: String,
    /// Client QPS.
    pub qps: f32,
    /// Client burst.
    pub burst: i32,
    /// The node's primary IP override (`0.0.0.0`/`::` mean "unset, pick the family").
    pub bind_address: IpAddr,
    /// Whether failing to bind the servers is fatal.
    pub bind_address_hard_fail: bool,
    /// Health check server (`None`: disabled).
    pub healthz_bind_address: Option<SocketAddr>,
    /// Metrics server (`None`: disabled).
    pub metrics_bind_address: Option<SocketAddr>,
    /// Periodic full resync for the chosen mode.
    pub sync_period: Duration,
    /// Minimum time between syncs for the chosen mode.
    pub min_sync_period: Duration,
    /// fwmark bit for SNAT (the nftables section's in nftables mode).
    pub masquerade_bit: u8,
    /// SNAT everything sent to service IPs.
    pub masquerade_all: bool,
    /// Allow NodePorts on 127.0.0.0/8 (iptables, IPv4).
    pub localhost_node_ports: bool,
    /// Cluster pod CIDRs (as configured, whatever the detect-local mode).
    pub cluster_cidrs: Vec<Cidr>,
    /// Local-traffic detection.
    pub detect_local: DetectLocal,
    /// NodePort addresses.
    pub node_port_addresses: NodePortAddresses,
    /// IPVS settings.
    pub ipvs: IpvsOptions,
    /// conntrack settings.
    pub conntrack: ConntrackOptions,
    /// OOM score adjustment.
    pub oom_score_adj: i32,
    /// Informer resync period.
    pub config_sync_period: Duration,
    /// Log verbosity (`-v`), saturated at 255.
    pub verbosity: u8,
    /// Log format.
    pub log_format: LogFormat,
    /// Per-file verbosity (`pattern=N`), in precedence order.
    pub vmodule: Vec<(String, u32)>,
    /// Log flush interval.
    pub log_flush_frequency: Duration,
    /// Serve /debug/pprof.
    pub enable_profiling: bool,
    /// Feature gates as given.
    pub feature_gates: BTreeMap<String, bool>,
    /// The `--config` file, if any (upstream exits when it changes).
    pub config_file: Option<PathBuf>,
}
