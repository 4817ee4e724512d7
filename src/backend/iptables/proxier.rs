//! The iptables [`Backend`]: renders with [`super::render`] and applies through
//! [`crate::kernel::iptables`], one `iptables-restore` per sync.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::render::{RenderCache, RenderConfig, RenderInput, SharedChains, SyncScope, render};
use crate::backend::conntrack::ConntrackCleaner;
use crate::backend::netfilter::jumps::{cleanup_plan, jump_rules};
use crate::backend::netfilter::names::KUBE_PROXY_CANARY;
use crate::backend::netfilter::parse::chain_names_in_save;
use crate::backend::netfilter::restore::{NEW_CHAINS_PER_RESTORE, split_new_chains};
use crate::backend::netfilter::{NFACCT_CT_STATE_INVALID, NFACCT_LOCALHOST_NODEPORTS};
use crate::backend::{Backend, BackendError, IptablesRuleCounts, SyncOutcome, SyncRequest};
use crate::kernel::addrs::Addresses;
use crate::kernel::conntrack::Conntrack;
use crate::kernel::iptables::{Iptables, IptablesVariant, RulePosition, Table};
use crate::kernel::nfacct::Nfacct;

/// The iptables-mode proxier.
pub struct IptablesProxier {
    ipt: Iptables,
    conntrack: ConntrackCleaner,
    addrs: Addresses,
    config: RenderConfig,
    /// In large-cluster mode stale chains are looked for (an `iptables-save`, seconds at
    /// scale) at most once per this period, as upstream (its syncPeriod).
    cleanup_period: Duration,
    /// When stale chains were last looked for and the restore that deleted them succeeded.
    last_cleanup: Option<Instant>,
    /// Whether the last render was in large-cluster mode (the render decides it).
    large_cluster: bool,
    /// The last render's per-service blocks: a partial sync formats only the changed services.
    cache: RenderCache,
    /// Whether the kernel's shared chains are what the last render wrote (its restore
    /// succeeded and no full sync is due), so a partial sync may edit them rule by rule.
    shared_chains_known: bool,
}

impl IptablesProxier {
    /// A proxier writing through `ipt`; `config.node_ips` is refreshed from the kernel and
    /// the node facts taken from the request on every sync.
    pub fn new(
        ipt: Iptables,
        conntrack: Conntrack,
        addrs: Addresses,
        config: RenderConfig,
    ) -> Self {
        IptablesProxier {
            ipt,
            conntrack: ConntrackCleaner::new(conntrack),
            addrs,
            config,
            cleanup_period: Duration::from_secs(30),
            last_cleanup: None,
            large_cluster: false,
            cache: RenderCache::default(),
            shared_chains_known: false,
        }
    }

    /// Looks for stale chains at most once per `period` in large-cluster mode (upstream's
    /// syncPeriod; 30 s unless set).
    pub fn with_cleanup_period(mut self, period: Duration) -> Self {
        self.cleanup_period = period;
        self
    }

    /// Whether this sync looks for stale chains: always below the large-cluster threshold,
    /// else once per cleanup period (stale chains are unreferenced, so only memory).
    fn cleanup_due(&self) -> bool {
        !self.large_cluster
            || self
                .last_cleanup
                .is_none_or(|t| t.elapsed() > self.cleanup_period)
    }

    /// The render settings in use.
    pub fn config(&self) -> &RenderConfig {
        &self.config
    }

    async fn ensure_jumps(&self) -> Result<(), BackendError> {
        for t in [Table::Mangle, Table::Nat, Table::Filter] {
            self.ipt
                .ensure_chain(t, KUBE_PROXY_CANARY)
                .await
                .map_err(|e| BackendError::JumpRules(e.to_string()))?;
        }
        for j in jump_rules() {
            let t = Table::from_name(j.table);
            self.ipt
                .ensure_chain(t, j.target)
                .await
                .map_err(|e| BackendError::JumpRules(e.to_string()))?;
            self.ipt
                .ensure_rule(RulePosition::Prepend, t, j.chain, &j.args())
                .await
                .map_err(|e| BackendError::JumpRules(e.to_string()))?;
        }
        Ok(())
    }

    async fn refresh_node_ips(&mut self) {
        match self.addrs.list().await {
            Ok(list) => {
                let ips: Vec<IpAddr> = list.into_iter().map(|a| a.addr).collect();
                self.config.node_ips = ips;
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing local addresses failed, keeping the previous list")
            }
        }
    }

    async fn existing_nat_chains(&self) -> Option<BTreeSet<String>> {
        match self.ipt.save(Table::Nat).await {
            Ok(text) => Some(chain_names_in_save(&text, "nat")),
            Err(e) => {
                tracing::warn!(error = %e, "iptables-save failed; stale chains kept this time");
                None
            }
        }
    }

    /// Restores `text`. With iptables-nft the chains the kernel lacks (`existing`, when
    /// known) go first, in transactions of their own: one transaction naming every chain of a
    /// large cluster is quadratic there (see [`split_new_chains`]).
    async fn write(
        &self,
        text: &str,
        existing: Option<&BTreeSet<String>>,
    ) -> Result<(), BackendError> {
        let parts = match (self.ipt.variant(), existing) {
            (IptablesVariant::Nft, Some(existing)) => {
                split_new_chains(text, "nat", existing, NEW_CHAINS_PER_RESTORE)
            }
            _ => vec![text.to_string()],
        };
        for part in parts.iter().filter(|p| !p.is_empty()) {
            self.ipt
                .restore(part)
                .await
                .map_err(|e| BackendError::IptablesRestore(e.to_string()))?;
        }
        Ok(())
    }

    /// `--cleanup`: removes every chain and jump rule kube-proxy (or kube-proxy-rs) creates in
    /// iptables mode; foreign rules stay.
    pub async fn cleanup(ipt: &Iptables) -> Result<(), BackendError> {
        let read = |e: crate::kernel::KernelError| BackendError::Read(e.to_string());
        let nat = ipt.save(Table::Nat).await.map_err(read)?;
        let filter = ipt.save(Table::Filter).await.map_err(read)?;
        let plan = cleanup_plan(&nat, &filter).map_err(|e| BackendError::Read(e.to_string()))?;
        for j in &plan.delete_jumps {
            if let Err(e) = ipt
                .delete_rule(Table::from_name(j.table), j.chain, &j.args())
                .await
            {
                tracing::warn!(error = %e, chain = j.chain, "deleting jump rule failed");
            }
        }
        for input in [&plan.nat_restore, &plan.filter_restore] {
            if !input.trim().is_empty() {
                ipt.restore(input)
                    .await
                    .map_err(|e| BackendError::IptablesRestore(e.to_string()))?;
            }
        }
        let (t, chain) = plan.delete_chain;
        if let Err(e) = ipt.flush_and_delete_chain(Table::from_name(t), chain).await {
            tracing::debug!(error = %e, "deleting {chain} in {t}");
        }
        Ok(())
    }
}

impl Backend for IptablesProxier {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn partial_syncs(&self) -> bool {
        true
    }

    /// Upstream: `doFullSync := needFullSync || (time.Since(lastFullSync) > FullSyncPeriod
    /// && !largeClusterMode)`, large-cluster mode being the last sync's.
    fn periodic_full_syncs(&self) -> bool {
        !self.large_cluster
    }

    async fn sync(&mut self, req: SyncRequest<'_>) -> Result<SyncOutcome, BackendError> {
        if req.full {
            self.ensure_jumps().await?;
        }
        self.refresh_node_ips().await;
        self.config.apply_node_facts(req.node_facts);
        // Upstream looks when cleanup is due, full sync or not. With iptables-nft a full sync
        // always looks: it may create thousands of chains, which `write` splits off.
        let split = req.full && self.ipt.variant() == IptablesVariant::Nft;
        let existing = if split || self.cleanup_due() {
            self.existing_nat_chains().await
        } else {
            None
        };
        let scope = if req.full {
            SyncScope::Full
        } else {
            SyncScope::Partial {
                changed: req.changed,
            }
        };
        // A full sync rewrites whatever the kernel holds (a canary gone, a failed restore: the
        // sync loop asks for a full sync after either).
        let shared = if self.shared_chains_known && !req.full {
            SharedChains::Edit
        } else {
            SharedChains::Rewrite
        };
        let rendered = self.cache.render(
            &RenderInput {
                model: req.model,
                config: &self.config,
                scope,
                existing_nat_chains: existing.as_ref(),
            },
            shared,
        );
        // Until this restore succeeds the kernel holds neither the old state nor the new.
        self.shared_chains_known = false;
        self.write(&rendered.text, existing.as_ref()).await?;
        self.shared_chains_known = true;
        self.large_cluster = rendered.large_cluster;
        if existing.is_some() {
            self.last_cleanup = Some(Instant::now());
        }
        let conntrack = self
            .conntrack
            .after_sync(req.model, &self.config.node_ips)
            .await;
        let mut outcome = SyncOutcome::new(
            rendered.filter_rules,
            rendered.nat_rules,
            rendered.no_local_endpoints_internal,
            rendered.no_local_endpoints_external,
            rendered.health_check_node_ports,
        );
        outcome.iptables_rules = Some(IptablesRuleCounts {
            filter_total: rendered.filter_rules,
            nat_total: rendered.nat_rules,
            filter_last: rendered.filter_rules,
            nat_last: rendered.nat_rules_written,
        });
        outcome.conntrack = conntrack;
        Ok(outcome)
    }

    async fn needs_full_sync(&mut self) -> bool {
        // The canary is in each table we write: a flush of any of them removes it. A check
        // that fails to run proves nothing (the next one retries).
        for t in [Table::Mangle, Table::Nat, Table::Filter] {
            if let Ok(false) = self.ipt.chain_exists(t, KUBE_PROXY_CANARY).await {
                tracing::info!(
                    table = t.as_str(),
                    "canary chain gone: the table was flushed"
                );
                self.shared_chains_known = false;
                return true;
            }
        }
        false
    }
}

/// Upstream's start-up step for the nfacct metrics: creates the two counters the rules count
/// into, and renders each counter's `-m nfacct` rule only once it exists (iptables-restore
/// would reject a rule naming a missing one). Returns whether nfacct works here at all; then
/// `/metrics` serves the counters.
pub fn setup_nfacct(nfacct: &Nfacct, config: &mut RenderConfig) -> bool {
    if let Err(e) = nfacct.probe() {
        tracing::error!(error = %e, "nfacct is not available, nfacct based metrics won't be available");
        return false;
    }
    let ensure = |name: &str| match nfacct.ensure(name) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, counter = name, "failed to create nfacct counter; the corresponding metric will not be updated");
            false
        }
    };
    config.nfacct_ct_state_invalid = ensure(NFACCT_CT_STATE_INVALID);
    config.nfacct_localhost_nodeports = ensure(NFACCT_LOCALHOST_NODEPORTS);
    true
}

/// Starts iptables mode writing through `ipt`: render settings from the options, and the
/// nfacct counters (the handle is returned when nfacct works, for `/metrics`); the host's
/// addresses are listed with `addrs`.
pub fn start(
    opts: &crate::config::ProxyOptions,
    ipt: Iptables,
    random_fully: bool,
    addrs: Addresses,
) -> (IptablesProxier, Option<Nfacct>) {
    let node = crate::model::NodeInfo::default();
    let mut config = render_config(opts, &node, ipt.family(), Vec::new());
    config.random_fully = random_fully;
    let nfacct = Nfacct::new();
    let nfacct = setup_nfacct(&nfacct, &mut config).then_some(nfacct);
    let proxier = IptablesProxier::new(ipt, Conntrack::new(), addrs, config)
        .with_cleanup_period(opts.sync_period);
    (proxier, nfacct)
}

/// What `render` prints in iptables mode: the restore input of a full sync of `model`, with
/// no chains in the kernel yet.
pub fn render_text(
    opts: &crate::config::ProxyOptions,
    model: &crate::model::ProxyModel,
    family: crate::model::IpFamily,
    node_ips: Vec<IpAddr>,
) -> String {
    let mut config = render_config(opts, &model.node, family, node_ips);
    // Upstream probes iptables for --random-fully; every supported distribution has it.
    config.random_fully = true;
    render(&RenderInput {
        model,
        config: &config,
        scope: SyncScope::Full,
        existing_nat_chains: Some(&BTreeSet::new()),
    })
    .text
}

/// Render settings from the options and what is known of the node (`node_ips`: addresses
/// node ports may be served on; the daemon refreshes them from the kernel on every sync).
pub fn render_config(
    opts: &crate::config::ProxyOptions,
    node: &crate::model::NodeInfo,
    family: crate::model::IpFamily,
    node_ips: Vec<IpAddr>,
) -> RenderConfig {
    let mut config = RenderConfig {
        masquerade_bit: opts.masquerade_bit,
        masquerade_all: opts.masquerade_all,
        node_ips,
        conntrack_tcp_be_liberal: opts.conntrack.tcp_be_liberal,
        ..RenderConfig::default()
    };
    config.apply_node_facts(&crate::host::HostSettings::from_options(opts).facts(node, family));
    config
}
