//! The sync loop: waits for the initial lists, then programs the backend no more often than
//! `min_sync_period` and, with nothing changing, as upstream per mode (see `Cadence`): IPVS
//! every `sync_period`; iptables a full sync every `full_sync_period` and a canary check every
//! `sync_period`. Full or partial syncs are chosen as upstream does (KEP-3453).

pub mod runner;
pub mod shared;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::{Duration, Instant, sleep_until};

use crate::backend::{Backend, BackendError, SyncOutcome, SyncRequest};
use crate::model::ServiceName;
use runner::BoundedFrequency;
use shared::Shared;

/// Upstream's `proxyutil.FullSyncPeriod`: a full resync at least this often.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Shortest wait before retrying a failed sync.
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

/// What one finished sync reports.
#[derive(Debug, Clone)]
pub struct SyncReport<'a> {
    /// What kind of sync it was.
    pub kind: SyncKind,
    /// How long the backend took.
    pub duration: Duration,
    /// What the backend reported.
    pub outcome: &'a SyncOutcome,
    /// Trigger times of the EndpointSlice changes it programmed.
    pub trigger_times: &'a [SystemTime],
    /// Service and EndpointSlice events it consumed.
    pub service_events: u64,
    /// EndpointSlice events it consumed.
    pub endpoint_events: u64,
    /// The node facts it programmed (health check servers listen where node ports are).
    pub node_facts: &'a crate::host::NodeFacts,
}

/// Side effects outside the kernel: metrics, health, health-check servers.
pub trait Reporter: Send {
    /// A change was queued (health: an update is pending).
    fn queued(&mut self);
    /// Services with Service changes and services with EndpointSlice changes received but
    /// not yet taken by a sync (reported when a change wakes the loop, and when a sync takes
    /// them).
    fn changes_pending(&mut self, services: usize, endpoints: usize);
    /// A sync succeeded.
    fn sync_done(
        &mut self,
        report: &SyncReport<'_>,
    ) -> impl std::future::Future<Output = ()> + Send;
    /// A sync failed with `error`; the next one is full.
    fn sync_failed(&mut self, kind: SyncKind, duration: Duration, error: &BackendError);
}

/// The loop's state.
pub struct SyncLoop<B: Backend, R: Reporter> {
    shared: Arc<Shared>,
    backend: B,
    reporter: R,
    settings: SyncSettings,
}

impl<B: Backend, R: Reporter> SyncLoop<B, R> {
    /// Builds the loop.
    pub fn new(shared: Arc<Shared>, backend: B, reporter: R, settings: SyncSettings) -> Self {
        SyncLoop {
            shared,
            backend,
            reporter,
            settings,
        }
    }

    /// Runs until `max_syncs` syncs were attempted (`None`: forever).
    pub async fn run(mut self, max_syncs: Option<usize>) -> B {
        while !self.shared.initial_lists_done() {
            self.shared.woken().await;
            // The first sync takes every change recorded so far: this wake is answered (a
            // permit left standing would make `woken` return at once, forever).
            self.shared.taking_changes();
        }
        tracing::info!("initial Service and EndpointSlice lists complete, starting to sync");
        let now = Instant::now();
        let cadence = Cadence::of(&self.settings, self.backend.partial_syncs());
        let mut rate =
            BoundedFrequency::new(self.settings.min_sync_period, cadence.max_interval, 2, now);
        let mut need_full = true;
        let mut last_full = now;
        // The node facts of the last successful sync: a change rewrites every chain, as the
        // primary IP, node-port addresses and local detector appear in unchanged services'.
        let mut synced_facts: Option<crate::host::NodeFacts> = None;
        let mut pending: BTreeSet<ServiceName> = BTreeSet::new();
        let mut trigger_times: Vec<SystemTime> = Vec::new();
        let mut events = (0u64, 0u64);
        let mut attempts = 0usize;
        self.reporter.queued();
        loop {
            sleep_until(rate.next_allowed(Instant::now())).await;
            let start = Instant::now();
            rate.ran(start);
            self.shared.taking_changes();
            let (model, node, left) = {
                let mut st = self.shared.lock();
                let c = st.take_changes();
                need_full |= c.node;
                pending.extend(c.services);
                trigger_times.extend(c.trigger_times);
                events.0 += c.service_events;
                events.1 += c.endpoint_events;
                (st.snapshot(), st.node().clone(), st.pending_changes())
            };
            self.reporter.changes_pending(left.0, left.1);
            if start.duration_since(last_full) >= self.settings.full_sync_period {
                need_full = true;
            }
            let facts = self.settings.host.facts(&node);
            if synced_facts.as_ref().is_some_and(|f| *f != facts) {
                tracing::info!(
                    ?facts,
                    "node facts changed (primary IP, podCIDR), forcing a full sync"
                );
                need_full = true;
            }
            let full = need_full;
            let kind = SyncKind::of(self.backend.partial_syncs(), full);
            let result = self
                .backend
                .sync(SyncRequest {
                    model: &model,
                    changed: &pending,
                    full,
                    node_facts: &facts,
                })
                .await;
            let duration = start.elapsed();
            attempts += 1;
            match result {
                Ok(outcome) => {
                    self.reporter
                        .sync_done(&SyncReport {
                            kind,
                            duration,
                            outcome: &outcome,
                            trigger_times: &trigger_times,
                            service_events: events.0,
                            endpoint_events: events.1,
                            node_facts: &facts,
                        })
                        .await;
                    tracing::debug!(
                        full,
                        duration_ms = duration.as_millis() as u64,
                        services = model.services.len(),
                        endpoints = model.endpoint_count(),
                        changed = pending.len(),
                        rules = ?outcome.rules_per_table,
                        "sync done"
                    );
                    pending.clear();
                    trigger_times.clear();
                    events = (0, 0);
                    if full {
                        last_full = start;
                    }
                    need_full = false;
                    synced_facts = Some(facts);
                }
                Err(e) => {
                    // Previous rules stay in the kernel; retry soon with a full sync.
                    tracing::error!(error = %e, full, "sync failed, keeping previous rules; retrying with a full sync");
                    self.reporter.sync_failed(kind, duration, &e);
                    need_full = true;
                }
            }
            if max_syncs.is_some_and(|m| attempts >= m) {
                return self.backend;
            }
            if need_full {
                // Failed: retry soon, but never spin (min_sync_period may be 0).
                let wait = self.settings.min_sync_period.max(RETRY_MIN_INTERVAL);
                tokio::time::sleep(wait).await;
                continue;
            }
            need_full = self.idle(&rate, cadence).await;
        }
    }

    /// Waits until a sync is due: a change, the periodic deadline, or (with a canary) a check
    /// that finds the kernel state drifted. Returns whether that sync must be full.
    async fn idle(&mut self, rate: &BoundedFrequency, cadence: Cadence) -> bool {
        let mut next_check = cadence.canary_check.map(|every| Instant::now() + every);
        loop {
            let check = async {
                match next_check {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shared.woken() => {
                    self.reporter.queued();
                    let (services, endpoints) = self.shared.lock().pending_changes();
                    self.reporter.changes_pending(services, endpoints);
                    return false;
                }
                _ = sleep_until(rate.periodic_deadline()) => return false,
                _ = check => {
                    if self.backend.needs_full_sync().await {
                        tracing::info!("kernel state drifted (canary missing), forcing a full sync");
                        return true;
                    }
                    next_check = cadence.canary_check.map(|every| Instant::now() + every);
                }
            }
        }
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
        fail_next: Arc<Mutex<bool>>,
        t0: Instant,
        /// When the canary was checked, and whether it is gone now.
        canary: Arc<Mutex<(Vec<Duration>, bool)>>,
    }

    impl Backend for FakeBackend {
        fn mode(&self) -> &'static str {
            "fake"
        }
        fn partial_syncs(&self) -> bool {
            true
        }
        async fn sync(&mut self, req: SyncRequest<'_>) -> Result<SyncOutcome, BackendError> {
            self.calls.lock().unwrap().push(Call {
                full: req.full,
                changed: req.changed.iter().map(|s| s.to_string()).collect(),
                services: req.model.services.len(),
                at: Instant::now() - self.t0,
            });
            let mut f = self.fail_next.lock().unwrap();
            if *f {
                *f = false;
                return Err(BackendError::Ipvs("boom".into()));
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
        done: Arc<Mutex<usize>>,
        failed: Arc<Mutex<usize>>,
        pending: Arc<Mutex<Vec<(usize, usize)>>>,
    }
    impl Reporter for CountingReporter {
        fn queued(&mut self) {}
        fn changes_pending(&mut self, services: usize, endpoints: usize) {
            self.pending.lock().unwrap().push((services, endpoints));
        }
        async fn sync_done(&mut self, _r: &SyncReport<'_>) {
            *self.done.lock().unwrap() += 1;
        }
        fn sync_failed(&mut self, _kind: SyncKind, _d: Duration, _e: &BackendError) {
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
        let fail_next = Arc::new(Mutex::new(false));
        let t0 = Instant::now();
        let canary: Arc<Mutex<(Vec<Duration>, bool)>> = Arc::default();
        let backend = FakeBackend {
            calls: calls.clone(),
            fail_next: fail_next.clone(),
            t0,
            canary: canary.clone(),
        };
        let reporter = CountingReporter::default();
        let (done, failed) = (reporter.done.clone(), reporter.failed.clone());
        let settings = SyncSettings {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            host: crate::host::HostSettings::default(),
        };
        let task =
            tokio::spawn(SyncLoop::new(shared.clone(), backend, reporter, settings).run(Some(6)));

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

        // A failing sync of another change, then the retry is full and still carries it.
        *fail_next.lock().unwrap() = true;
        tokio::time::sleep(Duration::from_secs(2)).await;
        shared.lock().apply_service(&svc("c", "10.0.0.3"));
        shared.wake();
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Nothing changes: no sync (upstream's iptables mode), a canary check every
        // sync_period instead.
        tokio::time::sleep(Duration::from_secs(40)).await;
        let c = calls.lock().unwrap().clone();
        assert_eq!(c.len(), 4, "{c:#?}");
        assert!(c[0].full && c[0].services == 1 && c[0].at == Duration::from_secs(5));
        assert!(!c[1].full);
        assert_eq!(c[1].changed, ["ns/b"]);
        assert!(!c[2].full && c[2].changed == ["ns/c"], "{:?}", c[2]);
        assert!(c[3].full, "a failed sync is retried in full");
        assert_eq!(c[3].changed, ["ns/c"]);
        assert!(
            c[3].at - c[2].at >= Duration::from_millis(999) || c[3].at - c[2].at == Duration::ZERO
        );
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
        let task =
            tokio::spawn(SyncLoop::new(shared.clone(), backend, reporter, settings).run(Some(6)));
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
                backend,
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
            fail_next: Arc::new(Mutex::new(false)),
            t0: Instant::now(),
            canary: Arc::default(),
        };
        let reporter = CountingReporter::default();
        let pending = reporter.pending.clone();
        let settings = SyncSettings {
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            full_sync_period: Duration::from_secs(3600),
            host: crate::host::HostSettings::default(),
        };
        let task =
            tokio::spawn(SyncLoop::new(shared.clone(), backend, reporter, settings).run(Some(3)));
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
}
