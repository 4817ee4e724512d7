//! Pure rendering of one sync: the `iptables-restore` input upstream's `syncProxyRules`
//! writes (pkg/proxy/iptables/proxier.go), for one IP family (the same text goes to
//! `iptables-restore` or `ip6tables-restore`), in upstream's chain and rule order.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

pub use crate::backend::netfilter::LocalDetector;
use crate::backend::netfilter::names::{self, *};
use crate::backend::netfilter::{self, NFACCT_CT_STATE_INVALID, NFACCT_LOCALHOST_NODEPORTS};
use crate::model::plan::{
    self, ClusterIpMasquerade, Disposition, ExternalMasquerade, Firewall, IpFamily, PlanOptions,
    Policy, ServicePlan,
};
use crate::model::{
    Cidr, Endpoint, NodeInfo, Protocol, ProxyModel, ServiceName, ServicePort, ServicePortName,
};

/// Settings that shape the rules (flags and probed host facts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    /// The IP family rendered (from the node facts): only its services, endpoints and
    /// addresses are written.
    pub family: IpFamily,
    /// `--iptables-masquerade-bit`: mark = `1 << bit`, written `%#08x` (`0x00004000`).
    pub masquerade_bit: u8,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--detect-local-mode` and its parameter.
    pub local_detector: LocalDetector,
    /// `--nodeport-addresses` (both families allowed; the other family's are ignored).
    /// `None`, an empty list, a list without a prefix of the family, or one holding a
    /// zero-length prefix mean "all local addresses" (`-m addrtype --dst-type LOCAL`).
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
            family: IpFamily::V4,
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

    /// The node-port prefixes of the family (`None`: every local address).
    fn family_node_port_cidrs(&self) -> Option<Vec<Cidr>> {
        let given = self.node_port_addresses.clone().unwrap_or_default();
        crate::host::node_port_cidrs(
            &crate::config::NodePortAddresses::Cidrs(given),
            None,
            self.family,
        )
    }

    /// Upstream `NodePortAddresses.ContainsIPv4Loopback`.
    pub fn node_port_addresses_contain_loopback(&self) -> bool {
        crate::host::contains_ipv4_loopback(self.family_node_port_cidrs().as_deref())
    }

    /// Localhost node ports as actually in effect (never for IPv6, as upstream).
    pub fn effective_localhost_node_ports(&self) -> bool {
        self.family == IpFamily::V4
            && self.localhost_node_ports
            && self.node_port_addresses_contain_loopback()
    }

    /// Upstream `NodePortAddresses.MatchAll` / `GetNodeIPs`, for the family.
    pub fn node_port_destinations(&self) -> NodePortDestinations {
        let mine: Vec<IpAddr> = self
            .node_ips
            .iter()
            .copied()
            .filter(|ip| self.family.matches(ip))
            .collect();
        crate::host::node_port_destinations(self.family_node_port_cidrs().as_deref(), &mine)
    }

    /// Takes this sync's node facts: family, primary node IP, node-port addresses, localhost
    /// node ports and the local-traffic detector.
    pub fn apply_node_facts(&mut self, facts: &crate::host::NodeFacts) {
        self.family = facts.family;
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
    /// Whether the shared chains were edited (`-D`/`-I`) rather than rewritten.
    pub edited_shared_chains: bool,
}

/// Upstream `computeProbability`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Restore-input lines, each ending in a newline, in one buffer: a render writes hundreds of
/// thousands of them, so they are neither allocated nor copied one by one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Lines {
    text: String,
    /// The number of lines in `text`.
    n: usize,
}

impl Lines {
    fn len(&self) -> usize {
        self.n
    }

    fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The lines, without their newlines.
    fn iter(&self) -> impl Iterator<Item = &str> {
        self.text.split_terminator('\n')
    }

    fn extend(&mut self, other: &Lines) {
        self.text.push_str(&other.text);
        self.n += other.n;
    }

    fn push_line(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
        self.n += 1;
    }

    /// Declares (and so flushes) `chain`.
    fn push_chain(&mut self, chain: &str) {
        self.text.push(':');
        self.text.push_str(chain);
        self.text.push_str(" - [0:0]\n");
        self.n += 1;
    }

    fn clear(&mut self) {
        self.text.clear();
        self.n = 0;
    }
}

/// Appends one rule to a [`Lines`]: its [`Word`]s separated by single spaces, written in place.
macro_rules! rule {
    ($lines:expr; $($w:expr),+ $(,)?) => {{
        let lines: &mut Lines = &mut $lines;
        let start = lines.text.len();
        $( Word::put(&$w, &mut lines.text, start); )+
        lines.text.push('\n');
        lines.n += 1;
    }};
}

/// Words of a rule, written straight into the restore input. Something that writes nothing
/// (an empty string, `None`: an absent option) adds no space either.
trait Word {
    /// Appends the word(s) to `out`, after a space unless the line begun at `start` is empty.
    fn put(&self, out: &mut String, start: usize);
}

fn space(out: &mut String, start: usize) {
    if out.len() > start {
        out.push(' ');
    }
}

impl Word for str {
    fn put(&self, out: &mut String, start: usize) {
        if !self.is_empty() {
            space(out, start);
            out.push_str(self);
        }
    }
}

impl Word for String {
    fn put(&self, out: &mut String, start: usize) {
        self.as_str().put(out, start);
    }
}

impl Word for ChainName {
    fn put(&self, out: &mut String, start: usize) {
        self.as_str().put(out, start);
    }
}

impl<T: Word + ?Sized> Word for &T {
    fn put(&self, out: &mut String, start: usize) {
        (**self).put(out, start);
    }
}

impl<T: Word> Word for Option<T> {
    fn put(&self, out: &mut String, start: usize) {
        if let Some(w) = self {
            w.put(out, start);
        }
    }
}

impl<A: Word, B: Word> Word for (A, B) {
    fn put(&self, out: &mut String, start: usize) {
        self.0.put(out, start);
        self.1.put(out, start);
    }
}

impl<A: Word, B: Word, C: Word> Word for (A, B, C) {
    fn put(&self, out: &mut String, start: usize) {
        self.0.put(out, start);
        self.1.put(out, start);
        self.2.put(out, start);
    }
}

/// `format_args!(…)`: a word formatted in place (comments, numbers, addresses).
impl Word for std::fmt::Arguments<'_> {
    fn put(&self, out: &mut String, start: usize) {
        space(out, start);
        // Formatting into a String cannot fail.
        let _ = out.write_fmt(*self);
    }
}

/// An endpoint as upstream's `Endpoint.String()` writes it (`ip:port`, IPv6 in brackets).
struct EndpointAddr<'e>(&'e Endpoint);

impl Word for EndpointAddr<'_> {
    fn put(&self, out: &mut String, start: usize) {
        space(out, start);
        write_endpoint_addr(out, self.0);
    }
}

/// An address, as its `Display` writes it.
struct Ip(IpAddr);

impl Word for Ip {
    fn put(&self, out: &mut String, start: usize) {
        space(out, start);
        write_ip(out, self.0);
    }
}

fn write_endpoint_addr(out: &mut String, ep: &Endpoint) {
    if ep.ip.is_ipv6() {
        out.push('[');
        write_ip(out, ep.ip);
        out.push(']');
    } else {
        write_ip(out, ep.ip);
    }
    out.push(':');
    write_number(out, ep.port);
}

/// `ip` as its `Display` writes it; IPv4 (four numbers per endpoint rule pair, hundreds of
/// thousands per render) without the formatting machinery.
fn write_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                len += decimal(octet.into(), &mut text[len..]);
            }
            out.push_str(std::str::from_utf8(&text[..len]).unwrap_or_default());
        }
        // Formatting into a String cannot fail.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `n` in decimal.
fn write_number(out: &mut String, n: u16) {
    let mut text = [0u8; 5];
    let len = decimal(n, &mut text);
    out.push_str(std::str::from_utf8(&text[..len]).unwrap_or_default());
}

/// Writes `n`'s decimal digits at the start of `to` (room for five) and returns how many.
fn decimal(n: u16, to: &mut [u8]) -> usize {
    let len = match n {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        1000..=9999 => 4,
        _ => 5,
    };
    let mut n = n;
    for d in to[..len].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    len
}

/// The four parts of the restore input, in the order they are written.
#[derive(Default)]
struct Tables {
    filter_chains: Lines,
    filter_rules: Lines,
    nat_chains: Lines,
    nat_rules: Lines,
}

impl Tables {
    /// Room for the nat rules and chains of `ports` service ports with `endpoints` endpoints
    /// (generous: pages reserved and not written cost nothing), so that the buffers of a
    /// large render are not copied as they grow.
    fn reserve(&mut self, ports: usize, endpoints: usize) {
        self.nat_rules.text.reserve(400 * ports + 450 * endpoints);
        self.nat_chains.text.reserve(32 * (2 * ports + endpoints));
    }

    fn clear(&mut self) {
        self.filter_chains.clear();
        self.filter_rules.clear();
        self.nat_chains.clear();
        self.nat_rules.clear();
    }

    /// The whole restore input. The nat rules, most of it, stay in their buffer (whose
    /// spare room takes the rest in front): no second copy of a large ruleset.
    fn into_text(self) -> String {
        let head_len = self.filter_chains.text.len()
            + self.filter_rules.text.len()
            + self.nat_chains.text.len()
            + 32;
        let mut head = String::with_capacity(head_len);
        head.push_str("*filter\n");
        head.push_str(&self.filter_chains.text);
        head.push_str(&self.filter_rules.text);
        head.push_str("COMMIT\n*nat\n");
        head.push_str(&self.nat_chains.text);
        let mut text = self.nat_rules.text;
        text.reserve(head.len() + 8);
        text.insert_str(0, &head);
        text.push_str("COMMIT\n");
        text
    }
}

/// Renders one sync from scratch: serialises the [`plan::Plan`] of the model; every
/// traffic-policy decision (which endpoints, served/rejected/dropped, masquerading, firewall)
/// is the plan's. What a fresh [`RenderCache`] renders with the shared chains rewritten.
pub fn render(input: &RenderInput) -> Rendered {
    RenderCache::default().render(input, SharedChains::Rewrite)
}

/// How a partial sync writes the shared chains (nat `KUBE-SERVICES` and `KUBE-NODEPORTS`,
/// filter `KUBE-SERVICES`, `KUBE-EXTERNAL-SERVICES`, `KUBE-NODEPORTS`, `KUBE-PROXY-FIREWALL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedChains {
    /// Declared (flushed) and written whole, as upstream.
    Rewrite,
    /// Only the changed services' rules: deleted by rule spec (`-D`) and inserted at their
    /// place in the full list (`-I CHAIN N`), so the chains end up equal to a rewrite's. Only
    /// valid when the kernel holds what this cache's last render wrote; a full sync, or a
    /// render that cannot reuse the cache, rewrites anyway.
    Edit,
}

/// One service port's rules in the shared chains and the size of its own chains: all a
/// partial sync needs of a service it does not rewrite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Block {
    /// Its lines in the shared nat chains, in write order.
    nat_entry: Lines,
    /// Its lines in the shared filter chains, in write order.
    filter_entry: Lines,
    /// Rules in its own nat chains (SVC, SVL, EXT, FW, SEP): the rules metric counts them.
    chain_rules: usize,
    /// Its own nat chains.
    chains: Vec<ChainName>,
    /// Its endpoints of the family (the large-cluster threshold counts them).
    endpoints: usize,
    /// internalTrafficPolicy Local without local endpoints.
    no_local_internal: bool,
    /// externalTrafficPolicy Local without local endpoints.
    no_local_external: bool,
}

/// What the last render made of each service port, so that the next partial render plans and
/// formats only the changed services (a partial sync used to format every service to count
/// its rules) and can edit the shared chains.
#[derive(Debug, Default)]
pub struct RenderCache {
    /// The settings and node the blocks were rendered with: any change re-renders them all.
    key: Option<(RenderConfig, NodeInfo)>,
    /// Every service port of the last model; `None` for another family's.
    blocks: BTreeMap<ServicePortName, Option<Block>>,
    /// Sums over `blocks`, kept as blocks come and go: a partial sync need not visit them.
    totals: Totals,
}

/// Sums over the cached blocks.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    nat_rules: usize,
    filter_rules: usize,
    endpoints: usize,
    no_local_internal: usize,
    no_local_external: usize,
}

impl Totals {
    /// Adds (`sign` true) or removes `b`'s share.
    fn count(&mut self, b: &Block, add: bool) {
        let apply = |total: &mut usize, n: usize| {
            *total = if add {
                *total + n
            } else {
                total.saturating_sub(n)
            };
        };
        apply(&mut self.nat_rules, b.nat_entry.len() + b.chain_rules);
        apply(&mut self.filter_rules, b.filter_entry.len());
        apply(&mut self.endpoints, b.endpoints);
        apply(
            &mut self.no_local_internal,
            usize::from(b.no_local_internal),
        );
        apply(
            &mut self.no_local_external,
            usize::from(b.no_local_external),
        );
    }
}

/// A service port's block; its own chains are written into `out`, after its shared-chain
/// rules if `with_entry` (a full render writes each rule once, in upstream's order).
fn render_port(sp: &ServicePlan, ctx: &Ctx, out: &mut Tables, with_entry: bool) -> Block {
    let port = PortRules::new(sp, ctx);
    let mut entry = Tables::default();
    port.write_entry_rules(&mut entry);
    if with_entry {
        out.nat_rules.extend(&entry.nat_rules);
        out.filter_rules.extend(&entry.filter_rules);
    }
    // SVC, SVL, EXT, FW and one per endpoint at most.
    let mut chains = Vec::with_capacity(4 + sp.reachable.len());
    let rules_before = out.nat_rules.len();
    port.write_chains(out, &mut chains);
    Block {
        nat_entry: entry.nat_rules,
        filter_entry: entry.filter_rules,
        chain_rules: out.nat_rules.len() - rules_before,
        chains,
        endpoints: sp.endpoints.len(),
        no_local_internal: sp.internal.lacks_local_endpoints(),
        no_local_external: sp.external.lacks_local_endpoints(),
    }
}

/// The entries of `map` that are ports of `service` (ports sort after their service).
fn ports_of<'m, V>(
    map: &'m BTreeMap<ServicePortName, V>,
    service: &ServiceName,
) -> impl Iterator<Item = (&'m ServicePortName, &'m V)> + 'm {
    let first = ServicePortName {
        service: service.clone(),
        port: String::new(),
        protocol: Protocol::Tcp,
    };
    let service = service.clone();
    map.range(first..)
        .take_while(move |(k, _)| k.service == service)
}

impl RenderCache {
    /// Renders one sync. A partial sync with the settings and node of the last render plans
    /// and formats only the changed services and takes the others from the cache; the text
    /// is [`render`]'s, except that with [`SharedChains::Edit`] such a sync edits the shared
    /// chains instead of rewriting them.
    pub fn render(&mut self, input: &RenderInput, shared: SharedChains) -> Rendered {
        let (cfg, model) = (input.config, input.model);
        let changed = match input.scope {
            SyncScope::Full => None,
            SyncScope::Partial { changed } => Some(changed),
        };
        let key = (cfg.clone(), model.node.clone());
        let mut reuse = changed.is_some() && self.key.as_ref() == Some(&key);
        let mut old = BTreeMap::new();
        let mut ports: Vec<&ServicePort> = Vec::new();
        if let Some(changed) = changed.filter(|_| reuse) {
            for s in changed {
                old.extend(self.take_service(s));
            }
            ports = changed
                .iter()
                .flat_map(|s| ports_of(&model.services, s).map(|(_, v)| v))
                .collect();
            // Guards against a caller whose `changed` missed a service.
            reuse = self.blocks.len() + ports.len() == model.services.len();
        }
        if reuse {
            // Every re-rendered port is in `old`, `None` if it is new.
            for svc in &ports {
                old.entry(svc.name.clone()).or_insert(None);
            }
        } else {
            old.clear();
            self.blocks.clear();
            self.totals = Totals::default();
            self.key = Some(key);
            ports = model.services.values().collect();
        }
        let health_checks = model.health_checks();
        let opts = plan_options(cfg);
        let mut plans = Vec::with_capacity(ports.len());
        let mut fresh = Vec::with_capacity(ports.len());
        for svc in ports {
            if cfg.family.matches(&svc.cluster_ip) {
                plans.push(plan::plan_port(
                    model,
                    svc,
                    cfg.family,
                    &opts,
                    &health_checks,
                ));
            } else {
                fresh.push((svc.name.clone(), None));
            }
        }
        let endpoints =
            self.totals.endpoints + plans.iter().map(|p| p.endpoints.len()).sum::<usize>();
        let large = endpoints > cfg.large_cluster_threshold;
        let ctx = Ctx::new(cfg, large, &plans);
        let edit = shared == SharedChains::Edit && reuse;
        let mut out = Rendered {
            large_cluster: large,
            edited_shared_chains: edit,
            ..Rendered::default()
        };
        // Rewrite: the fixed chains, then each service's shared-chain rules and own chains
        // (upstream's write order); edit: the changed services' own chains only.
        let mut body = Tables::default();
        write_base_rules(&mut body, cfg);
        let (base_nat, base_filter) = (body.nat_rules.len(), body.filter_rules.len());
        if edit {
            // Counted, not written.
            body.clear();
        }
        if reuse {
            let mut written = Vec::with_capacity(plans.len());
            for sp in &plans {
                let mut own = Tables::default();
                let block = render_port(sp, &ctx, &mut own, false);
                fresh.push((sp.service.name.clone(), Some(block)));
                written.push((&sp.service.name, own));
            }
            self.put_all(fresh);
            self.write_cached(&mut body, written, edit);
        } else {
            // Every port, streamed in the model's (= the cache's) order.
            body.reserve(plans.len(), endpoints);
            // A partial sync that cannot use the cache still writes only the changed
            // services' chains; the others' go to `unwritten`, for their counts.
            let mut unwritten = Tables::default();
            for sp in &plans {
                let block = if changed.is_none_or(|c| c.contains(&sp.service.name.service)) {
                    render_port(sp, &ctx, &mut body, true)
                } else {
                    unwritten.clear();
                    let block = render_port(sp, &ctx, &mut unwritten, false);
                    body.nat_rules.extend(&block.nat_entry);
                    body.filter_rules.extend(&block.filter_entry);
                    block
                };
                fresh.push((sp.service.name.clone(), Some(block)));
            }
            self.put_all(fresh);
        }
        let mut stale = Tables::default();
        if let Some(existing) = input.existing_nat_chains {
            // Every live chain (60k names at 10k services): only built to find stale ones.
            let live: HashSet<ChainName> = self
                .blocks
                .values()
                .flatten()
                .flat_map(|b| b.chains.iter().copied())
                .collect();
            delete_stale_chains(&mut stale, &mut out, existing, &live);
        }
        let mut tail = Tables::default();
        write_node_ports_tail(&mut tail, cfg);
        write_forward_rules(&mut tail, cfg);
        let totals = self.totals;
        out.no_local_endpoints_internal = totals.no_local_internal;
        out.no_local_endpoints_external = totals.no_local_external;
        out.filter_rules = base_filter + totals.filter_rules + tail.filter_rules.len();
        out.nat_rules = base_nat + totals.nat_rules + tail.nat_rules.len();
        if edit {
            let edits = self.edits(&old);
            out.nat_rules_written = body.nat_rules.len() + edits.nat_insert.len();
            out.text = edits.text(&body, &stale);
        } else {
            body.nat_chains.extend(&stale.nat_chains);
            body.nat_rules.extend(&stale.nat_rules);
            body.nat_rules.extend(&tail.nat_rules);
            body.filter_rules.extend(&tail.filter_rules);
            out.nat_rules_written = body.nat_rules.len() - out.deleted_chains.len();
            out.text = body.into_text();
        }
        out.health_check_node_ports = health_checks;
        out
    }

    /// Removes and returns the blocks of `service`'s ports.
    fn take_service(&mut self, service: &ServiceName) -> Vec<(ServicePortName, Option<Block>)> {
        let keys: Vec<ServicePortName> = ports_of(&self.blocks, service)
            .map(|(k, _)| k.clone())
            .collect();
        let taken: Vec<(ServicePortName, Option<Block>)> = keys
            .into_iter()
            .filter_map(|k| self.blocks.remove(&k).map(|b| (k, b)))
            .collect();
        for b in taken.iter().filter_map(|(_, b)| b.as_ref()) {
            self.totals.count(b, false);
        }
        taken
    }

    /// Caches the `fresh` blocks (built in one go into an empty cache: a full render's).
    fn put_all(&mut self, fresh: Vec<(ServicePortName, Option<Block>)>) {
        for b in fresh.iter().filter_map(|(_, b)| b.as_ref()) {
            self.totals.count(b, true);
        }
        if self.blocks.is_empty() {
            self.blocks = fresh.into_iter().collect();
            return;
        }
        for (name, block) in fresh {
            if let Some(Some(was)) = self.blocks.insert(name, block) {
                self.totals.count(&was, false);
            }
        }
    }

    /// A partial render's services into `body`: the own chains of the re-rendered services
    /// `written`, and unless `edit` every cached service's shared-chain rules, in order.
    fn write_cached(
        &self,
        body: &mut Tables,
        mut written: Vec<(&ServicePortName, Tables)>,
        edit: bool,
    ) {
        written.sort_by(|a, b| a.0.cmp(b.0));
        if edit {
            // The unchanged services are not visited (the totals count them).
            for (_, own) in &written {
                body.nat_chains.extend(&own.nat_chains);
                body.nat_rules.extend(&own.nat_rules);
            }
            return;
        }
        let mut written = written.into_iter().peekable();
        for (name, b) in &self.blocks {
            let Some(b) = b else { continue };
            body.nat_rules.extend(&b.nat_entry);
            body.filter_rules.extend(&b.filter_entry);
            if let Some((_, own)) = written.next_if(|(n, _)| *n == name) {
                body.nat_chains.extend(&own.nat_chains);
                body.nat_rules.extend(&own.nat_rules);
            }
        }
    }

    /// The `-D`/`-I` lines that turn the shared chains as the replaced blocks `old` (`None`:
    /// none) and the unchanged ones wrote them into what the current blocks would write.
    /// Where a service's rules in a chain changed, all of them are deleted by spec, then the
    /// new ones inserted in list order, each at its index in the new list. The other rules
    /// keep their relative order, so each insert lands where a rewrite would put it and the
    /// node-ports jump, after every service's rules, stays last.
    fn edits(&self, old: &BTreeMap<ServicePortName, Option<Block>>) -> Edits {
        let mut e = Edits::default();
        let mut redo: BTreeSet<(&ServicePortName, bool, &str)> = BTreeSet::new();
        let empty = Block::default();
        for (name, was) in old {
            let was = was.as_ref().unwrap_or(&empty);
            let now = self
                .blocks
                .get(name)
                .and_then(Option::as_ref)
                .unwrap_or(&empty);
            for (nat, was, now) in [
                (true, &was.nat_entry, &now.nat_entry),
                (false, &was.filter_entry, &now.filter_entry),
            ] {
                for chain in changed_chains(was, now) {
                    redo.insert((name, nat, chain));
                    let deletes = if nat {
                        &mut e.nat_delete
                    } else {
                        &mut e.filter_delete
                    };
                    for l in was.iter().filter(|l| split_append(l).0 == chain) {
                        deletes.push_line(&as_delete(l));
                    }
                }
            }
        }
        // Nothing to insert (an endpoint change keeps the service's rules): no need to
        // count the positions of every other service's rules.
        if redo.is_empty() {
            return e;
        }
        let mut counts: Vec<(bool, &str, usize)> = Vec::new();
        for (name, b) in &self.blocks {
            let Some(b) = b else { continue };
            for (nat, lines) in [(true, &b.nat_entry), (false, &b.filter_entry)] {
                for line in lines.iter() {
                    let (chain, rest) = split_append(line);
                    let n = match counts.iter_mut().find(|c| c.0 == nat && c.1 == chain) {
                        Some(c) => {
                            c.2 += 1;
                            c.2
                        }
                        None => {
                            counts.push((nat, chain, 1));
                            1
                        }
                    };
                    if redo.contains(&(name, nat, chain)) {
                        let to = if nat {
                            &mut e.nat_insert
                        } else {
                            &mut e.filter_insert
                        };
                        to.push_line(&format!("-I {chain} {n} {rest}"));
                    }
                }
            }
        }
        e
    }
}

/// The chains whose lines differ between `was` and `now` (one service port's, either table).
fn changed_chains<'l>(was: &'l Lines, now: &'l Lines) -> BTreeSet<&'l str> {
    let chains: BTreeSet<&str> = was
        .iter()
        .chain(now.iter())
        .map(|l| split_append(l).0)
        .collect();
    chains
        .into_iter()
        .filter(|c| {
            let of = |lines: &'l Lines| lines.iter().filter(move |l| split_append(l).0 == *c);
            !of(was).eq(of(now))
        })
        .collect()
}

/// The shared-chain edits of one partial sync.
#[derive(Debug, Default)]
struct Edits {
    nat_delete: Lines,
    nat_insert: Lines,
    filter_delete: Lines,
    filter_insert: Lines,
}

impl Edits {
    /// The restore input: in each table the deletions, then (nat) the rewritten service
    /// chains `own`, then the insertions that jump to them, then the stale chains' `-X`. The
    /// fixed chains are not written: the cache is only reused with the settings that wrote
    /// them. A table with nothing to do is left out.
    fn text(&self, own: &Tables, stale: &Tables) -> String {
        let mut text = String::new();
        let mut table = |name: &str, parts: &[&Lines]| {
            if parts.iter().all(|p| p.is_empty()) {
                return;
            }
            text.push('*');
            text.push_str(name);
            text.push('\n');
            for p in parts {
                text.push_str(&p.text);
            }
            text.push_str("COMMIT\n");
        };
        table("filter", &[&self.filter_delete, &self.filter_insert]);
        table(
            "nat",
            &[
                &own.nat_chains,
                &stale.nat_chains,
                &self.nat_delete,
                &own.nat_rules,
                &self.nat_insert,
                &stale.nat_rules,
            ],
        );
        text
    }
}

/// `-A CHAIN rest` as (`CHAIN`, `rest`).
fn split_append(line: &str) -> (&str, &str) {
    let spec = line.strip_prefix("-A ").unwrap_or(line);
    spec.split_once(' ').unwrap_or((spec, ""))
}

/// The `-D` line deleting the rule `-A CHAIN rest` by its spec.
fn as_delete(line: &str) -> String {
    let (chain, rest) = split_append(line);
    format!("-D {chain} {rest}")
}

/// What the plan needs of the iptables settings.
fn plan_options(cfg: &RenderConfig) -> PlanOptions {
    PlanOptions {
        masquerade_all: cfg.masquerade_all,
        detects_local_pods: cfg.local_detector.is_implemented(),
        primary_node_ip: cfg.primary_node_ip,
    }
}

/// The fixed chains, the masquerade machinery and the localhost firewall.
fn write_base_rules(t: &mut Tables, cfg: &RenderConfig) {
    let mark = cfg.masquerade_mark();
    for c in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        t.filter_chains.push_chain(c);
    }
    for c in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        t.nat_chains.push_chain(c);
    }

    rule!(t.nat_rules; "-A", KUBE_POSTROUTING, "-m mark ! --mark", format_args!("{mark}/{mark}"), "-j RETURN");
    rule!(t.nat_rules; "-A", KUBE_POSTROUTING, "-j MARK --xor-mark", mark);
    let snat_to = cfg
        .primary_node_ip
        .filter(|ip| cfg.snat_to_node_ip && !ip.is_loopback());
    let target = match snat_to {
        Some(ip) => format!("-j SNAT --to-source {ip}"),
        None => "-j MASQUERADE".to_string(),
    };
    rule!(
        t.nat_rules;
        "-A",
        KUBE_POSTROUTING,
        "-m comment --comment",
        "\"kubernetes service traffic requiring SNAT\"",
        target,
        cfg.random_fully.then_some("--random-fully"),
    );
    rule!(t.nat_rules; "-A", KUBE_MARK_MASQ, "-j MARK --or-mark", mark);

    if cfg.effective_localhost_node_ports() {
        t.filter_chains.push_chain(KUBE_FIREWALL);
        rule!(
            t.filter_rules;
            "-A",
            KUBE_FIREWALL,
            "-m comment --comment",
            "\"block incoming localnet connections\"",
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        );
    }
}

/// Stale per-service chains (not `live`): flush with a chain line, then delete.
fn delete_stale_chains(
    t: &mut Tables,
    out: &mut Rendered,
    existing: &BTreeSet<String>,
    live: &HashSet<ChainName>,
) {
    for chain in existing {
        let is_live = ChainName::parse(chain).is_some_and(|c| live.contains(&c));
        if names::is_service_chain(chain) && !is_live {
            t.nat_chains.push_chain(chain);
            rule!(t.nat_rules; "-X", chain);
            out.deleted_chains.push(chain.clone());
        }
    }
}

/// The node-ports tail call: it must be the last rule of nat KUBE-SERVICES.
fn write_node_ports_tail(t: &mut Tables, cfg: &RenderConfig) {
    let localhost_node_ports = cfg.effective_localhost_node_ports();
    let comment = (
        "-m comment --comment",
        "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"",
    );
    match cfg.node_port_destinations() {
        NodePortDestinations::AllLocal => {
            // IPv6 node ports never work on localhost; IPv4 ones only with route_localnet.
            let not_localhost = if cfg.family == IpFamily::V6 {
                "! -d ::1/128"
            } else if !localhost_node_ports {
                "! -d 127.0.0.0/8"
            } else {
                ""
            };
            rule!(
                t.nat_rules;
                "-A",
                KUBE_SERVICES,
                comment,
                "-m addrtype --dst-type LOCAL",
                not_localhost,
                "-j",
                KUBE_NODEPORTS,
            );
        }
        NodePortDestinations::Ips(ips) => {
            for ip in ips {
                if ip.is_loopback() && !localhost_node_ports {
                    continue;
                }
                rule!(t.nat_rules; "-A", KUBE_SERVICES, comment, format_args!("-d {ip}"), "-j", KUBE_NODEPORTS);
            }
        }
    }
}

/// The filter KUBE-FORWARD chain.
fn write_forward_rules(t: &mut Tables, cfg: &RenderConfig) {
    let mark = cfg.masquerade_mark();
    if !cfg.conntrack_tcp_be_liberal {
        rule!(
            t.filter_rules;
            "-A",
            KUBE_FORWARD,
            "-m conntrack --ctstate INVALID",
            cfg.nfacct_ct_state_invalid
                .then_some(("-m nfacct --nfacct-name", NFACCT_CT_STATE_INVALID)),
            "-j DROP",
        );
    }
    rule!(
        t.filter_rules;
        "-A",
        KUBE_FORWARD,
        "-m comment --comment",
        "\"kubernetes forwarding rules\"",
        format_args!("-m mark --mark {mark}/{mark}"),
        "-j ACCEPT",
    );
    rule!(
        t.filter_rules;
        "-A",
        KUBE_FORWARD,
        "-m comment --comment",
        "\"kubernetes forwarding conntrack rule\"",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    );
}

/// What every port's rules share in one render: the settings, and words derived from them
/// once rather than per rule.
struct Ctx {
    /// Large-cluster mode: no per-endpoint comments.
    large: bool,
    /// The local-traffic match (`-s CIDR`, `-i IF`; empty without a detector).
    if_local: String,
    /// Its negation.
    if_not_local: String,
    /// Localhost node ports are in effect and counted by their nfacct counter.
    localhost_nfacct: bool,
    /// [`probability`]`(k)` at index k, for every k a port's endpoint list needs.
    probabilities: Vec<String>,
}

impl Ctx {
    fn new(cfg: &RenderConfig, large: bool, plans: &[ServicePlan]) -> Self {
        let most = plans
            .iter()
            .map(|p| p.cluster.len().max(p.local.len()))
            .max()
            .unwrap_or(0);
        Ctx {
            large,
            if_local: cfg.local_detector.if_local().join(" "),
            if_not_local: cfg.local_detector.if_not_local().join(" "),
            localhost_nfacct: cfg.effective_localhost_node_ports()
                && cfg.nfacct_localhost_nodeports,
            probabilities: (0..=most).map(|k| probability(k.max(1))).collect(),
        }
    }

    /// [`probability`]`(k)`.
    fn probability(&self, k: usize) -> std::borrow::Cow<'_, str> {
        match self.probabilities.get(k) {
            Some(p) => p.as_str().into(),
            None => probability(k).into(),
        }
    }
}

/// `PROTO-MATCH -d IP --dport PORT`.
fn dest(proto_match: &str, ip: IpAddr, port: u16) -> String {
    let mut d = String::with_capacity(proto_match.len() + 40);
    d.push_str(proto_match);
    d.push_str(" -d ");
    write_ip(&mut d, ip);
    d.push_str(" --dport ");
    write_number(&mut d, port);
    d
}

/// A service port's name as upstream prints it (`ns/name:port`, `ns/name` when unnamed).
fn port_name(name: &ServicePortName) -> String {
    let service = &name.service;
    let mut s =
        String::with_capacity(service.namespace.len() + service.name.len() + name.port.len() + 2);
    s.push_str(&service.namespace);
    s.push('/');
    s.push_str(&service.name);
    if !name.port.is_empty() {
        s.push(':');
        s.push_str(&name.port);
    }
    s
}

/// Up to this many reachable endpoints, a lookup off `reachable`'s order scans them.
const SEPS_SCANNED: usize = 16;

/// `-m PROTO -p PROTO`.
fn proto_match(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "-m tcp -p tcp",
        Protocol::Udp => "-m udp -p udp",
        Protocol::Sctp => "-m sctp -p sctp",
    }
}

/// One service port's plan with the names and words its rules share.
struct PortRules<'p, 'a> {
    sp: &'p ServicePlan<'a>,
    ctx: &'p Ctx,
    name_str: String,
    proto_match: &'static str,
    /// `-m PROTO -p PROTO -d CLUSTER-IP --dport PORT`.
    cluster_dest: String,
    cluster_chain: ChainName,
    local_chain: ChainName,
    ext_chain: ChainName,
    fw_chain: ChainName,
    /// The KUBE-SEP chain of each reachable endpoint (hashed once), in `reachable`'s order.
    seps: Vec<((IpAddr, u16), ChainName)>,
    /// Indices into `seps` by (IP, port), for a large port's lookups off that order.
    by_addr: Vec<usize>,
}

impl<'p, 'a> PortRules<'p, 'a> {
    fn new(sp: &'p ServicePlan<'a>, ctx: &'p Ctx) -> Self {
        let name = &sp.service.name;
        let proto_match = proto_match(name.protocol);
        let mut hasher = PortHasher::new(name);
        let hash = hasher.port();
        let seps: Vec<_> = sp
            .reachable
            .iter()
            .map(|ep| ((ep.ip, ep.port), endpoint_chain(&mut hasher, ep)))
            .collect();
        let mut by_addr = Vec::new();
        if seps.len() > SEPS_SCANNED {
            by_addr = (0..seps.len()).collect();
            by_addr.sort_unstable_by_key(|&i| seps[i].0);
        }
        PortRules {
            sp,
            ctx,
            name_str: port_name(name),
            proto_match,
            cluster_dest: dest(proto_match, sp.service.cluster_ip, sp.service.port),
            cluster_chain: ChainName::new(SVC_PREFIX, &hash),
            local_chain: ChainName::new(SVL_PREFIX, &hash),
            ext_chain: ChainName::new(EXT_PREFIX, &hash),
            fw_chain: ChainName::new(FW_PREFIX, &hash),
            seps,
            by_addr,
        }
    }

    /// The chain implementing `policy`.
    fn policy_chain(&self, policy: Policy) -> &ChainName {
        match policy {
            Policy::Cluster => &self.cluster_chain,
            Policy::Local => &self.local_chain,
        }
    }

    /// `ep`'s KUBE-SEP chain; `i`: its index in its list, the same as in `reachable` when
    /// that list is all of them (the usual case).
    fn sep(&self, i: usize, ep: &Endpoint) -> ChainName {
        let key = (ep.ip, ep.port);
        if let Some((_, chain)) = self.seps.get(i).filter(|(k, _)| *k == key) {
            return *chain;
        }
        let found = if self.by_addr.is_empty() {
            self.seps.iter().position(|(k, _)| *k == key)
        } else {
            self.by_addr
                .binary_search_by_key(&key, |&j| self.seps[j].0)
                .ok()
                .map(|j| self.by_addr[j])
        };
        match found {
            Some(j) => self.seps[j].1,
            // The plan's endpoint lists are all within `reachable`; hashed anyway.
            None => endpoint_chain(&mut PortHasher::new(&self.sp.service.name), ep),
        }
    }

    /// The filter target of traffic the plan refuses, and why (`None`: served).
    fn refusal(&self, d: Disposition) -> Option<(&'static str, plan::Reason)> {
        match d {
            Disposition::Serve(_) => None,
            Disposition::Reject(r) => Some(("REJECT", r)),
            Disposition::Drop(r) => Some(("DROP", r)),
        }
    }

    /// The FW chain exists only while there are endpoints to protect.
    fn uses_fw_chain(&self) -> bool {
        self.sp.has_endpoints && self.sp.firewall.is_some()
    }

    /// Rules in the shared chains: ClusterIP, external IPs, LB IPs, node port, health check.
    fn write_entry_rules(&self, t: &mut Tables) {
        self.write_cluster_ip(t);
        self.write_external_ips(t);
        self.write_load_balancer_ips(t);
        if let Some(node_port) = self.sp.node_port {
            self.write_node_port(t, node_port);
        }
        if let Some(hc) = self.sp.health_check {
            rule!(
                t.filter_rules;
                "-A",
                KUBE_NODEPORTS,
                "-m comment --comment",
                format_args!("\"{} health check node port\"", self.name_str),
                "-m tcp -p tcp --dport",
                format_args!("{}", hc.node_port),
                "-j ACCEPT",
            );
        }
    }

    fn write_cluster_ip(&self, t: &mut Tables) {
        let name = &self.name_str;
        match (self.sp.internal.served_by(), self.refusal(self.sp.internal)) {
            (Some(policy), _) => rule!(
                t.nat_rules;
                "-A",
                KUBE_SERVICES,
                "-m comment --comment",
                format_args!("\"{name} cluster IP\""),
                self.cluster_dest,
                "-j",
                self.policy_chain(policy),
            ),
            (None, Some((target, reason))) => rule!(
                t.filter_rules;
                "-A",
                KUBE_SERVICES,
                "-m comment --comment",
                format_args!("\"{name} {}\"", reason.describe()),
                self.cluster_dest,
                "-j",
                target,
            ),
            (None, None) => {}
        }
    }

    /// The filter KUBE-EXTERNAL-SERVICES rule refusing external traffic to `dest`, if the
    /// plan refuses it.
    fn write_external_refusal(&self, t: &mut Tables, dest: &str) {
        if let Some((target, reason)) = self.refusal(self.sp.external) {
            rule!(
                t.filter_rules;
                "-A",
                KUBE_EXTERNAL_SERVICES,
                "-m comment --comment",
                format_args!("\"{} {}\"", self.name_str, reason.describe()),
                dest,
                "-j",
                target,
            );
        }
    }

    /// `-m PROTO -p PROTO -d IP --dport PORT`.
    fn dest(&self, ip: &IpAddr) -> String {
        dest(self.proto_match, *ip, self.sp.service.port)
    }

    fn write_external_ips(&self, t: &mut Tables) {
        for ip in &self.sp.external_ips {
            let dest = self.dest(ip);
            if self.sp.has_endpoints {
                rule!(
                    t.nat_rules;
                    "-A",
                    KUBE_SERVICES,
                    "-m comment --comment",
                    format_args!("\"{} external IP\"", self.name_str),
                    dest,
                    "-j",
                    self.ext_chain,
                );
            }
            self.write_external_refusal(t, &dest);
        }
    }

    fn write_load_balancer_ips(&self, t: &mut Tables) {
        let uses_fw_chain = self.uses_fw_chain();
        let lb_chain = if uses_fw_chain {
            &self.fw_chain
        } else {
            &self.ext_chain
        };
        for ip in &self.sp.load_balancer_ips {
            let dest = self.dest(ip);
            if self.sp.has_endpoints {
                rule!(
                    t.nat_rules;
                    "-A",
                    KUBE_SERVICES,
                    "-m comment --comment",
                    format_args!("\"{} loadbalancer IP\"", self.name_str),
                    dest,
                    "-j",
                    lb_chain,
                );
            }
            if uses_fw_chain {
                rule!(
                    t.filter_rules;
                    "-A",
                    KUBE_PROXY_FIREWALL,
                    "-m comment --comment",
                    format_args!("\"{} traffic not accepted by {}\"", self.name_str, self.fw_chain),
                    dest,
                    "-j DROP",
                );
            }
        }
        for ip in &self.sp.load_balancer_ips {
            self.write_external_refusal(t, &self.dest(ip));
        }
    }

    fn write_node_port(&self, t: &mut Tables, node_port: u16) {
        if self.sp.has_endpoints {
            if self.ctx.localhost_nfacct {
                rule!(
                    t.nat_rules;
                    "-A",
                    KUBE_NODEPORTS,
                    "-m comment --comment",
                    self.name_str,
                    self.proto_match,
                    format_args!("-d 127.0.0.0/8 --dport {node_port}"),
                    "-m nfacct --nfacct-name",
                    NFACCT_LOCALHOST_NODEPORTS,
                    "-j",
                    self.ext_chain,
                );
            }
            rule!(
                t.nat_rules;
                "-A",
                KUBE_NODEPORTS,
                "-m comment --comment",
                self.name_str,
                self.proto_match,
                format_args!("--dport {node_port}"),
                "-j",
                self.ext_chain,
            );
        }
        self.write_external_refusal(
            t,
            &format!(
                "-m addrtype --dst-type LOCAL {} --dport {node_port}",
                self.proto_match
            ),
        );
    }

    /// The per-service nat chains (SVC, SVL, EXT, FW, SEP) into `t`; every chain written is
    /// recorded in `active`.
    fn write_chains(&self, t: &mut Tables, active: &mut Vec<ChainName>) {
        self.write_cluster_ip_masquerade(t);
        if self.sp.has_endpoints && self.sp.externally_accessible() {
            self.write_ext_chain(t, active);
        }
        if let Some(fw) = self.sp.firewall.as_ref().filter(|_| self.uses_fw_chain()) {
            self.write_fw_chain(t, active, fw);
        }
        for (chain, endpoints) in [
            (&self.cluster_chain, &self.sp.cluster),
            (&self.local_chain, &self.sp.local),
        ] {
            if !endpoints.is_empty() {
                t.nat_chains.push_chain(chain.as_str());
                active.push(*chain);
                self.write_endpoint_rules(&mut t.nat_rules, chain, endpoints);
            }
        }
        self.write_endpoint_chains(t, active);
    }

    fn write_cluster_ip_masquerade(&self, t: &mut Tables) {
        let Some(policy) = self.sp.internal.served_by() else {
            return;
        };
        let not_local = match self.sp.cluster_ip_masquerade {
            ClusterIpMasquerade::All => "",
            ClusterIpMasquerade::NonLocalSources => &self.ctx.if_not_local,
            ClusterIpMasquerade::None => return,
        };
        rule!(
            t.nat_rules;
            "-A",
            self.policy_chain(policy),
            "-m comment --comment",
            format_args!("\"{} cluster IP\"", self.name_str),
            self.cluster_dest,
            not_local,
            "-j",
            KUBE_MARK_MASQ,
        );
    }

    fn write_ext_chain(&self, t: &mut Tables, active: &mut Vec<ChainName>) {
        let ext = &self.ext_chain;
        let name = &self.name_str;
        t.nat_chains.push_chain(ext.as_str());
        active.push(*ext);
        let rules = &mut t.nat_rules;
        let comment = "-m comment --comment";
        match self.sp.external_masquerade {
            ExternalMasquerade::All => rule!(
                *rules;
                "-A",
                ext,
                comment,
                format_args!("\"masquerade traffic for {name} external destinations\""),
                "-j",
                KUBE_MARK_MASQ,
            ),
            ExternalMasquerade::HostSourcesOnly { short_circuit_pods } => {
                if short_circuit_pods {
                    rule!(
                        *rules;
                        "-A",
                        ext,
                        comment,
                        format_args!("\"pod traffic for {name} external destinations\""),
                        self.ctx.if_local,
                        "-j",
                        self.cluster_chain,
                    );
                }
                rule!(
                    *rules;
                    "-A",
                    ext,
                    comment,
                    format_args!("\"masquerade LOCAL traffic for {name} external destinations\""),
                    "-m addrtype --src-type LOCAL -j",
                    KUBE_MARK_MASQ,
                );
                rule!(
                    *rules;
                    "-A",
                    ext,
                    comment,
                    format_args!("\"route LOCAL traffic for {name} external destinations\""),
                    "-m addrtype --src-type LOCAL -j",
                    self.cluster_chain,
                );
            }
        }
        if let Some(policy) = self.sp.external.served_by() {
            rule!(*rules; "-A", ext, "-j", self.policy_chain(policy));
        }
    }

    fn write_fw_chain(&self, t: &mut Tables, active: &mut Vec<ChainName>, fw: &Firewall) {
        let fw_chain = &self.fw_chain;
        t.nat_chains.push_chain(fw_chain.as_str());
        active.push(*fw_chain);
        let comment = (
            "-m comment --comment",
            format!("\"{} loadbalancer IP\"", self.name_str),
        );
        for cidr in &fw.allowed {
            rule!(t.nat_rules; "-A", fw_chain, comment, format_args!("-s {cidr}"), "-j", self.ext_chain);
        }
        if fw.allow_from_node {
            for ip in &self.sp.load_balancer_ips {
                rule!(t.nat_rules; "-A", fw_chain, comment, format_args!("-s {ip}"), "-j", self.ext_chain);
            }
        }
        rule!(
            t.nat_rules;
            "-A",
            fw_chain,
            "-m comment --comment",
            format_args!(
                "\"other traffic to {} will be dropped by KUBE-PROXY-FIREWALL\"",
                self.name_str
            ),
        );
    }

    /// The per-endpoint comment of the endpoint rules (none in large-cluster mode).
    fn endpoint_comment<'e>(&'e self, ep: &'e Endpoint) -> Option<EndpointComment<'e>> {
        (!self.ctx.large).then_some(EndpointComment {
            name: &self.name_str,
            ep,
        })
    }

    /// One KUBE-SEP chain per reachable endpoint: hairpin masquerade, then DNAT.
    fn write_endpoint_chains(&self, t: &mut Tables, active: &mut Vec<ChainName>) {
        let affinity = self.sp.service.session_affinity_timeout.is_some();
        let comment = (!self.ctx.large).then_some(("-m comment --comment", &self.name_str));
        for (i, ep) in self.sp.reachable.iter().enumerate() {
            let sep = self.sep(i, ep);
            t.nat_chains.push_chain(sep.as_str());
            active.push(sep);
            rule!(
                t.nat_rules;
                "-A",
                sep,
                comment,
                ("-s", Ip(ep.ip)),
                "-j",
                KUBE_MARK_MASQ,
            );
            rule!(
                t.nat_rules;
                "-A",
                sep,
                comment,
                affinity.then_some(("-m recent --name", sep, "--set")),
                self.proto_match,
                "-j DNAT --to-destination",
                EndpointAddr(ep),
            );
        }
    }

    /// Upstream `writeServiceToEndpointRules`: affinity checks, then probabilistic jumps.
    fn write_endpoint_rules(&self, rules: &mut Lines, chain: &ChainName, endpoints: &[Endpoint]) {
        if let Some(timeout) = self.sp.service.session_affinity_timeout {
            for (i, ep) in endpoints.iter().enumerate() {
                let sep = self.sep(i, ep);
                rule!(
                    *rules;
                    "-A",
                    chain,
                    self.endpoint_comment(ep),
                    "-m recent --name",
                    sep,
                    format_args!("--rcheck --seconds {timeout} --reap -j"),
                    sep,
                );
            }
        }
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let probability = (i + 1 < n).then(|| self.ctx.probability(n - i));
            rule!(
                *rules;
                "-A",
                chain,
                self.endpoint_comment(ep),
                probability
                    .as_deref()
                    .map(|p| ("-m statistic --mode random --probability", p)),
                "-j",
                self.sep(i, ep),
            );
        }
    }
}

/// `-m comment --comment "NAME -> IP:PORT"`, written in place.
struct EndpointComment<'e> {
    name: &'e str,
    ep: &'e Endpoint,
}

impl Word for EndpointComment<'_> {
    fn put(&self, out: &mut String, start: usize) {
        space(out, start);
        out.push_str("-m comment --comment \"");
        out.push_str(self.name);
        out.push_str(" -> ");
        write_endpoint_addr(out, self.ep);
        out.push('"');
    }
}

/// `ep`'s KUBE-SEP chain.
fn endpoint_chain(hasher: &mut PortHasher, ep: &Endpoint) -> ChainName {
    ChainName::new(
        SEP_PREFIX,
        &hasher.endpoint(|key| write_endpoint_addr(key, ep)),
    )
}
