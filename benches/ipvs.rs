//! IPVS mode at scale, in a real kernel: the qemu guest of `tests/vm/vmrun` (the host kernel
//! has no IPVS). Run on the host as root, the binary re-runs itself in the guest.
//!
//! Builds N ClusterIP services × 5 endpoints (as `benches/sync.rs`), renders IPVS mode's
//! virtual servers, then, per size:
//! - **table**: the whole IPVS table (N virtual servers, 5N real servers, scheduler `rr`, NAT,
//!   weight 1) programmed into an empty table twice: by `ipvsadm -R` reading the same table
//!   in `ipvsadm-save -n` format on stdin (the floor, as a tool user calls it; process start
//!   included), and by our netlink codec (`IpvsClient::connect` + one `apply` of every
//!   add). Best of `--runs` (default 2) each; the table is flushed (`IPVS_CMD_FLUSH`) before
//!   every run and its size checked after it. `ipvsadm -R` of an empty input is shown too:
//!   the tool's fixed cost (exec over 9p, libnl set-up).
//! - **syncs**: the IPVS proxier (`IpvsProxier`, as the daemon runs it) in the guest's root
//!   namespace: the first sync, a one-endpoint change (one endpoint of one service replaced:
//!   median of 3, each to another service), a periodic sync with nothing changed, and the
//!   raw netlink cost of the change (the two requests alone, on their own socket).
//!
//! `sudo cargo bench --bench ipvs [-- [--no-table] [--no-sync] [--runs R] SIZE...]`, SIZE = N
//! (services × 5 endpoints), default 1000 10000. Timings are the guest's: qemu emulates the
//! CPU (TCG), so only ratios measured in the same run mean anything.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube_proxy_rs::backend::ipvs::proxier::{IpvsKernel, IpvsProxier, IpvsSettings};
use kube_proxy_rs::backend::ipvs::{IpvsConfig, IpvsDesired, ipvsadm_save, render};
use kube_proxy_rs::backend::{Backend, SyncRequest};
use kube_proxy_rs::host::NodeFacts;
use kube_proxy_rs::kernel::iptables::{Iptables, detect_variant};
use kube_proxy_rs::kernel::ipvs::{IpvsClient, IpvsOp, RealServer};
use kube_proxy_rs::kernel::{Addresses, Conntrack, DummyLink, IpFamily, Ipset, Sysctl};
use kube_proxy_rs::model::{ClusterState, ServiceName};
#[path = "common/cluster.rs"]
mod cluster;

const ENDPOINTS: usize = 5;

fn config() -> IpvsConfig {
    IpvsConfig {
        random_fully: true,
        ..IpvsConfig::default()
    }
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    }
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

/// Every virtual server, then its real servers: the whole table as adds.
fn table_ops(d: &IpvsDesired) -> Vec<IpvsOp> {
    let mut ops = Vec::new();
    for s in &d.services {
        ops.push(IpvsOp::AddService(s.vs.clone()));
        for rs in &s.dests {
            ops.push(IpvsOp::AddDestination(s.vs.clone(), rs.clone()));
        }
    }
    ops
}

async fn flush() {
    let mut c = IpvsClient::connect().await.expect("IPVS in the guest");
    c.flush().await.expect("flush");
}

/// (virtual servers, real servers) in the kernel.
async fn table_size() -> (usize, usize) {
    let mut c = IpvsClient::connect().await.expect("IPVS in the guest");
    let services = c.services().await.expect("list services");
    let mut dests = 0;
    for s in &services {
        dests += c.destinations(s).await.expect("list destinations").len();
    }
    (services.len(), dests)
}

/// `ipvsadm -R` of `input` (a file, so writing the pipe is not timed) into an empty table.
fn ipvsadm_restore(input: &std::path::Path) -> Duration {
    let stdin = std::fs::File::open(input).expect("open input");
    let t = Instant::now();
    let out = Command::new("ipvsadm")
        .arg("-R")
        .stdin(Stdio::from(stdin))
        .output()
        .expect("run ipvsadm");
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "ipvsadm -R: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

async fn ours(ops: &[IpvsOp]) -> Duration {
    let t = Instant::now();
    let mut c = IpvsClient::connect().await.expect("IPVS in the guest");
    let results = c.apply(ops).await;
    let d = t.elapsed();
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 0, "{failed} requests failed: {:?}", results.first());
    d
}

struct TableRow {
    floor: Duration,
    ours: Duration,
    empty: Duration,
}

async fn table(d: &IpvsDesired, runs: usize) -> TableRow {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("table.ipvsadm");
    std::fs::write(&input, ipvsadm_save(d)).expect("write input");
    let empty = dir.path().join("empty.ipvsadm");
    std::fs::write(&empty, "").expect("write input");
    let want = (
        d.services.len(),
        d.services.iter().map(|s| s.dests.len()).sum::<usize>(),
    );
    let ops = table_ops(d);
    let (mut floor, mut mine, mut fixed) = (Duration::MAX, Duration::MAX, Duration::MAX);
    for run in 0..runs {
        flush().await;
        fixed = fixed.min(ipvsadm_restore(&empty));
        flush().await;
        let f = ipvsadm_restore(&input);
        assert_eq!(table_size().await, want, "ipvsadm -R left another table");
        flush().await;
        let o = ours(&ops).await;
        assert_eq!(table_size().await, want, "our apply left another table");
        println!(
            "  run {run}: ipvsadm -R {} ({} requests), ours {}",
            ms(f),
            ops.len(),
            ms(o)
        );
        floor = floor.min(f);
        mine = mine.min(o);
    }
    flush().await;
    TableRow {
        floor,
        ours: mine,
        empty: fixed,
    }
}

struct SyncRow {
    first: Duration,
    partial: Duration,
    periodic: Duration,
    raw: Duration,
}

async fn proxier() -> IpvsProxier {
    let variant = detect_variant(None).await.expect("iptables variant");
    let kernel = IpvsKernel {
        iptables: Iptables::new(variant, IpFamily::V4),
        ipset: Ipset::new(),
        link: DummyLink::default(),
        conntrack: Conntrack::new(),
        addrs: Addresses::new(),
        sysctl: Sysctl::new(),
    };
    let client = IpvsClient::connect().await.expect("IPVS in the guest");
    IpvsProxier::start(client, kernel, config(), IpvsSettings::default())
        .await
        .expect("IPVS mode starts")
}

async fn timed_sync(
    p: &mut IpvsProxier,
    model: &kube_proxy_rs::model::ProxyModel,
    changed: &BTreeSet<ServiceName>,
    full: bool,
) -> Duration {
    let facts = NodeFacts::default();
    let t = Instant::now();
    p.sync(SyncRequest {
        model,
        changed,
        full,
        node_facts: &facts,
    })
    .await
    .expect("sync");
    t.elapsed()
}

/// The raw netlink cost of replacing one real server of `svc`: the two requests alone.
async fn raw_change(d: &IpvsDesired, svc: usize, old: &RealServer, new: &RealServer) -> Duration {
    let vs = d.services[svc].vs.clone();
    let mut c = IpvsClient::connect().await.expect("IPVS in the guest");
    // Back and forth, so the kernel ends as the proxier left it; the forward pair is timed.
    let back = [
        IpvsOp::DeleteDestination(vs.clone(), new.clone()),
        IpvsOp::AddDestination(vs.clone(), old.clone()),
    ];
    assert!(c.apply(&back).await.iter().all(Result::is_ok));
    let forth = [
        IpvsOp::DeleteDestination(vs.clone(), old.clone()),
        IpvsOp::AddDestination(vs, new.clone()),
    ];
    let t = Instant::now();
    let ok = c.apply(&forth).await.iter().all(Result::is_ok);
    let d = t.elapsed();
    assert!(ok, "raw change failed");
    d
}

async fn syncs(state: &mut ClusterState) -> SyncRow {
    flush().await;
    let mut p = proxier().await;
    let none = BTreeSet::new();
    let model = state.snapshot(IpFamily::V4);
    let first = timed_sync(&mut p, &model, &none, true).await;
    println!("  first sync {}", ms(first));
    let mut partials = Vec::new();
    let mut raw = Duration::MAX;
    for svc in [7, 8, 9] {
        state.apply_slice(&cluster::slice_of(svc, ENDPOINTS, 1));
        let changed = state.take_changes().services;
        let model = state.snapshot(IpFamily::V4);
        let d = timed_sync(&mut p, &model, &changed, false).await;
        println!("  one-endpoint sync (svc{svc}) {}", ms(d));
        partials.push(d);
        // Endpoint 10.100.x.y went, 10.105.x.y came (services sort by ClusterIP).
        let desired = render(&model, p.config());
        let dests = &desired.services[svc].dests;
        let old = RealServer::new(format!("10.100.0.{svc}").parse().expect("ip"), 8080, 1);
        assert!(
            !dests.contains(&old) && dests.len() == ENDPOINTS,
            "{dests:?}"
        );
        let new = dests.last().expect("dest").clone();
        raw = raw.min(raw_change(&desired, svc, &old, &new).await);
    }
    partials.sort();
    let model = state.snapshot(IpFamily::V4);
    let periodic = timed_sync(&mut p, &model, &none, false).await;
    println!("  periodic sync, nothing changed {}", ms(periodic));
    drop(p);
    flush().await;
    SyncRow {
        first,
        partial: partials[partials.len() / 2],
        periodic,
        raw,
    }
}

/// Outside the guest: run this binary in it, with the same arguments.
fn rerun_in_vm(args: &[String]) -> ! {
    let vmrun = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vm/vmrun");
    let exe = std::env::current_exe().expect("current_exe");
    let status = Command::new(vmrun)
        .args(["--timeout", "5400", "--mem", "3072", "--"])
        .arg(exe)
        .args(args)
        .status()
        .expect("run tests/vm/vmrun (as root)");
    std::process::exit(status.code().unwrap_or(1));
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if std::env::var("KPRS_IN_VM").as_deref() != Ok("1") {
        rerun_in_vm(&args);
    }
    let flag = |f: &str| args.iter().any(|a| a == f);
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(2usize);
    let mut sizes: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || args[i - 1] != "--runs")
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![1000, 10_000];
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "guest kernel {}",
        std::env::var("KPRS_VM_KERNEL").unwrap_or_default()
    );
    let mut tables = Vec::new();
    let mut sync_rows = Vec::new();
    for &n in &sizes {
        let t = Instant::now();
        let mut state = cluster::build_state(n, ENDPOINTS);
        let built = t.elapsed();
        let t = Instant::now();
        let model = state.snapshot(IpFamily::V4);
        let snapshot = t.elapsed();
        let mut render_t = Duration::MAX;
        let mut desired = IpvsDesired::default();
        for _ in 0..3 {
            let t = Instant::now();
            desired = render(&model, &config());
            render_t = render_t.min(t.elapsed());
        }
        println!(
            "{n} services × {ENDPOINTS}: {} virtual servers; state built in {}, snapshot {}, \
             render (best of 3) {}",
            desired.services.len(),
            ms(built),
            ms(snapshot),
            ms(render_t)
        );
        if !flag("--no-table") {
            tables.push((n, rt.block_on(table(&desired, runs))));
        }
        if !flag("--no-sync") {
            sync_rows.push((n, rt.block_on(syncs(&mut state))));
        }
    }
    println!();
    if !tables.is_empty() {
        println!(
            "| services × 5 | requests | `ipvsadm -R` (floor) | `ipvsadm -R` of nothing | ours: connect + apply | ours / floor |"
        );
        println!("| --- | --- | --- | --- | --- | --- |");
        for (n, r) in &tables {
            println!(
                "| {n} | {} | {} | {} | {} | {} |",
                n * (1 + ENDPOINTS),
                ms(r.floor),
                ms(r.empty),
                ms(r.ours),
                ratio(r.ours, r.floor)
            );
        }
        println!();
    }
    if !sync_rows.is_empty() {
        println!(
            "| services × 5 | first sync | one-endpoint sync (median of 3) | raw netlink of the change | one-endpoint / raw | periodic sync, no change |"
        );
        println!("| --- | --- | --- | --- | --- | --- |");
        for (n, r) in &sync_rows {
            println!(
                "| {n} | {} | {} | {} | {} | {} |",
                ms(r.first),
                ms(r.partial),
                ms(r.raw),
                ratio(r.partial, r.raw),
                ms(r.periodic)
            );
        }
    }
}
