//! Pure rendering of one sync: the `iptables-restore` input upstream's `syncProxyRules`
//! writes (pkg/proxy/iptables/proxier.go), for IPv4, in upstream's chain and rule order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub use crate::backend::netfilter::LocalDetector;
use crate::backend::netfilter::names::{self, *};
use crate::backend::netfilter::{self, NFACCT_CT_STATE_INVALID, NFACCT_LOCALHOST_NODEPORTS};
use crate::model::{
    Categorized, Cidr, Endpoint, ProxyModel, ServiceName, ServicePort, categorize_endpoints,
};

/// Settings that shape the rules (flags and probed host facts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    /// `--iptables-masquerade-bit`: mark = `1 << bit`, written `%#08x` (`0x00004000`).
    pub masquerade_bit: u8,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--detect-local-mode` and its parameter.
    pub local_detector: LocalDetector,
    /// `--nodeport-addresses` (both families allowed; IPv6 ones are ignored). `None`, an
    /// empty list, a list without IPv4 CIDRs, or one holding `0.0.0.0/0` mean "all local
    /// addresses" (`-m addrtype --dst-type LOCAL`).
    pub node_port_addresses: Option<Vec<Cidr>>,
    /// The host's interface addresses, used to expand `node_port_addresses` into one
    /// `-d IP` rule per matching address.
    pub node_ips: Vec<IpAddr>,
    /// The node IP of this family (upstream `nodeIP`): loadBalancerSourceRanges that
    /// contain it also admit traffic sourced from the LB IPs; `snat_to_node_ip` uses it.
    pub primary_node_ip: Option<IpAddr>,
    /// `--iptables-localhost-nodeports` (forced off when `node_port_addresses` excludes
    /// 127.0.0.0/8, as upstream's constructor does).
    pub localhost_node_ports: bool,
    /// `iptables` supports `--random-fully` (upstream probes the binary).
    pub random_fully: bool,
    /// `iptables.snatNodeInternalIP`: SNAT to `primary_node_ip` instead of MASQUERADE
    /// (ignored without a non-loopback node IP).
    pub snat_to_node_ip: bool,
    /// `net.netfilter.nf_conntrack_tcp_be_liberal` is set: omit the ctstate INVALID drop.
    pub conntrack_tcp_be_liberal: bool,
    /// The `ct_state_invalid_dropped_pkts` nfacct counter exists.
    pub nfacct_ct_state_invalid: bool,
    /// The `localhost_nps_accepted_pkts` nfacct counter exists.
    pub nfacct_localhost_nodeports: bool,
    /// Above this many endpoints, per-endpoint comments are dropped (upstream: 1000).
    pub large_cluster_threshold: usize,
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            masquerade_bit: 14,
            masquerade_all: false,
            local_detector: LocalDetector::None,
            node_port_addresses: None,
            node_ips: Vec::new(),
            primary_node_ip: None,
            localhost_node_ports: true,
            random_fully: false,
            snat_to_node_ip: false,
            conntrack_tcp_be_liberal: false,
            nfacct_ct_state_invalid: false,
            nfacct_localhost_nodeports: false,
            large_cluster_threshold: LARGE_CLUSTER_THRESHOLD,
        }
    }
}

/// Upstream `largeClusterEndpointsThreshold`.
pub const LARGE_CLUSTER_THRESHOLD: usize = 1000;

pub use crate::host::NodePortDestinations;

impl RenderConfig {
    /// The masquerade mark as upstream formats it (`fmt.Sprintf("%#08x", 1<<bit)`).
    pub fn masquerade_mark(&self) -> String {
        netfilter::masquerade_mark(self.masquerade_bit)
    }

    /// The IPv4 node-port prefixes (`None`: every local address).
    fn ipv4_node_port_cidrs(&self) -> Option<Vec<Cidr>> {
        let given = self.node_port_addresses.clone().unwrap_or_default();
        crate::host::node_port_cidrs(&crate::config::NodePortAddresses::Cidrs(given), None)
    }

    /// Upstream `NodePortAddresses.ContainsIPv4Loopback`.
    pub fn node_port_addresses_contain_loopback(&self) -> bool {
        crate::host::contains_ipv4_loopback(self.ipv4_node_port_cidrs().as_deref())
    }

    /// Localhost node ports as actually in effect.
    pub fn effective_localhost_node_ports(&self) -> bool {
        self.localhost_node_ports && self.node_port_addresses_contain_loopback()
    }

    /// Upstream `NodePortAddresses.MatchAll` / `GetNodeIPs` (IPv4).
    pub fn node_port_destinations(&self) -> NodePortDestinations {
        crate::host::node_port_destinations(self.ipv4_node_port_cidrs().as_deref(), &self.node_ips)
    }

    /// Takes this sync's node facts: primary node IP, node-port addresses, localhost node
    /// ports and the local-traffic detector.
    pub fn apply_node_facts(&mut self, facts: &crate::host::NodeFacts) {
        self.primary_node_ip = facts.primary_ip;
        self.node_port_addresses = facts.node_port_cidrs.clone();
        self.localhost_node_ports = facts.localhost_node_ports;
        self.local_detector = facts.local_detector.clone();
    }
}

/// Which per-service chains a sync rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncScope<'a> {
    /// Write every chain.
    Full,
    /// KEP-3453 partial sync: only the SVC/SVL/EXT/FW/SEP chains of these services.
    Partial {
        /// Services whose Service or EndpointSlices changed since the last sync.
        changed: &'a BTreeSet<ServiceName>,
    },
}

/// Everything one render needs.
#[derive(Debug, Clone, Copy)]
pub struct RenderInput<'a> {
    /// The desired state (one family).
    pub model: &'a ProxyModel,
    /// Settings.
    pub config: &'a RenderConfig,
    /// Full or partial sync.
    pub scope: SyncScope<'a>,
    /// Chains now in the kernel's nat table (from `iptables-save -t nat`), to delete stale
    /// service chains. `None` skips stale-chain deletion (upstream does so in large-cluster
    /// mode until a sync period has passed, or when iptables-save failed).
    pub existing_nat_chains: Option<&'a BTreeSet<String>>,
}

/// The output of one render.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    /// The whole `iptables-restore --noflush` input (`*filter … COMMIT *nat … COMMIT`).
    pub text: String,
    /// `sync_proxy_rules_iptables_total{table="filter"}` (= rules written).
    pub filter_rules: usize,
    /// `sync_proxy_rules_iptables_total{table="nat"}`: rules written plus rules of skipped
    /// services, minus `-X` lines.
    pub nat_rules: usize,
    /// `sync_proxy_rules_iptables_last{table="nat"}`: nat rules actually written.
    pub nat_rules_written: usize,
    /// Per-service nat chains that exist after this sync (written or not).
    pub active_nat_chains: BTreeSet<String>,
    /// Stale chains deleted by this restore.
    pub deleted_chains: Vec<String>,
    /// Services with internalTrafficPolicy Local and no local endpoints.
    pub no_local_endpoints_internal: usize,
    /// Services with externalTrafficPolicy Local and no local endpoints.
    pub no_local_endpoints_external: usize,
    /// Health-check node port and local ready endpoint count of each LoadBalancer service
    /// with externalTrafficPolicy Local.
    pub health_check_node_ports: BTreeMap<ServiceName, (u16, usize)>,
    /// Whether large-cluster mode was in effect.
    pub large_cluster: bool,
}

fn chain_line(name: &str) -> String {
    format!(":{name} - [0:0]")
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

/// Upstream `computeProbability`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

struct Lines(Vec<String>);

impl Lines {
    fn push<S: AsRef<str>>(&mut self, words: &[S]) {
        let mut line = String::new();
        for (i, w) in words.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            line.push_str(w.as_ref());
        }
        self.0.push(line);
    }
}

macro_rules! words {
    ($($e:expr),* $(,)?) => {{
        let mut v: Vec<String> = Vec::new();
        $( v.extend(IntoWords::into_words($e)); )*
        v
    }};
}

trait IntoWords {
    fn into_words(self) -> Vec<String>;
}
impl IntoWords for &str {
    fn into_words(self) -> Vec<String> {
        vec![self.to_string()]
    }
}
impl IntoWords for String {
    fn into_words(self) -> Vec<String> {
        vec![self]
    }
}
impl IntoWords for &String {
    fn into_words(self) -> Vec<String> {
        vec![self.clone()]
    }
}
impl IntoWords for Vec<String> {
    fn into_words(self) -> Vec<String> {
        self
    }
}
impl IntoWords for &Vec<String> {
    fn into_words(self) -> Vec<String> {
        self.clone()
    }
}

/// Renders one sync.
pub fn render(input: &RenderInput) -> Rendered {
    let cfg = input.config;
    let model = input.model;
    let mark = cfg.masquerade_mark();
    let mark_match = format!("{mark}/{mark}");
    let localhost_node_ports = cfg.effective_localhost_node_ports();
    let detector = &cfg.local_detector;

    let mut out = Rendered::default();
    let mut filter_chains = Lines(Vec::new());
    let mut filter_rules = Lines(Vec::new());
    let mut nat_chains = Lines(Vec::new());
    let mut nat_rules = Lines(Vec::new());
    let mut skipped_nat_rules = 0usize;

    for c in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        filter_chains.0.push(chain_line(c));
    }
    for c in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        nat_chains.0.push(chain_line(c));
    }

    nat_rules.push(&words![
        "-A",
        KUBE_POSTROUTING,
        "-m",
        "mark",
        "!",
        "--mark",
        &mark_match,
        "-j",
        "RETURN"
    ]);
    nat_rules.push(&words![
        "-A",
        KUBE_POSTROUTING,
        "-j",
        "MARK",
        "--xor-mark",
        &mark
    ]);
    let mut masq = words![
        "-A",
        KUBE_POSTROUTING,
        "-m",
        "comment",
        "--comment",
        quoted("kubernetes service traffic requiring SNAT"),
    ];
    match cfg
        .primary_node_ip
        .filter(|ip| cfg.snat_to_node_ip && !ip.is_loopback())
    {
        Some(ip) => masq.extend(words!["-j", "SNAT", "--to-source", ip.to_string()]),
        None => masq.extend(words!["-j", "MASQUERADE"]),
    }
    if cfg.random_fully {
        masq.push("--random-fully".into());
    }
    nat_rules.push(&masq);
    nat_rules.push(&words![
        "-A",
        KUBE_MARK_MASQ,
        "-j",
        "MARK",
        "--or-mark",
        &mark
    ]);

    if localhost_node_ports {
        filter_chains.0.push(chain_line(KUBE_FIREWALL));
        filter_rules.push(&words![
            "-A",
            KUBE_FIREWALL,
            "-m",
            "comment",
            "--comment",
            quoted("block incoming localnet connections"),
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

    let total_endpoints: usize = model
        .services
        .keys()
        .map(|n| model.endpoints_of(n).len())
        .sum();
    let large = total_endpoints > cfg.large_cluster_threshold;
    out.large_cluster = large;

    for (name, svc) in &model.services {
        let proto = name.protocol.lower();
        let name_str = name.to_string();
        let cat = categorize(svc, model);
        let cluster_chain = names::service_chain(name);
        let local_chain = names::local_service_chain(name);
        let ext_chain = names::external_chain(name);
        let fw_chain = names::firewall_chain(name);
        let has_endpoints = cat.has_any;
        let uses_cluster_chain = !cat.cluster.is_empty() && uses_cluster_endpoints(svc);
        let uses_local_chain = !cat.local.is_empty() && svc.uses_local_endpoints();

        let (internal_chain, has_internal) = if svc.internal_policy_local {
            (&local_chain, has_endpoints && !cat.local.is_empty())
        } else {
            (&cluster_chain, has_endpoints)
        };
        let (external_policy_chain, has_external) = if svc.external_policy_local {
            (&local_chain, has_endpoints && !cat.local.is_empty())
        } else {
            (&cluster_chain, has_endpoints)
        };
        let uses_ext_chain = has_endpoints && svc.externally_accessible();
        let uses_fw_chain =
            has_endpoints && !svc.load_balancer_ips.is_empty() && svc.source_ranges.restricts();
        let lb_chain = if uses_fw_chain { &fw_chain } else { &ext_chain };

        let (internal_target, internal_comment, external_target, external_comment);
        if !has_endpoints {
            internal_target = "REJECT";
            internal_comment = quoted(&format!("{name_str} has no endpoints"));
            external_target = "REJECT";
            external_comment = internal_comment.clone();
        } else {
            internal_target = "DROP";
            external_target = "DROP";
            internal_comment = quoted(&format!("{name_str} has no local endpoints"));
            external_comment = internal_comment.clone();
            if !has_internal {
                out.no_local_endpoints_internal += 1;
            }
            if !has_external {
                out.no_local_endpoints_external += 1;
            }
        }

        let port = svc.port.to_string();
        let cluster_ip = svc.cluster_ip.to_string();
        let proto_match = words!["-m", proto, "-p", proto];

        // ClusterIP.
        if has_internal {
            nat_rules.push(&words![
                "-A",
                KUBE_SERVICES,
                "-m",
                "comment",
                "--comment",
                quoted(&format!("{name_str} cluster IP")),
                &proto_match,
                "-d",
                &cluster_ip,
                "--dport",
                &port,
                "-j",
                internal_chain,
            ]);
        } else {
            filter_rules.push(&words![
                "-A",
                KUBE_SERVICES,
                "-m",
                "comment",
                "--comment",
                &internal_comment,
                &proto_match,
                "-d",
                &cluster_ip,
                "--dport",
                &port,
                "-j",
                internal_target,
            ]);
        }

        // External IPs.
        for ip in &svc.external_ips {
            let ip = ip.to_string();
            if has_endpoints {
                nat_rules.push(&words![
                    "-A",
                    KUBE_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!("{name_str} external IP")),
                    &proto_match,
                    "-d",
                    &ip,
                    "--dport",
                    &port,
                    "-j",
                    &ext_chain,
                ]);
            }
            if !has_external {
                filter_rules.push(&words![
                    "-A",
                    KUBE_EXTERNAL_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &external_comment,
                    &proto_match,
                    "-d",
                    &ip,
                    "--dport",
                    &port,
                    "-j",
                    external_target,
                ]);
            }
        }

        // Load-balancer ingress IPs.
        for ip in &svc.load_balancer_ips {
            let ip = ip.to_string();
            if has_endpoints {
                nat_rules.push(&words![
                    "-A",
                    KUBE_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!("{name_str} loadbalancer IP")),
                    &proto_match,
                    "-d",
                    &ip,
                    "--dport",
                    &port,
                    "-j",
                    lb_chain,
                ]);
            }
            if uses_fw_chain {
                filter_rules.push(&words![
                    "-A",
                    KUBE_PROXY_FIREWALL,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!("{name_str} traffic not accepted by {fw_chain}")),
                    &proto_match,
                    "-d",
                    &ip,
                    "--dport",
                    &port,
                    "-j",
                    "DROP",
                ]);
            }
        }
        if !has_external {
            for ip in &svc.load_balancer_ips {
                filter_rules.push(&words![
                    "-A",
                    KUBE_EXTERNAL_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &external_comment,
                    &proto_match,
                    "-d",
                    ip.to_string(),
                    "--dport",
                    &port,
                    "-j",
                    external_target,
                ]);
            }
        }

        // Node port.
        if svc.node_port != 0 {
            let node_port = svc.node_port.to_string();
            if has_endpoints {
                if localhost_node_ports && cfg.nfacct_localhost_nodeports {
                    nat_rules.push(&words![
                        "-A",
                        KUBE_NODEPORTS,
                        "-m",
                        "comment",
                        "--comment",
                        &name_str,
                        &proto_match,
                        "-d",
                        "127.0.0.0/8",
                        "--dport",
                        &node_port,
                        "-m",
                        "nfacct",
                        "--nfacct-name",
                        NFACCT_LOCALHOST_NODEPORTS,
                        "-j",
                        &ext_chain,
                    ]);
                }
                nat_rules.push(&words![
                    "-A",
                    KUBE_NODEPORTS,
                    "-m",
                    "comment",
                    "--comment",
                    &name_str,
                    &proto_match,
                    "--dport",
                    &node_port,
                    "-j",
                    &ext_chain,
                ]);
            }
            if !has_external {
                filter_rules.push(&words![
                    "-A",
                    KUBE_EXTERNAL_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &external_comment,
                    "-m",
                    "addrtype",
                    "--dst-type",
                    "LOCAL",
                    &proto_match,
                    "--dport",
                    &node_port,
                    "-j",
                    external_target,
                ]);
            }
        }

        // Health-check node port.
        if let Some(hc) = svc.health_check_port() {
            filter_rules.push(&words![
                "-A",
                KUBE_NODEPORTS,
                "-m",
                "comment",
                "--comment",
                quoted(&format!("{name_str} health check node port")),
                "-m",
                "tcp",
                "-p",
                "tcp",
                "--dport",
                hc.to_string(),
                "-j",
                "ACCEPT",
            ]);
        }

        // Per-service chains: written, or (partial sync, unchanged service) only counted.
        let mut svc_chains = Lines(Vec::new());
        let mut svc_rules = Lines(Vec::new());

        if has_internal {
            let args = words![
                "-m",
                "comment",
                "--comment",
                quoted(&format!("{name_str} cluster IP")),
                &proto_match,
                "-d",
                &cluster_ip,
                "--dport",
                &port,
            ];
            if cfg.masquerade_all {
                svc_rules.push(&words!["-A", internal_chain, &args, "-j", KUBE_MARK_MASQ]);
            } else if detector.is_implemented() {
                svc_rules.push(&words![
                    "-A",
                    internal_chain,
                    &args,
                    detector.if_not_local(),
                    "-j",
                    KUBE_MARK_MASQ,
                ]);
            }
        }

        if uses_ext_chain {
            svc_chains.0.push(chain_line(&ext_chain));
            out.active_nat_chains.insert(ext_chain.clone());
            if !svc.external_policy_local {
                svc_rules.push(&words![
                    "-A",
                    &ext_chain,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!(
                        "masquerade traffic for {name_str} external destinations"
                    )),
                    "-j",
                    KUBE_MARK_MASQ,
                ]);
            } else {
                if detector.is_implemented() {
                    svc_rules.push(&words![
                        "-A",
                        &ext_chain,
                        "-m",
                        "comment",
                        "--comment",
                        quoted(&format!("pod traffic for {name_str} external destinations")),
                        detector.if_local(),
                        "-j",
                        &cluster_chain,
                    ]);
                }
                svc_rules.push(&words![
                    "-A",
                    &ext_chain,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!(
                        "masquerade LOCAL traffic for {name_str} external destinations"
                    )),
                    "-m",
                    "addrtype",
                    "--src-type",
                    "LOCAL",
                    "-j",
                    KUBE_MARK_MASQ,
                ]);
                svc_rules.push(&words![
                    "-A",
                    &ext_chain,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!(
                        "route LOCAL traffic for {name_str} external destinations"
                    )),
                    "-m",
                    "addrtype",
                    "--src-type",
                    "LOCAL",
                    "-j",
                    &cluster_chain,
                ]);
            }
            if has_external {
                svc_rules.push(&words!["-A", &ext_chain, "-j", external_policy_chain]);
            }
        }

        if uses_fw_chain {
            svc_chains.0.push(chain_line(&fw_chain));
            out.active_nat_chains.insert(fw_chain.clone());
            let args = words![
                "-A",
                &fw_chain,
                "-m",
                "comment",
                "--comment",
                quoted(&format!("{name_str} loadbalancer IP")),
            ];
            let mut allow_from_node = false;
            for cidr in svc.source_ranges.allowed() {
                svc_rules.push(&words![&args, "-s", cidr.to_string(), "-j", &ext_chain]);
                if cfg.primary_node_ip.is_some_and(|ip| cidr.contains(&ip)) {
                    allow_from_node = true;
                }
            }
            if allow_from_node {
                for ip in &svc.load_balancer_ips {
                    svc_rules.push(&words![&args, "-s", ip.to_string(), "-j", &ext_chain]);
                }
            }
            svc_rules.push(&words![
                "-A",
                &fw_chain,
                "-m",
                "comment",
                "--comment",
                quoted(&format!(
                    "other traffic to {name_str} will be dropped by KUBE-PROXY-FIREWALL"
                )),
            ]);
        }

        if uses_cluster_chain {
            svc_chains.0.push(chain_line(&cluster_chain));
            out.active_nat_chains.insert(cluster_chain.clone());
            write_endpoint_rules(
                &mut svc_rules,
                &name_str,
                svc,
                &cluster_chain,
                &cat.cluster,
                large,
            );
        }
        if uses_local_chain {
            svc_chains.0.push(chain_line(&local_chain));
            out.active_nat_chains.insert(local_chain.clone());
            write_endpoint_rules(
                &mut svc_rules,
                &name_str,
                svc,
                &local_chain,
                &cat.local,
                large,
            );
        }

        for ep in &cat.all_reachable {
            let sep = names::endpoint_chain(name, ep);
            svc_chains.0.push(chain_line(&sep));
            out.active_nat_chains.insert(sep.clone());
            let mut args = words!["-A", &sep];
            if !large {
                args.extend(words!["-m", "comment", "--comment", &name_str]);
            }
            svc_rules.push(&words![
                &args,
                "-s",
                ep.ip.to_string(),
                "-j",
                KUBE_MARK_MASQ
            ]);
            if svc.session_affinity_timeout.is_some() {
                args.extend(words!["-m", "recent", "--name", &sep, "--set"]);
            }
            svc_rules.push(&words![
                args,
                &proto_match,
                "-j",
                "DNAT",
                "--to-destination",
                ep.addr_string(),
            ]);
        }

        let skip = match input.scope {
            SyncScope::Full => false,
            SyncScope::Partial { changed } => !changed.contains(&name.service),
        };
        if skip {
            skipped_nat_rules += svc_rules.0.len();
        } else {
            nat_chains.0.extend(svc_chains.0);
            nat_rules.0.extend(svc_rules.0);
        }
    }

    // Stale per-service chains: flush with a chain line, then delete.
    if let Some(existing) = input.existing_nat_chains {
        for chain in existing {
            if names::is_service_chain(chain) && !out.active_nat_chains.contains(chain) {
                nat_chains.0.push(chain_line(chain));
                nat_rules.push(&["-X", chain.as_str()]);
                out.deleted_chains.push(chain.clone());
            }
        }
    }

    // The node-ports tail call must be the last rule of nat KUBE-SERVICES.
    let nodeports_comment =
        quoted("kubernetes service nodeports; NOTE: this must be the last rule in this chain");
    match cfg.node_port_destinations() {
        NodePortDestinations::AllLocal => {
            let mut dest = words!["-m", "addrtype", "--dst-type", "LOCAL"];
            if !localhost_node_ports {
                dest.extend(words!["!", "-d", "127.0.0.0/8"]);
            }
            nat_rules.push(&words![
                "-A",
                KUBE_SERVICES,
                "-m",
                "comment",
                "--comment",
                &nodeports_comment,
                dest,
                "-j",
                KUBE_NODEPORTS,
            ]);
        }
        NodePortDestinations::Ips(ips) => {
            for ip in ips {
                if ip.is_loopback() && !localhost_node_ports {
                    continue;
                }
                nat_rules.push(&words![
                    "-A",
                    KUBE_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    &nodeports_comment,
                    "-d",
                    ip.to_string(),
                    "-j",
                    KUBE_NODEPORTS,
                ]);
            }
        }
    }

    if !cfg.conntrack_tcp_be_liberal {
        let mut rule = words![
            "-A",
            KUBE_FORWARD,
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID"
        ];
        if cfg.nfacct_ct_state_invalid {
            rule.extend(words![
                "-m",
                "nfacct",
                "--nfacct-name",
                NFACCT_CT_STATE_INVALID
            ]);
        }
        rule.extend(words!["-j", "DROP"]);
        filter_rules.push(&rule);
    }
    filter_rules.push(&words![
        "-A",
        KUBE_FORWARD,
        "-m",
        "comment",
        "--comment",
        quoted("kubernetes forwarding rules"),
        "-m",
        "mark",
        "--mark",
        &mark_match,
        "-j",
        "ACCEPT",
    ]);
    filter_rules.push(&words![
        "-A",
        KUBE_FORWARD,
        "-m",
        "comment",
        "--comment",
        quoted("kubernetes forwarding conntrack rule"),
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ]);

    let deleted = out.deleted_chains.len();
    out.filter_rules = filter_rules.0.len();
    out.nat_rules_written = nat_rules.0.len() - deleted;
    out.nat_rules = nat_rules.0.len() + skipped_nat_rules - deleted;
    out.health_check_node_ports = model.health_checks();

    let mut text = String::with_capacity(
        64 * (filter_chains.0.len()
            + filter_rules.0.len()
            + nat_chains.0.len()
            + nat_rules.0.len()),
    );
    text.push_str("*filter\n");
    for l in filter_chains.0.iter().chain(&filter_rules.0) {
        text.push_str(l);
        text.push('\n');
    }
    text.push_str("COMMIT\n*nat\n");
    for l in nat_chains.0.iter().chain(&nat_rules.0) {
        text.push_str(l);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    out.text = text;
    out
}

/// Upstream `UsesClusterEndpoints`: Cluster endpoints are needed when the internal policy
/// is Cluster or the port is externally accessible at all (the eTP=Local short-circuit
/// rules jump to the Cluster chain).
fn uses_cluster_endpoints(svc: &ServicePort) -> bool {
    !svc.internal_policy_local || svc.externally_accessible()
}

/// `categorize_endpoints` with upstream's `UsesClusterEndpoints`. The model's
/// `ServicePort::uses_cluster_endpoints` returns false for an externally accessible port
/// with both policies Local; upstream returns true. Categorising a copy with the external
/// policy set to Cluster gives upstream's answer for that one case and changes nothing
/// else (the local side is still used because the internal policy is Local).
fn categorize(svc: &ServicePort, model: &ProxyModel) -> Categorized {
    categorize_endpoints(svc, model.endpoints_of(&svc.name), &model.node)
}

/// Upstream `writeServiceToEndpointRules`: affinity checks, then probabilistic jumps.
fn write_endpoint_rules(
    rules: &mut Lines,
    name_str: &str,
    svc: &ServicePort,
    chain: &str,
    endpoints: &[Endpoint],
    large: bool,
) {
    let comment = |ep: &Endpoint| -> Vec<String> {
        if large {
            Vec::new()
        } else {
            words![
                "-m",
                "comment",
                "--comment",
                quoted(&format!("{name_str} -> {}", ep.addr_string()))
            ]
        }
    };
    if let Some(timeout) = svc.session_affinity_timeout {
        for ep in endpoints {
            let sep = names::endpoint_chain(&svc.name, ep);
            rules.push(&words![
                "-A",
                chain,
                comment(ep),
                "-m",
                "recent",
                "--name",
                &sep,
                "--rcheck",
                "--seconds",
                timeout.to_string(),
                "--reap",
                "-j",
                &sep,
            ]);
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let sep = names::endpoint_chain(&svc.name, ep);
        let mut args = words!["-A", chain, comment(ep)];
        if i + 1 < n {
            args.extend(words![
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                probability(n - i)
            ]);
        }
        rules.push(&words![args, "-j", &sep]);
    }
}
