//! An independent re-derivation of upstream kube-proxy's iptables rules (IPv4 proxier), written
//! as a straight transcription of kubernetes/kubernetes:
//!
//! - `pkg/proxy/service.go` `newBaseServiceInfo` and `ServiceChangeTracker` (service ports),
//! - `pkg/proxy/endpointslicecache.go` `endpointInfoByServicePort` / `addEndpoints` /
//!   `endpointsMapFromEndpointInfo` (endpoints, sorted by "IP:port"),
//! - `pkg/proxy/topology.go` `CategorizeEndpoints` / `topologyModeFromHints`,
//! - `pkg/proxy/util/nodeport_addresses.go` `NewNodePortAddresses` / `GetNodeIPs`,
//! - `cmd/kube-proxy/app/server.go` `detectNodeIPs` and `utilnode.GetNodeHostIPs`,
//! - `pkg/proxy/iptables/proxier.go` `syncProxyRules` / `writeServiceToEndpointRules`.
//!
//! It shares no code with the crate under test: it reads the k8s-openapi objects itself and
//! computes chain names from upstream's description (base32(sha256(...))[:16]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};

/// The proxier settings the reference needs, as upstream's flags give them.
#[derive(Debug, Clone, Default)]
pub struct RefConfig {
    pub node_name: String,
    pub cluster_cidr: Option<String>,
    pub masquerade_all: bool,
    pub masquerade_bit: u32,
    /// Raw `--nodeport-addresses` entries (`["primary"]` allowed).
    pub nodeport_addresses: Vec<String>,
    pub localhost_nodeports: bool,
    pub bind_address: Option<String>,
    /// `render --node-ip`: stands for both the node's IPs and its local addresses.
    pub node_ip_flag: Vec<String>,
}

/// Go's `netutils.ParseIPSloppy` for what the generator produces: IPv4 octets may carry
/// leading zeros (read as decimal).
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if s.contains(':') {
        return s.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return None;
    }
    let mut o = [0u8; 4];
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        o[i] = p.parse::<u16>().ok().filter(|v| *v <= 255)? as u8;
    }
    Some(IpAddr::V4(Ipv4Addr::from(o)))
}

/// A parsed CIDR, network address masked as Go's `net.ParseCIDR` returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    V4(Ipv4Addr, u8),
    V6,
}

/// `netutils.ParseCIDRSloppy`.
pub fn parse_cidr_sloppy(s: &str) -> Option<Net> {
    let (ip, len) = s.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 3 {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    match parse_ip_sloppy(ip)? {
        IpAddr::V4(a) => {
            if len > 32 {
                return None;
            }
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Some(Net::V4(Ipv4Addr::from(u32::from(a) & mask), len))
        }
        IpAddr::V6(_) => (len <= 128).then_some(Net::V6),
    }
}

fn net_contains(net: (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    let mask = if net.1 == 0 {
        0
    } else {
        u32::MAX << (32 - net.1)
    };
    u32::from(ip) & mask == u32::from(net.0)
}

fn v4(s: &str) -> Option<Ipv4Addr> {
    match parse_ip_sloppy(s)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// `portProtoHash`: base32(sha256(name + proto))[:16].
fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    data_encoding::BASE32.encode(&digest)[..16].to_string()
}

/// One service port (upstream `BaseServicePortInfo` for the IPv4 family).
#[derive(Debug, Clone)]
struct SvcPort {
    /// `ns/name` or `ns/name:port`.
    name: String,
    protocol: String,
    cluster_ip: Ipv4Addr,
    port: i32,
    node_port: i32,
    external_ips: Vec<Ipv4Addr>,
    lb_vips: Vec<Ipv4Addr>,
    source_ranges: Vec<(Ipv4Addr, u8)>,
    /// Issue 7 item 8: a non-empty list none of whose entries parse still drops external
    /// traffic (upstream would open the firewall here).
    fail_closed: bool,
    affinity_seconds: Option<i32>,
    external_policy_local: bool,
    internal_policy_local: bool,
    health_check_node_port: i32,
}

impl SvcPort {
    fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.lb_vips.is_empty() || !self.external_ips.is_empty()
    }
    fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }
    fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.external_policy_local && self.externally_accessible())
    }
    fn proto(&self) -> String {
        self.protocol.to_lowercase()
    }
    fn chain(&self, prefix: &str) -> String {
        format!(
            "{prefix}{}",
            hash16(&format!("{}{}", self.name, self.proto()))
        )
    }
}

#[derive(Debug, Clone)]
struct Ep {
    ip: String,
    port: i32,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: BTreeSet<String>,
    node_hints: BTreeSet<String>,
}

impl Ep {
    fn key(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

fn is_dns_label(s: &str, first_may_be_digit: bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && (b[0].is_ascii_lowercase() || (first_may_be_digit && b[0].is_ascii_digit()))
        && b[b.len() - 1] != b'-'
}

/// IANA_SVC_NAME (validation of service port names).
fn is_port_name(s: &str) -> bool {
    s.len() <= 15
        && is_dns_label(s, true)
        && !s.starts_with('-')
        && !s.contains("--")
        && s.bytes().any(|c| c.is_ascii_lowercase())
}

/// Whether the API server would have admitted the Service (issue 7 item 2: a Service it
/// would refuse is skipped whole).
fn service_is_valid(svc: &Service) -> bool {
    let name_ok = svc
        .metadata
        .name
        .as_deref()
        .is_some_and(|n| is_dns_label(n, false));
    let ns_ok = svc
        .metadata
        .namespace
        .as_deref()
        .is_some_and(|n| is_dns_label(n, true));
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let ports_ok = ports.iter().all(|p| match p.name.as_deref() {
        None | Some("") => ports.len() == 1,
        Some(n) => is_port_name(n),
    });
    name_ok && ns_ok && ports_ok
}

/// `ServiceChangeTracker.serviceToServiceMap` + `newBaseServiceInfo`, IPv4 family.
fn service_ports(svc: &Service) -> Vec<SvcPort> {
    if !service_is_valid(svc) {
        return Vec::new();
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    // server.go: the informers select `!service.kubernetes.io/service-proxy-name` and
    // `!service.kubernetes.io/headless`.
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    if labels.contains_key("service.kubernetes.io/service-proxy-name")
        || labels.contains_key("service.kubernetes.io/headless")
    {
        return Vec::new();
    }
    let cluster_ip = spec.cluster_ip.clone().unwrap_or_default();
    // ShouldSkipService
    if cluster_ip.is_empty()
        || cluster_ip == "None"
        || spec.type_.as_deref() == Some("ExternalName")
    {
        return Vec::new();
    }
    // GetClusterIPByFamily
    let ips = spec.cluster_ips.clone().unwrap_or_default();
    let family_ip = if ips.is_empty() {
        v4(&cluster_ip)
    } else {
        ips.iter().find_map(|s| v4(s))
    };
    let Some(cluster_ip) = family_ip else {
        return Vec::new();
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let raw_external_ips = spec.external_ips.clone().unwrap_or_default();
    // apiservice.ExternallyAccessible / ExternalPolicyLocal / InternalPolicyLocal
    let externally_accessible = type_ == "LoadBalancer"
        || type_ == "NodePort"
        || (type_ == "ClusterIP" && !raw_external_ips.is_empty());
    let external_policy_local =
        externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(10800)
    });
    let external_ips: Vec<Ipv4Addr> = raw_external_ips.iter().filter_map(|s| v4(s)).collect();
    let raw_ranges = spec.load_balancer_source_ranges.clone().unwrap_or_default();
    let parsed: Vec<Net> = raw_ranges
        .iter()
        .filter_map(|r| parse_cidr_sloppy(r.trim()))
        .collect();
    let mut source_ranges: Vec<(Ipv4Addr, u8)> = parsed
        .iter()
        .filter_map(|n| match n {
            Net::V4(a, l) => Some((*a, *l)),
            Net::V6 => None,
        })
        .collect();
    // zero-masked cidr means "allow any"
    if source_ranges.iter().any(|(_, l)| *l == 0) {
        source_ranges.clear();
    }
    let fail_closed = !raw_ranges.is_empty() && parsed.is_empty();
    // The API server clears status.loadBalancer when the type leaves LoadBalancer
    // (registry/core/service/strategy.go dropTypeDependentFields), so kube-proxy never sees
    // ingress IPs on another type.
    let lb_status = if type_ == "LoadBalancer" {
        svc.status.as_ref()
    } else {
        None
    };
    let lb_vips: Vec<Ipv4Addr> = lb_status
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.clone())
        .unwrap_or_default()
        .iter()
        .filter(|i| {
            let ip = i.ip.as_deref().unwrap_or("");
            !ip.is_empty() && i.ip_mode.as_deref().is_none_or(|m| m == "VIP")
        })
        .filter_map(|i| v4(i.ip.as_deref().unwrap_or("")))
        .collect();
    let needs_health_check = type_ == "LoadBalancer" && external_policy_local;
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    spec.ports
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let port_name = p.name.clone().unwrap_or_default();
            SvcPort {
                name: if port_name.is_empty() {
                    format!("{ns}/{name}")
                } else {
                    format!("{ns}/{name}:{port_name}")
                },
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                cluster_ip,
                port: p.port,
                node_port: p.node_port.unwrap_or(0),
                external_ips: external_ips.clone(),
                lb_vips: lb_vips.clone(),
                source_ranges: source_ranges.clone(),
                fail_closed,
                affinity_seconds,
                external_policy_local,
                internal_policy_local,
                health_check_node_port: if needs_health_check {
                    spec.health_check_node_port.unwrap_or(0)
                } else {
                    0
                },
            }
        })
        .collect()
}

/// `endpointInfoByServicePort` + `addEndpoints` + `endpointsMapFromEndpointInfo` for one
/// service port: (port name, protocol) → endpoints sorted by "IP:port".
fn endpoints_for(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: &str,
    node_name: &str,
) -> Vec<Ep> {
    let mut set: BTreeMap<String, Ep> = BTreeMap::new();
    for slice in slices {
        for port in slice.ports.clone().unwrap_or_default() {
            // Upstream skips a nil name, but the API server never hands one over:
            // SetDefaults_EndpointPort makes it "" (and the protocol TCP).
            let name = port.name.as_deref().unwrap_or("");
            let Some(num) = port.port.filter(|p| *p != 0) else {
                continue;
            };
            if name != port_name || port.protocol.as_deref().unwrap_or("TCP") != protocol {
                continue;
            }
            for ep in slice.endpoints.iter().flatten() {
                let Some(addr) = ep.addresses.first() else {
                    continue;
                };
                let Some(ip) = parse_ip_sloppy(addr) else {
                    continue;
                };
                let cond = ep.conditions.clone().unwrap_or_default();
                let hints = ep.hints.clone().unwrap_or_default();
                let terminating = cond.terminating == Some(true);
                let e = Ep {
                    ip: ip.to_string(),
                    port: num,
                    local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
                    ready: cond.ready != Some(false),
                    serving: cond.serving != Some(false),
                    terminating,
                    zone_hints: hints
                        .for_zones
                        .unwrap_or_default()
                        .into_iter()
                        .map(|z| z.name)
                        .collect(),
                    node_hints: hints
                        .for_nodes
                        .unwrap_or_default()
                        .into_iter()
                        .map(|n| n.name)
                        .collect(),
                };
                let key = e.key();
                if !set.contains_key(&key) || !terminating {
                    set.insert(key, e);
                }
            }
        }
    }
    // BTreeMap iterates in key order: the same as sort.Sort(byEndpoint).
    set.into_values().collect()
}

struct Categorized {
    cluster: Vec<Ep>,
    local: Vec<Ep>,
    all_reachable: Vec<Ep>,
    has_any: bool,
}

/// `CategorizeEndpoints` (PreferSameTrafficDistribution enabled, as in the newest release).
fn categorize(eps: &[Ep], svc: &SvcPort, node_name: &str, zone: &str) -> Categorized {
    let mut topology_mode = "";
    let mut use_serving_terminating = false;
    let mut cluster = Vec::new();
    let mut local = Vec::new();
    let mut has_any = false;
    if svc.uses_cluster_endpoints() {
        topology_mode = topology_mode_from_hints(eps, node_name, zone);
        cluster = eps
            .iter()
            .filter(|e| e.ready && available_for_topology(e, topology_mode, node_name, zone))
            .cloned()
            .collect();
        if cluster.is_empty() {
            cluster = eps
                .iter()
                .filter(|e| e.serving && e.terminating)
                .cloned()
                .collect();
        }
        if !cluster.is_empty() {
            has_any = true;
        }
    }
    if !svc.uses_local_endpoints() {
        return Categorized {
            all_reachable: cluster.clone(),
            cluster,
            local,
            has_any,
        };
    }
    let (mut local_ready, mut local_st) = (false, false);
    for e in eps {
        if e.ready {
            has_any = true;
            local_ready |= e.local;
        } else if e.serving && e.terminating {
            has_any = true;
            local_st |= e.local;
        }
    }
    if local_ready {
        local = eps.iter().filter(|e| e.local && e.ready).cloned().collect();
    } else if local_st {
        use_serving_terminating = true;
        local = eps
            .iter()
            .filter(|e| e.local && e.serving && e.terminating)
            .cloned()
            .collect();
    }
    if !svc.uses_cluster_endpoints() {
        return Categorized {
            all_reachable: local.clone(),
            cluster,
            local,
            has_any,
        };
    }
    if topology_mode.is_empty() && !use_serving_terminating {
        return Categorized {
            all_reachable: cluster.clone(),
            cluster,
            local,
            has_any,
        };
    }
    let mut merged: BTreeMap<String, Ep> = BTreeMap::new();
    for e in cluster.iter().chain(local.iter()) {
        merged.insert(e.key(), e.clone());
    }
    Categorized {
        all_reachable: merged.into_values().collect(),
        cluster,
        local,
        has_any,
    }
}

fn topology_mode_from_hints(eps: &[Ep], node_name: &str, zone: &str) -> &'static str {
    let (mut for_node, mut all_node) = (false, true);
    let (mut for_zone, mut all_zone) = (false, true);
    for e in eps.iter().filter(|e| e.ready) {
        if e.node_hints.is_empty() {
            all_node = false;
        } else if e.node_hints.contains(node_name) {
            for_node = true;
        }
        if e.zone_hints.is_empty() {
            all_zone = false;
        } else if e.zone_hints.contains(zone) {
            for_zone = true;
        }
    }
    if all_node && for_node {
        return "PreferSameNode";
    }
    if all_zone && for_zone {
        return "PreferSameZone";
    }
    ""
}

fn available_for_topology(e: &Ep, mode: &str, node_name: &str, zone: &str) -> bool {
    match mode {
        "" => true,
        "PreferSameNode" => e.node_hints.contains(node_name),
        "PreferSameZone" => e.zone_hints.contains(zone),
        _ => false,
    }
}

/// `detectNodeIPs` (IPv4 entry) with `GetNodeHostIPs`; `render --node-ip` stands in for the
/// Node's addresses when given.
fn primary_node_ip(cfg: &RefConfig, node: Option<&Node>) -> Ipv4Addr {
    if let Some(b) = cfg.bind_address.as_deref().and_then(v4)
        && !b.is_unspecified()
    {
        return b;
    }
    if let Some(ip) = cfg.node_ip_flag.iter().find_map(|s| v4(s)) {
        return ip;
    }
    let addrs = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let host_ips: Vec<IpAddr> = ["InternalIP", "ExternalIP"]
        .iter()
        .flat_map(|t| {
            addrs
                .iter()
                .filter(move |a| a.type_ == *t)
                .filter_map(|a| parse_ip_sloppy(&a.address))
        })
        .collect();
    // GetNodeHostIPs keeps the first address and the first of the other family.
    host_ips
        .iter()
        .find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .unwrap_or(Ipv4Addr::LOCALHOST)
}

/// The node's local IPv4 addresses as `render` models the interfaces: `--node-ip` values if
/// given, else the Node's InternalIP/ExternalIP addresses.
fn local_addresses(cfg: &RefConfig, node: Option<&Node>) -> Vec<Ipv4Addr> {
    if !cfg.node_ip_flag.is_empty() {
        return cfg.node_ip_flag.iter().filter_map(|s| v4(s)).collect();
    }
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default()
        .iter()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| v4(&a.address))
        .collect()
}

/// `NewNodePortAddresses(IPv4, ...)`: (cidrs, matchAll, containsIPv4Loopback).
fn nodeport_addresses(strings: &[String]) -> (Vec<(Ipv4Addr, u8)>, bool, bool) {
    let mut kept: Vec<(Ipv4Addr, u8)> = strings
        .iter()
        .filter_map(|s| match parse_cidr_sloppy(s) {
            Some(Net::V4(a, l)) => Some((a, l)),
            _ => None,
        })
        .collect();
    if kept.is_empty() {
        kept.push((Ipv4Addr::UNSPECIFIED, 0));
    }
    let mut cidrs = Vec::new();
    let mut loopback = false;
    for c in kept {
        if c.0.is_loopback() || net_contains(c, Ipv4Addr::new(127, 0, 0, 1)) {
            loopback = true;
        }
        if c.1 == 0 {
            return (vec![c], true, loopback);
        }
        cidrs.push(c);
    }
    (cidrs, false, loopback)
}

struct Buf(Vec<String>);
impl Buf {
    fn w(&mut self, words: &[&str]) {
        self.0.push(words.join(" "));
    }
}

/// The iptables-restore input upstream's `syncProxyRules` writes on a full sync with no
/// pre-existing chains, for these objects.
pub fn render(
    services: &[Service],
    slices: &[EndpointSlice],
    nodes: &[Node],
    cfg: &RefConfig,
) -> String {
    let node = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(&cfg.node_name));
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get("topology.kubernetes.io/zone"))
        .cloned()
        .unwrap_or_default();
    let node_ip = primary_node_ip(cfg, node);
    // server.go: "primary" becomes the primary IP as a /32 (unless loopback).
    let np_strings: Vec<String> =
        if cfg.nodeport_addresses.len() == 1 && cfg.nodeport_addresses[0] == "primary" {
            if node_ip.is_loopback() {
                Vec::new()
            } else {
                vec![format!("{node_ip}/32")]
            }
        } else {
            cfg.nodeport_addresses.clone()
        };
    let (np_cidrs, np_match_all, np_loopback) = nodeport_addresses(&np_strings);
    let localhost_nodeports = cfg.localhost_nodeports && np_loopback;
    let mark = format!("0x{:08x}", 1u64 << cfg.masquerade_bit);
    let local_detector: Option<String> = cfg.cluster_cidr.clone();

    let mut filter_chains = Buf(Vec::new());
    let mut filter_rules = Buf(Vec::new());
    let mut nat_chains = Buf(Vec::new());
    let mut nat_rules = Buf(Vec::new());
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        filter_chains.w(&[&format!(":{c} - [0:0]")]);
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        nat_chains.w(&[&format!(":{c} - [0:0]")]);
    }
    let mm = format!("{mark}/{mark}");
    nat_rules.w(&[
        "-A",
        "KUBE-POSTROUTING",
        "-m",
        "mark",
        "!",
        "--mark",
        &mm,
        "-j",
        "RETURN",
    ]);
    nat_rules.w(&["-A", "KUBE-POSTROUTING", "-j", "MARK", "--xor-mark", &mark]);
    // render assumes iptables has --random-fully.
    nat_rules.w(&[
        "-A",
        "KUBE-POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "\"kubernetes service traffic requiring SNAT\"",
        "-j",
        "MASQUERADE",
        "--random-fully",
    ]);
    nat_rules.w(&["-A", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", &mark]);
    if localhost_nodeports {
        filter_chains.w(&[":KUBE-FIREWALL - [0:0]"]);
        filter_rules.w(&[
            "-A",
            "KUBE-FIREWALL",
            "-m",
            "comment",
            "--comment",
            "\"block incoming localnet connections\"",
            "-d",
            "127.0.0.0/8",
            "!",
            "-s",
            "127.0.0.0/8",
            "-m",
            "conntrack",
            "!",
            "--ctstate",
            "RELATED,ESTABLISHED,DNAT",
            "-j",
            "DROP",
        ]);
    }

    // svcPortMap and endpointsMap.
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if s.address_type != "IPv4" {
            continue;
        }
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        by_service.entry((ns, svc.clone())).or_default().push(s);
    }
    let mut ports: Vec<(SvcPort, Vec<Ep>)> = Vec::new();
    for svc in services {
        let key = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        let svc_slices = by_service.get(&key).cloned().unwrap_or_default();
        for sp in service_ports(svc) {
            let port_name = sp
                .name
                .split_once(':')
                .map(|x| x.1)
                .unwrap_or("")
                .to_string();
            let eps = endpoints_for(&svc_slices, &port_name, &sp.protocol, &cfg.node_name);
            ports.push((sp, eps));
        }
    }

    // Large-cluster mode: over 1000 endpoints in all drops the per-endpoint comments.
    let total: usize = ports.iter().map(|(_, e)| e.len()).sum();
    let large = total > 1000;
    for (svc, all_eps) in &ports {
        let protocol = svc.proto();
        let name = svc.name.as_str();
        let port = svc.port.to_string();
        let cip = svc.cluster_ip.to_string();
        let cat = categorize(all_eps, svc, &cfg.node_name, &zone);
        let cluster_chain = svc.chain("KUBE-SVC-");
        let uses_cluster_chain = !cat.cluster.is_empty() && svc.uses_cluster_endpoints();
        let local_chain = svc.chain("KUBE-SVL-");
        let uses_local_chain = !cat.local.is_empty() && svc.uses_local_endpoints();
        let has_endpoints = cat.has_any;
        let mut internal_chain = cluster_chain.clone();
        let mut has_internal = has_endpoints;
        if svc.internal_policy_local {
            internal_chain = local_chain.clone();
            if cat.local.is_empty() {
                has_internal = false;
            }
        }
        let mut external_policy_chain = cluster_chain.clone();
        let mut has_external = has_endpoints;
        if svc.external_policy_local {
            external_policy_chain = local_chain.clone();
            if cat.local.is_empty() {
                has_external = false;
            }
        }
        let ext_chain = svc.chain("KUBE-EXT-");
        let uses_ext_chain = has_endpoints && svc.externally_accessible();
        let fw_chain = svc.chain("KUBE-FW-");
        let mut lb_chain = ext_chain.clone();
        let uses_fw = has_endpoints
            && !svc.lb_vips.is_empty()
            && (!svc.source_ranges.is_empty() || svc.fail_closed);
        if uses_fw {
            lb_chain = fw_chain.clone();
        }
        let (mut int_target, mut int_comment) = (String::new(), String::new());
        let (mut ext_target, mut ext_comment) = (String::new(), String::new());
        if !has_endpoints {
            int_target = "REJECT".into();
            int_comment = format!("\"{name} has no endpoints\"");
            ext_target = "REJECT".into();
            ext_comment = int_comment.clone();
        } else {
            if !has_internal {
                int_target = "DROP".into();
                int_comment = format!("\"{name} has no local endpoints\"");
            }
            if !has_external {
                ext_target = "DROP".into();
                ext_comment = format!("\"{name} has no local endpoints\"");
            }
        }

        if has_internal {
            let c = format!("\"{name} cluster IP\"");
            nat_rules.w(&[
                "-A",
                "KUBE-SERVICES",
                "-m",
                "comment",
                "--comment",
                &c,
                "-m",
                &protocol,
                "-p",
                &protocol,
                "-d",
                &cip,
                "--dport",
                &port,
                "-j",
                &internal_chain,
            ]);
        } else {
            filter_rules.w(&[
                "-A",
                "KUBE-SERVICES",
                "-m",
                "comment",
                "--comment",
                &int_comment,
                "-m",
                &protocol,
                "-p",
                &protocol,
                "-d",
                &cip,
                "--dport",
                &port,
                "-j",
                &int_target,
            ]);
        }
        for eip in &svc.external_ips {
            let eip = eip.to_string();
            if has_endpoints {
                let c = format!("\"{name} external IP\"");
                nat_rules.w(&[
                    "-A",
                    "KUBE-SERVICES",
                    "-m",
                    "comment",
                    "--comment",
                    &c,
                    "-m",
                    &protocol,
                    "-p",
                    &protocol,
                    "-d",
                    &eip,
                    "--dport",
                    &port,
                    "-j",
                    &ext_chain,
                ]);
            }
            if !has_external {
                filter_rules.w(&[
                    "-A",
                    "KUBE-EXTERNAL-SERVICES",
                    "-m",
                    "comment",
                    "--comment",
                    &ext_comment,
                    "-m",
                    &protocol,
                    "-p",
                    &protocol,
                    "-d",
                    &eip,
                    "--dport",
                    &port,
                    "-j",
                    &ext_target,
                ]);
            }
        }
        for lbip in &svc.lb_vips {
            let lbip = lbip.to_string();
            if has_endpoints {
                let c = format!("\"{name} loadbalancer IP\"");
                nat_rules.w(&[
                    "-A",
                    "KUBE-SERVICES",
                    "-m",
                    "comment",
                    "--comment",
                    &c,
                    "-m",
                    &protocol,
                    "-p",
                    &protocol,
                    "-d",
                    &lbip,
                    "--dport",
                    &port,
                    "-j",
                    &lb_chain,
                ]);
            }
            if uses_fw {
                let c = format!("\"{name} traffic not accepted by {fw_chain}\"");
                filter_rules.w(&[
                    "-A",
                    "KUBE-PROXY-FIREWALL",
                    "-m",
                    "comment",
                    "--comment",
                    &c,
                    "-m",
                    &protocol,
                    "-p",
                    &protocol,
                    "-d",
                    &lbip,
                    "--dport",
                    &port,
                    "-j",
                    "DROP",
                ]);
            }
        }
        if !has_external {
            for lbip in &svc.lb_vips {
                let lbip = lbip.to_string();
                filter_rules.w(&[
                    "-A",
                    "KUBE-EXTERNAL-SERVICES",
                    "-m",
                    "comment",
                    "--comment",
                    &ext_comment,
                    "-m",
                    &protocol,
                    "-p",
                    &protocol,
                    "-d",
                    &lbip,
                    "--dport",
                    &port,
                    "-j",
                    &ext_target,
                ]);
            }
        }
        if svc.node_port != 0 {
            let np = svc.node_port.to_string();
            if has_endpoints {
                // nfacct counters are absent in a render: no localhost copy rule.
                nat_rules.w(&[
                    "-A",
                    "KUBE-NODEPORTS",
                    "-m",
                    "comment",
                    "--comment",
                    name,
                    "-m",
                    &protocol,
                    "-p",
                    &protocol,
                    "--dport",
                    &np,
                    "-j",
                    &ext_chain,
                ]);
            }
            if !has_external {
                filter_rules.w(&[
                    "-A",
                    "KUBE-EXTERNAL-SERVICES",
                    "-m",
                    "comment",
                    "--comment",
                    &ext_comment,
                    "-m",
                    "addrtype",
                    "--dst-type",
                    "LOCAL",
                    "-m",
                    &protocol,
                    "-p",
                    &protocol,
                    "--dport",
                    &np,
                    "-j",
                    &ext_target,
                ]);
            }
        }
        if svc.health_check_node_port != 0 {
            let c = format!("\"{name} health check node port\"");
            let hc = svc.health_check_node_port.to_string();
            filter_rules.w(&[
                "-A",
                "KUBE-NODEPORTS",
                "-m",
                "comment",
                "--comment",
                &c,
                "-m",
                "tcp",
                "-p",
                "tcp",
                "--dport",
                &hc,
                "-j",
                "ACCEPT",
            ]);
        }

        if has_internal {
            let c = format!("\"{name} cluster IP\"");
            let args = [
                "-m",
                "comment",
                "--comment",
                &c,
                "-m",
                &protocol,
                "-p",
                &protocol,
                "-d",
                &cip,
                "--dport",
                &port,
            ];
            if cfg.masquerade_all {
                let mut l = vec!["-A", internal_chain.as_str()];
                l.extend_from_slice(&args);
                l.extend_from_slice(&["-j", "KUBE-MARK-MASQ"]);
                nat_rules.w(&l);
            } else if let Some(cidr) = &local_detector {
                let mut l = vec!["-A", internal_chain.as_str()];
                l.extend_from_slice(&args);
                l.extend_from_slice(&["!", "-s", cidr, "-j", "KUBE-MARK-MASQ"]);
                nat_rules.w(&l);
            }
        }

        if uses_ext_chain {
            nat_chains.w(&[&format!(":{ext_chain} - [0:0]")]);
            if !svc.external_policy_local {
                let c = format!("\"masquerade traffic for {name} external destinations\"");
                nat_rules.w(&[
                    "-A",
                    &ext_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &c,
                    "-j",
                    "KUBE-MARK-MASQ",
                ]);
            } else {
                if let Some(cidr) = &local_detector {
                    let c = format!("\"pod traffic for {name} external destinations\"");
                    nat_rules.w(&[
                        "-A",
                        &ext_chain,
                        "-m",
                        "comment",
                        "--comment",
                        &c,
                        "-s",
                        cidr,
                        "-j",
                        &cluster_chain,
                    ]);
                }
                let c = format!("\"masquerade LOCAL traffic for {name} external destinations\"");
                nat_rules.w(&[
                    "-A",
                    &ext_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &c,
                    "-m",
                    "addrtype",
                    "--src-type",
                    "LOCAL",
                    "-j",
                    "KUBE-MARK-MASQ",
                ]);
                let c = format!("\"route LOCAL traffic for {name} external destinations\"");
                nat_rules.w(&[
                    "-A",
                    &ext_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &c,
                    "-m",
                    "addrtype",
                    "--src-type",
                    "LOCAL",
                    "-j",
                    &cluster_chain,
                ]);
            }
            if has_external {
                nat_rules.w(&["-A", &ext_chain, "-j", &external_policy_chain]);
            }
        }

        if uses_fw {
            nat_chains.w(&[&format!(":{fw_chain} - [0:0]")]);
            let c = format!("\"{name} loadbalancer IP\"");
            let mut allow_from_node = false;
            for r in &svc.source_ranges {
                let src = format!("{}/{}", r.0, r.1);
                nat_rules.w(&[
                    "-A",
                    &fw_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &c,
                    "-s",
                    &src,
                    "-j",
                    &ext_chain,
                ]);
                if net_contains(*r, node_ip) {
                    allow_from_node = true;
                }
            }
            if allow_from_node {
                for lbip in &svc.lb_vips {
                    let lbip = lbip.to_string();
                    nat_rules.w(&[
                        "-A",
                        &fw_chain,
                        "-m",
                        "comment",
                        "--comment",
                        &c,
                        "-s",
                        &lbip,
                        "-j",
                        &ext_chain,
                    ]);
                }
            }
            let c = format!("\"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\"");
            nat_rules.w(&["-A", &fw_chain, "-m", "comment", "--comment", &c]);
        }

        if uses_cluster_chain {
            nat_chains.w(&[&format!(":{cluster_chain} - [0:0]")]);
            write_service_to_endpoint_rules(
                &mut nat_rules,
                svc,
                &cluster_chain,
                &cat.cluster,
                large,
            );
        }
        if uses_local_chain {
            nat_chains.w(&[&format!(":{local_chain} - [0:0]")]);
            write_service_to_endpoint_rules(&mut nat_rules, svc, &local_chain, &cat.local, large);
        }
        for ep in &cat.all_reachable {
            let sep = sep_chain(svc, ep);
            nat_chains.w(&[&format!(":{sep} - [0:0]")]);
            let mut l = vec!["-A", sep.as_str()];
            if !large {
                l.extend_from_slice(&["-m", "comment", "--comment", name]);
            }
            let mut masq = l.clone();
            masq.extend_from_slice(&["-s", &ep.ip, "-j", "KUBE-MARK-MASQ"]);
            nat_rules.w(&masq);
            if svc.affinity_seconds.is_some() {
                l.extend_from_slice(&["-m", "recent", "--name", &sep, "--set"]);
            }
            let key = ep.key();
            l.extend_from_slice(&[
                "-m",
                &protocol,
                "-p",
                &protocol,
                "-j",
                "DNAT",
                "--to-destination",
                &key,
            ]);
            nat_rules.w(&l);
        }
    }

    let last = "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    if np_match_all {
        let mut l = vec![
            "-A",
            "KUBE-SERVICES",
            "-m",
            "comment",
            "--comment",
            last,
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
        ];
        if !localhost_nodeports {
            l.extend_from_slice(&["!", "-d", "127.0.0.0/8"]);
        }
        l.extend_from_slice(&["-j", "KUBE-NODEPORTS"]);
        nat_rules.w(&l);
    } else {
        // GetNodeIPs: local addresses inside any CIDR, deduplicated (map order upstream).
        let mut ips: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for c in &np_cidrs {
            for a in local_addresses(cfg, node) {
                if net_contains(*c, a) {
                    ips.insert(a);
                }
            }
        }
        for ip in ips {
            if ip.is_loopback() && !localhost_nodeports {
                continue;
            }
            let ip = ip.to_string();
            nat_rules.w(&[
                "-A",
                "KUBE-SERVICES",
                "-m",
                "comment",
                "--comment",
                last,
                "-d",
                &ip,
                "-j",
                "KUBE-NODEPORTS",
            ]);
        }
    }
    // conntrack_tcp_be_liberal is off in a render; no nfacct counters.
    filter_rules.w(&[
        "-A",
        "KUBE-FORWARD",
        "-m",
        "conntrack",
        "--ctstate",
        "INVALID",
        "-j",
        "DROP",
    ]);
    filter_rules.w(&[
        "-A",
        "KUBE-FORWARD",
        "-m",
        "comment",
        "--comment",
        "\"kubernetes forwarding rules\"",
        "-m",
        "mark",
        "--mark",
        &mm,
        "-j",
        "ACCEPT",
    ]);
    filter_rules.w(&[
        "-A",
        "KUBE-FORWARD",
        "-m",
        "comment",
        "--comment",
        "\"kubernetes forwarding conntrack rule\"",
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ]);

    let mut out = String::from("*filter\n");
    for l in filter_chains.0.iter().chain(filter_rules.0.iter()) {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("COMMIT\n*nat\n");
    for l in nat_chains.0.iter().chain(nat_rules.0.iter()) {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

fn sep_chain(svc: &SvcPort, ep: &Ep) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{}{}{}", svc.name, svc.proto(), ep.key()))
    )
}

/// `writeServiceToEndpointRules`; `large`: large-cluster mode, comments dropped.
fn write_service_to_endpoint_rules(
    rules: &mut Buf,
    svc: &SvcPort,
    chain: &str,
    eps: &[Ep],
    large: bool,
) {
    if let Some(seconds) = svc.affinity_seconds {
        let seconds = seconds.to_string();
        for ep in eps {
            let c = format!("\"{} -> {}\"", svc.name, ep.key());
            let sep = sep_chain(svc, ep);
            let mut l = vec!["-A", chain];
            if !large {
                l.extend_from_slice(&["-m", "comment", "--comment", &c]);
            }
            l.extend_from_slice(&[
                "-m",
                "recent",
                "--name",
                &sep,
                "--rcheck",
                "--seconds",
                &seconds,
                "--reap",
                "-j",
                &sep,
            ]);
            rules.w(&l);
        }
    }
    let n = eps.len();
    for (i, ep) in eps.iter().enumerate() {
        let c = format!("\"{} -> {}\"", svc.name, ep.key());
        let sep = sep_chain(svc, ep);
        let mut l = vec!["-A", chain];
        if !large {
            l.extend_from_slice(&["-m", "comment", "--comment", &c]);
        }
        let p = format!("{:.10}", 1.0 / (n - i) as f64);
        if i < n - 1 {
            l.extend_from_slice(&["-m", "statistic", "--mode", "random", "--probability", &p]);
        }
        l.extend_from_slice(&["-j", &sep]);
        rules.w(&l);
    }
}
