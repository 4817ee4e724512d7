//! Watch retries back off as client-go's reflector does (800 ms doubling to 30 s, jitter 1.0,
//! reset only after a healthy period), checked on the built binary against the fake API server:
//! - refused from the start (401): at most 30 list/watch requests in 60 s from all watchers;
//! - a running daemon whose server answers 503: the same bound.
//!
//! Once the server answers again, the daemon syncs the objects within one backoff step.
//! Needs root (the daemon runs in its own network namespace); fails, never skips, without it.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::Daemon;
use support::fakeapi::{FakeApiServer, endpoint_slice, node, service};
use support::netns::Netns;

/// How long the server fails; the requirement's window.
const OUTAGE: Duration = Duration::from_secs(60);
/// The most list/watch requests all watchers together may send in `OUTAGE`.
const MAX_REQUESTS: usize = 30;
/// Listing, watching and one sync (min-sync-period 1 s) after the retry that succeeds.
const SYNC_SLACK: Duration = Duration::from_secs(5);

/// The watchers' requests: lists and watches of the three watched collections (not Events,
/// not GETs of one object).
fn watcher_requests(api: &FakeApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|r| {
            let path = r.split_once('?').map_or(r.as_str(), |(p, _)| p);
            matches!(
                path,
                "GET /api/v1/services"
                    | "GET /apis/discovery.k8s.io/v1/endpointslices"
                    | "GET /api/v1/nodes"
            )
        })
        .count()
}

fn json_lines(log: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or_default()
}

/// The longest of the watchers' current backoff steps: each watcher's last logged retry delay.
fn longest_current_step(log: &Path) -> Duration {
    let mut last = std::collections::BTreeMap::new();
    for v in json_lines(log) {
        if message(&v).starts_with("watch failed")
            && let (Some(kind), Some(ms)) = (
                v["fields"]["kind"].as_str(),
                v["fields"]["retry_in_ms"].as_u64(),
            )
        {
            last.insert(kind.to_string(), ms);
        }
    }
    Duration::from_millis(last.values().copied().max().unwrap_or(0))
}

/// Waits until a "sync done" line reports at least `services` services; returns when it was
/// seen, or None after `timeout`.
fn wait_for_sync_with(log: &Path, services: u64, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if json_lines(log).iter().any(|v| {
            message(v) == "sync done" && v["fields"]["services"].as_u64() >= Some(services)
        }) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// A daemon with a directory of its own (kubeconfig, log).
struct Running {
    _dir: tempfile::TempDir,
    proxy: Daemon,
}

fn start_daemon(ns: &Netns, api: &FakeApiServer) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Daemon::builder(ns, api, dir.path())
        .args([
            "--cluster-cidr=10.244.0.0/16",
            "--iptables-min-sync-period=1s",
            "--logging-format=json",
            "-v=2",
        ])
        .start();
    Running { _dir: dir, proxy }
}

fn cluster(api: &FakeApiServer, name: &str, ip: &str) {
    api.apply(service("demo", name, ip, &[("http", 80, "TCP", 8080)]));
    api.apply(endpoint_slice(
        "demo",
        &format!("{name}-1"),
        name,
        &[("http", 8080, "TCP")],
        &["10.244.0.11"],
        Some("node1"),
    ));
}

/// Lets the server fail for `OUTAGE` (the caller turned failing on), checks the request count,
/// heals it with `heal`, and checks that a sync with `services` services follows within the
/// watchers' current backoff step.
fn outage_then_recovery(api: &FakeApiServer, d: &mut Running, services: u64, heal: impl Fn()) {
    std::thread::sleep(OUTAGE);
    let requests = watcher_requests(api);
    let log = d.proxy.logs();
    assert!(
        d.proxy.try_wait().is_none(),
        "the daemon must keep running through an outage:\n{log}"
    );
    eprintln!("list/watch requests in {OUTAGE:?} of outage: {requests}");
    assert!(
        (3..=MAX_REQUESTS).contains(&requests),
        "{requests} list/watch requests in {OUTAGE:?} (at most {MAX_REQUESTS}, at least one per \
         watcher):\n{:#?}",
        api.requests()
    );
    let step = longest_current_step(d.proxy.log());
    assert!(step > Duration::ZERO, "no retry delay logged:\n{log}");
    heal();
    let healed = Instant::now();
    let synced = wait_for_sync_with(d.proxy.log(), services, step + SYNC_SLACK + SYNC_SLACK);
    let log = d.proxy.logs();
    let synced = synced.unwrap_or_else(|| panic!("no sync after the server came back:\n{log}"));
    let took = synced - healed;
    eprintln!("synced {took:?} after the server came back (current backoff step {step:?})");
    assert!(
        took <= step + SYNC_SLACK,
        "synced {took:?} after recovery, more than one backoff step ({step:?}) + {SYNC_SLACK:?}"
    );
}

#[test]
fn refused_from_the_start_backs_off_then_converges() {
    support::require_root();
    let ns = Netns::new("backoff401");
    let api = FakeApiServer::start_in(Some(&ns), IpAddr::V4(Ipv4Addr::LOCALHOST));
    api.apply(node("node1", &["192.168.50.1"], Some("10.244.0.0/24")));
    cluster(&api, "web", "10.96.0.10");
    api.set_failing(Some(401));
    let mut d = start_daemon(&ns, &api);
    outage_then_recovery(&api, &mut d, 1, || api.set_failing(None));
}

#[test]
fn running_daemon_backs_off_from_a_503_server_then_converges() {
    support::require_root();
    let ns = Netns::new("backoff503");
    let api = FakeApiServer::start_in(Some(&ns), IpAddr::V4(Ipv4Addr::LOCALHOST));
    api.apply(node("node1", &["192.168.50.1"], Some("10.244.0.0/24")));
    cluster(&api, "web", "10.96.0.10");
    let mut d = start_daemon(&ns, &api);
    wait_for_sync_with(d.proxy.log(), 1, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no first sync:\n{}", d.proxy.logs()));
    api.set_unavailable(true);
    api.clear_requests();
    // A change during the outage: the daemon sees it only once the server answers again.
    cluster(&api, "web2", "10.96.0.11");
    outage_then_recovery(&api, &mut d, 2, || api.set_unavailable(false));
}
