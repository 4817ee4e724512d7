//! The nftables [`Backend`]: renders with [`super::render`], builds the transaction against
//! the record of what was committed ([`super::tx`]) and applies it with one `nft -f -` per
//! sync through [`crate::kernel::nft`]. Stale chains are flushed at once and deleted by a
//! separate transaction later, as upstream (a chain still referenced from a map element
//! being deleted is only released a little later on kernels before 6.2); not at the start
//! of the next sync as upstream, though, but when the loop is idle (the drift check) or once
//! they have waited [`STALE_CHAIN_LINGER`]: nft 1.0.6 fetches every chain of the table for a
//! `delete chain` (0.3–0.5 s at 10,000 services), while a one-endpoint change's own
//! transaction needs only the table (see [`super::render::Writer::rules`]).
//!
//! Drift: upstream's nftables proxier has no canary; a deleted or flushed table is only
//! rewritten by the next full sync (hourly) or after a partial sync fails on it. Here every
//! `sync_period` the sync loop asks [`Backend::needs_full_sync`], which compares each chain's
//! rule count in the kernel with what the last sync wrote, read over nf_tables netlink
//! (`nft -t list table` took ~0.6 s at 1k services, an `nft list chain` 0.15–0.3 s at 10k:
//! nft 1.0.6 builds its cache of the whole table first): every chain while the upstream
//! layout is in use; in the large-cluster layout only the NAT hooks, the firewall hook and
//! the dispatch chain.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::names::FamilyTokens;
use super::render::{
    RenderConfig, ServiceBlock, Writer, count_lacking, is_large, render, render_ports, write_setup,
};
use super::tx::{Committed, Existing, Owned, Prior, build, build_partial};
use crate::backend::conntrack::ConntrackCleaner;
use crate::backend::{Backend, BackendError, SyncOutcome, SyncRequest};
use crate::kernel::addrs::Addresses;
use crate::kernel::conntrack::Conntrack;
use crate::kernel::nft::Nft;
use crate::model::{IpFamily, ProxyModel, ServiceName, ServicePortName};

/// How long a flushed stale chain waits before it is deleted (upstream: 1 s).
const STALE_CHAIN_DELAY: Duration = Duration::from_secs(1);
/// How long a flushed stale chain waits at most while syncs keep coming: a sync deletes
/// the stale chains when one has waited this long (the idle drift check deletes them
/// sooner), so steady churn pays one `delete chain` transaction per this period.
const STALE_CHAIN_LINGER: Duration = Duration::from_secs(10);

/// Oldest `nft` upstream accepts (knftables rejects v0.x and v1.0.0).
const MIN_NFT: (u32, u32, u32) = (1, 0, 1);
/// Oldest kernel upstream accepts (`NFTablesKubeProxyKernelVersion`).
const MIN_KERNEL: (u32, u32) = (5, 13);
/// The chains a drift check counts the rules of when the table is too large to list whole:
/// the hooks service connections and
/// loadBalancerSourceRanges depend on (base chains can be deleted, being unreferenced) and
/// the dispatch chain. Any of them also shows a deleted or flushed table.
const LARGE_TABLE_CHECKED: [&str; 5] = [
    "filter-prerouting-pre-dnat",
    "nat-prerouting",
    "nat-output",
    "nat-postrouting",
    super::names::SERVICES,
];

/// Upstream's override of the kernel version check.
const SKIP_KERNEL_CHECK_ENV: &str = "KUBE_PROXY_NFTABLES_SKIP_KERNEL_VERSION_CHECK";

/// Why nftables mode cannot run on this host.
#[derive(Debug, thiserror::Error)]
pub enum NftablesStartError {
    /// `nft` is missing or failed.
    #[error("nft is not usable: {0}")]
    Nft(String),
    /// `nft` is older than 1.0.1.
    #[error("nft version {0} is too old (need 1.0.1 or later)")]
    NftVersion(String),
    /// The kernel is older than 5.13.
    #[error(
        "kernel {0} is too old for nftables mode (need 5.13 or later; set {SKIP_KERNEL_CHECK_ENV} to override)"
    )]
    Kernel(String),
}

/// The nftables-mode proxier (one family; the table is `ip kube-proxy` or `ip6 kube-proxy`).
pub struct NftablesProxier {
    nft: Nft,
    conntrack: ConntrackCleaner,
    addrs: Addresses,
    config: RenderConfig,
    /// What the last successful transaction left; `None` when unknown (start-up, failure).
    committed: Option<Committed>,
    /// A full sync succeeded since start (upstream `flushed`): later ones skip the base
    /// chains' add+delete.
    flushed: bool,
    /// Flushed per-service chains awaiting deletion, with when they were flushed.
    stale: BTreeMap<String, Instant>,
    /// Deleting stale chains failed: the next sync re-reads the table and is full.
    needs_full: bool,
    /// Deleting stale chains failed since the last sync reported it (between syncs, in the
    /// drift check): the next sync's outcome says so.
    cleanup_failed: bool,
    /// Operations in the last transaction (for the sync log).
    last_ops: usize,
    /// The blocks `committed` was built from; `None` whenever `committed` is.
    blocks: Option<Blocks>,
}

/// What every service port's block owned when last committed, so that a partial sync
/// renders only the changed services (upstream re-renders every service and skips the
/// unchanged ones). Names only: the rules' text is not kept.
struct Blocks {
    /// The settings they were rendered with: any change (node facts) renders everything.
    config: RenderConfig,
    /// The layout they were rendered in.
    large: bool,
    ports: BTreeMap<ServicePortName, PortRecord>,
}

/// One service port's objects and its no-local-endpoint flags.
struct PortRecord {
    owned: Owned,
    lacks_local: (bool, bool),
}

impl PortRecord {
    fn of(block: &ServiceBlock) -> Self {
        PortRecord {
            owned: Owned::of(&block.ops),
            lacks_local: block.lacks_local,
        }
    }
}

/// What a sync reports besides the transaction.
struct Counts {
    /// Service ports whose internal / external Local policy found no local endpoint.
    lacking: (usize, usize),
    health_checks: BTreeMap<ServiceName, (u16, usize)>,
}

impl NftablesProxier {
    /// A proxier writing through `nft`; the node facts come with every sync request.
    pub fn new(nft: Nft, conntrack: Conntrack, addrs: Addresses, config: RenderConfig) -> Self {
        NftablesProxier {
            nft,
            conntrack: ConntrackCleaner::new(conntrack),
            addrs,
            config,
            committed: None,
            flushed: false,
            stale: BTreeMap::new(),
            needs_full: false,
            cleanup_failed: false,
            last_ops: 0,
            blocks: None,
        }
    }

    /// The render settings in use (with the last sync's node facts).
    pub fn config(&self) -> &RenderConfig {
        &self.config
    }

    /// Operations written by the last sync's main transaction.
    pub fn last_operations(&self) -> usize {
        self.last_ops
    }

    /// Stale chains flushed and not yet deleted.
    pub fn pending_stale_chains(&self) -> usize {
        self.stale.len()
    }

    fn family_word(&self) -> &'static str {
        self.config.family.nft()
    }

    async fn local_ips(&self) -> Vec<IpAddr> {
        match self.addrs.list().await {
            Ok(list) => list
                .into_iter()
                .map(|a| a.addr)
                .filter(|ip| self.config.family.matches(ip))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing local addresses failed");
                Vec::new()
            }
        }
    }

    /// Deletes chains flushed at least [`STALE_CHAIN_DELAY`] ago, in their own transaction,
    /// if one of them was flushed at least `linger` ago; `false` when that transaction
    /// failed.
    async fn delete_stale_chains(&mut self, linger: Duration) -> bool {
        let now = Instant::now();
        let waited = |t: &Instant| now.duration_since(*t);
        if !self.stale.values().any(|t| waited(t) >= linger) {
            return true;
        }
        let due: Vec<String> = self
            .stale
            .iter()
            .filter(|(_, t)| waited(t) >= STALE_CHAIN_DELAY)
            .map(|(c, _)| c.clone())
            .collect();
        if due.is_empty() {
            return true;
        }
        let fam = self.family_word();
        let text: String = due
            .iter()
            .map(|c| format!("delete chain {fam} {} {c}\n", super::names::TABLE))
            .collect();
        tracing::info!(num_chains = due.len(), "Deleting stale nftables chains");
        match self.nft.run(&text).await {
            Ok(()) => {
                due.iter().for_each(|c| {
                    self.stale.remove(c);
                });
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "Unable to delete stale chains; will retry later");
                // The next sync lists the table again, so the survivors are found, flushed
                // and retried.
                self.stale.clear();
                self.committed = None;
                self.needs_full = true;
                false
            }
        }
    }

    /// What the kernel holds when the record is unknown: nothing (no table), or names.
    async fn existing(&self) -> Result<Option<Existing>, BackendError> {
        let names = self
            .nft
            .table_names(self.family_word())
            .await
            .map_err(|e| BackendError::Read(e.to_string()))?;
        Ok(names.map(|n| Existing {
            chains: n.chains,
            sets: n.sets,
        }))
    }

    /// Rule counts the last sync left in each chain it owns (the fixed section, and the
    /// per-service chains while the ruleset is kept).
    fn expected_rule_counts(&self) -> BTreeMap<String, usize> {
        let mut text = String::new();
        write_setup(
            &mut Writer::new(self.config.family, &mut text),
            &self.config,
            false,
        );
        let prefix = format!("{} {} ", self.family_word(), super::names::TABLE);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("add ") else {
                continue;
            };
            let Some((object, rest)) = rest.split_once(' ') else {
                continue;
            };
            let Some(name) = rest
                .strip_prefix(&prefix)
                .and_then(|r| r.split_whitespace().next())
            else {
                continue;
            };
            match object {
                "chain" => {
                    counts.entry(name.to_string()).or_default();
                }
                "rule" => *counts.entry(name.to_string()).or_default() += 1,
                _ => {}
            }
        }
        let small = self.blocks.as_ref().filter(|b| !b.large);
        for (chain, rules) in small
            .iter()
            .flat_map(|b| b.ports.values())
            .flat_map(|r| &r.owned.chains)
        {
            *counts.entry(chain.clone()).or_default() += rules;
        }
        counts
    }

    /// Why the kernel's table no longer holds what the last sync wrote (`None`: it does).
    async fn drift(&self) -> Result<Option<String>, BackendError> {
        let mut expected = self.expected_rule_counts();
        if self.blocks.as_ref().is_some_and(|b| !b.large) {
            return self.drift_of_table(expected).await;
        }
        expected.retain(|c, _| LARGE_TABLE_CHECKED.contains(&c.as_str()));
        let counts = self
            .nft
            .rule_counts(self.family_word(), &LARGE_TABLE_CHECKED)
            .await
            .map_err(|e| BackendError::Read(e.to_string()))?;
        for (chain, count) in LARGE_TABLE_CHECKED.into_iter().zip(counts) {
            let Some(count) = count else {
                return Ok(Some(format!("chain {chain} is gone")));
            };
            let want = expected.get(chain).copied().unwrap_or_default();
            if count != want {
                return Ok(Some(format!(
                    "chain {chain} holds {count} rules, not {want}"
                )));
            }
        }
        Ok(None)
    }

    /// [`Self::drift`] of a table small enough to count whole: every chain's rule count.
    async fn drift_of_table(
        &self,
        expected: BTreeMap<String, usize>,
    ) -> Result<Option<String>, BackendError> {
        let counts = self
            .nft
            .table_rule_counts(self.family_word())
            .await
            .map_err(|e| BackendError::Read(e.to_string()))?;
        if counts.is_empty() {
            return Ok(Some("the table is gone".into()));
        }
        for (chain, want) in expected {
            match counts.get(&chain) {
                None => return Ok(Some(format!("chain {chain} is gone"))),
                Some(&n) if n != want => {
                    return Ok(Some(format!("chain {chain} holds {n} rules, not {want}")));
                }
                Some(_) => {}
            }
        }
        Ok(None)
    }

    /// Renders and applies one sync: only the `changed` services when the last commit and
    /// its blocks are known and the settings and layout are unchanged, everything otherwise.
    async fn apply(
        &mut self,
        model: &ProxyModel,
        full: bool,
        changed: &BTreeSet<ServiceName>,
    ) -> Result<Counts, BackendError> {
        let large = is_large(model, &self.config);
        let reusable = self
            .blocks
            .as_ref()
            .is_some_and(|b| b.large == large && b.config == self.config);
        if !full && reusable && self.committed.is_some() {
            self.apply_partial(model, changed, large).await
        } else {
            self.apply_full(model, full, large).await
        }
    }

    async fn apply_full(
        &mut self,
        model: &ProxyModel,
        full: bool,
        large: bool,
    ) -> Result<Counts, BackendError> {
        let rs = render(model, &self.config);
        let existing = match self.committed {
            Some(_) => None,
            None => self.existing().await?,
        };
        let empty = Committed::default();
        let prior = match (&self.committed, &existing) {
            (Some(c), _) => Prior::Known(c),
            (None, Some(existing)) => Prior::Unknown { existing },
            (None, None) => Prior::Known(&empty),
        };
        let full = full || self.committed.is_none();
        let tx = build(&rs, prior, full, !self.flushed);
        self.run(tx).await?;
        self.flushed |= full;
        let ports = rs
            .services
            .iter()
            .map(|b| (b.port.clone(), PortRecord::of(b)))
            .collect();
        self.blocks = Some(Blocks {
            config: self.config.clone(),
            large,
            ports,
        });
        Ok(Counts {
            lacking: (
                rs.no_local_endpoints_internal,
                rs.no_local_endpoints_external,
            ),
            health_checks: rs.health_checks,
        })
    }

    async fn apply_partial(
        &mut self,
        model: &ProxyModel,
        changed: &BTreeSet<ServiceName>,
        large: bool,
    ) -> Result<Counts, BackendError> {
        let fresh = render_ports(model, &self.config, large, |svc| {
            changed.contains(&svc.name.service)
        });
        let (Some(blocks), Some(record)) = (self.blocks.as_mut(), self.committed.take()) else {
            return Err(BackendError::NftablesTransaction(
                "partial sync without a record of the last commit".into(),
            ));
        };
        let gone: Vec<ServicePortName> = blocks
            .ports
            .keys()
            .filter(|p| changed.contains(&p.service))
            .cloned()
            .collect();
        let old: Vec<Owned> = gone
            .iter()
            .filter_map(|p| blocks.ports.remove(p))
            .map(|r| r.owned)
            .collect();
        let tx = build_partial(self.config.family, &old, &fresh.blocks, record);
        self.run(tx).await?;
        let blocks = self.blocks.get_or_insert_with(|| Blocks {
            config: self.config.clone(),
            large,
            ports: BTreeMap::new(),
        });
        for b in &fresh.blocks {
            blocks.ports.insert(b.port.clone(), PortRecord::of(b));
        }
        let lacking = count_lacking(blocks.ports.values().map(|r| r.lacks_local));
        Ok(Counts {
            lacking,
            health_checks: fresh.health_checks,
        })
    }

    /// Runs one transaction and keeps its record; on failure forgets what the kernel holds
    /// (the next sync re-reads the table and is full).
    async fn run(&mut self, tx: super::tx::Transaction) -> Result<(), BackendError> {
        self.last_ops = tx.ops;
        if !tx.text.is_empty() {
            tracing::trace!(transaction = %tx.text, "Running nftables transaction");
            if let Err(e) = self.nft.run(&tx.text).await {
                // The flushes never happened: forget them, and rebuild from the kernel.
                self.committed = None;
                self.blocks = None;
                self.stale.clear();
                return Err(BackendError::NftablesTransaction(e.to_string()));
            }
        }
        let now = Instant::now();
        for c in tx.flushed_stale {
            self.stale.entry(c).or_insert(now);
        }
        self.stale.retain(|c, _| !tx.next.chains.contains_key(c));
        self.committed = Some(tx.next);
        Ok(())
    }

    /// `--cleanup` and other modes' start-up: deletes both families' tables.
    pub async fn cleanup(nft: &Nft) -> Result<(), BackendError> {
        for fam in ["ip", "ip6"] {
            match nft.delete_table(fam).await {
                Ok(true) => tracing::info!(family = fam, "deleted the kube-proxy nftables table"),
                Ok(false) => {}
                Err(e) => return Err(BackendError::Cleanup(format!("nftables {fam}: {e}"))),
            }
        }
        Ok(())
    }
}

impl Backend for NftablesProxier {
    fn mode(&self) -> &'static str {
        "nftables"
    }

    fn partial_syncs(&self) -> bool {
        true
    }

    async fn sync(&mut self, req: SyncRequest<'_>) -> Result<SyncOutcome, BackendError> {
        let cleanup_ok = self.delete_stale_chains(STALE_CHAIN_LINGER).await;
        let local = self.local_ips().await;
        self.config.apply_node_facts(req.node_facts, &local);
        // The drop rule lives in the fixed section, which only a full sync writes (upstream
        // waits for its next full sync, up to an hour; here the change is written at once).
        let cidrs_changed = self.config.service_cidrs != req.model.service_cidrs;
        self.config
            .service_cidrs
            .clone_from(&req.model.service_cidrs);
        // Taken whatever the request says: left set, it would ask for a full sync forever.
        let needs_full = std::mem::take(&mut self.needs_full);
        let full = req.full || needs_full || cidrs_changed;
        let counts = self.apply(req.model, full, req.changed).await?;
        let conntrack = self.conntrack.after_sync(req.model, &local).await;
        let mut outcome = SyncOutcome::new(
            0,
            0,
            counts.lacking.0,
            counts.lacking.1,
            counts.health_checks,
        );
        outcome.rules_per_table = BTreeMap::from([(
            format!("{} {}", self.family_word(), super::names::TABLE),
            self.last_ops,
        )]);
        outcome.conntrack = conntrack;
        outcome.nftables_cleanup_failed = !cleanup_ok || std::mem::take(&mut self.cleanup_failed);
        Ok(outcome)
    }

    /// Also deletes the stale chains due (this is the loop's idle time): a failure asks for
    /// a full sync, which finds them again.
    async fn needs_full_sync(&mut self) -> bool {
        if !self.delete_stale_chains(STALE_CHAIN_DELAY).await {
            self.cleanup_failed = true;
        }
        if self.needs_full || self.committed.is_none() {
            return self.needs_full;
        }
        match self.drift().await {
            Ok(None) => false,
            Ok(Some(why)) => {
                tracing::info!(family = self.family_word(), reason = %why, "nftables table drifted from what was synced, rewriting it");
                // The record no longer describes the kernel: the next sync reads the table
                // and writes everything.
                self.committed = None;
                self.stale.clear();
                self.needs_full = true;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "checking the nftables table failed");
                false
            }
        }
    }
}

impl RenderConfig {
    /// Takes this sync's node facts: primary node IP, node-port addresses (against the
    /// host's `local` addresses of this family) and the local-traffic detector.
    pub fn apply_node_facts(&mut self, facts: &crate::host::NodeFacts, local: &[IpAddr]) {
        self.primary_node_ip = facts.primary_ip.filter(|ip| self.family.matches(ip));
        self.node_ports = facts.node_port_ips(local);
        self.local_detector = facts.local_detector.clone();
    }
}

/// Render settings from the options (the node facts are applied per sync).
pub fn render_config(opts: &crate::config::ProxyOptions, family: IpFamily) -> RenderConfig {
    RenderConfig {
        family,
        mark: crate::backend::netfilter::masquerade_mark(opts.masquerade_bit),
        masquerade_all: opts.masquerade_all,
        ..RenderConfig::default()
    }
}

/// What `render` prints in nftables mode: the first-sync transaction of `model` on a host
/// without the table.
pub fn render_text(
    opts: &crate::config::ProxyOptions,
    model: &ProxyModel,
    family: IpFamily,
    node_ips: Vec<IpAddr>,
) -> String {
    let mut config = render_config(opts, family);
    let facts = crate::host::HostSettings::from_options(opts).facts(&model.node, family);
    config.apply_node_facts(&facts, &node_ips);
    config.service_cidrs.clone_from(&model.service_cidrs);
    let rs = render(model, &config);
    build(&rs, Prior::Known(&Committed::default()), true, true).text
}

fn kernel_release() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = text.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Upstream's start-up checks: `nft` ≥ 1.0.1, kernel ≥ 5.13 (unless overridden), and a
/// `--check` transaction creating the table.
pub async fn check_host(nft: &Nft, family: IpFamily) -> Result<(), NftablesStartError> {
    let version = nft
        .version()
        .await
        .map_err(|e| NftablesStartError::Nft(e.to_string()))?;
    match crate::kernel::nft::parse_version(&version) {
        Some(v) if v >= MIN_NFT => {}
        _ => return Err(NftablesStartError::NftVersion(version.trim().to_string())),
    }
    let skip = std::env::var_os(SKIP_KERNEL_CHECK_ENV).is_some_and(|v| !v.is_empty());
    if !skip && let Some(k) = kernel_release().filter(|k| *k < MIN_KERNEL) {
        return Err(NftablesStartError::Kernel(format!("{}.{}", k.0, k.1)));
    }
    let probe = format!(
        "add table {} {} {{ comment \"test\" ; }}\n",
        family.nft(),
        super::names::TABLE
    );
    nft.check(&probe)
        .await
        .map_err(|e| NftablesStartError::Nft(e.to_string()))
}

/// Starts nftables mode: host checks, then removal of iptables- and IPVS-mode leftovers
/// (so switching modes is clean), then the proxier, listing the host's addresses with `addrs`.
pub async fn start(
    opts: &crate::config::ProxyOptions,
    ipt: &crate::kernel::iptables::Iptables,
    addrs: Addresses,
) -> Result<NftablesProxier, NftablesStartError> {
    let nft = Nft::new();
    let family = ipt.family();
    check_host(&nft, family).await?;
    if let Err(e) = crate::backend::cleanup_legacy(ipt).await {
        tracing::warn!(error = %e, "removing iptables/IPVS-mode leftovers failed");
    }
    Ok(NftablesProxier::new(
        nft,
        Conntrack::new(),
        addrs,
        render_config(opts, family),
    ))
}
