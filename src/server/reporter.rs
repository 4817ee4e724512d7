//! The sync loop's [`Reporter`] for the daemon: metrics, proxy health and the per-service
//! health-check servers, all updated from one place after each sync.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::health::ProxyHealth;
use super::metrics::Metrics;
use super::service_health::ServiceHealthServers;
use crate::backend::BackendError;
use crate::host::NodeFacts;
use crate::model::{IpFamily, ServiceName};
use crate::sync::{Reporter, SyncKind, SyncReport};

/// Updates metrics, `/healthz` state and health-check node ports.
pub struct DaemonReporter {
    metrics: Metrics,
    health: ProxyHealth,
    service_health: ServiceHealthServers,
    /// The primary IP family (its health-check counts win for dual-stack services).
    primary: IpFamily,
    /// Each family's node facts as last synced.
    facts: BTreeMap<IpFamily, NodeFacts>,
    /// Each family's health checks as last synced.
    health_checks: BTreeMap<IpFamily, BTreeMap<ServiceName, (u16, usize)>>,
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
            primary: IpFamily::V4,
            facts: BTreeMap::new(),
            health_checks: BTreeMap::new(),
        }
    }

    /// The same reporter with `family` as the primary IP family.
    pub fn with_primary(mut self, family: IpFamily) -> Self {
        self.primary = family;
        self
    }

    /// The same reporter knowing every family's start-up node facts (those the health-check
    /// servers were opened for), so the first family's sync does not move the servers away
    /// from the other family's addresses.
    pub fn with_facts(mut self, facts: &[NodeFacts]) -> Self {
        self.facts = facts.iter().map(|f| (f.family, f.clone())).collect();
        self
    }
}

impl Reporter for DaemonReporter {
    fn queued(&mut self, family: IpFamily) {
        self.health.queued_update_for(family);
        self.metrics.for_view(family).record_queued();
    }

    fn changes_pending(&mut self, services: usize, endpoints: usize) {
        self.metrics.set_pending(services as u64, endpoints as u64);
    }

    async fn sync_done(&mut self, report: &SyncReport<'_>) {
        let out = report.outcome;
        let metrics = self.metrics.for_view(report.family);
        metrics.observe_sync(report.duration, report.kind);
        metrics.set_last_sync_now();
        metrics.inc_service_changes(report.service_events);
        metrics.inc_endpoint_changes(report.endpoint_events);
        if let Some(r) = &out.iptables_rules {
            metrics.set_rule_counts(r.filter_total as u64, r.nat_total as u64);
            metrics.set_rules_written(r.filter_last as u64, r.nat_last as u64);
        }
        if out.nftables_cleanup_failed {
            self.metrics.inc_nftables_cleanup_failure();
        }
        if let Some(ct) = &out.conntrack {
            metrics.observe_conntrack_reconcile(ct.duration, ct.deleted);
        }
        metrics.set_no_local_endpoints(
            out.no_local_endpoints_internal as u64,
            out.no_local_endpoints_external as u64,
        );
        let now = SystemTime::now();
        for t in report.trigger_times {
            let latency = now.duration_since(*t).unwrap_or(Duration::ZERO);
            metrics.observe_network_programming(latency.as_secs_f64());
        }
        self.health.updated_for(report.family);
        self.facts.insert(report.family, report.node_facts.clone());
        self.health_checks
            .insert(report.family, out.health_checks.clone());
        self.serve_health_checks().await;
    }

    fn sync_failed(
        &mut self,
        family: IpFamily,
        kind: SyncKind,
        duration: Duration,
        error: &BackendError,
    ) {
        let metrics = self.metrics.for_view(family);
        metrics.observe_sync(duration, kind);
        // Only a rejected iptables-restore counts, as upstream: an IPVS, ipset or netlink
        // failure is none.
        match error {
            BackendError::IptablesRestore(_) => {
                metrics.inc_restore_failure(kind == SyncKind::Partial)
            }
            BackendError::NftablesTransaction(_) => metrics.inc_nftables_sync_failure(),
            _ => {}
        }
    }
}

impl DaemonReporter {
    /// Serves every family's health checks on one set of servers (one port per service,
    /// listening on each family's node-port addresses). A dual-stack service's count comes
    /// from the primary family, so a load balancer probing the node sees one answer.
    async fn serve_health_checks(&mut self) {
        let mut merged: BTreeMap<ServiceName, (u16, usize)> = BTreeMap::new();
        for (family, checks) in &self.health_checks {
            for (name, check) in checks {
                if *family == self.primary || !merged.contains_key(name) {
                    merged.insert(name.clone(), *check);
                }
            }
        }
        let facts: Vec<NodeFacts> = self.facts.values().cloned().collect();
        if !self.service_health.follows(&facts) {
            let local = crate::host::local_addresses().await;
            self.service_health.follow(&facts, &local).await;
        }
        let ports = merged
            .iter()
            .map(|(k, (port, _))| (k.clone(), *port))
            .collect();
        for (svc, err) in self.service_health.sync(ports).await {
            tracing::warn!(service = %svc, error = %err, "health check node port not served");
        }
        let locals = merged.into_iter().map(|(k, (_, n))| (k, n)).collect();
        self.service_health.set_local_endpoints(locals);
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
            family: IpFamily::V4,
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

    /// A rejected nftables transaction counts in the nftables series only; a failed
    /// stale-chain cleanup in its own.
    #[tokio::test]
    async fn nftables_failures_count_in_their_series() {
        let (mut r, m) = reporter();
        r.sync_failed(
            IpFamily::V4,
            SyncKind::Partial,
            Duration::from_millis(3),
            &BackendError::NftablesTransaction("Error: No such file or directory".into()),
        );
        assert_eq!(
            lines(
                &m,
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{"
            ),
            ["kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 1"]
        );
        assert!(
            lines(
                &m,
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{"
            )
            .is_empty()
        );
        let mut out = SyncOutcome::new(0, 0, 0, 0, Default::default());
        out.nftables_cleanup_failed = true;
        done(&mut r, SyncKind::Partial, &out).await;
        assert_eq!(
            lines(
                &m,
                "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{"
            ),
            ["kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv4\"} 1"]
        );
    }

    #[tokio::test]
    async fn ipvs_mode_leaves_the_iptables_only_series_alone() {
        let (mut r, m) = reporter();
        let out = SyncOutcome::new(3, 40, 0, 0, Default::default());
        done(&mut r, SyncKind::Unsplit, &out).await;
        r.sync_failed(
            IpFamily::V4,
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
            IpFamily::V4,
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
            r.sync_failed(IpFamily::V4, SyncKind::Full, Duration::from_millis(1), &e);
        }
        let restore = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{";
        assert!(lines(&m, restore).is_empty(), "{:?}", lines(&m, restore));
        r.sync_failed(
            IpFamily::V4,
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
