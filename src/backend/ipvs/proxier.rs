//! The IPVS [`Backend`]: renders with [`super::render`] and applies the result to the kernel:
//! the `kube-ipvs0` dummy link and its addresses, ipsets, one `iptables-restore`, and the
//! IPVS virtual/real servers as one batched netlink diff.
//!
//! Upstream behaviours kept (KK `pkg/proxy/ipvs/{proxier,graceful_termination}.go`):
//! - one proxier per IP family, the family of its `Iptables` handle: it programs only that
//!   family's virtual servers, kube-ipvs0 addresses and ipsets (`KUBE-6-*` for IPv6), writes
//!   its rules with that family's `ip[6]tables-restore`, and leaves the other family's alone.
//! - start-up: IPVS answers, ipset ≥ 6.0, and a dummy virtual server at 198.51.100.0:20000
//!   (IPv6: [2001:db8::]:20000) can be added with the configured scheduler (skipped when a
//!   service of the family already uses it); the `net/ipv4/vs/*` (shared by both families),
//!   `ip_forward` and strict-ARP sysctls; `--ipvs-*-timeout`. As upstream, IPv6 forwarding
//!   is left to the node: setting `conf/all/forwarding` would stop it accepting router
//!   advertisements.
//! - per sync: the dummy link exists (created down), missing addresses are bound and stale
//!   ones unbound (never in `--ipvs-exclude-cidrs`), ipsets are diffed (never flushed),
//!   services not desired are deleted (except excluded and other-family ones), real servers
//!   are added/updated/removed; a second identical sync sends nothing to the kernel.
//! - upstream compares everything with the kernel on every sync (a dump of every virtual
//!   server's real servers, of every set, of the addresses, the jump checks and a restore).
//!   We do that on a *reconcile*: when the loop asks for a full sync, on the periodic resync
//!   (nothing changed), once `--ipvs-sync-period` has passed since the last one, and after
//!   any failure; so drift is repaired within a sync period, as upstream. A sync with
//!   changes in between diffs the new render against the last sync's result instead: only
//!   changed virtual servers are touched (their real servers listed, for the connection
//!   counts graceful termination needs), only changed set members restored, only changed
//!   addresses bound, and the ruleset restored only if its text changed.
//! - graceful termination: a removed TCP real server gets weight 0 and is deleted once
//!   `ActiveConn + InActConn == 0`, checked every sync and every minute by a background task;
//!   UDP and SCTP real servers are deleted at once (`expire_nodest_conn` drops their flows).
//! - `--cleanup` flushes every IPVS service (as upstream does), deletes the link, the IPVS-mode
//!   chains and the ipsets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::render::{ipvs_config_for, is_node_address, node_addresses};
use super::{DesiredService, IpSetSpec, IpvsConfig, IpvsDesired, ipvs_jump_rules, render};
use crate::backend::conntrack::ConntrackCleaner;
use crate::backend::netfilter::parse::Dump;
use crate::backend::netfilter::restore::flush_and_delete;
use crate::backend::{Backend, BackendError, SyncOutcome, SyncRequest};
use crate::host::NodeFacts;
use crate::kernel::addrs::Addresses;
use crate::kernel::conntrack::Conntrack;
use crate::kernel::ipset::{
    DesiredSet, Ipset, IpsetVersion, SavedSet, canonical_entry, plan_restore,
};
use crate::kernel::iptables::{Iptables, RulePosition, Table};
use crate::kernel::ipvs::{
    AddressFamily, IpvsClient, IpvsError, IpvsOp, Protocol, RealServer, VirtualService,
};
use crate::kernel::link::DummyLink;
use crate::kernel::sysctl::Sysctl;
use crate::model::IpFamily;

/// How often terminating real servers are re-checked besides every sync (upstream
/// `rsCheckDeleteInterval`).
pub const GRACEFUL_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Upstream's default `--ipvs-sync-period`: how often a sync compares the kernel with the
/// desired state when the settings do not say.
pub const DEFAULT_RECONCILE_PERIOD: Duration = Duration::from_secs(30);

/// The start-up probe's virtual server (TEST-NET-2, upstream `CanUseIPVSProxier`).
pub const PROBE_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);
/// The IPv6 proxier's probe address (the documentation prefix, RFC 3849): upstream probes
/// IPv4 only, which would not show that the kernel lacks IPv6 IPVS (`CONFIG_IP_VS_IPV6`).
pub const PROBE_ADDRESS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0);
/// The start-up probe's port.
pub const PROBE_PORT: u16 = 20000;

/// Kernel versions bracketing the `conn_reuse_mode=0` workaround (upstream #93297).
const CONN_REUSE_MIN_KERNEL: (u32, u32) = (4, 1);
const CONN_REUSE_FIXED_KERNEL: (u32, u32) = (5, 9);

/// Chains `--cleanup` removes in IPVS mode (upstream `iptablesCleanupChains`), flushed first
/// so links between them go away, then deleted.
const CLEANUP_CHAINS: &[(&str, &str)] = &[
    ("nat", "KUBE-SERVICES"),
    ("nat", "KUBE-POSTROUTING"),
    ("nat", "KUBE-NODE-PORT"),
    ("nat", "KUBE-LOAD-BALANCER"),
    ("filter", "KUBE-FORWARD"),
    ("filter", "KUBE-NODE-PORT"),
    ("filter", "KUBE-PROXY-FIREWALL"),
    ("filter", "KUBE-SOURCE-RANGES-FIREWALL"),
    ("filter", "KUBE-IPVS-FILTER"),
    ("filter", "KUBE-IPVS-OUT-FILTER"),
];

/// Kernel changes made so far, by kind (for tests and debug logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeCount {
    /// IPVS netlink requests (service and real-server add/update/delete) sent.
    pub ipvs: u64,
    /// Addresses bound to or unbound from the dummy link.
    pub addresses: u64,
    /// Dummy links created.
    pub links: u64,
    /// ipset entries added or deleted, and sets created or destroyed.
    pub ipsets: u64,
}

impl ChangeCount {
    /// All changes.
    pub fn total(&self) -> u64 {
        self.ipvs + self.addresses + self.links + self.ipsets
    }
}

#[derive(Debug, Default)]
struct Counters {
    ipvs: AtomicU64,
    addresses: AtomicU64,
    links: AtomicU64,
    ipsets: AtomicU64,
    /// Kernel listings: IPVS dumps, `ipset save`, address dumps.
    listings: AtomicU64,
}

impl Counters {
    fn listed(&self, n: usize) {
        self.listings.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ChangeCount {
        ChangeCount {
            ipvs: self.ipvs.load(Ordering::Relaxed),
            addresses: self.addresses.load(Ordering::Relaxed),
            links: self.links.load(Ordering::Relaxed),
            ipsets: self.ipsets.load(Ordering::Relaxed),
        }
    }
}

/// A terminating real server: (service key, address, port).
type RsKey = (VirtualService, IpAddr, u16);

struct IpvsState {
    client: IpvsClient,
    /// Removed TCP real servers at weight 0 waiting for their connections to end.
    terminating: HashMap<RsKey, (VirtualService, RealServer)>,
}

fn rs_key(vs: &VirtualService, rs: &RealServer) -> RsKey {
    (vs.key(), rs.address, rs.port)
}

/// The IPVS address family of `family`.
pub fn address_family(family: IpFamily) -> AddressFamily {
    match family {
        IpFamily::V4 => AddressFamily::Inet,
        IpFamily::V6 => AddressFamily::Inet6,
    }
}

/// The start-up probe's address for `family`.
pub fn probe_address(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(PROBE_ADDRESS),
        IpFamily::V6 => IpAddr::V6(PROBE_ADDRESS_V6),
    }
}

/// The tools the proxier drives, all bound to the same network namespace.
#[derive(Debug, Clone)]
pub struct IpvsKernel {
    /// iptables of the proxier's family (`ip6tables` for IPv6): its family is the proxier's.
    pub iptables: Iptables,
    /// ipset.
    pub ipset: Ipset,
    /// The dummy link (`kube-ipvs0`).
    pub link: DummyLink,
    /// conntrack, for stale UDP/SCTP flows.
    pub conntrack: Conntrack,
    /// Local addresses (node IPs for NodePort virtual servers).
    pub addrs: Addresses,
    /// Sysctls (start-up only).
    pub sysctl: Sysctl,
}

/// Settings that are not part of the render config.
#[derive(Debug, Clone)]
pub struct IpvsSettings {
    /// `--ipvs-tcp-timeout` (zero: leave the kernel's).
    pub tcp_timeout: Duration,
    /// `--ipvs-tcpfin-timeout` (zero: leave).
    pub tcp_fin_timeout: Duration,
    /// `--ipvs-udp-timeout` (zero: leave).
    pub udp_timeout: Duration,
    /// How often terminating real servers are re-checked between syncs.
    pub graceful_check_interval: Duration,
    /// How often a sync compares the whole kernel state with the desired one (`--ipvs-sync-period`):
    /// syncs in between change only what differs from the last sync's result.
    pub reconcile_period: Duration,
}

impl Default for IpvsSettings {
    fn default() -> Self {
        IpvsSettings {
            tcp_timeout: Duration::ZERO,
            tcp_fin_timeout: Duration::ZERO,
            udp_timeout: Duration::ZERO,
            graceful_check_interval: GRACEFUL_CHECK_INTERVAL,
            reconcile_period: DEFAULT_RECONCILE_PERIOD,
        }
    }
}

/// Why IPVS mode cannot start.
#[derive(Debug, thiserror::Error)]
#[error("IPVS proxy mode cannot be used: {0}")]
pub struct IpvsStartError(pub String);

/// What the last successful sync left in the kernel, as rendered. A sync between two
/// reconciles changes only what differs from it, without listing the kernel; a reconcile
/// lists everything and repairs drift.
struct Applied {
    /// Virtual servers by key ([`VirtualService::key`]).
    services: HashMap<VirtualService, DesiredService>,
    /// Every set, as rendered.
    ipsets: Vec<IpSetSpec>,
    /// Addresses bound to the dummy link.
    bound_addrs: BTreeSet<IpAddr>,
    /// The last restore's input (the jump rules were ensured with it).
    iptables_restore: String,
    /// When the kernel was last compared with the desired state.
    reconciled: Instant,
}

impl Applied {
    fn new(desired: IpvsDesired, reconciled: Instant) -> Self {
        Applied {
            services: desired
                .services
                .into_iter()
                .map(|d| (d.vs.key(), d))
                .collect(),
            ipsets: desired.ipsets,
            bound_addrs: desired.bound_addrs,
            iptables_restore: desired.iptables_restore,
            reconciled,
        }
    }
}

/// The IPVS-mode proxier.
pub struct IpvsProxier {
    state: Arc<Mutex<IpvsState>>,
    kernel: IpvsKernel,
    config: IpvsConfig,
    counters: Arc<Counters>,
    /// How often a sync reconciles (compares the whole kernel state).
    reconcile_period: Duration,
    /// The last successful sync's result; `None` until one succeeds, and after a failure.
    applied: Option<Applied>,
    /// Until the daemon takes it to supervise it.
    graceful_task: Option<tokio::task::JoinHandle<()>>,
    graceful_abort: tokio::task::AbortHandle,
    conntrack: ConntrackCleaner,
}

impl Drop for IpvsProxier {
    fn drop(&mut self) {
        self.graceful_abort.abort();
    }
}

fn read_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Read(e.to_string())
}

/// Upstream `CanUseIPVSProxier`: IPVS answers, ipset is recent enough, and a virtual server
/// of `family` with `scheduler` can be created (proving its module loads, and IPVS of that
/// family). Skips the dummy service when an existing one of the family already uses the
/// scheduler (a restart).
pub async fn check_ipvs_usable(
    client: &mut IpvsClient,
    ipset: &Ipset,
    scheduler: &str,
    family: IpFamily,
) -> Result<(), IpvsStartError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| IpvsStartError(format!("{what}: {e}"));
    client
        .probe()
        .await
        .map_err(|e| fail("IPVS does not answer", &e))?;
    let version = ipset
        .version()
        .await
        .map_err(|e| fail("cannot get the ipset version", &e))?;
    if version < IpsetVersion::MIN {
        return Err(IpvsStartError(format!(
            "ipset version {version} is less than the minimum required {}",
            IpsetVersion::MIN
        )));
    }
    let existing = client
        .services()
        .await
        .map_err(|e| fail("cannot list IPVS services", &e))?;
    let af = address_family(family);
    if existing
        .iter()
        .any(|s| s.scheduler == scheduler && s.address_family == af)
    {
        tracing::debug!(
            scheduler,
            ?family,
            "an IPVS service already uses the scheduler"
        );
        return Ok(());
    }
    let probe = VirtualService::new(probe_address(family), Protocol::Tcp, PROBE_PORT, scheduler);
    client.add_service(&probe).await.map_err(|e| {
        IpvsStartError(format!(
            "cannot create a virtual server with scheduler {scheduler:?} (is the kernel module \
             ip_vs_{scheduler} available?): {e}"
        ))
    })?;
    let listed = client
        .services()
        .await
        .map_err(|e| fail("cannot list IPVS services", &e))?;
    let found = listed.iter().any(|s| s.same_key(&probe));
    let deleted = client.delete_service(&probe).await;
    if !found {
        return Err(IpvsStartError(
            "a virtual server was accepted but is not listed: IPVS is not working".into(),
        ));
    }
    deleted.map_err(|e| fail("cannot delete the probe virtual server", &e))?;
    Ok(())
}

/// `major.minor` of a kernel release string such as `6.1.0-56-amd64`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn ensure_sysctl(sysctl: &Sysctl, name: &str, value: i64) -> Result<(), IpvsStartError> {
    let current = sysctl
        .read_int(name)
        .map_err(|e| IpvsStartError(format!("cannot read sysctl {name}: {e}")))?;
    if current != value {
        sysctl
            .write(name, &value.to_string())
            .map_err(|e| IpvsStartError(format!("cannot set sysctl {name}={value}: {e}")))?;
        tracing::info!(name, from = current, to = value, "set sysctl");
    }
    Ok(())
}

/// The sysctls IPVS mode needs (upstream `NewProxier`).
pub fn apply_sysctls(sysctl: &Sysctl, strict_arp: bool) -> Result<(), IpvsStartError> {
    ensure_sysctl(sysctl, "net/ipv4/vs/conntrack", 1)?;
    let release = sysctl.read("kernel/osrelease").unwrap_or_default();
    match parse_kernel_version(&release) {
        None => {
            return Err(IpvsStartError(format!(
                "cannot parse the kernel version {release:?}"
            )));
        }
        Some(v) if v < CONN_REUSE_MIN_KERNEL => tracing::error!(
            kernel = %release,
            "cannot set net/ipv4/vs/conn_reuse_mode: kernel older than 4.1"
        ),
        Some(v) if v >= CONN_REUSE_FIXED_KERNEL => {
            tracing::debug!(kernel = %release, "net/ipv4/vs/conn_reuse_mode left as is")
        }
        Some(_) => ensure_sysctl(sysctl, "net/ipv4/vs/conn_reuse_mode", 0)?,
    }
    ensure_sysctl(sysctl, "net/ipv4/vs/expire_nodest_conn", 1)?;
    ensure_sysctl(sysctl, "net/ipv4/vs/expire_quiescent_template", 1)?;
    ensure_sysctl(sysctl, "net/ipv4/ip_forward", 1)?;
    if strict_arp {
        ensure_sysctl(sysctl, "net/ipv4/conf/all/arp_ignore", 1)?;
        ensure_sysctl(sysctl, "net/ipv4/conf/all/arp_announce", 2)?;
    }
    Ok(())
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

impl IpvsProxier {
    /// Checks that IPVS mode can run, sets the sysctls and timeouts, and starts the
    /// graceful-termination checker. `client` must be connected in the namespace the
    /// `kernel` handles work in. The proxier's family is `kernel.iptables`'s (it overrides
    /// `config.family`; the node addresses, primary IP and detector in `config` are
    /// replaced by each sync's node facts). Must be called within a tokio runtime.
    pub async fn start(
        mut client: IpvsClient,
        kernel: IpvsKernel,
        mut config: IpvsConfig,
        settings: IpvsSettings,
    ) -> Result<Self, IpvsStartError> {
        config.family = kernel.iptables.family();
        check_ipvs_usable(
            &mut client,
            &kernel.ipset,
            config.scheduler(),
            config.family,
        )
        .await?;
        apply_sysctls(&kernel.sysctl, config.strict_arp)?;
        let (tcp, fin, udp) = (
            secs(settings.tcp_timeout),
            secs(settings.tcp_fin_timeout),
            secs(settings.udp_timeout),
        );
        if tcp > 0 || fin > 0 || udp > 0 {
            // As upstream: a failure is logged, not fatal.
            if let Err(e) = client.set_timeouts(tcp, fin, udp).await {
                tracing::error!(error = %e, "failed to configure IPVS timeouts");
            }
        }
        let state = Arc::new(Mutex::new(IpvsState {
            client,
            terminating: HashMap::new(),
        }));
        let counters = Arc::new(Counters::default());
        let graceful_task = tokio::spawn(graceful_loop(
            state.clone(),
            counters.clone(),
            settings.graceful_check_interval,
        ));
        Ok(IpvsProxier {
            state,
            reconcile_period: settings.reconcile_period,
            applied: None,
            conntrack: ConntrackCleaner::new(kernel.conntrack.clone()),
            kernel,
            config,
            counters,
            graceful_abort: graceful_task.abort_handle(),
            graceful_task: Some(graceful_task),
        })
    }

    /// The graceful-termination checker's task, once, for the daemon to supervise: it never
    /// ends while the proxier lives, so an end is a failure. Still aborted when the proxier is
    /// dropped.
    pub fn take_graceful_task(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.graceful_task.take()
    }

    /// The render settings in use (node IPs as of the last sync).
    pub fn config(&self) -> &IpvsConfig {
        &self.config
    }

    /// Kernel changes made since start (the start-up probe excluded).
    pub fn changes(&self) -> ChangeCount {
        self.counters.snapshot()
    }

    /// Kernel listings made by syncs and the graceful-termination checker since start: IPVS
    /// service and real-server dumps, `ipset save`, address dumps (what a sync costs beyond
    /// its changes).
    pub fn listings(&self) -> u64 {
        self.counters.listings.load(Ordering::Relaxed)
    }

    /// Real servers at weight 0 waiting for their connections to end.
    pub async fn terminating(&self) -> Vec<(VirtualService, RealServer)> {
        let st = self.state.lock().await;
        let mut v: Vec<_> = st.terminating.values().cloned().collect();
        v.sort_by_key(|(s, r)| (s.to_string(), r.to_string()));
        v
    }

    /// The IP family this proxier programs.
    pub fn family(&self) -> IpFamily {
        self.config.family
    }

    /// Takes this sync's node facts and, when `list_addresses` (a reconcile: the list holds
    /// every kube-ipvs0 address too), refreshes the node addresses in the render config:
    /// `host_addrs` (every local address of the family except the dummy link's), `node_ips`
    /// (those NodePort virtual servers go on: no loopback, inside the node-port addresses,
    /// upstream `NodeIPs` and `GetNodeAddresses`). Keeps the previous lists if listing fails.
    async fn refresh_node_facts(&mut self, facts: &NodeFacts, list_addresses: bool) {
        let family = self.config.family;
        self.config.primary_node_ip = facts.primary_ip.filter(|ip| family.matches(ip));
        self.config.local_detector = facts.local_detector.clone();
        if !list_addresses {
            return;
        }
        self.counters.listed(1);
        let list = match self.kernel.addrs.list().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing local addresses failed, keeping the previous node IPs");
                return;
            }
        };
        let local: Vec<IpAddr> = list
            .into_iter()
            .filter(|a| a.interface != self.kernel.link.name())
            .map(|a| a.addr)
            .collect();
        (self.config.host_addrs, self.config.node_ips) = node_addresses(facts, &local, family);
    }

    /// Whether this sync compares the whole kernel state with the desired one (upstream's
    /// every sync) rather than changing only what differs from the last sync's result: when
    /// asked for (start-up, after a failure, hourly, node facts changed), when nothing
    /// changed (the periodic resync: it exists to repair drift), once `reconcile_period` has
    /// passed since the last one (so steady churn does not postpone repairs), and whenever
    /// the last sync did not succeed.
    fn must_reconcile(&self, req: &SyncRequest<'_>) -> bool {
        req.full
            || req.changed.is_empty()
            || self
                .applied
                .as_ref()
                .is_none_or(|a| a.reconciled.elapsed() >= self.reconcile_period)
    }

    /// Applies `desired`: against the kernel's listed state on a reconcile (`applied`
    /// `None`), else against `applied`. Returns the IPVS and address changes that failed.
    async fn apply(
        &self,
        desired: &IpvsDesired,
        applied: Option<&Applied>,
    ) -> Result<Vec<String>, BackendError> {
        self.sync_link().await?;
        self.sync_ipsets(desired, applied.map(|a| a.ipsets.as_slice()))
            .await?;
        // The ruleset depends only on which sets are empty and on the settings: unchanged,
        // the restore (and the jump checks, each a process) would rewrite the same rules.
        if applied.is_none_or(|a| a.iptables_restore != desired.iptables_restore) {
            sync_iptables(&self.kernel.iptables, &desired.iptables_restore).await?;
        }
        // The diff is also the per-sync graceful-termination check: an unwanted real server
        // that has become idle is deleted by it.
        let mut errors = match applied {
            None => self.sync_ipvs(&desired.services).await?,
            Some(a) => {
                self.sync_ipvs_changes(&desired.services, &a.services)
                    .await?
            }
        };
        errors.extend(
            self.sync_addresses(desired, applied.map(|a| &a.bound_addrs))
                .await?,
        );
        Ok(errors)
    }

    fn excluded(&self, ip: &IpAddr) -> bool {
        self.config.exclude_cidrs.iter().any(|c| c.contains(ip))
    }

    async fn sync_link(&self) -> Result<(), BackendError> {
        if (self.kernel.link.ensure().await).map_err(|e| BackendError::Link(e.to_string()))? {
            tracing::info!(
                link = self.kernel.link.name(),
                "created the IPVS dummy link"
            );
            self.counters.links.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Brings the sets to `desired`: on a reconcile against `ipset save` of every set, else
    /// (`applied`: the last sync's sets) only the sets whose entries changed, against what
    /// that sync wrote.
    async fn sync_ipsets(
        &self,
        desired: &IpvsDesired,
        applied: Option<&[IpSetSpec]>,
    ) -> Result<(), BackendError> {
        let ipset = &self.kernel.ipset;
        let (changed, current) = match applied {
            None => {
                self.counters.listed(1);
                (
                    desired.ipsets.iter().collect::<Vec<_>>(),
                    ipset.save_all().await.map_err(read_err)?,
                )
            }
            Some(applied) => changed_sets(&desired.ipsets, applied),
        };
        let options: Vec<String> = changed.iter().map(|s| s.create_options()).collect();
        let sets: Vec<DesiredSet<'_>> = changed
            .iter()
            .zip(&options)
            .map(|(s, o)| DesiredSet {
                name: &s.name,
                set_type: &s.set_type,
                create_options: o,
                entries: &s.entries,
            })
            .collect();
        let plan = plan_restore(&sets, &current);
        for name in &plan.type_mismatch {
            tracing::warn!(set = %name, "ipset has another type; recreating it");
            ipset.destroy(name).await.map_err(|e| {
                BackendError::Ipset(format!(
                    "ipset {name} has the wrong type and cannot be destroyed: {e}"
                ))
            })?;
            self.counters.ipsets.fetch_add(1, Ordering::Relaxed);
        }
        if !plan.is_empty() {
            ipset
                .restore(&plan.input)
                .await
                .map_err(|e| BackendError::Ipset(e.to_string()))?;
            let n = plan.created.len() + plan.added + plan.deleted;
            self.counters.ipsets.fetch_add(n as u64, Ordering::Relaxed);
            tracing::debug!(
                created = plan.created.len(),
                added = plan.added,
                deleted = plan.deleted,
                "ipsets updated"
            );
        }
        Ok(())
    }

    /// Binds missing addresses and unbinds stale ones (of this family, neither loopback nor
    /// IPv6 link-local, as upstream's `GetLocalAddresses`; not in `--ipvs-exclude-cidrs`) in
    /// one rtnetlink batch. Returns what could not be changed.
    /// `applied`: the addresses the last sync left (no listing); `None` on a reconcile.
    async fn sync_addresses(
        &self,
        desired: &IpvsDesired,
        applied: Option<&BTreeSet<IpAddr>>,
    ) -> Result<Vec<String>, BackendError> {
        let link = &self.kernel.link;
        let current: BTreeSet<IpAddr> = match applied {
            Some(a) => a.clone(),
            None => {
                self.counters.listed(1);
                link.addresses()
                    .await
                    .map_err(read_err)?
                    .into_iter()
                    .collect()
            }
        };
        let add: Vec<IpAddr> = desired.bound_addrs.difference(&current).copied().collect();
        let del: Vec<IpAddr> = current
            .difference(&desired.bound_addrs)
            .filter(|ip| is_node_address(ip, self.config.family) && !self.excluded(ip))
            .copied()
            .collect();
        if add.is_empty() && del.is_empty() {
            return Ok(Vec::new());
        }
        self.counters
            .addresses
            .fetch_add((add.len() + del.len()) as u64, Ordering::Relaxed);
        let Err(e) = link.change_addresses(&add, &del).await else {
            return Ok(Vec::new());
        };
        // Some lines failed: report the addresses that are still wrong.
        let now: BTreeSet<IpAddr> = link
            .addresses()
            .await
            .map_err(read_err)?
            .into_iter()
            .collect();
        let mut errors: Vec<String> = add
            .iter()
            .filter(|ip| !now.contains(ip))
            .map(|ip| format!("binding {ip} to {}: {e}", link.name()))
            .collect();
        errors.extend(
            del.iter()
                .filter(|ip| now.contains(ip))
                .map(|ip| format!("unbinding {ip} from {}: {e}", link.name())),
        );
        Ok(errors)
    }

    /// Brings IPVS to `desired` with one batched `apply`. Returns the failed operations.
    async fn sync_ipvs(&self, desired: &[DesiredService]) -> Result<Vec<String>, BackendError> {
        let mut st = self.state.lock().await;
        self.counters.listed(1);
        let current = st.client.services().await.map_err(read_err)?;
        let mut current: HashMap<VirtualService, VirtualService> =
            current.into_iter().map(|s| (s.key(), s)).collect();
        let mut plan = Plan::default();
        let mut seen = BTreeSet::new();
        for d in desired {
            let key = d.vs.key();
            if !seen.insert(d.vs.to_string()) {
                tracing::warn!(service = %d.vs, "virtual server rendered twice; keeping the first");
                continue;
            }
            match current.remove(&key) {
                None => {
                    plan.services.push(IpvsOp::AddService(d.vs.clone()));
                    for rs in &d.dests {
                        plan.dests
                            .push(IpvsOp::AddDestination(d.vs.clone(), rs.clone()));
                    }
                }
                Some(cur) => {
                    if !same_service(&cur, &d.vs) {
                        plan.services.push(IpvsOp::UpdateService(d.vs.clone()));
                    }
                    self.counters.listed(1);
                    let cur_dests = st.client.destinations(&cur).await.map_err(read_err)?;
                    diff_dests(&d.vs, &d.dests, &cur_dests, &mut plan);
                }
            }
        }
        for (_, cur) in current {
            // The other family's proxier owns its virtual servers (upstream
            // `cleanLegacyService`).
            if cur.address_family != address_family(self.config.family)
                || self.excluded(&cur.address)
            {
                continue;
            }
            plan.deletes.push(IpvsOp::DeleteService(cur));
        }
        Ok(self.run_plan(&mut st, plan).await)
    }

    /// Brings IPVS from `applied` (the last sync's virtual servers) to `desired` without
    /// listing the kernel: only virtual servers that differ are touched, and the real
    /// servers of one that changed are listed (their connection counts decide deletion or
    /// quiescing) and diffed as a reconcile does. Returns the failed operations.
    async fn sync_ipvs_changes(
        &self,
        desired: &[DesiredService],
        applied: &HashMap<VirtualService, DesiredService>,
    ) -> Result<Vec<String>, BackendError> {
        let mut st = self.state.lock().await;
        let mut plan = Plan::default();
        let mut wanted: HashMap<VirtualService, &DesiredService> = HashMap::new();
        for d in desired {
            let key = d.vs.key();
            if wanted.contains_key(&key) {
                continue; // rendered twice: the reconcile warns about it
            }
            wanted.insert(key.clone(), d);
            match applied.get(&key) {
                Some(a) if a == d => {}
                None => {
                    plan.services.push(IpvsOp::AddService(d.vs.clone()));
                    for rs in &d.dests {
                        plan.dests
                            .push(IpvsOp::AddDestination(d.vs.clone(), rs.clone()));
                    }
                }
                Some(a) => {
                    if !same_service(&a.vs, &d.vs) {
                        plan.services.push(IpvsOp::UpdateService(d.vs.clone()));
                    }
                    if a.dests != d.dests {
                        self.counters.listed(1);
                        let cur_dests = st.client.destinations(&d.vs).await.map_err(read_err)?;
                        diff_dests(&d.vs, &d.dests, &cur_dests, &mut plan);
                    }
                }
            }
        }
        for (key, a) in applied {
            if !wanted.contains_key(key) && !self.excluded(&a.vs.address) {
                plan.deletes.push(IpvsOp::DeleteService(a.vs.clone()));
            }
        }
        Ok(self.run_plan(&mut st, plan).await)
    }

    async fn run_plan(&self, st: &mut IpvsState, plan: Plan) -> Vec<String> {
        let ops: Vec<IpvsOp> = plan
            .deletes
            .into_iter()
            .chain(plan.services)
            .chain(plan.dests)
            .collect();
        for (vs, rs) in plan.still_terminating {
            st.terminating.insert(rs_key(&vs, &rs), (vs, rs));
        }
        if ops.is_empty() {
            return Vec::new();
        }
        let results = st.client.apply(&ops).await;
        self.counters
            .ipvs
            .fetch_add(ops.len() as u64, Ordering::Relaxed);
        record_results(st, &ops, results)
    }

    /// `--cleanup`: flushes every IPVS service (upstream assumes only kube-proxy creates
    /// them), deletes the dummy link, the IPVS-mode jump rules and chains, then the ipsets.
    /// A kernel without IPVS is not an error. Errors are collected; the other steps still run.
    pub async fn cleanup(
        ipt: &Iptables,
        ipset: &Ipset,
        link: &DummyLink,
    ) -> Result<(), BackendError> {
        let mut errors: Vec<String> = Vec::new();
        match IpvsClient::connect().await {
            Ok(mut c) => {
                if let Err(e) = c.flush().await {
                    errors.push(format!("flushing IPVS: {e}"));
                }
            }
            Err(IpvsError::NotAvailable) => {
                tracing::debug!("no IPVS in this kernel, nothing to flush")
            }
            Err(e) => errors.push(format!("connecting to IPVS: {e}")),
        }
        if let Err(e) = link.delete().await {
            errors.push(format!("deleting {}: {e}", link.name()));
        }
        for j in ipvs_jump_rules() {
            if let Err(e) = ipt
                .delete_rule(Table::from_name(j.table), j.chain, &j.args())
                .await
            {
                errors.push(format!("deleting jump to {}: {e}", j.target));
            }
        }
        for t in ["nat", "filter"] {
            let text = match ipt.save(Table::from_name(t)).await {
                Ok(s) => s,
                Err(e) => {
                    errors.push(format!("iptables-save -t {t}: {e}"));
                    continue;
                }
            };
            let existing = match Dump::parse(&text) {
                Ok(d) => d.chain_names(t),
                Err(e) => {
                    errors.push(format!("parsing iptables-save -t {t}: {e}"));
                    continue;
                }
            };
            let chains: Vec<&str> = CLEANUP_CHAINS
                .iter()
                .filter(|(tt, c)| *tt == t && existing.contains(*c))
                .map(|(_, c)| *c)
                .collect();
            if chains.is_empty() {
                continue;
            }
            if let Err(e) = ipt.restore(&flush_and_delete(t, &chains)).await {
                errors.push(format!("deleting {t} chains: {e}"));
            }
        }
        // After the rules using them are gone (a referenced set cannot be destroyed). Both
        // families' sets: upstream's cleanup forgets the `KUBE-6-*` ones.
        for set in super::ipset::all_set_names() {
            if let Err(e) = ipset.destroy(&set).await {
                errors.push(format!("destroying ipset {set}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Cleanup(errors.join("; ")))
        }
    }
}

/// The iptables part of a sync: the jump rules into kube-proxy's chains, then the
/// rendered rules in one `iptables-restore`. The jumps are ensured on every sync, as
/// upstream's IPVS proxier (`createAndLinkKubeChain`) does: IPVS mode has no canary chain,
/// so a jump someone deleted is only noticed by re-checking it.
pub async fn sync_iptables(ipt: &Iptables, restore: &str) -> Result<(), BackendError> {
    for j in ipvs_jump_rules() {
        let t = Table::from_name(j.table);
        let jump_err = |e: crate::kernel::KernelError| BackendError::JumpRules(e.to_string());
        // A jump that is there proves its target chain is too: one `-C` per jump in the steady
        // state instead of `-N`, `-S` and `-C` (each a process; slow on busy nodes).
        if ipt
            .rule_exists(t, j.chain, &j.args())
            .await
            .map_err(jump_err)?
        {
            continue;
        }
        ipt.ensure_chain(t, j.target).await.map_err(jump_err)?;
        ipt.ensure_rule(RulePosition::Prepend, t, j.chain, &j.args())
            .await
            .map_err(jump_err)?;
    }
    ipt.restore(restore)
        .await
        .map_err(|e| BackendError::IptablesRestore(e.to_string()))?;
    Ok(())
}

/// IPVS operations of one sync, in the order they are sent.
#[derive(Debug, Default)]
struct Plan {
    /// Stale services.
    deletes: Vec<IpvsOp>,
    /// New and changed services (before their real servers).
    services: Vec<IpvsOp>,
    /// Real-server changes.
    dests: Vec<IpvsOp>,
    /// Real servers already at weight 0 with connections: tracked, nothing sent.
    still_terminating: Vec<(VirtualService, RealServer)>,
}

/// The sets of `desired` whose create options or entries differ from `applied`'s, and what
/// `ipset save` would print for them after the sync that wrote `applied`.
fn changed_sets<'a>(
    desired: &'a [IpSetSpec],
    applied: &[IpSetSpec],
) -> (Vec<&'a IpSetSpec>, BTreeMap<String, SavedSet>) {
    let mut changed = Vec::new();
    let mut current = BTreeMap::new();
    for d in desired {
        let before = applied.iter().find(|a| a.name == d.name);
        if before.is_some_and(|a| a == d) {
            continue;
        }
        changed.push(d);
        if let Some(a) = before.filter(|a| a.create_options() == d.create_options()) {
            current.insert(
                a.name.clone(),
                SavedSet {
                    name: a.name.clone(),
                    set_type: a.set_type.clone(),
                    options: Vec::new(),
                    entries: a.entries.iter().map(|e| canonical_entry(e)).collect(),
                },
            );
        }
    }
    (changed, current)
}

/// Upstream `VirtualServer.Equal` on the fields a sync sets (the key already matches).
fn same_service(cur: &VirtualService, want: &VirtualService) -> bool {
    cur.scheduler == want.scheduler
        && cur.flags.effective() == want.flags.effective()
        && cur.timeout == want.timeout
}

fn same_dest(cur: &RealServer, want: &RealServer) -> bool {
    cur.weight == want.weight
        && cur.forward == want.forward
        && cur.upper_threshold == want.upper_threshold
        && cur.lower_threshold == want.lower_threshold
}

/// Upstream `IsRsGracefulTerminationNeeded`: not for UDP and SCTP.
fn graceful_needed(vs: &VirtualService) -> bool {
    !matches!(vs.protocol, Protocol::Udp | Protocol::Sctp)
}

fn diff_dests(vs: &VirtualService, want: &[RealServer], cur: &[RealServer], plan: &mut Plan) {
    let wanted: BTreeMap<(IpAddr, u16), &RealServer> =
        want.iter().map(|r| ((r.address, r.port), r)).collect();
    let mut present = BTreeSet::new();
    for c in cur {
        present.insert((c.address, c.port));
        match wanted.get(&(c.address, c.port)) {
            Some(w) => {
                if !same_dest(c, w) {
                    plan.dests
                        .push(IpvsOp::UpdateDestination(vs.clone(), (*w).clone()));
                }
            }
            None => retire(vs, c, plan),
        }
    }
    for (k, w) in wanted {
        if !present.contains(&k) {
            plan.dests
                .push(IpvsOp::AddDestination(vs.clone(), w.clone()));
        }
    }
}

/// A real server no longer wanted: deleted when idle or not TCP-like, else quiesced.
fn retire(vs: &VirtualService, rs: &RealServer, plan: &mut Plan) {
    let conns = u64::from(rs.active_conns) + u64::from(rs.inactive_conns);
    if !graceful_needed(vs) || conns == 0 {
        plan.dests
            .push(IpvsOp::DeleteDestination(vs.clone(), rs.clone()));
    } else if rs.weight != 0 {
        let mut quiet = rs.clone();
        quiet.weight = 0;
        plan.dests
            .push(IpvsOp::UpdateDestination(vs.clone(), quiet));
    } else {
        plan.still_terminating.push((vs.clone(), rs.clone()));
    }
}

/// Logs failures, updates the terminating list from what succeeded, returns the failures.
fn record_results(
    st: &mut IpvsState,
    ops: &[IpvsOp],
    results: Vec<Result<(), IpvsError>>,
) -> Vec<String> {
    let mut errors = Vec::new();
    for (op, r) in ops.iter().zip(results) {
        match (&r, op) {
            (Ok(()), IpvsOp::UpdateDestination(vs, rs)) if rs.weight == 0 => {
                tracing::info!(service = %vs, server = %rs, "real server quiesced (weight 0) until its connections end");
                st.terminating
                    .insert(rs_key(vs, rs), (vs.clone(), rs.clone()));
            }
            (Ok(()), IpvsOp::UpdateDestination(vs, rs) | IpvsOp::AddDestination(vs, rs)) => {
                st.terminating.remove(&rs_key(vs, rs));
            }
            (Ok(()), IpvsOp::DeleteDestination(vs, rs)) => {
                st.terminating.remove(&rs_key(vs, rs));
                tracing::debug!(service = %vs, server = %rs, "real server deleted");
            }
            (Ok(()), IpvsOp::DeleteService(vs)) => {
                let key = vs.key();
                st.terminating.retain(|k, _| k.0 != key);
                tracing::debug!(service = %vs, "virtual server deleted");
            }
            // Deleting something already gone reached the goal.
            (Err(e), IpvsOp::DeleteDestination(vs, rs)) if e.is_not_found() => {
                st.terminating.remove(&rs_key(vs, rs));
            }
            (Err(e), IpvsOp::DeleteService(_)) if e.is_not_found() => {}
            (Err(e), _) => {
                tracing::error!(error = %e, "IPVS change failed");
                errors.push(e.to_string());
            }
            (Ok(()), _) => {}
        }
    }
    errors
}

/// Deletes terminating real servers whose connections have ended; forgets those that are gone
/// or were given a weight again.
async fn check_terminating(st: &mut IpvsState, counters: &Counters) {
    if st.terminating.is_empty() {
        return;
    }
    let mut by_service: HashMap<VirtualService, Vec<RsKey>> = HashMap::new();
    for k in st.terminating.keys() {
        by_service.entry(k.0.clone()).or_default().push(k.clone());
    }
    let mut ops = Vec::new();
    for (svc, keys) in by_service {
        let Some(vs) = st.terminating.get(&keys[0]).map(|(vs, _)| vs.clone()) else {
            continue;
        };
        counters.listed(1);
        let dests = match st.client.destinations(&vs).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, service = %svc, "cannot list real servers; retrying later");
                continue;
            }
        };
        for k in keys {
            match dests.iter().find(|d| d.address == k.1 && d.port == k.2) {
                None => {
                    st.terminating.remove(&k);
                }
                Some(d) if d.weight != 0 => {
                    st.terminating.remove(&k);
                }
                Some(d) if u64::from(d.active_conns) + u64::from(d.inactive_conns) == 0 => {
                    ops.push(IpvsOp::DeleteDestination(vs.clone(), d.clone()));
                }
                Some(_) => {}
            }
        }
    }
    if ops.is_empty() {
        return;
    }
    let results = st.client.apply(&ops).await;
    counters.ipvs.fetch_add(ops.len() as u64, Ordering::Relaxed);
    for e in record_results(st, &ops, results) {
        tracing::warn!(error = %e, "deleting a terminated real server failed; retrying later");
    }
}

async fn graceful_loop(state: Arc<Mutex<IpvsState>>, counters: Arc<Counters>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut st = state.lock().await;
        check_terminating(&mut st, &counters).await;
    }
}

impl Backend for IpvsProxier {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    fn partial_syncs(&self) -> bool {
        false
    }

    async fn sync(&mut self, req: SyncRequest<'_>) -> Result<SyncOutcome, BackendError> {
        let reconcile = self.must_reconcile(&req);
        self.refresh_node_facts(req.node_facts, reconcile).await;
        let desired = render(req.model, &self.config);
        // Taken: a sync that fails leaves none, so the next one reconciles.
        let applied = self.applied.take().filter(|_| !reconcile);
        let errors = self.apply(&desired, applied.as_ref()).await?;
        let conntrack = self
            .conntrack
            .after_sync(req.model, &self.config.node_ips)
            .await;
        if !errors.is_empty() {
            let n = errors.len();
            let mut errors = errors;
            errors.truncate(5);
            return Err(BackendError::Ipvs(format!(
                "{n} IPVS change(s) failed: {}",
                errors.join("; ")
            )));
        }
        let mut outcome = SyncOutcome::new(
            desired.filter_rules,
            desired.nat_rules,
            desired.no_local_endpoints_internal,
            desired.no_local_endpoints_external,
            desired.health_checks.clone(),
        );
        outcome.conntrack = conntrack;
        tracing::debug!(changes = ?self.counters.snapshot(), reconcile, "IPVS sync applied");
        let reconciled = applied.map_or_else(Instant::now, |a| a.reconciled);
        self.applied = Some(Applied::new(desired, reconciled));
        Ok(outcome)
    }

    async fn needs_full_sync(&mut self) -> bool {
        // Every IPVS sync is complete (jump rules included), so there is nothing a "full"
        // one would repair.
        false
    }
}

/// Starts the IPVS proxier of `ipt`'s family writing through `ipt`: probes IPVS, sets its
/// sysctls, starts the graceful-termination checker. Node facts come with each sync.
pub async fn start(
    opts: &crate::config::ProxyOptions,
    ipt: Iptables,
    random_fully: bool,
) -> Result<IpvsProxier, IpvsStartError> {
    let client = IpvsClient::connect()
        .await
        .map_err(|e| IpvsStartError(e.to_string()))?;
    let family = ipt.family();
    let mut config = ipvs_config_for(opts, &NodeFacts::default(), &[], family);
    config.random_fully = random_fully;
    let kernel = IpvsKernel {
        iptables: ipt,
        ipset: Ipset::new(),
        link: DummyLink::default(),
        conntrack: Conntrack::new(),
        addrs: Addresses::new(),
        sysctl: Sysctl::new(),
    };
    let proxier = IpvsProxier::start(client, kernel, config, ipvs_settings(opts)).await?;
    tracing::info!(
        scheduler = proxier.config().scheduler(),
        ?family,
        "using IPVS"
    );
    Ok(proxier)
}

/// What `render` prints in IPVS mode: the virtual servers (`ipvsadm -Sn`), the ipsets
/// (`ipset save`) and the iptables-restore input of a sync of `model`, each under a `#`
/// header (`family`'s proxier, node facts from `opts`).
pub fn render_text(
    opts: &crate::config::ProxyOptions,
    model: &crate::model::ProxyModel,
    family: IpFamily,
    node_ips: Vec<IpAddr>,
) -> String {
    let facts = crate::host::HostSettings::from_options(opts).facts(&model.node, family);
    render_text_for(opts, model, &facts, &node_ips, family)
}

/// [`render_text`] for the `family` proxier, given that family's node facts and the
/// host's addresses.
pub fn render_text_for(
    opts: &crate::config::ProxyOptions,
    model: &crate::model::ProxyModel,
    facts: &NodeFacts,
    local_ips: &[IpAddr],
    family: IpFamily,
) -> String {
    let mut config = ipvs_config_for(opts, facts, local_ips, family);
    // Upstream probes iptables for --random-fully; every supported distribution has it.
    config.random_fully = true;
    let desired = render(model, &config);
    let restore = match family {
        IpFamily::V4 => "iptables-restore",
        IpFamily::V6 => "ip6tables-restore",
    };
    let mut out = String::from("# IPVS virtual servers (ipvsadm -Sn)\n");
    out.push_str(&super::ipvsadm_save(&desired));
    out.push_str("# ipsets (ipset save)\n");
    out.push_str(&super::ipset_save(&desired));
    out.push_str(&format!("# iptables ({restore} --noflush)\n"));
    out.push_str(&desired.iptables_restore);
    out
}

/// Settings from the options.
pub fn ipvs_settings(opts: &crate::config::ProxyOptions) -> IpvsSettings {
    IpvsSettings {
        tcp_timeout: opts.ipvs.tcp_timeout,
        tcp_fin_timeout: opts.ipvs.tcp_fin_timeout,
        udp_timeout: opts.ipvs.udp_timeout,
        graceful_check_interval: GRACEFUL_CHECK_INTERVAL,
        reconcile_period: opts.sync_period,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn vs(proto: Protocol) -> VirtualService {
        VirtualService::new(ip("10.96.0.10"), proto, 80, "rr")
    }

    fn rs(addr: &str, weight: i32, active: u32, inactive: u32) -> RealServer {
        let mut r = RealServer::new(ip(addr), 8080, weight);
        r.active_conns = active;
        r.inactive_conns = inactive;
        r
    }

    fn ops_text(plan: &Plan) -> Vec<String> {
        plan.dests
            .iter()
            .map(|o| match o {
                IpvsOp::UpdateDestination(_, r) => format!("update {r} w{}", r.weight),
                other => other.to_string(),
            })
            .collect()
    }

    #[test]
    fn identical_destinations_need_no_operation() {
        let want = [rs("10.244.0.10", 1, 0, 0), rs("10.244.0.11", 1, 0, 0)];
        let cur = [rs("10.244.0.11", 1, 3, 1), rs("10.244.0.10", 1, 0, 2)];
        let mut plan = Plan::default();
        diff_dests(&vs(Protocol::Tcp), &want, &cur, &mut plan);
        assert!(plan.dests.is_empty(), "{:?}", plan.dests);
        assert!(plan.still_terminating.is_empty());
    }

    #[test]
    fn new_destinations_are_added_and_reweighted_ones_updated() {
        let want = [rs("10.244.0.10", 1, 0, 0), rs("10.244.0.12", 1, 0, 0)];
        let cur = [rs("10.244.0.10", 0, 0, 0)];
        let mut plan = Plan::default();
        diff_dests(&vs(Protocol::Tcp), &want, &cur, &mut plan);
        assert_eq!(
            ops_text(&plan),
            [
                "update 10.244.0.10:8080 w1",
                "add destination 10.244.0.12:8080 to TCP 10.96.0.10:80"
            ]
        );
    }

    #[test]
    fn removed_tcp_destination_with_connections_is_quiesced_not_deleted() {
        let mut plan = Plan::default();
        diff_dests(
            &vs(Protocol::Tcp),
            &[],
            &[rs("10.244.0.10", 1, 1, 0), rs("10.244.0.11", 1, 0, 0)],
            &mut plan,
        );
        assert_eq!(
            ops_text(&plan),
            [
                "update 10.244.0.10:8080 w0",
                "delete destination 10.244.0.11:8080 of TCP 10.96.0.10:80"
            ]
        );
        // Already quiesced with connections left: tracked, nothing sent.
        let mut plan = Plan::default();
        diff_dests(
            &vs(Protocol::Tcp),
            &[],
            &[rs("10.244.0.10", 0, 0, 1)],
            &mut plan,
        );
        assert!(plan.dests.is_empty());
        assert_eq!(plan.still_terminating.len(), 1);
        // Once idle: deleted.
        let mut plan = Plan::default();
        diff_dests(
            &vs(Protocol::Tcp),
            &[],
            &[rs("10.244.0.10", 0, 0, 0)],
            &mut plan,
        );
        assert_eq!(
            ops_text(&plan),
            ["delete destination 10.244.0.10:8080 of TCP 10.96.0.10:80"]
        );
    }

    #[test]
    fn removed_udp_and_sctp_destinations_are_deleted_at_once() {
        for p in [Protocol::Udp, Protocol::Sctp] {
            let mut plan = Plan::default();
            diff_dests(&vs(p), &[], &[rs("10.244.0.10", 1, 5, 5)], &mut plan);
            assert_eq!(plan.dests.len(), 1);
            assert!(matches!(plan.dests[0], IpvsOp::DeleteDestination(..)));
        }
    }

    #[test]
    fn service_equality_ignores_kernel_only_fields() {
        let want = vs(Protocol::Tcp);
        let mut cur = want.clone();
        cur.flags.mask = u32::MAX;
        cur.netmask = 0;
        assert!(same_service(&cur, &want));
        cur.scheduler = "wrr".into();
        assert!(!same_service(&cur, &want));
        let mut cur = want.clone();
        cur.timeout = 10800;
        assert!(!same_service(&cur, &want));
    }

    /// A jump rule someone deleted comes back whenever the rules are written: upstream's
    /// IPVS proxier runs `createAndLinkKubeChain` on every sync; ours on every reconcile (at
    /// least every sync period) and every sync whose ruleset changed.
    #[tokio::test]
    async fn every_sync_re_ensures_the_jump_rules() {
        use crate::kernel::IpFamily;
        use crate::kernel::iptables::IptablesVariant;
        use crate::kernel::testutil::NetNs;
        let ns = NetNs::new();
        let ipt = Iptables::new(IptablesVariant::Legacy, IpFamily::V4).with_netns(ns.name());
        let restore = "*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n";
        sync_iptables(&ipt, restore).await.unwrap();
        let jumps = ipvs_jump_rules();
        for j in &jumps {
            let t = Table::from_name(j.table);
            assert_eq!(
                ipt.rule_exists(t, j.chain, &j.args()).await.ok(),
                Some(true)
            );
        }
        let gone = &jumps[0];
        let t = Table::from_name(gone.table);
        ipt.delete_rule(t, gone.chain, &gone.args()).await.unwrap();
        assert_eq!(
            ipt.rule_exists(t, gone.chain, &gone.args()).await.ok(),
            Some(false)
        );

        sync_iptables(&ipt, restore).await.unwrap();
        assert_eq!(
            ipt.rule_exists(t, gone.chain, &gone.args()).await.ok(),
            Some(true),
            "jump {} -> {} not restored by the next sync",
            gone.chain,
            gone.target
        );
    }

    /// A sync between reconciles restores only the sets whose entries changed, against the
    /// entries the last sync wrote (in the kernel's spelling): so its `ipset restore` holds
    /// the change alone.
    #[test]
    fn only_changed_sets_are_restored_against_the_last_sync() {
        use crate::backend::ipvs::ipset::{CLUSTER_IP, LOOP_BACK};
        let spec = |name: &str, entries: &[&str]| {
            let mut s = IpSetSpec::empty(name, IpFamily::V4).unwrap();
            s.entries = entries.iter().map(|e| e.to_string()).collect();
            s
        };
        let before = [
            spec(CLUSTER_IP, &["10.96.0.1,tcp:80", "10.96.0.2,tcp:80"]),
            spec(LOOP_BACK, &["10.244.0.5,tcp:8080,10.244.0.5"]),
        ];
        let (changed, _) = changed_sets(&before, &before);
        assert!(changed.is_empty());

        let after = [
            spec(CLUSTER_IP, &["10.96.0.1,tcp:80", "10.96.0.3,tcp:80"]),
            before[1].clone(),
        ];
        let (changed, current) = changed_sets(&after, &before);
        let names: Vec<&str> = changed.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [CLUSTER_IP]);
        let sets: Vec<DesiredSet<'_>> = changed
            .iter()
            .map(|s| DesiredSet {
                name: &s.name,
                set_type: &s.set_type,
                create_options: "",
                entries: &s.entries,
            })
            .collect();
        let plan = plan_restore(&sets, &current);
        assert_eq!(
            plan.input,
            "add KUBE-CLUSTER-IP 10.96.0.3,tcp:80\ndel KUBE-CLUSTER-IP 10.96.0.2,tcp:80\n"
        );
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("4.19.0\n"), Some((4, 19)));
        assert_eq!(parse_kernel_version("5.10"), Some((5, 10)));
        assert_eq!(parse_kernel_version("x"), None);
        assert!((5, 4) < CONN_REUSE_FIXED_KERNEL && (5, 4) >= CONN_REUSE_MIN_KERNEL);
    }

    #[test]
    fn sysctls_are_written_only_when_different() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let set = |name: &str, v: &str| {
            let p = root.join("proc/sys").join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        let get = |name: &str| {
            std::fs::read_to_string(root.join("proc/sys").join(name))
                .unwrap()
                .trim()
                .to_string()
        };
        for (n, v) in [
            ("net/ipv4/vs/conntrack", "0"),
            ("net/ipv4/vs/conn_reuse_mode", "1"),
            ("net/ipv4/vs/expire_nodest_conn", "0"),
            ("net/ipv4/vs/expire_quiescent_template", "0"),
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/arp_ignore", "0"),
            ("net/ipv4/conf/all/arp_announce", "0"),
            ("kernel/osrelease", "5.4.0-1-amd64"),
        ] {
            set(n, v);
        }
        apply_sysctls(&Sysctl::with_root(root), true).unwrap();
        for (n, v) in [
            ("net/ipv4/vs/conntrack", "1"),
            ("net/ipv4/vs/conn_reuse_mode", "0"),
            ("net/ipv4/vs/expire_nodest_conn", "1"),
            ("net/ipv4/vs/expire_quiescent_template", "1"),
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/arp_ignore", "1"),
            ("net/ipv4/conf/all/arp_announce", "2"),
        ] {
            assert_eq!(get(n), v, "{n}");
        }
        // A fixed kernel keeps conn_reuse_mode; no strict ARP leaves arp_* alone.
        set("kernel/osrelease", "6.1.0");
        set("net/ipv4/vs/conn_reuse_mode", "1");
        set("net/ipv4/conf/all/arp_ignore", "0");
        apply_sysctls(&Sysctl::with_root(root), false).unwrap();
        assert_eq!(get("net/ipv4/vs/conn_reuse_mode"), "1");
        assert_eq!(get("net/ipv4/conf/all/arp_ignore"), "0");
        // Missing IPVS sysctls (no ip_vs module) are a clear start-up error.
        std::fs::remove_file(root.join("proc/sys/net/ipv4/vs/conntrack")).unwrap();
        let err = apply_sysctls(&Sysctl::with_root(root), false).unwrap_err();
        assert!(err.to_string().contains("net/ipv4/vs/conntrack"), "{err}");
    }
}
