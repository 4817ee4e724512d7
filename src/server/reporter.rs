//! The sync loop's [`Reporter`] for the daemon: metrics, proxy health and the per-service
//! health-check servers, all updated from one place after each sync.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::health::ProxyHealth;
use super::metrics::Metrics;
use super::service_health::ServiceHealthServers;
use crate::sync::{Reporter, SyncReport};

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

    async fn sync_done(&mut self, report: &SyncReport<'_>) {
        let out = report.outcome;
        self.metrics.observe_sync(report.duration, report.full);
        self.metrics.set_last_sync_now();
        self.metrics.inc_service_changes(report.service_events);
        self.metrics.inc_endpoint_changes(report.endpoint_events);
        self.metrics.set_pending(0, 0);
        let count = |t: &str| out.rules_per_table.get(t).copied().unwrap_or(0) as u64;
        self.metrics.set_rule_counts(count("filter"), count("nat"));
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

    fn sync_failed(&mut self, full: bool, duration: Duration) {
        self.metrics.observe_sync(duration, full);
        self.metrics.inc_restore_failure(!full);
    }
}
