//! Backends: render the model into kernel state (pure) and apply it (through `kernel`).
//!
//! Every backend sits behind [`Backend`], so the sync loop, metrics and health logic are
//! shared and a mode switch changes only how the kernel is written. [`Kind`] is the one place
//! a proxy mode is mapped to its backend (start, cleanup, render; explain matches on it):
//! adding a backend is a directory here plus one arm in each of its methods. Both backends
//! build on the shared [`netfilter`] layer and the [`conntrack`] reconciler.

pub mod conntrack;
pub mod iptables;
pub mod ipvs;
pub mod netfilter;
pub mod nftables;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;

use crate::config::{ProxyMode, ProxyOptions};
use crate::kernel::iptables::Iptables;

use crate::model::{IpFamily, ProxyModel, ServiceName};
use conntrack::ReconcileReport;

/// One sync as the loop asks for it.
#[derive(Debug, Clone, Copy)]
pub struct SyncRequest<'a> {
    /// The desired state.
    pub model: &'a ProxyModel,
    /// Services changed since the last successful sync (ignored on a full sync).
    pub changed: &'a BTreeSet<ServiceName>,
    /// Rewrite everything (start-up, node facts changed, after a failure, hourly).
    pub full: bool,
    /// This sync's node facts (primary node IP, node-port addresses, local detector).
    pub node_facts: &'a crate::host::NodeFacts,
}

/// What a successful sync reports back, for metrics and health-check servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Rules per table after the sync (`filter`, `nat`, ...), for the sync log line.
    pub rules_per_table: BTreeMap<String, usize>,
    /// `sync_proxy_rules_iptables_{total,last}`: only iptables mode reports them (upstream's
    /// IPVS proxier writes iptables rules too, but does not fill these series).
    pub iptables_rules: Option<IptablesRuleCounts>,
    /// Service ports whose internal Local policy found no local endpoint.
    pub no_local_endpoints_internal: usize,
    /// Service ports whose external Local policy found no local endpoint.
    pub no_local_endpoints_external: usize,
    /// healthCheckNodePort and local endpoint count of each eTP=Local service.
    pub health_checks: BTreeMap<ServiceName, (u16, usize)>,
    /// The conntrack reconcile round that followed the sync (`None`: skipped, no UDP or
    /// SCTP frontend could have a stale flow).
    pub conntrack: Option<ReconcileReport>,
    /// nftables mode: the stale-chain delete transaction of this sync failed
    /// (`sync_proxy_rules_nftables_cleanup_failures_total`).
    pub nftables_cleanup_failed: bool,
}

/// iptables rule counts per table, as upstream's iptables proxier reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IptablesRuleCounts {
    /// `filter` rules owned by kube-proxy after the sync.
    pub filter_total: usize,
    /// `nat` rules owned after the sync (written plus those of chains a partial sync kept).
    pub nat_total: usize,
    /// `filter` rules written by this sync.
    pub filter_last: usize,
    /// `nat` rules written by this sync.
    pub nat_last: usize,
}

impl SyncOutcome {
    /// An outcome with the rule counts of the `filter` and `nat` tables (for the log).
    pub fn new(
        filter_rules: usize,
        nat_rules: usize,
        no_local_endpoints_internal: usize,
        no_local_endpoints_external: usize,
        health_checks: BTreeMap<ServiceName, (u16, usize)>,
    ) -> Self {
        SyncOutcome {
            rules_per_table: BTreeMap::from([
                ("filter".to_string(), filter_rules),
                ("nat".to_string(), nat_rules),
            ]),
            iptables_rules: None,
            no_local_endpoints_internal,
            no_local_endpoints_external,
            health_checks,
            conntrack: None,
            nftables_cleanup_failed: false,
        }
    }
}

/// Why a sync (or `--cleanup`) failed, one kind per thing that can fail, so metrics count
/// the right failure. The loop keeps the previous rules and retries with a full sync.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `iptables-restore` rejected the rendered rules (what upstream counts in
    /// `sync_proxy_rules_iptables_restore_failures_total`, in both modes).
    #[error("iptables-restore failed: {0}")]
    IptablesRestore(String),
    /// A chain or jump rule in a builtin chain could not be ensured.
    #[error("ensuring the jump rules failed: {0}")]
    JumpRules(String),
    /// An ipset could not be created, changed or destroyed.
    #[error("updating ipsets failed: {0}")]
    Ipset(String),
    /// IPVS refused virtual or real server changes, or kube-ipvs0's addresses.
    #[error("{0}")]
    Ipvs(String),
    /// The IPVS dummy link could not be created.
    #[error("creating the dummy link failed: {0}")]
    Link(String),
    /// Reading kernel state failed.
    #[error("reading kernel state failed: {0}")]
    Read(String),
    /// `nft -f -` rejected the sync's transaction (upstream's
    /// `sync_proxy_rules_nftables_sync_failures_total`).
    #[error("nft transaction failed: {0}")]
    NftablesTransaction(String),
    /// `--cleanup` left something behind.
    #[error("{0}")]
    Cleanup(String),
}

/// The backend a proxy mode maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--proxy-mode=iptables`.
    Iptables,
    /// `--proxy-mode=ipvs`.
    Ipvs,
    /// `--proxy-mode=nftables`.
    Nftables,
}

/// Why a backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// IPVS mode cannot run on this host (no IPVS, old ipset, unknown scheduler, ...).
    #[error(transparent)]
    Ipvs(#[from] ipvs::proxier::IpvsStartError),
    /// nftables mode cannot run on this host (old nft or kernel, no nf_tables).
    #[error(transparent)]
    Nftables(#[from] nftables::proxier::NftablesStartError),
}

/// A started backend and what the daemon runs beside it.
pub struct Started {
    /// The backend for the sync loop.
    pub backend: AnyBackend,
    /// Tasks the backend needs supervised (they never end while it works).
    pub tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    /// The nfacct handle when the backend's rules count into nfacct counters.
    pub nfacct: Option<crate::kernel::nfacct::Nfacct>,
}

impl Kind {
    /// The backend of `mode` (`None` for a mode without one).
    pub fn for_mode(mode: ProxyMode) -> Option<Kind> {
        match mode {
            ProxyMode::Iptables => Some(Kind::Iptables),
            ProxyMode::Ipvs => Some(Kind::Ipvs),
            ProxyMode::Nftables => Some(Kind::Nftables),
        }
    }

    /// The IP families this host can run a proxier for, primary-first order not implied
    /// (upstream `platformCheckSupported`: a family is supported when its iptables works,
    /// `POSTROUTING` in its nat table). An unsupported family is skipped with one log line.
    pub async fn families(self, variant: crate::kernel::IptablesVariant) -> Vec<IpFamily> {
        let mut out = Vec::new();
        for family in self.candidate_families() {
            let ipt = Iptables::new(variant, family);
            match ipt
                .chain_exists(crate::kernel::Table::Nat, "POSTROUTING")
                .await
            {
                Ok(true) => out.push(family),
                Ok(false) => {
                    tracing::warn!(%family, "no {family} nat table; not proxying {family}")
                }
                Err(e) => {
                    tracing::warn!(%family, error = %e, "{family} is not supported on this host; not proxying {family}")
                }
            }
        }
        out
    }

    /// The families this backend can program at all.
    pub fn candidate_families(self) -> Vec<IpFamily> {
        match self {
            Kind::Iptables | Kind::Ipvs | Kind::Nftables => IpFamily::ALL.to_vec(),
        }
    }

    /// Whether localhost node ports are served by rules that need `route_localnet`.
    pub fn uses_route_localnet(self) -> bool {
        self == Kind::Iptables
    }

    /// What a full sync of `family`'s `model` writes, as `render` prints it (`node_ips`: the
    /// addresses node ports are served on).
    pub fn render(
        self,
        opts: &ProxyOptions,
        model: &ProxyModel,
        family: IpFamily,
        node_ips: Vec<IpAddr>,
    ) -> String {
        match self {
            Kind::Iptables => iptables::render_text(opts, model, family, node_ips),
            Kind::Ipvs => ipvs::render_text(opts, model, family, node_ips),
            Kind::Nftables => nftables::render_text(opts, model, family, node_ips),
        }
    }

    /// Whether the daemon keeps the host's addresses from rtnetlink events for this mode
    /// (and passes them to [`Kind::start`]). Not IPVS: its own syncs change the addresses
    /// (every service IP bound to `kube-ipvs0`), so events would only add dumps.
    pub fn follows_address_events(self) -> bool {
        self != Kind::Ipvs
    }

    /// Probes and sets up the backend writing through `ipt`; `addrs` lists the host's
    /// addresses for iptables and nftables mode (IPVS lists its own).
    pub async fn start(
        self,
        opts: &ProxyOptions,
        ipt: Iptables,
        random_fully: bool,
        addrs: crate::kernel::addrs::Addresses,
    ) -> Result<Started, StartError> {
        if self != Kind::Nftables {
            // Switching away from nftables mode leaves nothing of it behind.
            if let Err(e) =
                nftables::proxier::NftablesProxier::cleanup(&crate::kernel::nft::Nft::new()).await
            {
                tracing::debug!(error = %e, "removing nftables-mode tables");
            }
        }
        match self {
            Kind::Nftables => Ok(Started {
                backend: AnyBackend::Nftables(nftables::proxier::start(opts, &ipt, addrs).await?),
                tasks: Vec::new(),
                nfacct: None,
            }),
            Kind::Iptables => {
                let (backend, nfacct) = iptables::proxier::start(opts, ipt, random_fully, addrs);
                Ok(Started {
                    backend: AnyBackend::Iptables(backend),
                    tasks: Vec::new(),
                    nfacct,
                })
            }
            Kind::Ipvs => {
                let mut backend = ipvs::proxier::start(opts, ipt, random_fully).await?;
                let graceful = backend.take_graceful_task();
                Ok(Started {
                    backend: AnyBackend::Ipvs(backend),
                    tasks: graceful
                        .map(|t| ("IPVS graceful termination", t))
                        .into_iter()
                        .collect(),
                    nfacct: None,
                })
            }
        }
    }
}

/// `--cleanup`: removes what every mode (ours or upstream's) created, as upstream's
/// `--cleanup` tears down every mode. Every step runs; failures are reported together.
pub async fn cleanup(ipt: &Iptables) -> Result<(), BackendError> {
    let legacy = cleanup_legacy(ipt).await;
    let nft = nftables::proxier::NftablesProxier::cleanup(&crate::kernel::nft::Nft::new()).await;
    match (legacy, nft) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(BackendError::Cleanup(format!("{a}; {b}"))),
    }
}

/// Removes what iptables and IPVS mode created (nftables mode's start-up, and `--cleanup`).
pub async fn cleanup_legacy(ipt: &Iptables) -> Result<(), BackendError> {
    use crate::kernel::ipset::Ipset;
    use crate::kernel::link::DummyLink;
    let mut errors = Vec::new();
    let first = iptables::proxier::IptablesProxier::cleanup(ipt).await;
    if let Err(e) =
        ipvs::proxier::IpvsProxier::cleanup(ipt, &Ipset::new(), &DummyLink::default()).await
    {
        errors.push(format!("ipvs mode: {e}"));
    }
    // Both modes share chain names (KUBE-MARK-MASQ, jumped to from IPVS-mode chains): when
    // IPVS-mode rules were present the iptables-mode pass fails on them; once they are gone
    // a second pass completes it.
    if first.is_err()
        && let Err(e) = iptables::proxier::IptablesProxier::cleanup(ipt).await
    {
        errors.push(format!("iptables mode: {e}"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(BackendError::Cleanup(errors.join("; ")))
    }
}

/// One of the backends, for the sync loop.
pub enum AnyBackend {
    /// iptables mode.
    Iptables(iptables::proxier::IptablesProxier),
    /// IPVS mode.
    Ipvs(ipvs::proxier::IpvsProxier),
    /// nftables mode.
    Nftables(nftables::proxier::NftablesProxier),
}

impl Backend for AnyBackend {
    fn mode(&self) -> &'static str {
        match self {
            AnyBackend::Iptables(b) => b.mode(),
            AnyBackend::Ipvs(b) => b.mode(),
            AnyBackend::Nftables(b) => b.mode(),
        }
    }

    fn partial_syncs(&self) -> bool {
        match self {
            AnyBackend::Iptables(b) => b.partial_syncs(),
            AnyBackend::Ipvs(b) => b.partial_syncs(),
            AnyBackend::Nftables(b) => b.partial_syncs(),
        }
    }

    fn periodic_full_syncs(&self) -> bool {
        match self {
            AnyBackend::Iptables(b) => b.periodic_full_syncs(),
            AnyBackend::Ipvs(b) => b.periodic_full_syncs(),
            AnyBackend::Nftables(b) => b.periodic_full_syncs(),
        }
    }

    async fn sync(&mut self, req: SyncRequest<'_>) -> Result<SyncOutcome, BackendError> {
        match self {
            AnyBackend::Iptables(b) => b.sync(req).await,
            AnyBackend::Ipvs(b) => b.sync(req).await,
            AnyBackend::Nftables(b) => b.sync(req).await,
        }
    }

    async fn needs_full_sync(&mut self) -> bool {
        match self {
            AnyBackend::Iptables(b) => b.needs_full_sync().await,
            AnyBackend::Ipvs(b) => b.needs_full_sync().await,
            AnyBackend::Nftables(b) => b.needs_full_sync().await,
        }
    }
}

/// A way of programming the kernel.
pub trait Backend: Send {
    /// The mode name served on `/proxyMode`.
    fn mode(&self) -> &'static str;

    /// Whether the backend has upstream's partial syncs (iptables and nftables modes): a
    /// sync asked for with `full: false` rewrites only what changed, and its duration feeds
    /// the partial sync-duration histogram. IPVS mode answers `false` as upstream's IPVS
    /// proxier (neither histogram), although between its reconciles it too writes only
    /// the difference from its last sync.
    fn partial_syncs(&self) -> bool;

    /// Whether the hourly periodic sync is a full one now. Upstream's iptables proxier skips
    /// it in large-cluster mode (#138571: the full rewrite disrupts traffic there; drift is
    /// still caught by the canary); a backend that never does (IPVS, nftables) keeps it.
    fn periodic_full_syncs(&self) -> bool {
        true
    }

    /// Programs the kernel for `req`.
    fn sync(
        &mut self,
        req: SyncRequest<'_>,
    ) -> impl Future<Output = Result<SyncOutcome, BackendError>> + Send;

    /// Whether kernel state drifted in a way only a full sync repairs (e.g. the canary chain
    /// was flushed by someone else).
    fn needs_full_sync(&mut self) -> impl Future<Output = bool> + Send;
}
