//! The proxy's own health (KK: `pkg/proxy/healthcheck/proxy_health.go`), as pure state.
//!
//! The sync loop calls [`ProxyHealth::queued_update`] when a change arrives and
//! [`ProxyHealth::updated`] after it has been programmed. The proxy is unhealthy once an update
//! has stayed queued for the health timeout (2 × syncPeriod). `/healthz` is additionally
//! unhealthy while the Node is not eligible (missing, being deleted, or tainted
//! `ToBeDeletedByClusterAutoscaler`); `/livez` ignores the Node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use super::IpFamily;
use super::format::rfc3339_nano;
use super::metrics::Metrics;

/// The taint the cluster autoscaler puts on a Node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A source of the current time (injectable for tests).
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A settable clock for tests. Clones share the time.
#[derive(Debug, Clone)]
pub struct FakeClock(Arc<Mutex<SystemTime>>);

impl FakeClock {
    /// A clock stopped at `t`.
    pub fn new(t: SystemTime) -> Self {
        FakeClock(Arc::new(Mutex::new(t)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *t += d;
    }

    /// Sets the clock.
    pub fn set(&self, t: SystemTime) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = t;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Health of one proxier (one IP family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxierHealth {
    /// When it last finished a sync (`None`: never, Go's zero time).
    pub last_updated: Option<SystemTime>,
    /// Whether it is healthy.
    pub healthy: bool,
}

/// A snapshot of the proxy's health: upstream's `ProxyHealth` struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// The most recent `updated()` over all families (`None`: never).
    pub last_updated: Option<SystemTime>,
    /// The time of the snapshot.
    pub current_time: SystemTime,
    /// Whether every proxier is healthy (ignores the Node).
    pub healthy: bool,
    /// Per family, for families that have been updated at least once.
    pub status: BTreeMap<IpFamily, ProxierHealth>,
}

/// A `/healthz` or `/livez` answer: status code and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthResponse {
    /// 200 or 503.
    pub status: u16,
    /// The JSON body, exactly as upstream's `json.Marshal(ProxyHealth)`.
    pub body: String,
}

#[derive(Debug)]
struct State {
    last_updated: BTreeMap<IpFamily, SystemTime>,
    oldest_pending_queued: BTreeMap<IpFamily, SystemTime>,
    node_eligible: bool,
}

/// Reads whether the Node is eligible, at request time.
type EligibilitySource = Box<dyn Fn() -> bool + Send + Sync>;

struct Inner {
    clock: Arc<dyn Clock>,
    node_source: OnceLock<EligibilitySource>,
    timeout: Duration,
    family: IpFamily,
    metrics: OnceLock<Metrics>,
    state: Mutex<State>,
}

/// The proxy's health. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct ProxyHealth(Arc<Inner>);

impl std::fmt::Debug for ProxyHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHealth")
            .field("timeout", &self.0.timeout)
            .field("family", &self.0.family)
            .field("state", &*self.state())
            .finish_non_exhaustive()
    }
}

impl ProxyHealth {
    /// Health for an IPv4 proxier syncing every `sync_period`: unhealthy once an update has
    /// been queued for 2 × `sync_period`.
    pub fn new(sync_period: Duration) -> Self {
        ProxyHealth::with_clock(sync_period, IpFamily::V4, Arc::new(SystemClock))
    }

    /// As [`new`](Self::new), for `family` (what [`queued_update`](Self::queued_update) and
    /// [`updated`](Self::updated) apply to) and with an explicit clock.
    pub fn with_clock(sync_period: Duration, family: IpFamily, clock: Arc<dyn Clock>) -> Self {
        ProxyHealth(Arc::new(Inner {
            clock,
            node_source: OnceLock::new(),
            timeout: sync_period * 2,
            family,
            metrics: OnceLock::new(),
            state: Mutex::new(State {
                last_updated: BTreeMap::new(),
                oldest_pending_queued: BTreeMap::new(),
                // Eligible until the first Node event says otherwise.
                node_eligible: true,
            }),
        }))
    }

    /// Counts `/healthz` and `/livez` answers in `kubeproxy_proxy_{healthz,livez}_total`.
    /// Only the first call has an effect.
    pub fn with_metrics(self, metrics: Metrics) -> Self {
        let _ = self.0.metrics.set(metrics);
        self
    }

    /// Reads the Node's eligibility from `source` whenever `/healthz` is asked (upstream
    /// updates it on every Node event, not only after a sync); [`set_node`](Self::set_node)
    /// is then ignored. Only the first call has an effect.
    pub fn with_node_eligibility(self, source: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        let _ = self.0.node_source.set(Box::new(source));
        self
    }

    /// The health timeout (2 × syncPeriod).
    pub fn timeout(&self) -> Duration {
        self.0.timeout
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state_guard()
    }

    /// A change arrived that needs programming (upstream `QueuedUpdate`). Only the oldest
    /// pending one counts.
    pub fn queued_update(&self) {
        self.queued_update_for(self.0.family);
    }

    /// [`queued_update`](Self::queued_update) for a given family.
    pub fn queued_update_for(&self, family: IpFamily) {
        let now = self.0.clock.now();
        self.state()
            .oldest_pending_queued
            .entry(family)
            .or_insert(now);
    }

    /// All queued changes are programmed (upstream `Updated`).
    pub fn updated(&self) {
        self.updated_for(self.0.family);
    }

    /// [`updated`](Self::updated) for a given family.
    pub fn updated_for(&self, family: IpFamily) {
        let now = self.0.clock.now();
        let mut s = self.state();
        s.oldest_pending_queued.remove(&family);
        s.last_updated.insert(family, now);
    }

    /// Records this proxy's Node: eligible iff it exists, has no deletionTimestamp and no
    /// `ToBeDeletedByClusterAutoscaler` taint.
    pub fn set_node(&self, present: bool, deleting: bool, to_be_deleted_taint: bool) {
        self.state().node_eligible = present && !deleting && !to_be_deleted_taint;
    }

    /// [`set_node`](Self::set_node) from the model's view of this Node.
    pub fn set_node_info(&self, node: &crate::model::NodeInfo) {
        self.set_node(node.present, node.deleting, node.to_be_deleted);
    }

    /// Whether the Node is eligible for traffic.
    pub fn node_eligible(&self) -> bool {
        match self.0.node_source.get() {
            Some(source) => source(),
            None => self.state().node_eligible,
        }
    }

    /// The proxy's health, ignoring the Node (upstream `Health()`).
    pub fn health(&self) -> HealthSnapshot {
        let s = self.state();
        let now = self.0.clock.now();
        let mut snap = HealthSnapshot {
            last_updated: s.last_updated.values().max().copied(),
            current_time: now,
            healthy: true,
            status: BTreeMap::new(),
        };
        // As upstream, only families that have been updated at least once are judged: a
        // proxier is healthy while starting up.
        for (family, last) in &s.last_updated {
            let late = s
                .oldest_pending_queued
                .get(family)
                .is_some_and(|q| now.duration_since(*q).unwrap_or_default() >= self.0.timeout);
            if late {
                snap.healthy = false;
            }
            snap.status.insert(
                *family,
                ProxierHealth {
                    last_updated: Some(*last),
                    healthy: !late,
                },
            );
        }
        snap
    }

    /// Whether the proxy is healthy, ignoring the Node (what service health checks use).
    pub fn is_healthy(&self) -> bool {
        self.health().healthy
    }

    /// The `/healthz` answer: 503 when unhealthy or the Node is not eligible. Counts it in
    /// `kubeproxy_proxy_healthz_total`.
    pub fn healthz(&self) -> HealthResponse {
        let mut snap = self.health();
        let eligible = self.node_eligible();
        let ok = snap.healthy && eligible;
        if ok {
            // Upstream reports lastUpdated as "now" when healthy, for compatibility.
            snap.last_updated = Some(snap.current_time);
        }
        let status = if ok { 200 } else { 503 };
        if let Some(m) = self.0.metrics.get() {
            m.inc_healthz(status);
        }
        HealthResponse {
            status,
            body: health_json(&snap, Some(eligible)),
        }
    }

    /// The `/livez` answer: like `/healthz` without the Node. Counts it in
    /// `kubeproxy_proxy_livez_total`.
    pub fn livez(&self) -> HealthResponse {
        let mut snap = self.health();
        if snap.healthy {
            snap.last_updated = Some(snap.current_time);
        }
        let status = if snap.healthy { 200 } else { 503 };
        if let Some(m) = self.0.metrics.get() {
            m.inc_livez(status);
        }
        HealthResponse {
            status,
            body: health_json(&snap, None),
        }
    }
}

impl Inner {
    fn state_guard(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `json.Marshal` of upstream's `ProxyHealth`: fields in declaration order, `nodeEligible`
/// omitted when nil (`/livez`), `status` omitted when empty, map keys sorted.
fn health_json(h: &HealthSnapshot, node_eligible: Option<bool>) -> String {
    let mut out = format!(
        "{{\"lastUpdated\":\"{}\",\"currentTime\":\"{}\"",
        rfc3339_nano(h.last_updated),
        rfc3339_nano(Some(h.current_time))
    );
    if let Some(e) = node_eligible {
        out.push_str(&format!(",\"nodeEligible\":{e}"));
    }
    out.push_str(&format!(",\"healthy\":{}", h.healthy));
    if !h.status.is_empty() {
        let entries: Vec<String> = h
            .status
            .iter()
            .map(|(f, p)| {
                format!(
                    "\"{}\":{{\"lastUpdated\":\"{}\",\"healthy\":{}}}",
                    f.as_str(),
                    rfc3339_nano(p.last_updated),
                    p.healthy
                )
            })
            .collect();
        out.push_str(&format!(",\"status\":{{{}}}", entries.join(",")));
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const PERIOD: Duration = Duration::from_secs(30);

    fn setup() -> (ProxyHealth, FakeClock, Metrics) {
        // 2024-03-01T00:00:00Z
        let clock = FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_709_251_200));
        let metrics = Metrics::new();
        let h = ProxyHealth::with_clock(PERIOD, IpFamily::V4, Arc::new(clock.clone()))
            .with_metrics(metrics.clone());
        (h, clock, metrics)
    }

    #[test]
    fn fresh_proxy_is_healthy_without_status() {
        let (h, _, _) = setup();
        let r = h.healthz();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            r#"{"lastUpdated":"2024-03-01T00:00:00Z","currentTime":"2024-03-01T00:00:00Z","nodeEligible":true,"healthy":true}"#
        );
        // Queued but never updated: upstream still judges only updated families.
        h.queued_update();
        assert_eq!(h.healthz().status, 200);
    }

    #[test]
    fn queued_update_older_than_twice_sync_period_is_unhealthy() {
        let (h, clock, metrics) = setup();
        h.updated(); // at T
        clock.advance(Duration::from_millis(500));
        h.queued_update(); // at T+0.5s
        clock.advance(Duration::from_secs(30));
        h.queued_update(); // a later queue does not reset the oldest one
        clock.advance(Duration::from_millis(29_999));
        // 59.999s after the first queue: still within 2 × 30s.
        let r = h.healthz();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            concat!(
                r#"{"lastUpdated":"2024-03-01T00:01:00.499Z","currentTime":"2024-03-01T00:01:00.499Z","#,
                r#""nodeEligible":true,"healthy":true,"status":{"IPv4":{"lastUpdated":"2024-03-01T00:00:00Z","healthy":true}}}"#
            )
        );
        clock.advance(Duration::from_millis(1)); // exactly 60s: late
        let r = h.healthz();
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            concat!(
                r#"{"lastUpdated":"2024-03-01T00:00:00Z","currentTime":"2024-03-01T00:01:00.5Z","#,
                r#""nodeEligible":true,"healthy":false,"status":{"IPv4":{"lastUpdated":"2024-03-01T00:00:00Z","healthy":false}}}"#
            )
        );
        let l = h.livez();
        assert_eq!(l.status, 503);
        assert!(!l.body.contains("nodeEligible"));
        assert!(!h.is_healthy());

        // Programming the change heals it.
        h.updated();
        assert_eq!(h.healthz().status, 200);
        assert_eq!(h.livez().status, 200);
        let text = metrics.encode().unwrap();
        for want in [
            "kubeproxy_proxy_healthz_total{code=\"200\"} 2",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
            "kubeproxy_proxy_livez_total{code=\"200\"} 1",
            "kubeproxy_proxy_livez_total{code=\"503\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
    }

    #[test]
    fn ineligible_node_fails_healthz_but_not_livez() {
        let (h, clock, _) = setup();
        h.updated();
        clock.advance(Duration::from_secs(1));
        h.set_node(true, true, false); // deletionTimestamp set
        let r = h.healthz();
        assert_eq!(r.status, 503);
        // The proxier itself is healthy; lastUpdated is the real one, not "now".
        assert_eq!(
            r.body,
            concat!(
                r#"{"lastUpdated":"2024-03-01T00:00:00Z","currentTime":"2024-03-01T00:00:01Z","#,
                r#""nodeEligible":false,"healthy":true,"status":{"IPv4":{"lastUpdated":"2024-03-01T00:00:00Z","healthy":true}}}"#
            )
        );
        let l = h.livez();
        assert_eq!(l.status, 200);
        assert_eq!(
            l.body,
            concat!(
                r#"{"lastUpdated":"2024-03-01T00:00:01Z","currentTime":"2024-03-01T00:00:01Z","#,
                r#""healthy":true,"status":{"IPv4":{"lastUpdated":"2024-03-01T00:00:00Z","healthy":true}}}"#
            )
        );
        h.set_node(true, false, true);
        assert_eq!(h.healthz().status, 503);
        h.set_node(false, false, false);
        assert_eq!(h.healthz().status, 503);
        h.set_node(true, false, false);
        assert_eq!(h.healthz().status, 200);
        let mut node = crate::model::NodeInfo {
            present: true,
            ..Default::default()
        };
        node.to_be_deleted = true;
        h.set_node_info(&node);
        assert!(!h.node_eligible());
        node.to_be_deleted = false;
        h.set_node_info(&node);
        assert!(h.node_eligible());
    }

    #[test]
    fn healthz_reads_node_eligibility_when_asked_not_after_a_sync() {
        use crate::sync::shared::Shared;
        let shared = Arc::new(Shared::new(crate::model::ClusterState::new("n1")));
        let (h, _, _) = setup();
        let h = h.with_node_eligibility({
            let shared = shared.clone();
            move || shared.lock().node_eligible()
        });
        h.updated();
        assert_eq!(
            h.healthz().status,
            200,
            "eligible until a Node event says otherwise"
        );
        let node = |taints: serde_json::Value, deleting: bool| {
            let mut n = serde_json::json!({"metadata": {"name": "n1"}, "spec": {"taints": taints}});
            if deleting {
                n["metadata"]["deletionTimestamp"] = serde_json::json!("2024-03-01T00:00:00Z");
            }
            serde_json::from_value::<k8s_openapi::api::core::v1::Node>(n).unwrap()
        };
        shared
            .lock()
            .set_node(Some(&node(serde_json::json!([]), false)));
        assert_eq!(h.healthz().status, 200);
        // No sync happens in between: the answer follows the Node at once.
        let taint = serde_json::json!([{"key": TO_BE_DELETED_TAINT, "effect": "NoSchedule"}]);
        shared.lock().set_node(Some(&node(taint, false)));
        assert_eq!(h.healthz().status, 503);
        assert_eq!(h.livez().status, 200);
        shared
            .lock()
            .set_node(Some(&node(serde_json::json!([]), true)));
        assert_eq!(h.healthz().status, 503);
        shared
            .lock()
            .set_node(Some(&node(serde_json::json!([]), false)));
        assert_eq!(h.healthz().status, 200);
        shared.lock().set_node(None);
        assert_eq!(h.healthz().status, 503, "deleted");
    }

    #[test]
    fn dual_stack_status_is_per_family() {
        let clock = FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_709_251_200));
        let h = ProxyHealth::with_clock(PERIOD, IpFamily::V4, Arc::new(clock.clone()));
        h.updated_for(IpFamily::V6);
        clock.advance(Duration::from_secs(1));
        h.updated_for(IpFamily::V4);
        h.queued_update_for(IpFamily::V6);
        clock.advance(Duration::from_secs(60));
        let snap = h.health();
        assert!(!snap.healthy);
        assert!(snap.status[&IpFamily::V4].healthy);
        assert!(!snap.status[&IpFamily::V6].healthy);
        assert_eq!(
            snap.last_updated,
            Some(UNIX_EPOCH + Duration::from_secs(1_709_251_201))
        );
        let body = h.livez().body;
        assert!(body.ends_with(
            r#""status":{"IPv4":{"lastUpdated":"2024-03-01T00:00:01Z","healthy":true},"IPv6":{"lastUpdated":"2024-03-01T00:00:00Z","healthy":false}}}"#
        ), "{body}");
    }
}
