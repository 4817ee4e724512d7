//! The sync loop: waits for the initial lists, then programs the backend no more often than
//! `min_sync_period` and, with nothing changing, as upstream per mode (see `Cadence`): IPVS
//! every `sync_period`; iptables a full sync every `full_sync_period` (a partial one in
//! large-cluster mode, upstream #138571) and a canary check every `sync_period`. Full or
//! partial syncs are chosen as upstream does (KEP-3453).

pub mod runner;
pub mod shared;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::{Duration, Instant, sleep_until};

use crate::backend::{Backend, BackendError, SyncOutcome, SyncRequest};
use crate::model::{IpFamily, ProxyModel, ServiceName};
use runner::BoundedFrequency;
use shared::Shared;

/// Upstream's `proxyutil.FullSyncPeriod`: a full resync at least this often.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Shortest wait before retrying a failed sync: a `sync_period` of zero never spins.
pub const RETRY_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Timing settings.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Minimum interval between syncs (burst of two).
    pub min_sync_period: Duration,
    /// Maximum interval between syncs (IPVS), or between canary checks (iptables).
    pub sync_period: Duration,
    /// Maximum interval between full syncs.
    pub full_sync_period: Duration,
    /// What node facts are computed from (each sync, from the Node as last seen).
    pub host: crate::host::HostSettings,
}

/// Which sync-duration histograms a sync feeds besides the overall one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// A full sync of a backend with partial syncs (iptables).
    Full,
    /// A partial sync (iptables): only changed services rewritten.
    Partial,
    /// A sync of a backend without partial syncs (IPVS): every sync is alike.
    Unsplit,
}

impl SyncKind {
    /// The kind of a sync asked for with `full` from a backend that has partial syncs or not.
    pub fn of(partial_syncs: bool, full: bool) -> Self {
        match (partial_syncs, full) {
            (false, _) => SyncKind::Unsplit,
            (true, true) => SyncKind::Full,
            (true, false) => SyncKind::Partial,
        }
    }
}

/// What one finished sync of one family reports.
#[derive(Debug, Clone)]
pub struct SyncReport<'a> {
    /// The family synced.
    pub family: IpFamily,
    /// What kind of sync it was.
    pub kind: SyncKind,
    /// How long the backend took.
    pub duration: Duration,
    /// What the backend reported.
    pub outcome: &'a SyncOutcome,
    /// Trigger times of the EndpointSlice changes it programmed.
    pub trigger_times: &'a [SystemTime],
    /// Service events it consumed (counted with the first family's sync only, so each event
    /// counts once).
    pub service_events: u64,
    /// EndpointSlice events it consumed (likewise).
    pub endpoint_events: u64,
    /// The node facts it programmed (health check servers listen where node ports are).
    pub node_facts: &'a crate::host::NodeFacts,
}

/// Side effects outside the kernel: metrics, health, health-check servers.
pub trait Reporter: Send {
    /// A change was queued for `family` (health: an update is pending).
    fn queued(&mut self, family: IpFamily);
    /// Services with Service changes and services with EndpointSlice changes received but
    /// not yet taken by a sync (reported when a change wakes the loop, and when a sync takes
    /// them).
    fn changes_pending(&mut self, services: usize, endpoints: usize);
    /// A sync succeeded.
    fn sync_done(
        &mut self,
        report: &SyncReport<'_>,
    ) -> impl std::future::Future<Output = ()> + Send;
    /// A sync of `family` failed with `error`; its next one is full.
    fn sync_failed(
        &mut self,
        family: IpFamily,
        kind: SyncKind,
        duration: Duration,
        error: &BackendError,
    );
}

/// One family's proxier and what the loop remembers about it.
struct Proxier<B> {
    family: IpFamily,
    backend: B,
    need_full: bool,
    last_full: Instant,
    /// The node facts of the last successful sync: a change rewrites every chain, as the
    /// primary IP, node-port addresses and local detector appear in unchanged services'.
    synced_facts: Option<crate::host::NodeFacts>,
    /// Trigger times of changes not yet programmed for this family.
    trigger_times: Vec<SystemTime>,
    /// Services changed since this family's last successful sync (kept after a failure: the
    /// full retry still names them).
    pending: BTreeSet<ServiceName>,
    /// A change of this family is not yet programmed. A family without one sits out rounds
    /// woken by the other family's changes, as upstream's per-family proxiers do.
    dirty: bool,
    /// Service and EndpointSlice events not yet counted.
    events: (u64, u64),
}

/// What one round hands each proxier.
struct Round<'a> {
    start: Instant,
    node: &'a crate::model::NodeInfo,
}

/// What ended the wait before a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// A recorded change, or a family's kernel state found drifted.
    Change,
    /// The periodic deadline or the retry of a failed round (and the first round).
    Timer,
}

/// Whether `p`'s periodic full sync is due this round.
fn full_sync_due<B: Backend>(p: &Proxier<B>, round: &Round<'_>, settings: &SyncSettings) -> bool {
    round.start.duration_since(p.last_full) >= settings.full_sync_period
        && p.backend.periodic_full_syncs()
}

/// The loop's state: one proxier per IP family (upstream's metaproxier), synced in turn.
pub struct SyncLoop<B: Backend, R: Reporter> {
    shared: Arc<Shared>,
    proxiers: Vec<Proxier<B>>,
    reporter: R,
    settings: SyncSettings,
}

impl<B: Backend, R: Reporter> SyncLoop<B, R> {
    /// Builds the loop over one backend per family (primary family first).
    pub fn new(
        shared: Arc<Shared>,
        backends: Vec<(IpFamily, B)>,
        reporter: R,
        settings: SyncSettings,
    ) -> Self {
        let now = Instant::now();
        let proxiers = backends
            .into_iter()
            .map(|(family, backend)| Proxier {
                family,
                backend,
                need_full: true,
                last_full: now,
                synced_facts: None,
                trigger_times: Vec::new(),
                pending: BTreeSet::new(),
                dirty: false,
                events: (0, 0),
            })
            .collect();
        SyncLoop {
            shared,
            proxiers,
            reporter,
            settings,
        }
    }

    /// Tells the reporter (`/healthz`, metrics) which families have a change queued: all of
    /// them at start, else those the pending changes touch.
    fn queued(&mut self, families: Option<&BTreeSet<IpFamily>>) {
        for p in &self.proxiers {
            if families.is_none_or(|f| f.contains(&p.family)) {
                self.reporter.queued(p.family);
            }
        }
    }

    /// Runs until `max_syncs` rounds were attempted (`None`: forever); returns the backends.
    pub async fn run(mut self, max_syncs: Option<usize>) -> Vec<B> {
        while !self.shared.initial_lists_done() {
            self.shared.woken().await;
            // The first sync takes every change recorded so far: this wake is answered (a
            // permit left standing would make `woken` return at once, forever).
            self.shared.taking_changes();
        }
        tracing::info!("initial Service and EndpointSlice lists complete, starting to sync");
        let now = Instant::now();
        let partial = self
            .proxiers
            .first()
            .is_some_and(|p| p.backend.partial_syncs());
        let cadence = Cadence::of(&self.settings, partial);
        let mut rate =
            BoundedFrequency::new(self.settings.min_sync_period, cadence.max_interval, 2, now);
        for p in &mut self.proxiers {
            p.last_full = now;
        }
        // Each family's model, kept from round to round and refreshed with the changed
        // services only: a small change costs a small update, not a copy of the cluster.
        let mut models: Option<Vec<ProxyModel>> = None;
        let mut attempts = 0usize;
        // Upstream's BoundedFrequencyRunner retryInterval: after a failed round, the next one
        // runs no later than `sync_period` after it ended (sooner if a change or the periodic
        // deadline comes first); a successful round cancels the retry.
        let retry_interval = self.settings.sync_period.max(RETRY_MIN_INTERVAL);
        self.queued(None);
        let mut wake = Wake::Timer;
        loop {
            sleep_until(rate.next_allowed(Instant::now())).await;
            let start = Instant::now();
            rate.ran(start);
            self.shared.taking_changes();
            let families: Vec<IpFamily> = self.proxiers.iter().map(|p| p.family).collect();
            let (node, left) = {
                let mut st = self.shared.lock();
                let c = st.take_changes();
                refresh_models(&st, &mut models, &families, &c.services);
                let counter = families
                    .iter()
                    .position(|f| c.families.contains(f))
                    .unwrap_or(0);
                for (i, p) in self.proxiers.iter_mut().enumerate() {
                    p.need_full |= c.node;
                    if c.families.contains(&p.family) {
                        p.dirty = true;
                        p.pending.extend(c.services.iter().cloned());
                    }
                    let family = p.family;
                    p.trigger_times.extend(
                        c.trigger_times
                            .iter()
                            .filter(|(f, _)| *f == family)
                            .map(|(_, t)| *t),
                    );
                    // Counted once, by the first family that syncs them.
                    if i == counter {
                        p.events.0 += c.service_events;
                        p.events.1 += c.endpoint_events;
                    }
                }
                (st.node().clone(), st.pending_changes())
            };
            self.reporter.changes_pending(left.0, left.1);
            let round = Round { start, node: &node };
            let mut any_failed = false;
            for (p, model) in self.proxiers.iter_mut().zip(models.iter().flatten()) {
                // A timer (the periodic sync, a retry) syncs every family; a change only
                // those it touched, those with a full sync due (after a failure or drift)
                // and those whose periodic full sync is due.
                if wake == Wake::Change
                    && !p.dirty
                    && !p.need_full
                    && !full_sync_due(p, &round, &self.settings)
                {
                    continue;
                }
                any_failed |=
                    !sync_family(p, model, &round, &self.settings, &mut self.reporter).await;
            }
            attempts += 1;
            if max_syncs.is_some_and(|m| attempts >= m) {
                return self.proxiers.into_iter().map(|p| p.backend).collect();
            }
            let retry_at = any_failed.then(|| Instant::now() + retry_interval);
            wake = self.idle(&rate, cadence, retry_at).await;
        }
    }

    /// Waits until a sync is due: a change, the periodic deadline, the retry of a failed
    /// round (`retry_at`), or (with a canary) a check that finds a family's kernel state
    /// drifted (that family's next sync is full).
    async fn idle(
        &mut self,
        rate: &BoundedFrequency,
        cadence: Cadence,
        retry_at: Option<Instant>,
    ) -> Wake {
        // While a retry is pending the canary is not checked: the retry is full anyway and
        // due no later than the check.
        let canary = cadence.canary_check.filter(|_| retry_at.is_none());
        let mut next_check = canary.map(|every| Instant::now() + every);
        loop {
            tokio::select! {
                _ = sleep_until_some(retry_at) => return Wake::Timer,
                _ = self.shared.woken() => {
                    let (families, (services, endpoints)) = {
                        let st = self.shared.lock();
                        (st.pending_families().clone(), st.pending_changes())
                    };
                    self.queued(Some(&families));
                    self.reporter.changes_pending(services, endpoints);
                    return Wake::Change;
                }
                _ = sleep_until(rate.periodic_deadline()) => return Wake::Timer,
                _ = sleep_until_some(next_check) => {
                    let mut drifted = false;
                    for p in &mut self.proxiers {
                        if p.backend.needs_full_sync().await {
                            tracing::info!(family = %p.family, "kernel state drifted (canary missing), forcing a full sync");
                            p.need_full = true;
                            drifted = true;
                        }
                    }
                    if drifted {
                        return Wake::Change;
                    }
                    next_check = canary.map(|every| Instant::now() + every);
                }
            }
        }
    }
}

/// Brings each family's kept model up to date with the services changed since the last
/// round (the first round snapshots the whole state).
fn refresh_models(
    st: &crate::model::ClusterState,
    models: &mut Option<Vec<ProxyModel>>,
    families: &[IpFamily],
    changed: &BTreeSet<ServiceName>,
) {
    match models {
        Some(models) => {
            for (model, family) in models.iter_mut().zip(families) {
                st.refresh(model, *family, changed);
            }
        }
        None => *models = Some(families.iter().map(|f| st.snapshot(*f)).collect()),
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When syncs happen without a change: upstream's cadence per mode.
#[derive(Debug, Clone, Copy)]
struct Cadence {
    /// The longest time between two syncs.
    max_interval: Duration,
    /// How often the kernel is checked for drift between syncs (`None`: never).
    canary_check: Option<Duration>,
}

impl Cadence {
    /// A backend with partial syncs (iptables mode) syncs only on a change or every
    /// `full_sync_period` (a full sync), and checks its canary every `sync_period` (upstream's
    /// `ipt.Monitor`); one without (IPVS) resyncs every `sync_period`, which repairs drift.
    fn of(settings: &SyncSettings, partial_syncs: bool) -> Self {
        if partial_syncs {
            Cadence {
                max_interval: settings.full_sync_period,
                canary_check: Some(settings.sync_period),
            }
        } else {
            Cadence {
                max_interval: settings.sync_period,
                canary_check: None,
            }
        }
    }
}

/// Syncs one family's proxier for this round; returns whether it succeeded. A failure keeps
/// the previous rules in the kernel and makes the family's next sync full.
async fn sync_family<B: Backend, R: Reporter>(
    p: &mut Proxier<B>,
    model: &ProxyModel,
    round: &Round<'_>,
    settings: &SyncSettings,
    reporter: &mut R,
) -> bool {
    let family = p.family;
    if full_sync_due(p, round, settings) {
        p.need_full = true;
    }
    let facts = settings.host.facts(round.node, family);
    if p.synced_facts.as_ref().is_some_and(|f| *f != facts) {
        tracing::info!(%family, ?facts, "node facts changed (primary IP, podCIDR), forcing a full sync");
        p.need_full = true;
    }
    let full = p.need_full;
    let kind = SyncKind::of(p.backend.partial_syncs(), full);
    let started = Instant::now();
    let result = p
        .backend
        .sync(SyncRequest {
            model,
            changed: &p.pending,
            full,
            node_facts: &facts,
        })
        .await;
    let duration = started.elapsed();
    match result {
        Ok(outcome) => {
            reporter
                .sync_done(&SyncReport {
                    family,
                    kind,
                    duration,
                    outcome: &outcome,
                    trigger_times: &p.trigger_times,
                    service_events: p.events.0,
                    endpoint_events: p.events.1,
                    node_facts: &facts,
                })
                .await;
            tracing::debug!(
                %family,
                full,
                duration_ms = duration.as_millis() as u64,
                services = model.services.len(),
                endpoints = model.endpoint_count(),
                changed = p.pending.len(),
                rules = ?outcome.rules_per_table,
                "sync done"
            );
            p.trigger_times.clear();
            p.pending.clear();
            p.dirty = false;
            p.events = (0, 0);
            if full {
                p.last_full = round.start;
            }
            p.need_full = false;
            p.synced_facts = Some(facts);
            true
        }
        Err(e) => {
            tracing::error!(%family, error = %e, full, "sync failed, keeping previous rules; retrying with a full sync");
            reporter.sync_failed(family, kind, duration, &e);
            p.need_full = true;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClusterState;
    use k8s_openapi::api::core::v1::Service;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq)]
    struct Call {
        full: bool,
        changed: Vec<String>,
        services: usize,
        at: Duration,
    }

    struct FakeBackend {
        calls: Arc<Mutex<Vec<Call>>>,
        /// How many of the next syncs fail (a rejected restore).
        fail_next: Arc<Mutex<u32>>,
        t0: Instant,
        /// When the canary was checked, and whether it is gone now.
        canary: Arc<Mutex<(Vec<Duration>, bool)>>,
        /// Whether it is in large-cluster mode (no periodic full syncs).
        large_cluster: Arc<Mutex<bool>>,
    }

    impl Backend for FakeBackend {
        fn mode(&self) -> &'static str {
            "fake"
        }
        fn partial_syncs(&self) -> bool {
            true
        }
        fn periodic_full_syncs(&self) -> bool {
            !*self.large_cluster.lock().unwrap()
        }
        async fn sync(&mut self, req: SyncRequest<'_>) -> Result<SyncOutcome, BackendError> {
            self.calls.lock().unwrap().push(Call {
                full: req.full,
                changed: req.changed.iter().map(|s| s.to_string()).collect(),
                services: req.model.services.len(),
                at: Instant::now() - self.t0,
            });
            let mut f = self.fail_next.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                return Err(BackendError::IptablesRestore("boom".into()));
            }
            Ok(SyncOutcome::default())
        }
        async fn needs_full_sync(&mut self) -> bool {
            let mut c = self.canary.lock().unwrap();
            c.0.push(Instant::now() - self.t0);
            std::mem::take(&mut c.1)
        }
    }

    #[derive(Default)]
    struct CountingReporter {
        queued: Arc<Mutex<Vec<IpFamily>>>,
        done: Arc<Mutex<usize>>,
        failed: Arc<Mutex<usize>>,
        pending: Arc<Mutex<Vec<(usize, usize)>>>,
    }
    impl Reporter for CountingReporter {
        fn queued(&mut self, family: IpFamily) {
            self.queued.lock().unwrap().push(family);
        }
        fn changes_pending(&mut self, services: usize, endpoints: usize) {
            self.pending.lock().unwrap().push((services, endpoints));
        }
        async fn sync_done(&mut self, _r: &SyncReport<'_>) {
            *self.done.lock().unwrap() += 1;
        }
        fn sync_failed(
            &mut self,
            _family: IpFamily,
            _kind: SyncKind,
            _d: Duration,
            _e: &BackendError,
        ) {
            *self.failed.lock().unwrap() += 1;
        }
    }

    fn svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_lists_then_full_then_partial_and_full_after_failure() {
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fail_next = Arc::new(Mutex::new(0));
        let t0 = Instant::now();
        let canary: Arc<Mutex<(Vec<Duration>, bool)>> = Arc::default();
        let backend = FakeBackend {
            calls: calls.clone(),
            fail_next: fail_next.clone(),
            t0,
            canary: canary.clone(),
            large_cluster: Arc::default(),
        };
        let reporter = CountingReporter::default();
        let (done, failed) = (reporter.done.clone(), reporter.failed.clone());
        let settings = SyncSettings {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            host: crate::host::HostSettings::default(),
        };
        let task = tokio::spawn(
            SyncLoop::new(
                shared.clone(),
                vec![(IpFamily::V4, backend)],
                reporter,
                settings,
            )
            .run(Some(6)),
        );

        shared.lock().apply_service(&svc("a", "10.0.0.1"));
        shared.set_services_synced();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            calls.lock().unwrap().is_empty(),
            "nothing may be programmed before both lists"
        );
        shared.set_slices_synced();
        tokio::time::sleep(Duration::from_millis(10)).await;

        // A change: partial sync of exactly that service.
        shared.lock().apply_service(&svc("b", "10.0.0.2"));
        shared.wake();
        tokio::time::sleep(Duration::from_millis(10)).await;

        // A failing sync of another change, then the retry (sync_period later, as upstream)
        // is full and still carries it.
        *fail_next.lock().unwrap() = 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
        shared.lock().apply_service(&svc("c", "10.0.0.3"));
        shared.wake();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            calls.lock().unwrap().len(),
            3,
            "no retry before sync_period"
        );

        // Nothing changes: no sync (upstream's iptables mode), a canary check every
        // sync_period instead.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let c = calls.lock().unwrap().clone();
        assert_eq!(c.len(), 4, "{c:#?}");
        assert!(c[0].full && c[0].services == 1 && c[0].at == Duration::from_secs(5));
        assert!(!c[1].full);
        assert_eq!(c[1].changed, ["ns/b"]);
        assert!(!c[2].full && c[2].changed == ["ns/c"], "{:?}", c[2]);
        assert!(c[3].full, "a failed sync is retried in full");
        assert_eq!(c[3].changed, ["ns/c"]);
        assert_eq!(c[3].at - c[2].at, Duration::from_secs(30));
        let checks = canary.lock().unwrap().0.clone();
        assert_eq!(
            checks,
            [c[3].at + Duration::from_secs(30)],
            "one check per sync_period"
        );

        // Someone flushed the tables: the next check forces a full sync.
        canary.lock().unwrap().1 = true;
        tokio::time::sleep(Duration::from_secs(30)).await;
        let c = calls.lock().unwrap().clone();
        assert_eq!(c.len(), 5, "{c:#?}");
        assert!(c[4].full && c[4].changed.is_empty(), "{:?}", c[4]);
        assert_eq!(c[4].at, c[3].at + Duration::from_secs(60));

        // Then nothing but checks until the hourly full sync.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let c = calls.lock().unwrap().clone();
        assert_eq!(c.len(), 6, "{c:#?}");
        assert!(c[5].full, "{:?}", c[5]);
        assert_eq!(c[5].at - c[4].at, Duration::from_secs(3600));
        // 119 checks in between (the one due with the sync itself may run or not).
        let checks = canary.lock().unwrap().0.len();
        assert!((2 + 119..=2 + 120).contains(&checks), "{checks} checks");
        assert_eq!((*done.lock().unwrap(), *failed.lock().unwrap()), (5, 1));
        task.abort();
    }

    /// Upstream #138571: in large-cluster mode the hourly sync is partial; back below the
    /// threshold, the overdue full sync comes at the next sync.
    #[tokio::test(start_paused = true)]
    async fn no_periodic_full_sync_in_large_cluster_mode() {
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let large = Arc::new(Mutex::new(true));
        let backend = FakeBackend {
            calls: calls.clone(),
            fail_next: Arc::default(),
            t0: Instant::now(),
            canary: Arc::default(),
            large_cluster: large.clone(),
        };
        let task = tokio::spawn(
            SyncLoop::new(
                shared.clone(),
                vec![(IpFamily::V4, backend)],
                CountingReporter::default(),
                settings_1s_30s(),
            )
            .run(Some(4)),
        );
        shared.set_services_synced();
        shared.set_slices_synced();
        tokio::time::sleep(Duration::from_secs(3601)).await;
        let fulls = |c: &[Call]| c.iter().map(|c| c.full).collect::<Vec<_>>();
        let c = calls.lock().unwrap().clone();
        assert_eq!(
            fulls(&c),
            [true, false],
            "the hourly sync is partial: {c:#?}"
        );
        assert_eq!(c[1].at - c[0].at, Duration::from_secs(3600));
        // Below the threshold again: the next sync (a change here) is full.
        *large.lock().unwrap() = false;
        shared.lock().apply_service(&svc("a", "10.0.0.1"));
        shared.wake();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c = calls.lock().unwrap().clone();
        assert_eq!(fulls(&c), [true, false, true], "{c:#?}");
        task.abort();
    }

    fn node(ip: &str, pod_cidr: &str) -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node1"},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
        }))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_cidr_or_primary_ip_change_forces_a_full_sync() {
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let backend = FakeBackend {
            calls: calls.clone(),
            fail_next: Arc::default(),
            t0: Instant::now(),
            canary: Arc::default(),
            large_cluster: Arc::default(),
        };
        let settings = SyncSettings {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            host: crate::host::HostSettings {
                detect_local: crate::config::DetectLocal::NodeCidr,
                node_port_addresses: crate::config::NodePortAddresses::Primary,
                ..crate::host::HostSettings::default()
            },
        };
        let reporter = CountingReporter::default();
        let task = tokio::spawn(
            SyncLoop::new(
                shared.clone(),
                vec![(IpFamily::V4, backend)],
                reporter,
                settings,
            )
            .run(Some(6)),
        );
        shared
            .lock()
            .set_node(Some(&node("192.168.50.1", "10.244.0.0/24")));
        shared.set_services_synced();
        shared.set_slices_synced();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let step = |f: Box<dyn FnOnce(&mut ClusterState)>| {
            f(&mut shared.lock());
            shared.wake();
        };
        step(Box::new(|st| {
            st.apply_service(&svc("a", "10.0.0.1"));
        }));
        tokio::time::sleep(Duration::from_secs(2)).await;
        step(Box::new(|st| {
            st.set_node(Some(&node("192.168.50.1", "10.244.7.0/24")))
        }));
        tokio::time::sleep(Duration::from_secs(2)).await;
        step(Box::new(|st| {
            st.set_node(Some(&node("192.168.50.9", "10.244.7.0/24")))
        }));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c = calls.lock().unwrap().clone();
        assert!(c[0].full, "start-up: {c:#?}");
        // Past start-up: a service change, then a podCIDR change, then a primary IP change.
        let later: Vec<(bool, Vec<String>)> = c
            .iter()
            .filter(|c| c.at >= Duration::from_secs(2))
            .map(|c| (c.full, c.changed.clone()))
            .collect();
        assert_eq!(
            later,
            [
                (false, vec!["ns/a".to_string()]),
                (true, vec![]),
                (true, vec![])
            ],
            "{c:#?}"
        );
        task.abort();
    }

    fn heartbeat(at: &str) -> k8s_openapi::api::core::v1::Node {
        let mut n = node("192.168.50.1", "10.244.0.0/24");
        n.status.get_or_insert_default().conditions = Some(vec![
            serde_json::from_value(serde_json::json!({
                "type": "Ready", "status": "True", "lastHeartbeatTime": at
            }))
            .unwrap(),
        ]);
        n
    }

    #[tokio::test(start_paused = true)]
    async fn node_heartbeats_and_no_op_updates_cause_no_sync() {
        use kube::runtime::watcher::Event;
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let backend = FakeBackend {
            calls: calls.clone(),
            fail_next: Arc::default(),
            t0: Instant::now(),
            canary: Arc::default(),
            large_cluster: Arc::default(),
        };
        let settings = SyncSettings {
            min_sync_period: Duration::ZERO,
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            host: crate::host::HostSettings::default(),
        };
        let task = tokio::spawn(
            SyncLoop::new(
                shared.clone(),
                vec![(IpFamily::V4, backend)],
                CountingReporter::default(),
                settings,
            )
            .run(None),
        );
        let apply = |e: Event<Service>| crate::watch::handle(e, &shared, &mut None);
        let apply_node = |n| crate::watch::handle(Event::Apply(n), &shared, &mut None);
        apply_node(heartbeat("2026-11-29T06:00:00Z"));
        apply(Event::Apply(svc("a", "10.0.0.1")));
        shared.set_services_synced();
        shared.set_slices_synced();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(calls.lock().unwrap().len(), 1, "the start-up sync");

        // 25 s of heartbeats and no-op Service updates (a new resourceVersion, an annotation
        // the proxy does not read), every second: still only the start-up sync.
        for i in 1..=25u32 {
            apply_node(heartbeat(&format!("2026-11-29T06:00:{i:02}Z")));
            let mut s = svc("a", "10.0.0.1");
            s.metadata.resource_version = Some(i.to_string());
            s.metadata.annotations = Some([("unread".to_string(), i.to_string())].into());
            apply(Event::Apply(s));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(
            calls.lock().unwrap().len(),
            1,
            "{:#?}",
            calls.lock().unwrap()
        );

        // A real change still syncs at once.
        apply(Event::Apply(svc("a", "10.0.0.9")));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c = calls.lock().unwrap().clone();
        assert_eq!(c.len(), 2, "{c:#?}");
        assert_eq!(c[1].changed, ["ns/a"]);
        task.abort();
    }

    fn dual_stack_svc(name: &str, v4: &str, v6: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"clusterIP": v4, "clusterIPs": [v4, v6], "ipFamilies": ["IPv4", "IPv6"],
                     "ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    fn v6_slice_of(svc: &str, ip: &str) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        let mut s = slice_of(svc, ip);
        s.address_type = "IPv6".to_string();
        s.metadata.name = Some(format!("{svc}-6"));
        s
    }

    /// Upstream runs one proxier per family, each with its own change trackers: a change
    /// of one family queues and syncs that family's proxier only. A timer (the periodic
    /// sync) and a change of the Node's addresses still sync both.
    #[tokio::test(start_paused = true)]
    async fn each_family_syncs_only_its_own_changes() {
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let (v4, v6) = (Arc::default(), Arc::default());
        let reporter = CountingReporter::default();
        let queued = reporter.queued.clone();
        let task = tokio::spawn(
            SyncLoop::new(
                shared.clone(),
                vec![
                    (IpFamily::V4, fake(&Arc::default(), &v4)),
                    (IpFamily::V6, fake(&Arc::default(), &v6)),
                ],
                reporter,
                settings_1s_30s(),
            )
            .run(None),
        );
        let calls = |c: &Arc<Mutex<Vec<Call>>>| -> Vec<(bool, Vec<String>)> {
            let c = c.lock().unwrap();
            c.iter().map(|c| (c.full, c.changed.clone())).collect()
        };
        let step = |f: &dyn Fn(&mut ClusterState)| {
            shared.update(f);
        };
        step(&|st| {
            st.apply_service(&dual_stack_svc("a", "10.0.0.1", "fd00::1"));
        });
        shared.set_services_synced();
        shared.set_slices_synced();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let first = (true, vec!["ns/a".to_string()]);
        assert_eq!(calls(&v4), std::slice::from_ref(&first));
        assert_eq!(calls(&v6), [first]);
        queued.lock().unwrap().clear();

        // An IPv4 slice, then an IPv4-only Service: the IPv6 proxier is neither queued nor
        // synced.
        step(&|st| {
            st.apply_slice(&slice_of("a", "10.1.0.5"));
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        step(&|st| {
            st.apply_service(&svc("b", "10.0.0.2"));
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let partial = |names: &[&str]| (false, names.iter().map(|s| s.to_string()).collect());
        assert_eq!(calls(&v4)[1..], [partial(&["ns/a"]), partial(&["ns/b"])]);
        assert_eq!(calls(&v6).len(), 1, "{:?}", calls(&v6));
        assert_eq!(*queued.lock().unwrap(), [IpFamily::V4, IpFamily::V4]);

        // An IPv6 slice: the IPv6 proxier alone.
        step(&|st| {
            st.apply_slice(&v6_slice_of("a", "fd00:1::5"));
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(calls(&v4).len(), 3, "{:?}", calls(&v4));
        assert_eq!(calls(&v6)[1..], [partial(&["ns/a"])]);
        assert_eq!(queued.lock().unwrap()[2..], [IpFamily::V6]);

        // Changing only the IPv6 address of a dual-stack Service touches IPv6 alone.
        step(&|st| {
            st.apply_service(&dual_stack_svc("a", "10.0.0.1", "fd00::9"));
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(calls(&v4).len(), 3, "{:?}", calls(&v4));
        assert_eq!(calls(&v6)[2..], [partial(&["ns/a"])]);

        // The host's addresses changed: both families sync, with nothing named.
        step(&|st| st.host_addresses_changed());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(calls(&v4)[3..], [partial(&[])]);
        assert_eq!(calls(&v6)[3..], [partial(&[])]);

        // The hourly full sync is a timer: both families.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(calls(&v4)[4..], [(true, vec![])]);
        assert_eq!(calls(&v6)[4..], [(true, vec![])]);
        task.abort();
    }

    fn slice_of(svc: &str, ip: &str) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": format!("{svc}-1"),
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip]}]
        }))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn pending_changes_are_reported_when_queued_and_when_taken() {
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let backend = FakeBackend {
            calls: Arc::new(Mutex::new(Vec::new())),
            fail_next: Arc::new(Mutex::new(0)),
            t0: Instant::now(),
            canary: Arc::default(),
            large_cluster: Arc::default(),
        };
        let reporter = CountingReporter::default();
        let pending = reporter.pending.clone();
        let settings = SyncSettings {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            host: crate::host::HostSettings::default(),
        };
        let task = tokio::spawn(
            SyncLoop::new(
                shared.clone(),
                vec![(IpFamily::V4, backend)],
                reporter,
                settings,
            )
            .run(Some(3)),
        );
        shared.set_services_synced();
        shared.set_slices_synced();
        tokio::time::sleep(Duration::from_millis(10)).await;
        {
            let mut st = shared.lock();
            st.apply_service(&svc("a", "10.0.0.1"));
            st.apply_service(&svc("b", "10.0.0.2"));
            st.apply_slice(&slice_of("a", "10.244.0.5"));
        }
        shared.wake();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Each sync reports what it left pending (nothing); the wake between them reports the
        // two services with Service changes and the one with an EndpointSlice change.
        let seen = pending.lock().unwrap().clone();
        assert!(seen.len() >= 3, "{seen:?}");
        assert_eq!(seen[seen.len() - 2..], [(2, 1), (0, 0)], "{seen:?}");
        assert_eq!(seen.iter().filter(|p| **p != (0, 0)).count(), 1, "{seen:?}");
        task.abort();
    }

    /// The daemon's reporter over fresh metrics, and a way to read one counter's samples.
    fn daemon_reporter() -> (
        crate::server::reporter::DaemonReporter,
        impl Fn(&str) -> Vec<String>,
    ) {
        use crate::server::{health::ProxyHealth, metrics::Metrics};
        let metrics = Metrics::new();
        let health = ProxyHealth::new(Duration::from_secs(30)).with_metrics(metrics.clone());
        let servers =
            crate::server::service_health::ServiceHealthServers::new(Vec::new(), health.clone());
        let reporter =
            crate::server::reporter::DaemonReporter::new(metrics.clone(), health, servers);
        let read = move |name: &str| {
            let prefix = format!("kubeproxy_sync_proxy_rules_{name}{{");
            metrics
                .encode()
                .unwrap()
                .lines()
                .filter(|l| l.starts_with(&prefix))
                .map(str::to_string)
                .collect()
        };
        (reporter, read)
    }

    fn fake(fail_next: &Arc<Mutex<u32>>, calls: &Arc<Mutex<Vec<Call>>>) -> FakeBackend {
        FakeBackend {
            calls: calls.clone(),
            fail_next: fail_next.clone(),
            t0: Instant::now(),
            canary: Arc::default(),
            large_cluster: Arc::default(),
        }
    }

    fn settings_1s_30s() -> SyncSettings {
        SyncSettings {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            host: crate::host::HostSettings::default(),
        }
    }

    /// A kernel write failing three times in a row, nothing else changing: each retry comes
    /// `sync_period` after the failed one ended (upstream's retryInterval, not every second),
    /// each failure counts, and the first success is full and still carries the change.
    #[tokio::test(start_paused = true)]
    async fn failed_syncs_are_retried_every_sync_period_until_one_succeeds_in_full() {
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let (calls, fail_next) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let (reporter, read) = daemon_reporter();
        let task = tokio::spawn(
            SyncLoop::new(
                shared.clone(),
                vec![(IpFamily::V4, fake(&fail_next, &calls))],
                reporter,
                settings_1s_30s(),
            )
            .run(None),
        );
        shared.set_services_synced();
        shared.set_slices_synced();
        tokio::time::sleep(Duration::from_secs(2)).await;
        *fail_next.lock().unwrap() = 3;
        shared.lock().apply_service(&svc("a", "10.0.0.1"));
        shared.wake();
        // Long enough for a retry every second to show, and for the canary checks that
        // resume after the success (none of which may sync: nothing drifted).
        tokio::time::sleep(Duration::from_secs(200)).await;
        let c = calls.lock().unwrap().clone();
        let seen: Vec<(u64, bool, Vec<String>)> = c
            .iter()
            .map(|c| (c.at.as_secs(), c.full, c.changed.clone()))
            .collect();
        let a = || vec!["ns/a".to_string()];
        assert_eq!(
            seen,
            [
                (0, true, vec![]),
                (2, false, a()),
                (32, true, a()),
                (62, true, a()),
                (92, true, a()),
            ]
        );
        assert_eq!(
            read("iptables_restore_failures_total"),
            ["kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 3"]
        );
        assert_eq!(
            read("iptables_partial_restore_failures_total"),
            [
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"} 1"
            ]
        );
        task.abort();
    }

    /// As upstream, a change during the retry wait syncs at once (rate-limited by
    /// `min_sync_period`), in full; its success cancels the pending retry.
    #[tokio::test(start_paused = true)]
    async fn a_change_during_the_retry_wait_syncs_in_full_and_its_success_cancels_the_retry() {
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let (calls, fail_next) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let task = tokio::spawn(
            SyncLoop::new(
                shared.clone(),
                vec![(IpFamily::V4, fake(&fail_next, &calls))],
                CountingReporter::default(),
                settings_1s_30s(),
            )
            .run(None),
        );
        shared.set_services_synced();
        shared.set_slices_synced();
        tokio::time::sleep(Duration::from_secs(2)).await;
        *fail_next.lock().unwrap() = 1;
        shared.lock().apply_service(&svc("a", "10.0.0.1"));
        shared.wake();
        tokio::time::sleep(Duration::from_secs(5)).await;
        shared.lock().apply_service(&svc("b", "10.0.0.2"));
        shared.wake();
        tokio::time::sleep(Duration::from_secs(100)).await;
        let c = calls.lock().unwrap().clone();
        let seen: Vec<(u64, bool, Vec<String>)> = c
            .iter()
            .map(|c| (c.at.as_secs(), c.full, c.changed.clone()))
            .collect();
        assert_eq!(
            seen,
            [
                (0, true, vec![]),
                (2, false, vec!["ns/a".to_string()]),
                (7, true, vec!["ns/a".to_string(), "ns/b".to_string()]),
            ],
            "no sync at the cancelled retry (32 s)"
        );
        task.abort();
    }
}
