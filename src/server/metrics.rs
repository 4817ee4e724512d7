//! Upstream kube-proxy's metrics (KK: `pkg/proxy/metrics/metrics.go`), in a prometheus-client
//! [`Registry`], exposed in the Prometheus text format (0.0.4) as client_golang writes it.
//!
//! Names, types, help texts (with component-base's `[ALPHA] ` prefix), buckets and labels follow
//! the newest upstream: `ip_family` on every per-proxier metric, none on the change counters,
//! `code` on the healthz/livez counters. Labelled metrics appear once first touched, as Go's
//! `*Vec` metrics do.
//!
//! prometheus-client writes OpenMetrics (counters declared without `_total`, a `.` appended to
//! every help text, `# EOF`, histogram `_sum`/`_count` before the buckets). [`Metrics::encode`]
//! rewrites that into what upstream serves: `# TYPE kubeproxy_..._total counter`, help texts
//! verbatim, families sorted by name, buckets before `_sum`/`_count`, `le` last, and numbers
//! formatted like Go (`1`, `0.001`, `1.712345678e+09`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode_registry;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::IpFamily;
use super::error::ServerError;
use super::format::go_float;
use crate::backend::netfilter::{NFACCT_CT_STATE_INVALID, NFACCT_LOCALHOST_NODEPORTS};
use crate::kernel::nfacct::Nfacct;
use crate::sync::SyncKind;

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type FamilyLabel = [(&'static str, &'static str); 1];
type FamilyAnd = [(&'static str, &'static str); 2];
type CodeLabel = [(&'static str, String); 1];
type HistogramFamily = Family<FamilyLabel, Histogram, fn() -> Histogram>;
type GaugeF64 = Gauge<f64, AtomicU64>;

/// `prometheus.ExponentialBuckets(0.001, 2, 15)`: 1ms … 16.384s.
pub fn sync_buckets() -> Vec<f64> {
    let mut b = Vec::with_capacity(15);
    let mut v = 0.001;
    for _ in 0..15 {
        b.push(v);
        v *= 2.0;
    }
    b
}

/// `metrics.MergeBuckets(Linear(0.25,0.25,2), Linear(1,1,59), Linear(60,5,12), Linear(120,30,7))`.
/// component-base's `MergeBuckets` starts from a one-element zero slice, so upstream's first
/// bucket is `le="0"`; it is kept here.
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0];
    for (start, width, count) in [
        (0.25, 0.25, 2),
        (1.0, 1.0, 59),
        (60.0, 5.0, 12),
        (120.0, 30.0, 7),
    ] {
        let mut v = start;
        for _ in 0..count {
            b.push(v);
            v += width;
        }
    }
    b
}

fn sync_histogram() -> Histogram {
    Histogram::new(sync_buckets())
}

fn network_programming_histogram() -> Histogram {
    Histogram::new(network_programming_buckets())
}

struct Inner {
    registry: Registry,
    sync_duration: HistogramFamily,
    sync_full_duration: HistogramFamily,
    sync_partial_duration: HistogramFamily,
    network_programming: HistogramFamily,
    last_timestamp: Family<FamilyLabel, GaugeF64>,
    last_queued_timestamp: Family<FamilyLabel, GaugeF64>,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    iptables_total: Family<FamilyAnd, Gauge>,
    iptables_last: Family<FamilyAnd, Gauge>,
    restore_failures: Family<FamilyLabel, Counter>,
    partial_restore_failures: Family<FamilyLabel, Counter>,
    nftables_sync_failures: Family<FamilyLabel, Counter>,
    nftables_cleanup_failures: Family<FamilyLabel, Counter>,
    no_local_endpoints: Family<FamilyAnd, Gauge>,
    healthz_total: Family<CodeLabel, Counter>,
    livez_total: Family<CodeLabel, Counter>,
    conntrack_sync_duration: HistogramFamily,
    conntrack_deleted: Family<FamilyLabel, Counter>,
}

/// kube-proxy's metrics, seen from one IP family (the `ip_family` label of what it records).
/// Cheap to clone; all clones, and the views of other families, share one registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
    family: IpFamily,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Registers `metric` under its full upstream name and help text (with component-base's
/// stability prefix). prometheus-client appends `_total` to counter samples itself, so
/// counters are registered without it.
fn reg<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    metric: &M,
) {
    let is_counter = matches!(metric.metric_type(), MetricType::Counter);
    let name = match name.strip_suffix("_total") {
        Some(stem) if is_counter => stem,
        _ => name,
    };
    r.register(name, format!("[ALPHA] {help}"), metric.clone());
}

impl Metrics {
    /// All metrics, labelled `ip_family="IPv4"`.
    pub fn new() -> Self {
        Metrics::for_family(IpFamily::V4)
    }

    /// All metrics, with `ip_family` set to `family`.
    pub fn for_family(family: IpFamily) -> Self {
        Metrics::build(family, None)
    }

    /// As [`Metrics::for_family`], plus upstream's two nfacct counters of iptables mode, read
    /// from the kernel through `nfacct` at every scrape.
    pub fn with_nfacct(family: IpFamily, nfacct: Nfacct) -> Self {
        Metrics::build(family, Some(nfacct))
    }

    fn build(family: IpFamily, nfacct: Option<Nfacct>) -> Self {
        let hist = || HistogramFamily::new_with_constructor(sync_histogram as fn() -> Histogram);
        let inner = Inner {
            registry: Registry::default(),
            sync_duration: hist(),
            sync_full_duration: hist(),
            sync_partial_duration: hist(),
            network_programming: HistogramFamily::new_with_constructor(
                network_programming_histogram as fn() -> Histogram,
            ),
            last_timestamp: Family::default(),
            last_queued_timestamp: Family::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            iptables_total: Family::default(),
            iptables_last: Family::default(),
            restore_failures: Family::default(),
            partial_restore_failures: Family::default(),
            nftables_sync_failures: Family::default(),
            nftables_cleanup_failures: Family::default(),
            no_local_endpoints: Family::default(),
            healthz_total: Family::default(),
            livez_total: Family::default(),
            conntrack_sync_duration: hist(),
            conntrack_deleted: Family::default(),
        };
        let mut i = inner;
        let r = &mut i.registry;
        let p = "kubeproxy_";
        let n = |s: &str| format!("{p}{s}");
        reg(
            r,
            &n("sync_proxy_rules_duration_seconds"),
            "SyncProxyRules latency in seconds",
            &i.sync_duration,
        );
        reg(
            r,
            &n("sync_full_proxy_rules_duration_seconds"),
            "SyncProxyRules latency in seconds for full resyncs",
            &i.sync_full_duration,
        );
        reg(
            r,
            &n("sync_partial_proxy_rules_duration_seconds"),
            "SyncProxyRules latency in seconds for partial resyncs",
            &i.sync_partial_duration,
        );
        reg(
            r,
            &n("network_programming_duration_seconds"),
            "In Cluster Network Programming Latency in seconds",
            &i.network_programming,
        );
        reg(
            r,
            &n("sync_proxy_rules_last_timestamp_seconds"),
            "The last time proxy rules were successfully synced",
            &i.last_timestamp,
        );
        reg(
            r,
            &n("sync_proxy_rules_last_queued_timestamp_seconds"),
            "The last time a sync of proxy rules was queued",
            &i.last_queued_timestamp,
        );
        reg(
            r,
            &n("sync_proxy_rules_endpoint_changes_pending"),
            "Pending proxy rules Endpoint changes",
            &i.endpoint_changes_pending,
        );
        reg(
            r,
            &n("sync_proxy_rules_endpoint_changes_total"),
            "Cumulative proxy rules Endpoint changes",
            &i.endpoint_changes_total,
        );
        reg(
            r,
            &n("sync_proxy_rules_service_changes_pending"),
            "Pending proxy rules Service changes",
            &i.service_changes_pending,
        );
        reg(
            r,
            &n("sync_proxy_rules_service_changes_total"),
            "Cumulative proxy rules Service changes",
            &i.service_changes_total,
        );
        reg(
            r,
            &n("sync_proxy_rules_iptables_total"),
            "Total number of iptables rules owned by kube-proxy",
            &i.iptables_total,
        );
        reg(
            r,
            &n("sync_proxy_rules_iptables_last"),
            "Number of iptables rules written by kube-proxy in last sync",
            &i.iptables_last,
        );
        reg(
            r,
            &n("sync_proxy_rules_iptables_restore_failures_total"),
            "Cumulative proxy iptables restore failures",
            &i.restore_failures,
        );
        reg(
            r,
            &n("sync_proxy_rules_iptables_partial_restore_failures_total"),
            "Cumulative proxy iptables partial restore failures",
            &i.partial_restore_failures,
        );
        reg(
            r,
            &n("sync_proxy_rules_nftables_sync_failures_total"),
            "Cumulative proxy nftables sync failures",
            &i.nftables_sync_failures,
        );
        reg(
            r,
            &n("sync_proxy_rules_nftables_cleanup_failures_total"),
            "Cumulative proxy nftables cleanup failures",
            &i.nftables_cleanup_failures,
        );
        reg(
            r,
            &n("sync_proxy_rules_no_local_endpoints_total"),
            "Number of services with a Local traffic policy and no endpoints",
            &i.no_local_endpoints,
        );
        reg(
            r,
            &n("proxy_healthz_total"),
            "Cumulative proxy healthz HTTP status",
            &i.healthz_total,
        );
        reg(
            r,
            &n("proxy_livez_total"),
            "Cumulative proxy livez HTTP status",
            &i.livez_total,
        );
        reg(
            r,
            &n("conntrack_reconciler_sync_duration_seconds"),
            "ReconcileConntrackFlowsLatency latency in seconds",
            &i.conntrack_sync_duration,
        );
        reg(
            r,
            &n("conntrack_reconciler_deleted_entries_total"),
            "Cumulative conntrack flows deleted by conntrack reconciler",
            &i.conntrack_deleted,
        );
        if let Some(client) = nfacct {
            let counter = |name| NfacctCounter {
                client: client.clone(),
                name,
            };
            reg(
                r,
                &n("iptables_ct_state_invalid_dropped_packets_total"),
                "packets dropped by iptables to work around conntrack problems",
                &counter(NFACCT_CT_STATE_INVALID),
            );
            reg(
                r,
                &n("iptables_localhost_nodeports_accepted_packets_total"),
                "Number of packets accepted on nodeports of loopback interface",
                &counter(NFACCT_LOCALHOST_NODEPORTS),
            );
        }
        Metrics {
            inner: Arc::new(i),
            family,
        }
    }

    /// The IP family these metrics are labelled with.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The same registry, recording for `family` (one view per proxier).
    pub fn for_view(&self, family: IpFamily) -> Metrics {
        Metrics {
            inner: self.inner.clone(),
            family,
        }
    }

    fn fam(&self) -> FamilyLabel {
        [("ip_family", self.family.as_str())]
    }

    fn fam_and(&self, key: &'static str, value: &'static str) -> FamilyAnd {
        [("ip_family", self.family.as_str()), (key, value)]
    }

    /// One sync round (successful or not) took `duration`: `sync_proxy_rules_duration_seconds`
    /// plus, for a backend with partial syncs, the full or partial histogram.
    pub fn observe_sync(&self, duration: Duration, kind: SyncKind) {
        let secs = duration.as_secs_f64();
        self.inner
            .sync_duration
            .get_or_create(&self.fam())
            .observe(secs);
        let h = match kind {
            SyncKind::Full => &self.inner.sync_full_duration,
            SyncKind::Partial => &self.inner.sync_partial_duration,
            SyncKind::Unsplit => return,
        };
        h.get_or_create(&self.fam()).observe(secs);
    }

    /// `sync_proxy_rules_last_timestamp_seconds` = now.
    pub fn set_last_sync_now(&self) {
        self.set_last_sync(SystemTime::now());
    }

    /// `sync_proxy_rules_last_timestamp_seconds` = `at`.
    pub fn set_last_sync(&self, at: SystemTime) {
        self.inner
            .last_timestamp
            .get_or_create(&self.fam())
            .set(unix_seconds(at));
    }

    /// A sync was queued now: `sync_proxy_rules_last_queued_timestamp_seconds` = now.
    pub fn record_queued(&self) {
        self.record_queued_at(SystemTime::now());
    }

    /// A sync was queued at `at`.
    pub fn record_queued_at(&self, at: SystemTime) {
        self.inner
            .last_queued_timestamp
            .get_or_create(&self.fam())
            .set(unix_seconds(at));
    }

    /// One `network_programming_duration_seconds` observation (from an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` to the end of the sync).
    pub fn observe_network_programming(&self, seconds: f64) {
        self.inner
            .network_programming
            .get_or_create(&self.fam())
            .observe(seconds);
    }

    /// An nftables transaction failed.
    pub fn inc_nftables_sync_failure(&self) {
        self.inner
            .nftables_sync_failures
            .get_or_create(&self.fam())
            .inc();
    }

    /// nftables mode's stale-chain delete transaction failed.
    pub fn inc_nftables_cleanup_failure(&self) {
        self.inner
            .nftables_cleanup_failures
            .get_or_create(&self.fam())
            .inc();
    }

    /// An iptables-restore failed. As upstream, every failure counts in the plain counter and
    /// a failed partial sync (which falls back to a full one) also in the partial counter.
    pub fn inc_restore_failure(&self, partial: bool) {
        self.inner.restore_failures.get_or_create(&self.fam()).inc();
        if partial {
            self.inner
                .partial_restore_failures
                .get_or_create(&self.fam())
                .inc();
        }
    }

    /// `sync_proxy_rules_iptables_total{table}`: rules owned by kube-proxy per table.
    pub fn set_rule_counts(&self, filter: u64, nat: u64) {
        set_tables(&self.inner.iptables_total, self, filter, nat);
    }

    /// `sync_proxy_rules_iptables_last{table}`: rules written in the last sync per table.
    pub fn set_rules_written(&self, filter: u64, nat: u64) {
        set_tables(&self.inner.iptables_last, self, filter, nat);
    }

    /// `sync_proxy_rules_no_local_endpoints_total{traffic_policy}`: Services with a Local
    /// internal / external traffic policy and no local endpoints.
    pub fn set_no_local_endpoints(&self, internal: u64, external: u64) {
        let g = &self.inner.no_local_endpoints;
        g.get_or_create(&self.fam_and("traffic_policy", "internal"))
            .set(as_i64(internal));
        g.get_or_create(&self.fam_and("traffic_policy", "external"))
            .set(as_i64(external));
    }

    /// `sync_proxy_rules_service_changes_total += n`.
    pub fn inc_service_changes(&self, n: u64) {
        self.inner.service_changes_total.inc_by(n);
    }

    /// `sync_proxy_rules_endpoint_changes_total += n`.
    pub fn inc_endpoint_changes(&self, n: u64) {
        self.inner.endpoint_changes_total.inc_by(n);
    }

    /// `sync_proxy_rules_{service,endpoint}_changes_pending`.
    pub fn set_pending(&self, services: u64, endpoints: u64) {
        self.inner.service_changes_pending.set(as_i64(services));
        self.inner.endpoint_changes_pending.set(as_i64(endpoints));
    }

    /// `proxy_healthz_total{code}` += 1.
    pub fn inc_healthz(&self, code: u16) {
        self.inner
            .healthz_total
            .get_or_create(&[("code", code.to_string())])
            .inc();
    }

    /// `proxy_livez_total{code}` += 1.
    pub fn inc_livez(&self, code: u16) {
        self.inner
            .livez_total
            .get_or_create(&[("code", code.to_string())])
            .inc();
    }

    /// One conntrack reconcile round: its duration and how many flows it deleted.
    pub fn observe_conntrack_reconcile(&self, duration: Duration, deleted: u64) {
        self.inner
            .conntrack_sync_duration
            .get_or_create(&self.fam())
            .observe(duration.as_secs_f64());
        self.inner
            .conntrack_deleted
            .get_or_create(&self.fam())
            .inc_by(deleted);
    }

    /// The registry in the Prometheus text format, as upstream's `/metrics` serves it.
    pub fn encode(&self) -> Result<String, ServerError> {
        let mut om = String::new();
        encode_registry(&mut om, &self.inner.registry)?;
        Ok(openmetrics_to_prometheus(&om))
    }
}

/// A counter whose value is the packet count of an nfacct object, read when encoded
/// (upstream's `nfacctMetricCollector`): nothing is exposed while it cannot be read.
#[derive(Debug, Clone)]
struct NfacctCounter {
    client: Nfacct,
    name: &'static str,
}

impl EncodeMetric for NfacctCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.client.get(self.name) {
            Ok(Some(c)) => encoder.encode_counter::<NoLabelSet, _, u64>(&c.packets, None),
            Ok(None) => {
                tracing::debug!(counter = self.name, "nfacct counter does not exist");
                Ok(())
            }
            Err(e) => {
                tracing::debug!(counter = self.name, error = %e, "reading nfacct counter failed");
                Ok(())
            }
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

fn set_tables(g: &Family<FamilyAnd, Gauge>, m: &Metrics, filter: u64, nat: u64) {
    g.get_or_create(&m.fam_and("table", "filter"))
        .set(as_i64(filter));
    g.get_or_create(&m.fam_and("table", "nat")).set(as_i64(nat));
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One metric family in the text output.
struct FamilyText {
    name: String,
    help: String,
    kind: String,
    /// Children by label set (without `le`), in first-seen order.
    children: Vec<Child>,
}

struct Child {
    labels: Vec<(String, String)>,
    /// (rank, line): buckets 0, `_sum` 1, `_count` 2, anything else 0.
    lines: Vec<(u8, String)>,
}

/// Rewrites prometheus-client's OpenMetrics text (only what this module produces: no
/// exemplars, timestamps or units) into client_golang's Prometheus 0.0.4 text.
fn openmetrics_to_prometheus(om: &str) -> String {
    let mut families: Vec<FamilyText> = Vec::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // prometheus-client appends "." to every help text.
            let help = help.strip_suffix('.').unwrap_or(help);
            families.push(FamilyText {
                name: name.to_string(),
                help: help.to_string(),
                kind: String::new(),
                children: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let (Some(f), Some((_, kind))) = (families.last_mut(), rest.split_once(' ')) {
                f.kind = kind.to_string();
            }
        } else if line.starts_with('#') || line.is_empty() {
            // `# EOF`, `# UNIT`: not part of the 0.0.4 format.
        } else if let Some(f) = families.last_mut() {
            push_sample(f, line);
        }
    }
    for f in &mut families {
        if f.kind == "counter" {
            f.name.push_str("_total");
        }
        f.children.sort_by(|a, b| {
            let av = a.labels.iter().map(|(_, v)| v);
            let bv = b.labels.iter().map(|(_, v)| v);
            av.cmp(bv)
        });
        for c in &mut f.children {
            c.lines.sort_by_key(|(rank, _)| *rank);
        }
    }
    // As client_golang's Gather: a family without samples (an untouched labelled metric, an
    // nfacct counter that cannot be read) is not written at all.
    families.retain(|f| !f.children.is_empty());
    families.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = String::new();
    for f in families {
        out.push_str(&format!(
            "# HELP {} {}\n# TYPE {} {}\n",
            f.name, f.help, f.name, f.kind
        ));
        for c in f.children {
            for (_, l) in c.lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
    }
    out
}

fn push_sample(f: &mut FamilyText, line: &str) {
    let Some((series, value)) = line.rsplit_once(' ') else {
        return;
    };
    let (name, mut labels) = match series.split_once('{') {
        Some((n, l)) => (n, parse_labels(l.strip_suffix('}').unwrap_or(l))),
        None => (series, Vec::new()),
    };
    let le = labels
        .iter()
        .position(|(k, _)| k == "le")
        .map(|i| labels.remove(i).1);
    labels.sort_by(|a, b| a.0.cmp(&b.0));
    let rank = if name.ends_with("_sum") {
        1
    } else if name.ends_with("_count") {
        2
    } else {
        0
    };
    let mut text = String::from(name);
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{}\"", go_float(parse_float(&le))));
    }
    if !pairs.is_empty() {
        text.push('{');
        text.push_str(&pairs.join(","));
        text.push('}');
    }
    text.push(' ');
    text.push_str(&go_float(parse_float(value)));
    match f.children.iter_mut().find(|c| c.labels == labels) {
        Some(c) => c.lines.push((rank, text)),
        None => f.children.push(Child {
            labels,
            lines: vec![(rank, text)],
        }),
    }
}

fn parse_float(s: &str) -> f64 {
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => s.parse().unwrap_or(f64::NAN),
    }
}

/// `k="v",k2="v2"` into pairs; values keep their escapes.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let key = key.trim_start_matches(',').to_string();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { break };
        out.push((key, after[..end].to_string()));
        rest = &after[end + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(text: &str, prefix: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn type_and_help_lines_match_upstream() {
        let m = Metrics::new();
        // Touch every labelled metric so that all families are exposed.
        m.observe_sync(Duration::from_millis(5), SyncKind::Full);
        m.observe_sync(Duration::from_millis(5), SyncKind::Partial);
        m.observe_network_programming(1.5);
        m.set_last_sync_now();
        m.record_queued();
        m.set_rule_counts(10, 20);
        m.set_rules_written(1, 2);
        m.inc_restore_failure(false);
        m.inc_restore_failure(true);
        m.inc_nftables_sync_failure();
        m.inc_nftables_cleanup_failure();
        m.set_no_local_endpoints(0, 1);
        m.inc_healthz(200);
        m.inc_livez(503);
        m.observe_conntrack_reconcile(Duration::from_millis(3), 4);
        let text = m.encode().unwrap();
        let k = "kubeproxy_";
        let want_types = [
            ("conntrack_reconciler_deleted_entries_total", "counter"),
            ("conntrack_reconciler_sync_duration_seconds", "histogram"),
            ("network_programming_duration_seconds", "histogram"),
            ("proxy_healthz_total", "counter"),
            ("proxy_livez_total", "counter"),
            ("sync_full_proxy_rules_duration_seconds", "histogram"),
            ("sync_partial_proxy_rules_duration_seconds", "histogram"),
            ("sync_proxy_rules_duration_seconds", "histogram"),
            ("sync_proxy_rules_endpoint_changes_pending", "gauge"),
            ("sync_proxy_rules_endpoint_changes_total", "counter"),
            ("sync_proxy_rules_iptables_last", "gauge"),
            (
                "sync_proxy_rules_iptables_partial_restore_failures_total",
                "counter",
            ),
            (
                "sync_proxy_rules_iptables_restore_failures_total",
                "counter",
            ),
            ("sync_proxy_rules_iptables_total", "gauge"),
            ("sync_proxy_rules_last_queued_timestamp_seconds", "gauge"),
            ("sync_proxy_rules_last_timestamp_seconds", "gauge"),
            (
                "sync_proxy_rules_nftables_cleanup_failures_total",
                "counter",
            ),
            ("sync_proxy_rules_nftables_sync_failures_total", "counter"),
            ("sync_proxy_rules_no_local_endpoints_total", "gauge"),
            ("sync_proxy_rules_service_changes_pending", "gauge"),
            ("sync_proxy_rules_service_changes_total", "counter"),
        ];
        let want: Vec<String> = want_types
            .iter()
            .map(|(n, t)| format!("# TYPE {k}{n} {t}"))
            .collect();
        // Exactly these families, sorted by name like client_golang's Gather.
        assert_eq!(lines_of(&text, "# TYPE "), want);
        assert!(
            !text.contains("# EOF"),
            "OpenMetrics trailer must not leak: {text}"
        );
        assert!(text.contains(
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds\n"
        ));
        assert!(text.contains(
            "# HELP kubeproxy_sync_proxy_rules_endpoint_changes_total [ALPHA] Cumulative proxy rules Endpoint changes\n"
        ));
        assert!(text.contains(
            "# HELP kubeproxy_sync_proxy_rules_no_local_endpoints_total [ALPHA] Number of services with a Local traffic policy and no endpoints\n"
        ));
    }

    #[test]
    fn unlabelled_metrics_are_always_present_and_labelled_ones_lazy() {
        let text = Metrics::new().encode().unwrap();
        assert_eq!(
            lines_of(&text, "kubeproxy_"),
            [
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
                "kubeproxy_sync_proxy_rules_endpoint_changes_total 0",
                "kubeproxy_sync_proxy_rules_service_changes_pending 0",
                "kubeproxy_sync_proxy_rules_service_changes_total 0",
            ]
        );
    }

    #[test]
    fn families_without_samples_are_not_written() {
        let text = Metrics::new().encode().unwrap();
        assert_eq!(
            lines_of(&text, "# TYPE "),
            [
                "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_pending gauge",
                "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_total counter",
                "# TYPE kubeproxy_sync_proxy_rules_service_changes_pending gauge",
                "# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter",
            ]
        );
    }

    #[test]
    fn kernel_nfacct_counters_are_read_at_every_scrape() {
        let ns = crate::kernel::testutil::NetNs::new();
        let acct = Nfacct::new().with_netns(ns.name());
        let m = Metrics::with_nfacct(IpFamily::V4, acct.clone());
        let ct = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total";
        let lo = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total";
        // The counters do not exist yet: nothing is exposed, as upstream's collector.
        let text = m.encode().unwrap();
        assert!(!text.contains("kubeproxy_iptables_"), "{text}");

        acct.ensure(NFACCT_CT_STATE_INVALID).unwrap();
        acct.ensure(NFACCT_LOCALHOST_NODEPORTS).unwrap();
        let text = m.encode().unwrap();
        assert!(text.contains(&format!(
            "# HELP {ct} [ALPHA] packets dropped by iptables to work around conntrack problems\n# TYPE {ct} counter\n{ct} 0\n"
        )), "{text}");
        assert!(text.contains(&format!(
            "# HELP {lo} [ALPHA] Number of packets accepted on nodeports of loopback interface\n# TYPE {lo} counter\n{lo} 0\n"
        )), "{text}");
        // Plain Metrics (IPVS mode, or no nfacct) never has them.
        assert!(
            !Metrics::new()
                .encode()
                .unwrap()
                .contains("kubeproxy_iptables_")
        );
    }

    #[test]
    fn sync_duration_buckets_and_samples() {
        let m = Metrics::new();
        m.observe_sync(Duration::from_millis(3), SyncKind::Partial);
        m.observe_sync(Duration::from_secs(20), SyncKind::Partial);
        let text = m.encode().unwrap();
        let name = "kubeproxy_sync_proxy_rules_duration_seconds";
        let les = [
            "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256",
            "0.512", "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf",
        ];
        let counts = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2];
        let mut want: Vec<String> = les
            .iter()
            .zip(counts)
            .map(|(le, c)| format!("{name}_bucket{{ip_family=\"IPv4\",le=\"{le}\"}} {c}"))
            .collect();
        want.push(format!("{name}_sum{{ip_family=\"IPv4\"}} 20.003"));
        want.push(format!("{name}_count{{ip_family=\"IPv4\"}} 2"));
        assert_eq!(lines_of(&text, &format!("{name}_")), want);
        // Partial sync: the partial histogram got both, the full one nothing.
        assert!(text.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2\n"
        ));
        assert!(!text.contains("kubeproxy_sync_full_proxy_rules_duration_seconds"));
    }

    #[test]
    fn network_programming_buckets_match_upstream() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 81);
        assert_eq!(&b[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(b[61], 59.0);
        assert_eq!(&b[62..64], &[60.0, 65.0]);
        assert_eq!(b[73], 115.0);
        assert_eq!(&b[74..], &[120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]);

        let m = Metrics::new();
        m.observe_network_programming(0.3);
        let text = m.encode().unwrap();
        let name = "kubeproxy_network_programming_duration_seconds_bucket";
        let buckets = lines_of(&text, name);
        assert_eq!(buckets.len(), 82);
        assert_eq!(
            buckets[0],
            format!("{name}{{ip_family=\"IPv4\",le=\"0\"}} 0")
        );
        assert_eq!(
            buckets[1],
            format!("{name}{{ip_family=\"IPv4\",le=\"0.25\"}} 0")
        );
        assert_eq!(
            buckets[2],
            format!("{name}{{ip_family=\"IPv4\",le=\"0.5\"}} 1")
        );
        assert_eq!(
            buckets[3],
            format!("{name}{{ip_family=\"IPv4\",le=\"1\"}} 1")
        );
        assert_eq!(
            buckets[80],
            format!("{name}{{ip_family=\"IPv4\",le=\"300\"}} 1")
        );
        assert_eq!(
            buckets[81],
            format!("{name}{{ip_family=\"IPv4\",le=\"+Inf\"}} 1")
        );
    }

    #[test]
    fn counters_gauges_and_labels() {
        let m = Metrics::for_family(IpFamily::V6);
        m.inc_service_changes(3);
        m.inc_endpoint_changes(1_500_000);
        m.set_pending(2, 7);
        m.inc_restore_failure(true);
        m.inc_nftables_sync_failure();
        m.set_rule_counts(12, 34);
        m.set_no_local_endpoints(5, 6);
        m.inc_healthz(503);
        m.inc_healthz(200);
        m.inc_healthz(200);
        m.observe_conntrack_reconcile(Duration::from_millis(1), 9);
        m.set_last_sync(UNIX_EPOCH + Duration::from_millis(1_712_345_678_250));
        let text = m.encode().unwrap();
        for want in [
            "kubeproxy_sync_proxy_rules_service_changes_total 3",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1.5e+06",
            "kubeproxy_sync_proxy_rules_service_changes_pending 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 7",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv6\",table=\"filter\"} 12",
            "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv6\",table=\"nat\"} 34",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"external\"} 6",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"internal\"} 5",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv6\"} 9",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"} 1.71234567825e+09",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        // A partial failure counts in both counters, as upstream.
        assert!(text.lines().any(|l| l == "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv6\"} 1"), "{text}");
        // Children sorted by label value, as client_golang does.
        assert_eq!(
            lines_of(&text, "kubeproxy_proxy_healthz_total{"),
            [
                "kubeproxy_proxy_healthz_total{code=\"200\"} 2",
                "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
            ]
        );
    }

    #[test]
    fn label_parsing_keeps_escapes() {
        assert_eq!(
            parse_labels(r#"a="x\"y",b="2""#),
            [
                ("a".to_string(), r#"x\"y"#.to_string()),
                ("b".to_string(), "2".to_string())
            ]
        );
    }
}
