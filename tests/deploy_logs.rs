//! Logs an operator relies on, read from the built binary's stderr:
//! - `--logging-format=json` gives one JSON object per line (render and the daemon);
//! - every skipped object gets a warning naming it (render's loader and the daemon's watchers);
//! - at `-v=2` the daemon logs exactly one "sync done" line per sync, with its duration and
//!   counts (checked against `kubeproxy_sync_proxy_rules_duration_seconds_count`).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{BIN, Daemon};
use support::fakeapi::{FakeApiServer, endpoint_slice, service};
use support::netns::Netns;

const BAD_OBJECTS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node1}
- {addresses: [10.244.1.300], nodeName: node1}
---
apiVersion: v1
kind: Service
metadata: {name: bad-ip, namespace: demo}
spec:
  clusterIP: 10.96.0.999
  ports: [{port: 80, protocol: TCP}]
";

/// Every non-empty line of `text` as a JSON object; panics on any other line.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l:?}\n---\n{text}"));
            assert!(v.is_object(), "not a JSON object: {l}");
            assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
            v
        })
        .collect()
}

fn message(v: &Value) -> String {
    v["fields"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn render_json_logs_warn_per_skipped_object() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects.yaml");
    std::fs::write(&objects, BAD_OBJECTS).unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "render",
            "--logging-format=json",
            "--hostname-override=node1",
        ])
        .arg("--objects")
        .arg(&objects)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("KUBE-SVC-"),
        "rules still rendered"
    );
    let lines = json_lines(&stderr);
    let warnings: Vec<String> = lines
        .iter()
        .filter(|v| v["level"] == "WARN")
        .map(message)
        .collect();
    for (what, detail) in [
        ("demo/bad-ip", "10.96.0.999"),
        ("demo/web-1", "10.244.1.300"),
    ] {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(what) && w.contains(detail)),
            "no warning naming {what} ({detail}): {warnings:#?}"
        );
    }
}

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects.yaml");
    std::fs::write(&objects, BAD_OBJECTS).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["render", "--objects"])
        .arg(&objects)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("WARN"), "expected a warning: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "ANSI escapes in piped logs: {stderr:?}"
    );
}

fn metrics_sync_count(ns: &Netns) -> Option<u64> {
    let text = ns
        .in_netns(|| -> std::io::Result<String> {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut t = String::new();
            s.read_to_string(&mut t)?;
            Ok(t)
        })
        .ok()?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
}

fn sync_lines(log: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // Only complete lines: the last one may be half written.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    // One line per family and round; the IPv4 proxier's are compared with its histogram.
    json_lines(complete)
        .into_iter()
        .filter(|v| message(v) == "sync done" && v["fields"]["family"] == "IPv4")
        .collect()
}

fn wait_for<T>(what: &str, log: &std::path::Path, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn daemon_json_logs_one_line_per_sync_at_v2() {
    support::require_root();
    let ns = Netns::new("logs");
    let api = FakeApiServer::start_in(Some(&ns), IpAddr::V4(Ipv4Addr::LOCALHOST));
    api.apply_demo_web("node1", "192.168.50.1");
    let mut bad = service("demo", "bad-ip", "10.96.0.999", &[("p", 80, "TCP", 80)]);
    bad["spec"]["clusterIPs"] = json!(["10.96.0.999"]);
    api.apply(bad);

    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Daemon::builder(&ns, &api, dir.path())
        .args([
            "--cluster-cidr=10.244.0.0/16",
            "--iptables-min-sync-period=1s",
            "--logging-format=json",
            "-v=2",
        ])
        .start();
    let log = proxy.log().to_path_buf();

    wait_for("the first sync", &log, || {
        (!sync_lines(&log).is_empty()).then_some(())
    });
    // A change: one more sync, one more line.
    api.apply(endpoint_slice(
        "demo",
        "web-1",
        "web",
        &[("http", 8080, "TCP")],
        &["10.244.0.11", "10.244.0.12"],
        Some("node1"),
    ));
    wait_for("a sync with the new endpoint", &log, || {
        sync_lines(&log)
            .iter()
            .any(|l| l["fields"]["endpoints"] == 2)
            .then_some(())
    });
    // Lines and the sync histogram agree (the metric is updated just before the line).
    let (lines, count) = wait_for("log lines to match the sync count", &log, || {
        let count = metrics_sync_count(&ns)?;
        let lines = sync_lines(&log);
        (lines.len() as u64 == count).then_some((lines, count))
    });
    assert!(count >= 2);
    for l in &lines {
        let f = &l["fields"];
        assert_eq!(l["level"], "DEBUG", "{l}");
        assert!(f["duration_ms"].is_u64(), "no duration: {l}");
        assert!(f["full"].is_boolean(), "{l}");
        assert!(f["services"].is_u64() && f["endpoints"].is_u64(), "{l}");
        assert!(f["changed"].is_u64() && f["rules"].is_string(), "{l}");
    }
    assert_eq!(lines[0]["fields"]["full"], true, "the first sync is full");
    let last = lines.last().unwrap();
    assert_eq!(last["fields"]["endpoints"], 2, "{last}");

    let status = proxy.terminate(Duration::from_secs(3));
    // Every line of the whole run is JSON, and the skipped Service was named.
    let all = json_lines(&std::fs::read_to_string(&log).unwrap());
    assert!(
        all.iter()
            .any(|v| v["level"] == "WARN" && message(v).contains("demo/bad-ip")),
        "no warning naming demo/bad-ip"
    );
    let _ = status;
}
