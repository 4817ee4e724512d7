//! The sync loop's [`Reporter`] for the daemon: metrics, proxy health and the per-service
//! health-check servers, all updated from one place after each sync.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::health::ProxyHealth;
use super::metrics::Metrics;
use super::service_health::ServiceHealthServers;
use crate::backend::BackendError;
use crate::sync::{Reporter, SyncKind, SyncReport};

/// Updates metrics, `/healthz` state and health-check node ports.
pub struct DaemonReporter {
    metrics: Metrics,
    health: ProxyHealth,
    service_health: ServiceHealthServers,
}

impl DaemonReporter {
    /// Wires the three together.
    pub fn new(
        metrics: Metrics,
        health: ProxyHealth,
        service_health: ServiceHealthServers,
    ) -> Self {
        DaemonReporter {
            metrics,
            health,
            service_health,
        }
    }
}

impl Reporter for DaemonReporter {
    fn queued(&mut self) {
        self.health.queued_update();
        self.metrics.record_queued();
    }

    fn changes_pending(&mut self, services: usize, endpoints: usize) {
        self.metrics.set_pending(services as u64, endpoints as u64);
    }

    async fn sync_done(&mut self, report: &SyncReport<'_>) {
        let out = report.outcome;
        self.metrics.observe_sync(report.duration, report.kind);
        self.metrics.set_last_sync_now();
        self.metrics.inc_service_changes(report.service_events);
        self.metrics.inc_endpoint_changes(report.endpoint_events);
        if let Some(r) = &out.iptables_rules {
            self.metrics
                .set_rule_counts(r.filter_total as u64, r.nat_total as u64);
            self.metrics
                .set_rules_written(r.filter_last as u64, r.nat_last as u64);
        }
        if let Some(ct) = &out.conntrack {
            self.metrics
                .observe_conntrack_reconcile(ct.duration, ct.deleted);
        }
        self.metrics.set_no_local_endpoints(
            out.no_local_endpoints_internal as u64,
            out.no_local_endpoints_external as u64,
        );
        let now = SystemTime::now();
        for t in report.trigger_times {
            let latency = now.duration_since(*t).unwrap_or(Duration::ZERO);
            self.metrics
                .observe_network_programming(latency.as_secs_f64());
        }
        self.health.updated();

        let ports: BTreeMap<_, _> = out
            .health_checks
            .iter()
            .map(|(k, (port, _))| (k.clone(), *port))
            .collect();
        let locals: BTreeMap<_, _> = out
            .health_checks
            .iter()
            .map(|(k, (_, n))| (k.clone(), *n))
            .collect();
        if !self.service_health.follows(report.node_facts) {
            let local = crate::host::local_addresses().await;
            self.service_health.follow(report.node_facts, &local).await;
        }
        for (svc, err) in self.service_health.sync(ports).await {
            tracing::warn!(service = %svc, error = %err, "health check node port not served");
        }
        self.service_health.set_local_endpoints(locals);
    }

    fn sync_failed(&mut self, kind: SyncKind, duration: Duration, error: &BackendError) {
        self.metrics.observe_sync(duration, kind);
        // Only a rejected iptables-restore counts, as upstream: an IPVS, ipset or netlink
        // failure is none.
        if matches!(error, BackendError::IptablesRestore(_)) {
            self.metrics.inc_restore_failure(kind == SyncKind::Partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conntrack::ReconcileReport;
    use crate::backend::{IptablesRuleCounts, SyncOutcome};

    fn reporter() -> (DaemonReporter, Metrics) {
        let metrics = Metrics::new();
        let health = ProxyHealth::new(Duration::from_secs(30)).with_metrics(metrics.clone());
        let service_health = ServiceHealthServers::new(Vec::new(), health.clone());
        (
            DaemonReporter::new(metrics.clone(), health, service_health),
            metrics,
        )
    }

    fn lines(m: &Metrics, prefix: &str) -> Vec<String> {
        m.encode()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    async fn done(r: &mut DaemonReporter, kind: SyncKind, outcome: &SyncOutcome) {
        r.sync_done(&SyncReport {
            kind,
            duration: Duration::from_millis(4),
            outcome,
            trigger_times: &[],
            service_events: 0,
            endpoint_events: 0,
            node_facts: &crate::host::NodeFacts::default(),
        })
        .await;
    }

    #[tokio::test]
    async fn iptables_mode_feeds_rule_counts_and_the_conntrack_reconciler() {
        let (mut r, m) = reporter();
        let mut out = SyncOutcome::new(3, 40, 0, 0, Default::default());
        out.iptables_rules = Some(IptablesRuleCounts {
            filter_total: 3,
            nat_total: 40,
            filter_last: 3,
            nat_last: 12,
        });
        out.conntrack = Some(ReconcileReport {
            duration: Duration::from_millis(2),
            deleted: 5,
            ..ReconcileReport::default()
        });
        done(&mut r, SyncKind::Partial, &out).await;
        assert_eq!(
            lines(&m, "kubeproxy_sync_proxy_rules_iptables_last{"),
            [
                "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"filter\"} 3",
                "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"nat\"} 12",
            ]
        );
        assert_eq!(
            lines(&m, "kubeproxy_sync_proxy_rules_iptables_total{"),
            [
                "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"filter\"} 3",
                "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 40",
            ]
        );
        assert_eq!(
            lines(&m, "kubeproxy_conntrack_reconciler_deleted_entries_total"),
            ["kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 5"]
        );
        assert_eq!(
            lines(
                &m,
                "kubeproxy_conntrack_reconciler_sync_duration_seconds_count"
            ),
            ["kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"} 1"]
        );
        assert_eq!(
            lines(
                &m,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
            ),
            ["kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1"]
        );
    }

    #[tokio::test]
    async fn ipvs_mode_leaves_the_iptables_only_series_alone() {
        let (mut r, m) = reporter();
        let out = SyncOutcome::new(3, 40, 0, 0, Default::default());
        done(&mut r, SyncKind::Unsplit, &out).await;
        r.sync_failed(
            SyncKind::Unsplit,
            Duration::from_millis(3),
            &BackendError::Ipvs("1 IPVS change(s) failed".into()),
        );
        let text = m.encode().unwrap();
        for absent in [
            "kubeproxy_sync_proxy_rules_iptables_total{",
            "kubeproxy_sync_proxy_rules_iptables_last{",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{",
            // No conntrack round ran (nothing could be stale): no sample.
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_count",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        assert_eq!(
            lines(&m, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            ["kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2"]
        );
        // A rejected restore is one, in IPVS mode too (never "partial" there).
        r.sync_failed(
            SyncKind::Unsplit,
            Duration::from_millis(3),
            &BackendError::IptablesRestore("line 3 failed".into()),
        );
        assert_eq!(
            lines(
                &m,
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{"
            ),
            ["kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1"]
        );
        assert!(
            lines(
                &m,
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{"
            )
            .is_empty()
        );
    }

    #[test]
    fn only_a_rejected_restore_counts_as_a_restore_failure() {
        let (mut r, m) = reporter();
        for e in [
            BackendError::JumpRules("-I failed".into()),
            BackendError::Ipset("restore failed".into()),
            BackendError::Ipvs("1 IPVS change(s) failed".into()),
            BackendError::Link("no dummy module".into()),
            BackendError::Read("iptables-save failed".into()),
        ] {
            r.sync_failed(SyncKind::Full, Duration::from_millis(1), &e);
        }
        let restore = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{";
        assert!(lines(&m, restore).is_empty(), "{:?}", lines(&m, restore));
        r.sync_failed(
            SyncKind::Partial,
            Duration::from_millis(1),
            &BackendError::IptablesRestore("line 9 failed".into()),
        );
        assert_eq!(
            lines(&m, restore),
            ["kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1"]
        );
    }

    #[tokio::test]
    async fn pending_changes_survive_a_sync_that_did_not_take_them() {
        let (mut r, m) = reporter();
        r.changes_pending(2, 1);
        done(&mut r, SyncKind::Full, &SyncOutcome::default()).await;
        let text = m.encode().unwrap();
        assert!(
            text.contains("\nkubeproxy_sync_proxy_rules_service_changes_pending 2\n"),
            "{text}"
        );
        assert!(
            text.contains("\nkubeproxy_sync_proxy_rules_endpoint_changes_pending 1\n"),
            "{text}"
        );
    }
}
