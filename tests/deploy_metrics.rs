//! `/metrics` as a Prometheus server and dashboards read it: the body served over HTTP passes
//! `promtool check metrics` (the Debian `prometheus` package's promtool; `.ci/run` installs
//! it). Fails, never skips, when promtool is missing.
//!
//! promtool's linter flags two names that are upstream's own: kube-proxy registers
//! `kubeproxy_sync_proxy_rules_iptables_total` and
//! `kubeproxy_sync_proxy_rules_no_local_endpoints_total` as gauges (KK:
//! `pkg/proxy/metrics/metrics.go`), so upstream's `/metrics` gets the same two findings.
//! Names and types stay upstream's for dashboards and alerts; those two findings are allowed,
//! any other finding or a parse error fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use kube_proxy_rs::server::metrics::{CONTENT_TYPE, Metrics};
use kube_proxy_rs::server::{MetricsEndpoint, serve_metrics};
use kube_proxy_rs::sync::SyncKind;

const UPSTREAM_LINT: &[&str] = &[
    "kubeproxy_sync_proxy_rules_iptables_total non-counter metrics should not have \"_total\" suffix",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total non-counter metrics should not have \"_total\" suffix",
];

fn touch_everything(m: &Metrics) {
    m.observe_sync(Duration::from_millis(12), SyncKind::Full);
    m.observe_sync(Duration::from_millis(3), SyncKind::Partial);
    m.set_last_sync_now();
    m.record_queued();
    m.observe_network_programming(1.5);
    m.inc_restore_failure(true);
    m.set_rule_counts(30, 40);
    m.set_rules_written(10, 20);
    m.set_no_local_endpoints(1, 0);
    m.inc_service_changes(2);
    m.inc_endpoint_changes(3);
    m.set_pending(1, 1);
    m.inc_healthz(200);
    m.inc_healthz(503);
    m.inc_livez(200);
    m.observe_conntrack_reconcile(Duration::from_millis(5), 2);
}

/// GET /metrics: (headers, body).
fn get_metrics(addr: SocketAddr) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    (head.to_string(), body.to_string())
}

/// Runs promtool on `body`; returns its findings (one per line).
fn promtool(body: &str) -> Vec<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install the Debian package `prometheus` (.ci/run does)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // 0: clean; 3: lint findings; anything else (1: parse error) fails.
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "promtool rejected /metrics ({}):\n{text}\n--- body ---\n{body}",
        out.status
    );
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

async fn check(metrics: Metrics, want_families: &[&str]) {
    let server = serve_metrics(
        "127.0.0.1:0".parse().unwrap(),
        MetricsEndpoint {
            proxy_mode: "iptables".into(),
            metrics,
            config: serde_json::json!({}),
        },
    )
    .unwrap();
    let addr = server.local_addr();
    let (head, body) = tokio::task::spawn_blocking(move || get_metrics(addr))
        .await
        .unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-type: {CONTENT_TYPE}")),
        "{head}"
    );
    for f in want_families {
        assert!(
            body.contains(&format!("# TYPE {f} ")),
            "family {f} missing from:\n{body}"
        );
    }
    let findings = promtool(&body);
    let unexpected: Vec<&String> = findings
        .iter()
        .filter(|l| !UPSTREAM_LINT.contains(&l.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool findings beyond upstream's own: {unexpected:#?}\n--- body ---\n{body}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_after_syncs() {
    let m = Metrics::new();
    touch_everything(&m);
    check(
        m,
        &[
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "kubeproxy_network_programming_duration_seconds",
            "kubeproxy_sync_proxy_rules_iptables_total",
            "kubeproxy_proxy_healthz_total",
            "kubeproxy_conntrack_reconciler_deleted_entries_total",
            // client_golang's process collector, charted by kube-proxy dashboards.
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_at_start() {
    check(
        Metrics::new(),
        &["kubeproxy_sync_proxy_rules_service_changes_total"],
    )
    .await;
}
