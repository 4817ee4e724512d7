//! Pure rendering of one sync: the `iptables-restore` input upstream's `syncProxyRules`
//! writes (pkg/proxy/iptables/proxier.go), for one IP family (the same text goes to
//! `iptables-restore` or `ip6tables-restore`), in upstream's chain and rule order.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Per-service nat chains that exist after this sync (written or not); filled only when
    /// they are needed, by a full sync or one that deletes stale chains.
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
    /// Whether the shared chains were edited (`-D`/`-I`) rather than rewritten.
    pub edited_shared_chains: bool,
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

#[derive(Default)]
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

/// The four parts of the restore input, in the order they are written.
#[derive(Default)]
struct Tables {
    filter_chains: Lines,
    filter_rules: Lines,
    nat_chains: Lines,
    nat_rules: Lines,
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
    nat_entry: Vec<String>,
    /// Its lines in the shared filter chains, in write order.
    filter_entry: Vec<String>,
    /// Rules in its own nat chains (SVC, SVL, EXT, FW, SEP): the rules metric counts them.
    chain_rules: usize,
    /// Its own nat chains.
    chains: Vec<String>,
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

/// A service port's block and the text of its own chains.
fn render_port(sp: &ServicePlan, cfg: &RenderConfig, large: bool) -> (Block, Tables) {
    let port = PortRules::new(sp, cfg, large);
    let mut entry = Tables::default();
    port.write_entry_rules(&mut entry);
    let mut own = Tables::default();
    let mut chains = Vec::new();
    port.write_chains(&mut own, &mut chains);
    let block = Block {
        nat_entry: entry.nat_rules.0,
        filter_entry: entry.filter_rules.0,
        chain_rules: own.nat_rules.0.len(),
        chains,
        endpoints: sp.endpoints.len(),
        no_local_internal: sp.internal.lacks_local_endpoints(),
        no_local_external: sp.external.lacks_local_endpoints(),
    };
    (block, own)
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
        if !reuse {
            old.clear();
            self.blocks.clear();
            self.totals = Totals::default();
            self.key = Some(key);
            ports = model.services.values().collect();
        }
        // Every re-rendered port is in `old`, `None` if it is new.
        for svc in &ports {
            old.entry(svc.name.clone()).or_insert(None);
        }
        let health_checks = model.health_checks();
        let opts = plan_options(cfg);
        let mut plans = Vec::new();
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
                self.put(svc.name.clone(), None);
            }
        }
        let endpoints =
            self.totals.endpoints + plans.iter().map(|p| p.endpoints.len()).sum::<usize>();
        let large = endpoints > cfg.large_cluster_threshold;
        let mut written = BTreeMap::new();
        for sp in &plans {
            let (block, own) = render_port(sp, cfg, large);
            if changed.is_none_or(|c| c.contains(&sp.service.name.service)) {
                written.insert(sp.service.name.clone(), own);
            }
            self.put(sp.service.name.clone(), Some(block));
        }
        let edit = (shared == SharedChains::Edit && reuse).then_some(&old);
        let mut out = self.assemble(input, large, written, edit);
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

    /// Caches `block` for `name`.
    fn put(&mut self, name: ServicePortName, block: Option<Block>) {
        if let Some(b) = &block {
            self.totals.count(b, true);
        }
        if let Some(Some(was)) = self.blocks.insert(name, block) {
            self.totals.count(&was, false);
        }
    }

    /// The restore input and counts from the cached blocks and the chains of the services
    /// `written`; `edit` holds the replaced blocks when the shared chains are edited.
    fn assemble(
        &self,
        input: &RenderInput,
        large: bool,
        mut written: BTreeMap<ServicePortName, Tables>,
        edit: Option<&BTreeMap<ServicePortName, Option<Block>>>,
    ) -> Rendered {
        let cfg = input.config;
        let mut out = Rendered {
            large_cluster: large,
            ..Rendered::default()
        };
        // Stale-chain deletion needs every live chain; otherwise the set is not built (60k
        // names at 10k services).
        let want_active =
            matches!(input.scope, SyncScope::Full) || input.existing_nat_chains.is_some();
        let mut t = Tables::default();
        write_base_rules(&mut t, cfg);
        let (base_nat, base_filter) = (t.nat_rules.0.len(), t.filter_rules.0.len());
        let mut own = Tables::default();
        // An edit without a stale-chain scan writes only the changed services' chains: the
        // unchanged ones are not visited (the totals count them).
        let visit_all = edit.is_none() || want_active;
        if !visit_all {
            for chains in std::mem::take(&mut written).into_values() {
                own.nat_chains.0.extend(chains.nat_chains.0);
                own.nat_rules.0.extend(chains.nat_rules.0);
            }
        }
        let blocks = visit_all.then_some(&self.blocks);
        for (name, b) in blocks.into_iter().flatten() {
            let Some(b) = b else { continue };
            if want_active {
                out.active_nat_chains.extend(b.chains.iter().cloned());
            }
            // Rewrite: each service's shared-chain rules, then its own chains (upstream's
            // write order); edit: its own chains only.
            let into = if edit.is_some() { &mut own } else { &mut t };
            if edit.is_none() {
                into.nat_rules.0.extend(b.nat_entry.iter().cloned());
                into.filter_rules.0.extend(b.filter_entry.iter().cloned());
            }
            if let Some(chains) = written.remove(name) {
                into.nat_chains.0.extend(chains.nat_chains.0);
                into.nat_rules.0.extend(chains.nat_rules.0);
            }
        }
        let mut stale = Tables::default();
        if let Some(existing) = input.existing_nat_chains {
            delete_stale_chains(&mut stale, &mut out, existing);
        }
        let mut tail = Tables::default();
        write_node_ports_tail(&mut tail, cfg);
        write_forward_rules(&mut tail, cfg);
        let totals = self.totals;
        out.no_local_endpoints_internal = totals.no_local_internal;
        out.no_local_endpoints_external = totals.no_local_external;
        out.filter_rules = base_filter + totals.filter_rules + tail.filter_rules.0.len();
        out.nat_rules = base_nat + totals.nat_rules + tail.nat_rules.0.len();
        match edit {
            None => {
                t.nat_chains.0.extend(stale.nat_chains.0);
                t.nat_rules.0.extend(stale.nat_rules.0);
                t.nat_rules.0.extend(tail.nat_rules.0);
                t.filter_rules.0.extend(tail.filter_rules.0);
                out.nat_rules_written = t.nat_rules.0.len() - out.deleted_chains.len();
                out.text = t.text();
            }
            Some(old) => {
                let edits = self.edits(old);
                out.nat_rules_written = own.nat_rules.0.len() + edits.nat_insert.len();
                out.text = edits.text(own, stale);
                out.edited_shared_chains = true;
            }
        }
        out
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
                    deletes.extend(
                        was.iter()
                            .filter(|l| split_append(l).0 == chain)
                            .map(|l| as_delete(l)),
                    );
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
                for line in lines {
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
                        to.push(format!("-I {chain} {n} {rest}"));
                    }
                }
            }
        }
        e
    }
}

/// The chains whose lines differ between `was` and `now` (one service port's, either table).
fn changed_chains<'l>(was: &'l [String], now: &'l [String]) -> BTreeSet<&'l str> {
    let chains: BTreeSet<&str> = was.iter().chain(now).map(|l| split_append(l).0).collect();
    chains
        .into_iter()
        .filter(|c| {
            let of = |lines: &'l [String]| lines.iter().filter(move |l| split_append(l).0 == *c);
            !of(was).eq(of(now))
        })
        .collect()
}

/// The shared-chain edits of one partial sync.
#[derive(Debug, Default)]
struct Edits {
    nat_delete: Vec<String>,
    nat_insert: Vec<String>,
    filter_delete: Vec<String>,
    filter_insert: Vec<String>,
}

impl Edits {
    /// The restore input: in each table the deletions, then (nat) the rewritten service
    /// chains `own`, then the insertions that jump to them, then the stale chains' `-X`. The
    /// fixed chains are not written: the cache is only reused with the settings that wrote
    /// them. A table with nothing to do is left out.
    fn text(self, own: Tables, stale: Tables) -> String {
        let mut text = String::new();
        let mut table = |name: &str, parts: &[&[String]]| {
            if parts.iter().all(|p| p.is_empty()) {
                return;
            }
            text.push_str(&format!("*{name}\n"));
            for l in parts.iter().flat_map(|p| p.iter()) {
                text.push_str(l);
                text.push('\n');
            }
            text.push_str("COMMIT\n");
        };
        table("filter", &[&self.filter_delete, &self.filter_insert]);
        table(
            "nat",
            &[
                &own.nat_chains.0,
                &stale.nat_chains.0,
                &self.nat_delete,
                &own.nat_rules.0,
                &self.nat_insert,
                &stale.nat_rules.0,
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

impl Tables {
    /// The whole restore input.
    fn text(&self) -> String {
        let lines = self.filter_chains.0.len()
            + self.filter_rules.0.len()
            + self.nat_chains.0.len()
            + self.nat_rules.0.len();
        let mut text = String::with_capacity(64 * lines);
        text.push_str("*filter\n");
        for l in self.filter_chains.0.iter().chain(&self.filter_rules.0) {
            text.push_str(l);
            text.push('\n');
        }
        text.push_str("COMMIT\n*nat\n");
        for l in self.nat_chains.0.iter().chain(&self.nat_rules.0) {
            text.push_str(l);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    }
}

/// The fixed chains, the masquerade machinery and the localhost firewall.
fn write_base_rules(t: &mut Tables, cfg: &RenderConfig) {
    let mark = cfg.masquerade_mark();
    let mark_match = format!("{mark}/{mark}");
    for c in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        t.filter_chains.0.push(chain_line(c));
    }
    for c in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        t.nat_chains.0.push(chain_line(c));
    }

    t.nat_rules.push(&words![
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
    t.nat_rules.push(&words![
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
    t.nat_rules.push(&masq);
    t.nat_rules.push(&words![
        "-A",
        KUBE_MARK_MASQ,
        "-j",
        "MARK",
        "--or-mark",
        &mark
    ]);

    if cfg.effective_localhost_node_ports() {
        t.filter_chains.0.push(chain_line(KUBE_FIREWALL));
        t.filter_rules.push(&words![
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
}

/// Stale per-service chains: flush with a chain line, then delete.
fn delete_stale_chains(t: &mut Tables, out: &mut Rendered, existing: &BTreeSet<String>) {
    for chain in existing {
        if names::is_service_chain(chain) && !out.active_nat_chains.contains(chain) {
            t.nat_chains.0.push(chain_line(chain));
            t.nat_rules.push(&["-X", chain.as_str()]);
            out.deleted_chains.push(chain.clone());
        }
    }
}

/// The node-ports tail call: it must be the last rule of nat KUBE-SERVICES.
fn write_node_ports_tail(t: &mut Tables, cfg: &RenderConfig) {
    let localhost_node_ports = cfg.effective_localhost_node_ports();
    let nodeports_comment =
        quoted("kubernetes service nodeports; NOTE: this must be the last rule in this chain");
    match cfg.node_port_destinations() {
        NodePortDestinations::AllLocal => {
            let mut dest = words!["-m", "addrtype", "--dst-type", "LOCAL"];
            // IPv6 node ports never work on localhost; IPv4 ones only with route_localnet.
            if cfg.family == IpFamily::V6 {
                dest.extend(words!["!", "-d", "::1/128"]);
            } else if !localhost_node_ports {
                dest.extend(words!["!", "-d", "127.0.0.0/8"]);
            }
            t.nat_rules.push(&words![
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
                t.nat_rules.push(&words![
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
}

/// The filter KUBE-FORWARD chain.
fn write_forward_rules(t: &mut Tables, cfg: &RenderConfig) {
    let mark = cfg.masquerade_mark();
    let mark_match = format!("{mark}/{mark}");
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
        t.filter_rules.push(&rule);
    }
    t.filter_rules.push(&words![
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
    t.filter_rules.push(&words![
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
}

/// One service port's plan with the names and words its rules share.
struct PortRules<'p, 'a> {
    sp: &'p ServicePlan<'a>,
    cfg: &'p RenderConfig,
    large: bool,
    name_str: String,
    proto_match: Vec<String>,
    port: String,
    cluster_ip: String,
    cluster_chain: String,
    local_chain: String,
    ext_chain: String,
    fw_chain: String,
}

impl<'p, 'a> PortRules<'p, 'a> {
    fn new(sp: &'p ServicePlan<'a>, cfg: &'p RenderConfig, large: bool) -> Self {
        let name = &sp.service.name;
        let proto = name.protocol.lower();
        PortRules {
            sp,
            cfg,
            large,
            name_str: name.to_string(),
            proto_match: words!["-m", proto, "-p", proto],
            port: sp.service.port.to_string(),
            cluster_ip: sp.service.cluster_ip.to_string(),
            cluster_chain: names::service_chain(name),
            local_chain: names::local_service_chain(name),
            ext_chain: names::external_chain(name),
            fw_chain: names::firewall_chain(name),
        }
    }

    /// The chain implementing `policy`.
    fn policy_chain(&self, policy: Policy) -> &str {
        match policy {
            Policy::Cluster => &self.cluster_chain,
            Policy::Local => &self.local_chain,
        }
    }

    /// The filter target and comment of traffic the plan refuses (`None`: served).
    fn refusal(&self, d: Disposition) -> Option<(&'static str, String)> {
        let (target, reason) = match d {
            Disposition::Serve(_) => return None,
            Disposition::Reject(r) => ("REJECT", r),
            Disposition::Drop(r) => ("DROP", r),
        };
        Some((
            target,
            quoted(&format!("{} {}", self.name_str, reason.describe())),
        ))
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
            t.filter_rules.push(&words![
                "-A",
                KUBE_NODEPORTS,
                "-m",
                "comment",
                "--comment",
                quoted(&format!("{} health check node port", self.name_str)),
                "-m",
                "tcp",
                "-p",
                "tcp",
                "--dport",
                hc.node_port.to_string(),
                "-j",
                "ACCEPT",
            ]);
        }
    }

    fn write_cluster_ip(&self, t: &mut Tables) {
        let dest = words![
            &self.proto_match,
            "-d",
            &self.cluster_ip,
            "--dport",
            &self.port
        ];
        match (self.sp.internal.served_by(), self.refusal(self.sp.internal)) {
            (Some(policy), _) => t.nat_rules.push(&words![
                "-A",
                KUBE_SERVICES,
                "-m",
                "comment",
                "--comment",
                quoted(&format!("{} cluster IP", self.name_str)),
                dest,
                "-j",
                self.policy_chain(policy),
            ]),
            (None, Some((target, comment))) => t.filter_rules.push(&words![
                "-A",
                KUBE_SERVICES,
                "-m",
                "comment",
                "--comment",
                comment,
                dest,
                "-j",
                target,
            ]),
            (None, None) => {}
        }
    }

    /// The filter KUBE-EXTERNAL-SERVICES rule refusing external traffic to `dest`, if the
    /// plan refuses it.
    fn write_external_refusal(&self, t: &mut Tables, dest: Vec<String>) {
        if let Some((target, comment)) = self.refusal(self.sp.external) {
            t.filter_rules.push(&words![
                "-A",
                KUBE_EXTERNAL_SERVICES,
                "-m",
                "comment",
                "--comment",
                comment,
                dest,
                "-j",
                target,
            ]);
        }
    }

    fn write_external_ips(&self, t: &mut Tables) {
        for ip in &self.sp.external_ips {
            let dest = words![
                &self.proto_match,
                "-d",
                ip.to_string(),
                "--dport",
                &self.port
            ];
            if self.sp.has_endpoints {
                t.nat_rules.push(&words![
                    "-A",
                    KUBE_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!("{} external IP", self.name_str)),
                    &dest,
                    "-j",
                    &self.ext_chain,
                ]);
            }
            self.write_external_refusal(t, dest);
        }
    }

    fn write_load_balancer_ips(&self, t: &mut Tables) {
        let uses_fw_chain = self.uses_fw_chain();
        let lb_chain = if uses_fw_chain {
            &self.fw_chain
        } else {
            &self.ext_chain
        };
        let dest = |ip: &IpAddr| {
            words![
                &self.proto_match,
                "-d",
                ip.to_string(),
                "--dport",
                &self.port
            ]
        };
        for ip in &self.sp.load_balancer_ips {
            if self.sp.has_endpoints {
                t.nat_rules.push(&words![
                    "-A",
                    KUBE_SERVICES,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!("{} loadbalancer IP", self.name_str)),
                    dest(ip),
                    "-j",
                    lb_chain,
                ]);
            }
            if uses_fw_chain {
                t.filter_rules.push(&words![
                    "-A",
                    KUBE_PROXY_FIREWALL,
                    "-m",
                    "comment",
                    "--comment",
                    quoted(&format!(
                        "{} traffic not accepted by {}",
                        self.name_str, self.fw_chain
                    )),
                    dest(ip),
                    "-j",
                    "DROP",
                ]);
            }
        }
        for ip in &self.sp.load_balancer_ips {
            self.write_external_refusal(t, dest(ip));
        }
    }

    fn write_node_port(&self, t: &mut Tables, node_port: u16) {
        let node_port = node_port.to_string();
        if self.sp.has_endpoints {
            if self.cfg.effective_localhost_node_ports() && self.cfg.nfacct_localhost_nodeports {
                t.nat_rules.push(&words![
                    "-A",
                    KUBE_NODEPORTS,
                    "-m",
                    "comment",
                    "--comment",
                    &self.name_str,
                    &self.proto_match,
                    "-d",
                    "127.0.0.0/8",
                    "--dport",
                    &node_port,
                    "-m",
                    "nfacct",
                    "--nfacct-name",
                    NFACCT_LOCALHOST_NODEPORTS,
                    "-j",
                    &self.ext_chain,
                ]);
            }
            t.nat_rules.push(&words![
                "-A",
                KUBE_NODEPORTS,
                "-m",
                "comment",
                "--comment",
                &self.name_str,
                &self.proto_match,
                "--dport",
                &node_port,
                "-j",
                &self.ext_chain,
            ]);
        }
        self.write_external_refusal(
            t,
            words![
                "-m",
                "addrtype",
                "--dst-type",
                "LOCAL",
                &self.proto_match,
                "--dport",
                &node_port
            ],
        );
    }

    /// The per-service nat chains (SVC, SVL, EXT, FW, SEP) into `t`; every chain written is
    /// recorded in `active`.
    fn write_chains(&self, t: &mut Tables, active: &mut Vec<String>) {
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
                t.nat_chains.0.push(chain_line(chain));
                active.push(chain.clone());
                write_endpoint_rules(
                    &mut t.nat_rules,
                    &self.name_str,
                    self.sp.service,
                    chain,
                    endpoints,
                    self.large,
                );
            }
        }
        self.write_endpoint_chains(t, active);
    }

    fn write_cluster_ip_masquerade(&self, t: &mut Tables) {
        let Some(policy) = self.sp.internal.served_by() else {
            return;
        };
        let chain = self.policy_chain(policy);
        let args = words![
            "-m",
            "comment",
            "--comment",
            quoted(&format!("{} cluster IP", self.name_str)),
            &self.proto_match,
            "-d",
            &self.cluster_ip,
            "--dport",
            &self.port,
        ];
        match self.sp.cluster_ip_masquerade {
            ClusterIpMasquerade::All => {
                t.nat_rules
                    .push(&words!["-A", chain, &args, "-j", KUBE_MARK_MASQ]);
            }
            ClusterIpMasquerade::NonLocalSources => t.nat_rules.push(&words![
                "-A",
                chain,
                &args,
                self.cfg.local_detector.if_not_local(),
                "-j",
                KUBE_MARK_MASQ,
            ]),
            ClusterIpMasquerade::None => {}
        }
    }

    fn write_ext_chain(&self, t: &mut Tables, active: &mut Vec<String>) {
        let ext = &self.ext_chain;
        let name_str = &self.name_str;
        t.nat_chains.0.push(chain_line(ext));
        active.push(ext.clone());
        let comment = |what: &str| {
            words![
                "-A",
                ext,
                "-m",
                "comment",
                "--comment",
                quoted(&format!("{what} for {name_str} external destinations"))
            ]
        };
        match self.sp.external_masquerade {
            ExternalMasquerade::All => {
                t.nat_rules
                    .push(&words![comment("masquerade traffic"), "-j", KUBE_MARK_MASQ]);
            }
            ExternalMasquerade::HostSourcesOnly { short_circuit_pods } => {
                if short_circuit_pods {
                    t.nat_rules.push(&words![
                        comment("pod traffic"),
                        self.cfg.local_detector.if_local(),
                        "-j",
                        &self.cluster_chain,
                    ]);
                }
                let local_src = words!["-m", "addrtype", "--src-type", "LOCAL"];
                t.nat_rules.push(&words![
                    comment("masquerade LOCAL traffic"),
                    &local_src,
                    "-j",
                    KUBE_MARK_MASQ,
                ]);
                t.nat_rules.push(&words![
                    comment("route LOCAL traffic"),
                    &local_src,
                    "-j",
                    &self.cluster_chain,
                ]);
            }
        }
        if let Some(policy) = self.sp.external.served_by() {
            t.nat_rules
                .push(&words!["-A", ext, "-j", self.policy_chain(policy)]);
        }
    }

    fn write_fw_chain(&self, t: &mut Tables, active: &mut Vec<String>, fw: &Firewall) {
        let fw_chain = &self.fw_chain;
        t.nat_chains.0.push(chain_line(fw_chain));
        active.push(fw_chain.clone());
        let args = words![
            "-A",
            fw_chain,
            "-m",
            "comment",
            "--comment",
            quoted(&format!("{} loadbalancer IP", self.name_str)),
        ];
        for cidr in &fw.allowed {
            t.nat_rules.push(&words![
                &args,
                "-s",
                cidr.to_string(),
                "-j",
                &self.ext_chain
            ]);
        }
        if fw.allow_from_node {
            for ip in &self.sp.load_balancer_ips {
                t.nat_rules
                    .push(&words![&args, "-s", ip.to_string(), "-j", &self.ext_chain]);
            }
        }
        t.nat_rules.push(&words![
            "-A",
            fw_chain,
            "-m",
            "comment",
            "--comment",
            quoted(&format!(
                "other traffic to {} will be dropped by KUBE-PROXY-FIREWALL",
                self.name_str
            )),
        ]);
    }

    /// One KUBE-SEP chain per reachable endpoint: hairpin masquerade, then DNAT.
    fn write_endpoint_chains(&self, t: &mut Tables, active: &mut Vec<String>) {
        let svc = self.sp.service;
        for ep in &self.sp.reachable {
            let sep = names::endpoint_chain(&svc.name, ep);
            t.nat_chains.0.push(chain_line(&sep));
            active.push(sep.clone());
            let mut args = words!["-A", &sep];
            if !self.large {
                args.extend(words!["-m", "comment", "--comment", &self.name_str]);
            }
            t.nat_rules.push(&words![
                &args,
                "-s",
                ep.ip.to_string(),
                "-j",
                KUBE_MARK_MASQ
            ]);
            if svc.session_affinity_timeout.is_some() {
                args.extend(words!["-m", "recent", "--name", &sep, "--set"]);
            }
            t.nat_rules.push(&words![
                args,
                &self.proto_match,
                "-j",
                "DNAT",
                "--to-destination",
                ep.addr_string(),
            ]);
        }
    }
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
