//! Backends: render the model into kernel state (pure) and apply it (through `kernel`).
//!
//! Every backend sits behind [`Backend`], so the sync loop, metrics and health logic are
//! shared and a mode switch changes only how the kernel is written.

pub mod conntrack;
pub mod iptables;
pub mod ipvs;
pub mod netfilter;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use crate::model::{ProxyModel, ServiceName};
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
        }
    }
}

/// Why a sync failed. The loop keeps the previous rules and retries with a full sync.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `iptables-restore` rejected the rendered rules (what upstream counts in
    /// `sync_proxy_rules_iptables_restore_failures_total`, in both modes).
    #[error("iptables-restore failed: {0}")]
    IptablesRestore(String),
    /// The kernel refused another update (a jump rule, ipsets, IPVS, the dummy link).
    #[error("applying rules failed: {0}")]
    Apply(String),
    /// Reading kernel state failed.
    #[error("reading kernel state failed: {0}")]
    Read(String),
}

/// A way of programming the kernel.
pub trait Backend: Send {
    /// The mode name served on `/proxyMode`.
    fn mode(&self) -> &'static str;

    /// Whether a sync asked for with `full: false` rewrites only what changed (iptables
    /// mode). Backends without partial syncs (IPVS) feed neither the full nor the partial
    /// sync-duration histogram, as upstream.
    fn partial_syncs(&self) -> bool;

    /// Programs the kernel for `req`.
    fn sync(
        &mut self,
        req: SyncRequest<'_>,
    ) -> impl Future<Output = Result<SyncOutcome, BackendError>> + Send;

    /// Whether kernel state drifted in a way only a full sync repairs (e.g. the canary chain
    /// was flushed by someone else).
    fn needs_full_sync(&mut self) -> impl Future<Output = bool> + Send;
}
