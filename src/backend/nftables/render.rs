//! Pure rendering: a per-family [`Plan`] serialised into upstream's v1.34/1.35 nftables
//! objects (pkg/proxy/nftables/proxier.go `setupNFTables` and the per-service part of
//! `syncProxyRules`), in upstream's operation order. Every decision (served, rejected or
//! dropped, which endpoints, masquerading, firewall) is the plan's; this module only names
//! objects and writes them down. [`super::tx`] turns the result into a transaction.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::names::{self, FamilyTokens, ServiceChains};
use crate::backend::netfilter::LocalDetector;
use crate::host::NodePortDestinations;
use crate::model::plan::{
    self, ClusterIpMasquerade, Disposition, ExternalMasquerade, Firewall, IpFamily, PlanOptions,
    Policy, ServicePlan,
};
use crate::model::{Cidr, Endpoint, ProxyModel, ServiceName, ServicePort, ServicePortName};

/// Settings that shape one family's ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    /// The family (and so the table: `ip kube-proxy` or `ip6 kube-proxy`).
    pub family: IpFamily,
    /// The masquerade mark as written in rules (`0x00004000`; upstream's tests use `0x4000`).
    pub mark: String,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// How traffic from local pods is recognised.
    pub local_detector: LocalDetector,
    /// Where node ports are served (`nodeport-ips`, or every local address but loopback).
    pub node_ports: NodePortDestinations,
    /// The primary node IP of this family (loadBalancerSourceRanges `allowFromNode`).
    pub primary_node_ip: Option<IpAddr>,
    /// ServiceCIDRs of this family: other addresses inside them are dropped.
    pub service_cidrs: Vec<Cidr>,
    /// Above this many service ports, endpoints are picked by one `numgen` rule per
    /// endpoint instead of upstream's per-service `numgen … vmap { … }`: every inline map is
    /// an anonymous set, and the kernel's cost of adding sets grows with the square of their
    /// number (10k services: 110 s for `nft -f`).
    pub large_cluster_threshold: usize,
}

/// Service ports above which [`RenderConfig::large_cluster_threshold`] switches layouts.
pub const LARGE_CLUSTER_THRESHOLD: usize = 1000;

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            family: IpFamily::V4,
            mark: crate::backend::netfilter::masquerade_mark(14),
            masquerade_all: false,
            local_detector: LocalDetector::None,
            node_ports: NodePortDestinations::AllLocal,
            primary_node_ip: None,
            service_cidrs: Vec::new(),
            large_cluster_threshold: LARGE_CLUSTER_THRESHOLD,
        }
    }
}

/// Set or map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// `set`.
    Set,
    /// `map`.
    Map,
}

impl SetKind {
    /// The keyword.
    pub fn word(self) -> &'static str {
        match self {
            SetKind::Set => "set",
            SetKind::Map => "map",
        }
    }
}

/// The six element containers whose contents are tracked element by element (upstream's
/// `nftElementStorage`s), in upstream's leftover-deletion order.
pub const ELEMENT_CONTAINERS: [(&str, SetKind); 6] = [
    (names::CLUSTER_IPS, SetKind::Set),
    (names::SERVICE_IPS, SetKind::Map),
    (names::FIREWALL_IPS, SetKind::Map),
    (names::NO_ENDPOINT_SERVICES, SetKind::Map),
    (names::NO_ENDPOINT_NODEPORTS, SetKind::Map),
    (names::SERVICE_NODEPORTS, SetKind::Map),
];

/// One set or map element: `KEY [comment "C"] [: VALUE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The container (one of [`ELEMENT_CONTAINERS`]).
    pub container: &'static str,
    /// The key, ` . `-joined.
    pub key: String,
    /// What follows the key: the comment and the value (empty for set elements).
    pub rest: String,
}

impl Element {
    fn new(container: &'static str, key: String, comment: Option<String>, value: &str) -> Self {
        let mut rest = String::new();
        if let Some(c) = comment {
            rest.push_str(" comment ");
            rest.push_str(&quote(&c));
        }
        if !value.is_empty() {
            rest.push_str(" : ");
            rest.push_str(value);
        }
        Element {
            container,
            key,
            rest,
        }
    }
}

/// One operation of a service's block, in upstream's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `add chain` + `flush chain` of a per-service chain.
    Chain(String),
    /// `add rule CHAIN RULE`.
    Rule {
        /// The chain.
        chain: String,
        /// The rule text.
        rule: String,
    },
    /// `add set NAME { SPEC }` (an affinity set).
    Set {
        /// The set.
        name: String,
        /// What goes between the braces.
        spec: String,
    },
    /// `add element`.
    Element(Element),
}

/// The objects of one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBlock {
    /// The service port (partial syncs rewrite the changed services' ports).
    pub port: ServicePortName,
    /// Its operations.
    pub ops: Vec<Op>,
    /// Its internal and external Local policies found no local endpoint.
    pub lacks_local: (bool, bool),
}

/// One family's desired ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The family.
    pub family: IpFamily,
    /// The settings it was rendered with (the fixed section is written from them).
    pub config: RenderConfig,
    /// Per service port, in service-port-name order.
    pub services: Vec<ServiceBlock>,
    /// Service ports whose internal Local policy found no local endpoint.
    pub no_local_endpoints_internal: usize,
    /// Service ports whose external Local policy found no local endpoint.
    pub no_local_endpoints_external: usize,
    /// Health-check node port and local endpoint count of each eTP=Local LoadBalancer.
    pub health_checks: BTreeMap<ServiceName, (u16, usize)>,
}

/// Go `%q` for the strings kube-proxy writes (names and fixed texts).
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// Renders `model` for `cfg.family`.
pub fn render(model: &ProxyModel, cfg: &RenderConfig) -> Ruleset {
    let blocks = render_ports(model, cfg, is_large(model, cfg), |_| true);
    let mut rs = Ruleset {
        family: cfg.family,
        config: cfg.clone(),
        services: Vec::new(),
        no_local_endpoints_internal: 0,
        no_local_endpoints_external: 0,
        health_checks: blocks.health_checks,
    };
    rs.services = blocks.blocks;
    (
        rs.no_local_endpoints_internal,
        rs.no_local_endpoints_external,
    ) = count_lacking(rs.services.iter().map(|b| b.lacks_local));
    rs
}

/// Whether `model` gets the large-cluster layout: more service ports of the family than
/// [`RenderConfig::large_cluster_threshold`].
pub fn is_large(model: &ProxyModel, cfg: &RenderConfig) -> bool {
    let ports = model
        .services
        .values()
        .filter(|svc| cfg.family.matches(&svc.cluster_ip))
        .count();
    ports > cfg.large_cluster_threshold
}

/// Service ports whose internal and external Local policies found no local endpoint, from
/// each port's [`ServiceBlock::lacks_local`].
pub fn count_lacking(ports: impl Iterator<Item = (bool, bool)>) -> (usize, usize) {
    ports.fold((0, 0), |(i, e), (li, le)| {
        (i + usize::from(li), e + usize::from(le))
    })
}

/// The blocks of some service ports, and every service's health checks.
pub struct PortBlocks {
    /// One block per selected service port, in service-port-name order.
    pub blocks: Vec<ServiceBlock>,
    /// Health-check node port and local endpoint count of each eTP=Local LoadBalancer.
    pub health_checks: BTreeMap<ServiceName, (u16, usize)>,
}

/// Renders the service ports `wanted` selects in the given layout (a partial sync renders
/// only its changed services; `large` is decided over the whole model by [`is_large`]).
pub fn render_ports(
    model: &ProxyModel,
    cfg: &RenderConfig,
    large: bool,
    wanted: impl Fn(&ServicePort) -> bool,
) -> PortBlocks {
    let opts = PlanOptions {
        masquerade_all: cfg.masquerade_all,
        detects_local_pods: cfg.local_detector.is_implemented(),
        primary_node_ip: cfg.primary_node_ip,
    };
    let plan = plan::plan_where(model, cfg.family, &opts, wanted);
    let blocks = plan
        .services
        .iter()
        .map(|sp| ServiceBlock {
            port: sp.service.name.clone(),
            lacks_local: (
                sp.internal.lacks_local_endpoints(),
                sp.external.lacks_local_endpoints(),
            ),
            ops: PortOps::new(sp, cfg, large).ops(),
        })
        .collect();
    PortBlocks {
        blocks,
        health_checks: plan.health_checks,
    }
}

/// The base chains: name, type, hook, priority (as knftables writes it), in upstream's order.
pub const BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// Regular chains hooked from base chains, with their jump rules, in upstream's order.
const HOOKED: [(&str, &[&str], bool); 6] = [
    (names::NODEPORT_ENDPOINTS_CHECK, &["filter-input"], true),
    (
        names::SERVICE_ENDPOINTS_CHECK,
        &["filter-input", "filter-forward", "filter-output"],
        true,
    ),
    (
        names::FIREWALL_CHECK,
        &["filter-prerouting-pre-dnat", "filter-output-pre-dnat"],
        true,
    ),
    (names::SERVICES, &["nat-output", "nat-prerouting"], false),
    (names::MASQUERADING, &["nat-postrouting"], false),
    (
        names::CLUSTER_IPS_CHECK,
        &["filter-forward", "filter-output"],
        true,
    ),
];

/// Writes `nft -f` lines for one table.
pub struct Writer<'a> {
    prefix: String,
    out: &'a mut String,
    /// Lines written.
    pub ops: usize,
}

impl<'a> Writer<'a> {
    /// A writer for `family`'s table appending to `out`.
    pub fn new(family: IpFamily, out: &'a mut String) -> Self {
        Writer {
            prefix: format!("{} {}", family.nft(), names::TABLE),
            out,
            ops: 0,
        }
    }

    /// `VERB OBJECT FAMILY kube-proxy REST`.
    pub fn line(&mut self, verb: &str, object: &str, rest: &str) {
        let _ = write!(self.out, "{verb} {object} {}", self.prefix);
        if !rest.is_empty() {
            self.out.push(' ');
            self.out.push_str(rest);
        }
        self.out.push('\n');
        self.ops += 1;
    }

    /// `add chain` + `flush chain` of a regular chain.
    pub fn chain(&mut self, name: &str) {
        self.line("add", "chain", name);
        self.line("flush", "chain", name);
    }

    /// `add rule CHAIN RULE`.
    pub fn rule(&mut self, chain: &str, rule: &str) {
        self.line("add", "rule", &format!("{chain} {rule}"));
    }

    /// The rules of a chain just added and flushed, as one `add chain CHAIN { RULE ; ... }`
    /// (one operation per rule). nft 1.0.6 fetches only its table cache for an `add chain`,
    /// but the names of every chain in the table for an `add rule`: 0.3–0.5 s with the
    /// 60,000 chains of 10,000 services. A rule naming a set (`@`) needs nft's set cache,
    /// which only an `add rule` loads, so such a chain keeps its `add rule` lines.
    pub fn rules(&mut self, chain: &str, rules: &[&str]) {
        if rules.is_empty() {
            return;
        }
        if rules.iter().any(|r| r.contains('@')) {
            rules.iter().for_each(|r| self.rule(chain, r));
            return;
        }
        let _ = write!(self.out, "add chain {} {chain} {{", self.prefix);
        for r in rules {
            let _ = write!(self.out, " {r} ;");
        }
        self.out.push_str(" }\n");
        self.ops += rules.len();
    }

    /// `add element NAME { KEY REST }`.
    pub fn element(&mut self, e: &Element) {
        self.line(
            "add",
            "element",
            &format!("{} {{ {}{} }}", e.container, e.key, e.rest),
        );
    }

    /// `delete element NAME { KEY }`.
    pub fn delete_element(&mut self, container: &str, key: &str) {
        self.line("delete", "element", &format!("{container} {{ {key} }}"));
    }
}

/// Upstream `setupNFTables`: the table, base chains, fixed chains and rules, the set and map
/// declarations and the `nodeport-ips` contents. `first_after_start` adds the add+delete of
/// every base chain that wipes an older layout's hooks (upstream's `!proxier.flushed`).
pub fn write_setup(w: &mut Writer, cfg: &RenderConfig, first_after_start: bool) {
    let ip = cfg.family.nft();
    w.line("add", "table", "{ comment \"rules for kube-proxy\" ; }");
    if first_after_start {
        for (name, ..) in BASE_CHAINS {
            w.line("add", "chain", name);
            w.line("delete", "chain", name);
        }
    }
    for (name, ty, hook, prio) in BASE_CHAINS {
        w.line(
            "add",
            "chain",
            &format!("{name} {{ type {ty} hook {hook} priority {prio} ; }}"),
        );
        w.line("flush", "chain", name);
    }
    for (chain, from, ct_new) in HOOKED {
        w.chain(chain);
        for base in from {
            let ct = if ct_new { "ct state new " } else { "" };
            w.rule(base, &format!("{ct}jump {chain}"));
        }
    }
    w.chain(names::MARK_FOR_MASQUERADE);
    let mark = &cfg.mark;
    w.rule(
        names::MARK_FOR_MASQUERADE,
        &format!("mark set mark or {mark}"),
    );
    w.rule(names::MASQUERADING, &format!("mark and {mark} == 0 return"));
    w.rule(names::MASQUERADING, &format!("mark set mark xor {mark}"));
    w.rule(names::MASQUERADING, "masquerade fully-random");
    let addr = cfg.family.addr_type();
    w.line(
        "add",
        "set",
        &format!(
            "{} {{ type {addr} ; comment \"Active ClusterIPs\" ; }}",
            names::CLUSTER_IPS
        ),
    );
    w.rule(
        names::CLUSTER_IPS_CHECK,
        &format!(
            "{ip} daddr @{} reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
            names::CLUSTER_IPS
        ),
    );
    let cidrs: Vec<String> = cfg
        .service_cidrs
        .iter()
        .filter(|c| cfg.family.matches(&c.addr()))
        .map(Cidr::to_string)
        .collect();
    if !cidrs.is_empty() {
        w.rule(
            names::CLUSTER_IPS_CHECK,
            &format!(
                "{ip} daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
                cidrs.join(",")
            ),
        );
    }
    write_node_port_ips(w, cfg);
    write_maps_and_dispatch(w, cfg);
}

fn write_node_port_ips(w: &mut Writer, cfg: &RenderConfig) {
    let spec = format!(
        "{} {{ type {} ; comment \"IPs that accept NodePort traffic\" ; }}",
        names::NODEPORT_IPS,
        cfg.family.addr_type()
    );
    w.line("add", "set", &spec);
    match &cfg.node_ports {
        NodePortDestinations::AllLocal => w.line("delete", "set", names::NODEPORT_IPS),
        NodePortDestinations::Ips(ips) => {
            w.line("flush", "set", names::NODEPORT_IPS);
            for ip in ips {
                // Localhost node ports need route_localnet tricks nftables mode never does.
                if cfg.family.matches(ip) && !ip.is_loopback() {
                    w.line(
                        "add",
                        "element",
                        &format!("{} {{ {ip} }}", names::NODEPORT_IPS),
                    );
                }
            }
        }
    }
}

fn write_maps_and_dispatch(w: &mut Writer, cfg: &RenderConfig) {
    let ip = cfg.family.nft();
    let addr = cfg.family.addr_type();
    let map = |w: &mut Writer, name: &str, key: &str, comment: &str| {
        w.line(
            "add",
            "map",
            &format!("{name} {{ type {key} : verdict ; comment \"{comment}\" ; }}"),
        );
    };
    let full_key = format!("{addr} . inet_proto . inet_service");
    map(
        w,
        names::NO_ENDPOINT_SERVICES,
        &full_key,
        "vmap to drop or reject packets to services with no endpoints",
    );
    map(
        w,
        names::NO_ENDPOINT_NODEPORTS,
        "inet_proto . inet_service",
        "vmap to drop or reject packets to service nodeports with no endpoints",
    );
    w.line(
        "add",
        "chain",
        &format!(
            "{} {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}",
            names::REJECT_CHAIN
        ),
    );
    w.line("flush", "chain", names::REJECT_CHAIN);
    w.rule(names::REJECT_CHAIN, "reject");
    w.rule(
        names::SERVICE_ENDPOINTS_CHECK,
        &format!(
            "{ip} daddr . meta l4proto . th dport vmap @{}",
            names::NO_ENDPOINT_SERVICES
        ),
    );
    let node_port_daddr = match cfg.node_ports {
        NodePortDestinations::AllLocal => format!("{ip} daddr != {}", cfg.family.loopback()),
        NodePortDestinations::Ips(_) => format!("{ip} daddr @{}", names::NODEPORT_IPS),
    };
    w.rule(
        names::NODEPORT_ENDPOINTS_CHECK,
        &format!(
            "{node_port_daddr} meta l4proto . th dport vmap @{}",
            names::NO_ENDPOINT_NODEPORTS
        ),
    );
    map(
        w,
        names::FIREWALL_IPS,
        &full_key,
        "destinations that are subject to LoadBalancerSourceRanges",
    );
    w.rule(
        names::FIREWALL_CHECK,
        &format!(
            "{ip} daddr . meta l4proto . th dport vmap @{}",
            names::FIREWALL_IPS
        ),
    );
    map(
        w,
        names::SERVICE_IPS,
        &full_key,
        "ClusterIP, ExternalIP and LoadBalancer IP traffic",
    );
    map(
        w,
        names::SERVICE_NODEPORTS,
        "inet_proto . inet_service",
        "NodePort traffic",
    );
    w.rule(
        names::SERVICES,
        &format!(
            "{ip} daddr . meta l4proto . th dport vmap @{}",
            names::SERVICE_IPS
        ),
    );
    let node_port_daddr = match cfg.node_ports {
        NodePortDestinations::AllLocal => format!("fib daddr type local {node_port_daddr}"),
        NodePortDestinations::Ips(_) => node_port_daddr,
    };
    w.rule(
        names::SERVICES,
        &format!(
            "{node_port_daddr} meta l4proto . th dport vmap @{}",
            names::SERVICE_NODEPORTS
        ),
    );
}

/// Detect-local matches in nft syntax (upstream `IfLocalNFT` / `IfNotLocalNFT`).
fn if_local(d: &LocalDetector, family: IpFamily, negate: bool) -> Option<String> {
    let op = if negate { "!= " } else { "" };
    match d {
        LocalDetector::None => None,
        LocalDetector::Cidr(c) => Some(format!("{} saddr {op}{c}", family.nft())),
        LocalDetector::BridgeInterface(i) => Some(format!("iifname {op}{}", quote(i))),
        LocalDetector::InterfaceNamePrefix(p) => {
            Some(format!("iifname {op}{}", quote(&format!("{p}*"))))
        }
    }
}

fn verdict(d: Disposition) -> &'static str {
    match d {
        Disposition::Drop(_) => "drop",
        Disposition::Reject(_) | Disposition::Serve(_) => "goto reject-chain",
    }
}

/// The objects of one service port, in upstream's order.
struct PortOps<'p, 'a> {
    sp: &'p ServicePlan<'a>,
    cfg: &'p RenderConfig,
    /// Large-cluster layout: no anonymous map per service.
    large: bool,
    chains: ServiceChains,
    ops: Vec<Op>,
}

impl<'p, 'a> PortOps<'p, 'a> {
    fn new(sp: &'p ServicePlan<'a>, cfg: &'p RenderConfig, large: bool) -> Self {
        PortOps {
            sp,
            cfg,
            large,
            chains: ServiceChains::of(&sp.service.name),
            ops: Vec::new(),
        }
    }

    fn policy_chain(&self, p: Policy) -> &str {
        match p {
            Policy::Cluster => &self.chains.service,
            Policy::Local => &self.chains.local,
        }
    }

    fn uses_external_chain(&self) -> bool {
        self.sp.has_endpoints && self.sp.externally_accessible()
    }

    fn rule(&mut self, chain: &str, rule: String) {
        self.ops.push(Op::Rule {
            chain: chain.to_string(),
            rule,
        });
    }

    fn element(&mut self, container: &'static str, key: String, comment: bool, value: &str) {
        let comment = comment.then(|| self.sp.service.name.to_string());
        self.ops
            .push(Op::Element(Element::new(container, key, comment, value)));
    }

    fn ops(mut self) -> Vec<Op> {
        let sp = self.sp;
        for ep in &sp.reachable {
            self.ops.push(Op::Chain(endpoint_chain(sp, ep)));
        }
        if !sp.cluster.is_empty() {
            self.ops.push(Op::Chain(self.chains.service.clone()));
        }
        if !sp.local.is_empty() {
            self.ops.push(Op::Chain(self.chains.local.clone()));
        }
        if self.uses_external_chain() {
            self.ops.push(Op::Chain(self.chains.external.clone()));
        }
        self.elements();
        self.rules();
        self.ops
    }

    fn dest_key(&self, ip: IpAddr) -> String {
        let svc = self.sp.service;
        format!("{ip} . {} . {}", svc.name.protocol.lower(), svc.port)
    }

    fn elements(&mut self) {
        let sp = self.sp;
        let external_goto = format!("goto {}", self.chains.external);
        self.element(
            names::CLUSTER_IPS,
            sp.service.cluster_ip.to_string(),
            false,
            "",
        );
        let key = self.dest_key(sp.service.cluster_ip);
        match sp.internal {
            Disposition::Serve(p) => {
                let v = format!("goto {}", self.policy_chain(p));
                self.element(names::SERVICE_IPS, key, false, &v);
            }
            d => self.element(names::NO_ENDPOINT_SERVICES, key, true, verdict(d)),
        }
        let external_blocked = sp.external.served_by().is_none();
        for ip in &sp.external_ips {
            let key = self.dest_key(*ip);
            if sp.has_endpoints {
                self.element(names::SERVICE_IPS, key.clone(), false, &external_goto);
            }
            if external_blocked {
                self.element(names::NO_ENDPOINT_SERVICES, key, true, verdict(sp.external));
            }
        }
        if sp.firewall.is_some() {
            self.ops.push(Op::Chain(self.chains.firewall.clone()));
        }
        let firewall_goto = format!("goto {}", self.chains.firewall);
        for ip in &sp.load_balancer_ips {
            let key = self.dest_key(*ip);
            if sp.has_endpoints {
                self.element(names::SERVICE_IPS, key.clone(), false, &external_goto);
            }
            if sp.firewall.is_some() {
                self.element(names::FIREWALL_IPS, key, false, &firewall_goto);
            }
        }
        if external_blocked {
            for ip in &sp.load_balancer_ips {
                let key = self.dest_key(*ip);
                self.element(names::NO_ENDPOINT_SERVICES, key, true, verdict(sp.external));
            }
        }
        if let Some(np) = sp.node_port {
            let key = format!("{} . {np}", sp.service.name.protocol.lower());
            if sp.has_endpoints {
                self.element(names::SERVICE_NODEPORTS, key.clone(), false, &external_goto);
            }
            if external_blocked {
                self.element(
                    names::NO_ENDPOINT_NODEPORTS,
                    key,
                    true,
                    verdict(sp.external),
                );
            }
        }
    }

    fn rules(&mut self) {
        let sp = self.sp;
        self.internal_masquerade();
        if self.uses_external_chain() {
            self.external_rules();
        }
        if let Some(fw) = &sp.firewall {
            let rule = firewall_rule(fw, &sp.load_balancer_ips, self.cfg.family);
            let chain = self.chains.firewall.clone();
            self.rule(&chain, rule);
        }
        if let Some(timeout) = sp.service.session_affinity_timeout {
            for ep in &sp.reachable {
                self.ops.push(Op::Set {
                    name: format!(
                        "{}{}",
                        names::AFFINITY_PREFIX,
                        names::endpoint_base(&sp.service.name, ep)
                    ),
                    spec: format!(
                        "type {} ; flags dynamic,timeout ; timeout {timeout}s ;",
                        self.cfg.family.addr_type()
                    ),
                });
            }
        }
        if !sp.cluster.is_empty() {
            let chain = self.chains.service.clone();
            self.policy_rules(&chain, &sp.cluster);
        }
        if !sp.local.is_empty() {
            let chain = self.chains.local.clone();
            self.policy_rules(&chain, &sp.local);
        }
        for ep in &sp.reachable {
            self.endpoint_rules(ep);
        }
    }

    fn internal_masquerade(&mut self) {
        let sp = self.sp;
        let Disposition::Serve(p) = sp.internal else {
            return;
        };
        let ip = self.cfg.family.nft();
        let daddr = format!("{ip} daddr {}", sp.service.cluster_ip);
        let rule = match sp.cluster_ip_masquerade {
            ClusterIpMasquerade::All => format!("{daddr} jump {}", names::MARK_FOR_MASQUERADE),
            ClusterIpMasquerade::NonLocalSources => {
                let Some(not_local) = if_local(&self.cfg.local_detector, self.cfg.family, true)
                else {
                    return;
                };
                format!("{daddr} {not_local} jump {}", names::MARK_FOR_MASQUERADE)
            }
            ClusterIpMasquerade::None => return,
        };
        let chain = self.policy_chain(p).to_string();
        self.rule(&chain, rule);
    }

    fn external_rules(&mut self) {
        let sp = self.sp;
        let ext = self.chains.external.clone();
        let svc = self.chains.service.clone();
        let masq = names::MARK_FOR_MASQUERADE;
        match sp.external_masquerade {
            ExternalMasquerade::All => {
                self.rule(&ext, format!("jump {masq}"));
            }
            ExternalMasquerade::HostSourcesOnly { short_circuit_pods } => {
                if short_circuit_pods
                    && let Some(local) = if_local(&self.cfg.local_detector, self.cfg.family, false)
                {
                    self.rule(
                        &ext,
                        format!("{local} goto {svc} comment \"short-circuit pod traffic\""),
                    );
                }
                self.rule(
                    &ext,
                    format!(
                        "fib saddr type local jump {masq} comment \"masquerade local traffic\""
                    ),
                );
                self.rule(
                    &ext,
                    format!(
                        "fib saddr type local goto {svc} comment \"short-circuit local traffic\""
                    ),
                );
            }
        }
        if let Some(p) = sp.external.served_by() {
            let target = self.policy_chain(p).to_string();
            self.rule(&ext, format!("goto {target}"));
        }
    }

    fn policy_rules(&mut self, chain: &str, eps: &[Endpoint]) {
        let sp = self.sp;
        let ip = self.cfg.family.nft();
        if sp.service.session_affinity_timeout.is_some() {
            for ep in eps {
                let base = names::endpoint_base(&sp.service.name, ep);
                self.rule(
                    chain,
                    format!(
                        "{ip} saddr @{}{base} goto endpoint-{base}",
                        names::AFFINITY_PREFIX
                    ),
                );
            }
        }
        if self.large {
            // Uniform over the endpoints, as iptables' statistic rules: endpoint i is taken
            // with probability 1/(n-i) among those left.
            let n = eps.len();
            for (i, ep) in eps.iter().enumerate() {
                let target = endpoint_chain(sp, ep);
                let rule = if i + 1 < n {
                    format!("numgen random mod {} 0 goto {target}", n - i)
                } else {
                    format!("goto {target}")
                };
                self.rule(chain, rule);
            }
            return;
        }
        let entries: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, ep)| format!("{i} : goto {}", endpoint_chain(sp, ep)))
            .collect();
        self.rule(
            chain,
            format!(
                "numgen random mod {} vmap {{ {} }}",
                eps.len(),
                entries.join(" , ")
            ),
        );
    }

    fn endpoint_rules(&mut self, ep: &Endpoint) {
        let sp = self.sp;
        let ip = self.cfg.family.nft();
        let base = names::endpoint_base(&sp.service.name, ep);
        let chain = format!("endpoint-{base}");
        self.rule(
            &chain,
            format!("{ip} saddr {} jump {}", ep.ip, names::MARK_FOR_MASQUERADE),
        );
        if sp.service.session_affinity_timeout.is_some() {
            self.rule(
                &chain,
                format!("update @{}{base} {{ {ip} saddr }}", names::AFFINITY_PREFIX),
            );
        }
        self.rule(
            &chain,
            format!(
                "meta l4proto {} dnat to {}",
                sp.service.name.protocol.lower(),
                names::dnat_target(ep.ip, ep.port)
            ),
        );
    }
}

fn endpoint_chain(sp: &ServicePlan, ep: &Endpoint) -> String {
    format!("endpoint-{}", names::endpoint_base(&sp.service.name, ep))
}

/// `ip saddr != { RANGES [, LB IPs] } drop`; admitting nothing, a plain `drop`.
fn firewall_rule(fw: &Firewall, lb_ips: &[IpAddr], family: IpFamily) -> String {
    let mut allowed: Vec<String> = fw.allowed.iter().map(Cidr::to_string).collect();
    if fw.allow_from_node {
        allowed.extend(lb_ips.iter().map(IpAddr::to_string));
    }
    if allowed.is_empty() {
        return "drop".to_string();
    }
    format!(
        "{} saddr != {{ {} }} drop",
        family.nft(),
        allowed.join(" , ")
    )
}
