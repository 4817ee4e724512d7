//! The daemon end to end, nftables and iptables mode side by side in one run: the release
//! `kube-proxy-rs` in a node namespace against the fake API server holding N ClusterIP
//! services × 5 endpoints (the five pod namespaces' echo servers), per N and mode:
//! - first sync: daemon start → rules in the kernel (the daemon's
//!   `sync_proxy_rules_last_timestamp_seconds` moves), lists included;
//! - one-endpoint change: the EndpointSlice update at the API → the sync that carries it has
//!   committed (median of 20, each to another service, 1.2 s apart so minSyncPeriod never
//!   delays one);
//! - the daemon's RSS (VmRSS, and its peak VmHWM) with the cluster loaded;
//! - idle CPU: the daemon's user + system time (its own, and its reaped children's: the
//!   iptables/nft processes it runs) over `--idle-secs` (default 60) with no change, in
//!   CPU-seconds per minute;
//! - RSS after churn: `--churn-secs` (default 600; 0 skips it) of EndpointSlice updates at
//!   50 per second through the fake API, then VmRSS / VmHWM once the last one is synced;
//! - iptables mode: a minimal restore (one chain declared and deleted) by the daemon's back
//!   end with its rules loaded, the floor of any change (median of 10);
//! - connection set-up through a ClusterIP: median `connect()` time from the node namespace
//!   to a service's ClusterIP (DNAT to a pod) over 200 connections.
//!
//! `cargo bench --bench daemon [-- [--modes nftables,iptables] [--idle-secs S]
//! [--churn-secs S] N...]` (default sizes 100 1000 10000). Needs root.
//! iptables mode uses the host's detected back end; `KUBE_PROXY_RS_IPTABLES_MODE=legacy` (or
//! `nft`) in the environment forces one.

#[path = "../tests/scenarios/mod.rs"]
mod scenarios;
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use scenarios::{Cluster, http_get_in};
use serde_json::{Value, json};
use support::fakeapi::{endpoint_slice, service};

const MODES: [&str; 2] = ["nftables", "iptables"];
const CHANGES: usize = 20;
/// EndpointSlice updates per second during churn.
const CHURN_RATE: u32 = 50;

/// The command line: sizes, modes and the idle and churn durations.
struct Args {
    sizes: Vec<usize>,
    modes: Vec<String>,
    idle: Duration,
    churn: Duration,
}

impl Args {
    fn parse() -> Args {
        let mut args = Args {
            sizes: Vec::new(),
            modes: MODES.iter().map(|m| m.to_string()).collect(),
            idle: Duration::from_secs(60),
            churn: Duration::from_secs(600),
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let (key, inline) = match a.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (a.clone(), None),
            };
            let mut value = || inline.clone().or_else(|| it.next()).unwrap_or_default();
            match key.as_str() {
                "--modes" => args.modes = value().split(',').map(str::to_string).collect(),
                "--idle-secs" => args.idle = Duration::from_secs(value().parse().unwrap_or(60)),
                "--churn-secs" => args.churn = Duration::from_secs(value().parse().unwrap_or(600)),
                _ => args.sizes.extend(a.parse::<usize>().ok()),
            }
        }
        if args.sizes.is_empty() {
            args.sizes = vec![100, 1000, 10_000];
        }
        args
    }
}

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", 10 + i / 250, i % 250)
}

fn slice(i: usize, pods: &[String]) -> Value {
    let ips: Vec<&str> = pods.iter().map(String::as_str).collect();
    let mut s = endpoint_slice(
        "bench",
        &format!("svc{i}-1"),
        &format!("svc{i}"),
        &[("p", 8080, "TCP")],
        &ips,
        Some("node2"),
    );
    s["metadata"]["labels"]["bench"] = json!("1");
    s
}

fn objects(n: usize, pods: &[String]) -> Vec<Value> {
    (0..n)
        .flat_map(|i| {
            [
                service(
                    "bench",
                    &format!("svc{i}"),
                    &cluster_ip(i),
                    &[("p", 80, "TCP", 8080)],
                ),
                slice(i, pods),
            ]
        })
        .collect()
}

/// The daemon's last successful sync (seconds since the epoch), 0 before the first.
fn last_sync(c: &Cluster) -> f64 {
    let addr: SocketAddr = "127.0.0.1:10249".parse().unwrap();
    let Ok((_, text)) = http_get_in(&c.topo.node, addr, "/metrics") else {
        return 0.0;
    };
    text.lines()
        .filter(|l| l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Polls until the daemon has synced after `since` (epoch seconds): the time it took.
fn synced_after(c: &Cluster, since: f64, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if last_sync(c) > since {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// When process `pid` started (epoch seconds, to the clock tick).
fn started(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 22 (starttime, in ticks since boot) counts from the end of the `(comm)` field.
    let ticks: f64 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(19)?.parse().ok())
        .unwrap_or(0.0);
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
        .unwrap_or(0.0);
    btime + ticks / 100.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn connect_time(c: &Cluster, addr: SocketAddr) -> Duration {
    let times = c.topo.node.in_netns(|| {
        (0..200)
            .filter_map(|_| {
                let t = Instant::now();
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
                let d = t.elapsed();
                drop(s);
                Some(d)
            })
            .collect::<Vec<_>>()
    });
    assert!(times.len() > 150, "connections to {addr} failed");
    median(times)
}

/// The process's CPU time so far (seconds): its own (utime + stime) and its reaped
/// children's (cutime + cstime: the iptables/nft processes it runs).
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields 14 to 17, counted from the end of `(comm)`.
    let ticks: Vec<f64> = stat
        .rsplit(')')
        .next()
        .map(|rest| {
            rest.split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|t| t.parse::<f64>().ok())
                .collect()
        })
        .unwrap_or_default();
    let sum =
        |r: std::ops::Range<usize>| ticks.get(r).map_or(0.0, |t| t.iter().sum::<f64>()) / 100.0;
    (sum(0..2), sum(2..4))
}

/// VmRSS / VmHWM of `pid`, in MiB.
fn rss(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    format!(
        "{} / {} MiB",
        kib(&status, "VmRSS:") / 1024,
        kib(&status, "VmHWM:") / 1024
    )
}

/// The daemon's CPU-seconds per minute over `idle` with nothing changing: in all, and its
/// own / its children's.
fn idle_cpu(pid: u32, idle: Duration) -> String {
    let before = cpu_seconds(pid);
    std::thread::sleep(idle);
    let after = cpu_seconds(pid);
    let per_min = |a: f64, b: f64| (a - b) * 60.0 / idle.as_secs_f64().max(1.0);
    let (own, children) = (per_min(after.0, before.0), per_min(after.1, before.1));
    format!("{:.2} ({own:.2} / {children:.2})", own + children)
}

/// Updates EndpointSlices at [`CHURN_RATE`] per second for `churn`, then waits for the last
/// update's sync: the daemon's RSS / peak then.
fn churn(c: &Cluster, pid: u32, n: usize, pods: &[String], churn: Duration) -> String {
    if churn.is_zero() {
        return "-".into();
    }
    let t0 = Instant::now();
    let every = Duration::from_secs(1) / CHURN_RATE;
    let mut k = 0u32;
    let mut last = epoch();
    while t0.elapsed() < churn {
        let i = (k as usize * 7919 + 3) % n;
        last = epoch();
        c.api.apply(slice(i, &pods[..3 + (k as usize % 3)]));
        k += 1;
        if let Some(wait) = (every * k).checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    if synced_after(c, last, Duration::from_secs(300)).is_none() {
        println!("the last churn update was not synced within 300 s");
    }
    format!("{} ({k} updates)", rss(pid))
}

/// iptables mode's floor for a change, in the node namespace with the daemon's rules loaded:
/// the median time of a minimal `--noflush` restore (declare and delete one chain) by the
/// back end the daemon uses. iptables-legacy replaces the whole table for any change, so
/// its floor grows with the table.
fn minimal_restore(c: &Cluster) -> Duration {
    let tool = match std::env::var("KUBE_PROXY_RS_IPTABLES_MODE").as_deref() {
        Ok("legacy") => "iptables-legacy-restore",
        _ => "iptables-nft-restore",
    };
    let input = "*nat\n:KUBE-SEP-BENCHFLOOR - [0:0]\n-X KUBE-SEP-BENCHFLOOR\nCOMMIT\n";
    let times = c.topo.node.in_netns(move || {
        (0..10)
            .map(|_| {
                use std::io::Write;
                let t = Instant::now();
                let mut child = std::process::Command::new(tool)
                    .args(["-w", "5", "--noflush", "--counters"])
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .expect("start the restore");
                let mut stdin = child.stdin.take().expect("stdin");
                stdin.write_all(input.as_bytes()).expect("write");
                drop(stdin);
                assert!(child.wait().expect("restore").success());
                t.elapsed()
            })
            .collect::<Vec<_>>()
    });
    median(times)
}

fn run(n: usize, mode: &str, args: &Args) {
    let probe = Cluster::start(mode, &[]);
    let pods: Vec<String> = (0..5).map(|i| probe.pod_ip(i)).collect();
    drop(probe);
    let c = Cluster::start(mode, &objects(n, &pods));
    let pid = c.proxy.lock().unwrap().id();
    let limit = Duration::from_secs(600);
    if synced_after(&c, 0.0, limit).is_none() {
        println!("| {n} | {mode} | >{limit:?} | | | | | | |");
        return;
    }
    let first = Duration::from_secs_f64(last_sync(&c) - started(pid));
    let setup = connect_time(&c, format!("{}:80", cluster_ip(0)).parse().unwrap());
    let mut changes = Vec::new();
    for k in 0..CHANGES {
        std::thread::sleep(Duration::from_millis(1200));
        let i = (k * 7919 + 1) % n;
        let keep = if k % 2 == 0 { 4 } else { 3 };
        let since = epoch();
        c.api.apply(slice(i, &pods[..keep]));
        match synced_after(&c, since, Duration::from_secs(120)) {
            Some(d) => changes.push(d),
            None => println!("change {k} not synced within 120 s"),
        }
    }
    let loaded = rss(pid);
    let floor = if mode == "iptables" {
        format!("{:.1?}", minimal_restore(&c))
    } else {
        String::new()
    };
    // The last change's sync has committed; let its tail (metrics, stale-chain cleanup) end.
    std::thread::sleep(Duration::from_secs(2));
    let idle = idle_cpu(pid, args.idle);
    let churned = churn(&c, pid, n, &pods, args.churn);
    println!(
        "| {n} | {mode} | {first:.2?} | {:.1?} | {floor} | {loaded} | {idle} | {churned} | {setup:.0?} |",
        median(changes),
    );
}

fn main() {
    let args = Args::parse();
    println!(
        "| services (x5 endpoints) | mode | first sync: start → kernel | one-endpoint change: event → kernel (median of {CHANGES}) | iptables: minimal restore (median of 10) | daemon RSS / peak | idle CPU, s/min over {:?} (daemon / its children) | RSS / peak after {:?} of churn at {CHURN_RATE}/s | ClusterIP connect() (median of 200) |",
        args.idle, args.churn
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &args.sizes {
        for mode in &args.modes {
            run(n, mode, &args);
        }
    }
}
