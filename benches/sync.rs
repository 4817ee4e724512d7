//! Sync cost against the kernel floor, measured in the same run.
//!
//! Builds an upstream-shaped cluster (N ClusterIP services × 5 endpoints), then times:
//! - our work: snapshot of the state store, full render, partial render of one service;
//! - the kernel floor, exactly as the daemon calls the kernel: one `iptables-restore -w 5
//!   --noflush --counters` of the full ruleset into a fresh network namespace holding what
//!   the daemon creates before its first restore (jump rules, canaries), legacy and nft;
//! - the daemon's own syncs through the iptables backend in a fresh namespace: the first full
//!   sync, a one-endpoint partial sync (and its raw restore), a full re-sync.
//!
//! A restore that takes longer than the cap is stopped and reported as `>cap`. Needs root.
//!
//! Also: the partial render without the render cache (as before) and with it (shared chains
//! rewritten or edited), the RSS of a fresh process holding each cluster (state store, model
//! snapshot, render cache), and the state store's EndpointSlice update throughput.
//!
//! `cargo bench --bench sync [-- [--render-only] [--no-floor] [--parts [--chunks A,B]]
//! SIZE...]`, SIZE = `N` (N services × 5 endpoints) or `NxE` (default 10000). `--parts` times
//! the first sync's steps one by one instead of the backend's syncs.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube_proxy_rs::backend::iptables::proxier::IptablesProxier;
use kube_proxy_rs::backend::iptables::render::{
    RenderCache, RenderConfig, RenderInput, SharedChains, SyncScope, render,
};
use kube_proxy_rs::backend::netfilter::Dump;
use kube_proxy_rs::backend::netfilter::restore::{NEW_CHAINS_PER_RESTORE, split_new_chains};
use kube_proxy_rs::backend::{Backend, SyncRequest};
use kube_proxy_rs::kernel::iptables::{Iptables, IptablesVariant};
use kube_proxy_rs::kernel::{Addresses, Conntrack, IpFamily};
use kube_proxy_rs::model::{ProxyModel, ServiceName};
#[path = "common/cluster.rs"]
mod cluster;
use cluster::{build_state, slice_of};

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        last = Some(v);
    }
    (best, last.expect("runs > 0"))
}

/// CPU time this thread has used (utime + stime from `/proc/thread-self/stat`, in clock
/// ticks of 10 ms): on a shared machine it says more about our work than wall time does.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Duration::from_millis(10 * fields.iter().sum::<u64>())
}

/// Mean CPU time of `f` over `runs` runs.
fn cpu_per_run<T>(runs: u32, mut f: impl FnMut() -> T) -> Duration {
    let start = thread_cpu();
    for _ in 0..runs {
        std::hint::black_box(f());
    }
    thread_cpu().saturating_sub(start) / runs
}

/// The longest a single restore may take before it is stopped.
const CAP: Duration = Duration::from_secs(180);

/// `iptables-restore` as the daemon calls it (`-w 5 --noflush --counters`); `None` past `CAP`.
fn restore(ns: &str, tool: &str, input: &str) -> Option<Duration> {
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            tool,
            "-w",
            "5",
            "--noflush",
            "--counters",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn iptables-restore");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let _ = writer.join();
            assert!(st.success(), "{tool} failed");
            return Some(t.elapsed());
        }
        if t.elapsed() > CAP {
            let _ = child.kill();
            let _ = child.wait();
            let _ = writer.join();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn show(d: Option<Duration>) -> String {
    d.map_or(format!(">{}s", CAP.as_secs()), |d| {
        format!("{:.3}s", d.as_secs_f64())
    })
}

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("kprs-bench-{}-{tag}", std::process::id());
        if std::path::Path::new("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        let ok = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(ok.is_ok_and(|s| s.success()), "ip netns add {name}");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn proxier(ns: &Netns, variant: IptablesVariant, config: &RenderConfig) -> IptablesProxier {
    IptablesProxier::new(
        Iptables::new(variant, IpFamily::V4).with_netns(&ns.0),
        Conntrack::new().with_netns(&ns.0),
        Addresses::new().with_netns(&ns.0),
        config.clone(),
    )
}

/// One sync through the backend, as the sync loop asks for it.
fn sync(
    rt: &tokio::runtime::Runtime,
    p: &mut IptablesProxier,
    model: &ProxyModel,
    changed: &BTreeSet<ServiceName>,
    full: bool,
    config: &RenderConfig,
) -> Duration {
    let facts = kube_proxy_rs::host::NodeFacts {
        local_detector: config.local_detector.clone(),
        ..Default::default()
    };
    let t = Instant::now();
    rt.block_on(p.sync(SyncRequest {
        model,
        changed,
        full,
        node_facts: &facts,
    }))
    .expect("sync");
    t.elapsed()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

/// One cluster size: `services` × `endpoints` each.
#[derive(Clone, Copy)]
struct Size {
    services: usize,
    endpoints: usize,
}

impl Size {
    /// `N` (× 5 endpoints) or `NxE`.
    fn parse(s: &str) -> Option<Size> {
        let (n, e) = s.split_once('x').unwrap_or((s, "5"));
        Some(Size {
            services: n.parse().ok()?,
            endpoints: e.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} × {}", self.services, self.endpoints)
    }
}

/// VmHWM and VmRSS of this process, in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn bench_config() -> RenderConfig {
    RenderConfig {
        local_detector: kube_proxy_rs::backend::iptables::render::LocalDetector::Cidr(
            "10.0.0.0/8".parse().unwrap(),
        ),
        random_fully: true,
        ..RenderConfig::default()
    }
}

/// In a fresh process (`--rss-child SIZE`): the state the daemon keeps with the cluster
/// loaded (state store, model snapshot, render cache after a full render whose text is then
/// dropped), then VmHWM and VmRSS.
fn rss_child(size: Size) {
    let state = build_state(size.services, size.endpoints);
    let model = state.snapshot(kube_proxy_rs::model::IpFamily::V4);
    let config = bench_config();
    let mut cache = RenderCache::default();
    let r = cache.render(
        &RenderInput {
            model: &model,
            config: &config,
            scope: SyncScope::Full,
            existing_nat_chains: None,
        },
        SharedChains::Edit,
    );
    drop(r);
    let (hwm, rss) = rss_mib();
    println!("{hwm:.0} {rss:.0}");
}

/// VmHWM and VmRSS (MiB) of a fresh process holding `size`'s cluster.
fn rss_of(size: Size) -> Option<(f64, f64)> {
    let exe = std::env::current_exe().ok()?;
    let arg = format!("{}x{}", size.services, size.endpoints);
    let out = Command::new(exe)
        .args(["--rss-child", &arg])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = text.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some((w.next()??, w.next()??))
}

/// EndpointSlice updates applied to the state store per second at `size` (one endpoint
/// changed per update, objects decoded beforehand, as the watch hands them over), and the
/// per-sync change collection.
fn model_throughput(size: Size) -> f64 {
    let mut state = build_state(size.services, size.endpoints);
    let updates: Vec<_> = (0..50_000)
        .map(|k| slice_of((k * 7919) % size.services, size.endpoints, 1 + k % 2))
        .collect();
    let t = Instant::now();
    for (k, slice) in updates.iter().enumerate() {
        state.apply_slice(slice);
        if k % 100 == 99 {
            state.take_changes();
        }
    }
    updates.len() as f64 / t.elapsed().as_secs_f64()
}

/// One row of the summary table.
#[derive(Default)]
struct Row {
    size: String,
    full_render: String,
    partial_uncached: String,
    partial_rewrite: String,
    partial_edit: String,
    rss: String,
    kernel: Vec<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--rss-child") {
        if let Some(size) = args.get(i + 1).and_then(|a| Size::parse(a)) {
            rss_child(size);
        }
        return;
    }
    let flag = |f: &str| args.iter().any(|a| a == f);
    let sizes: Vec<Size> = args.iter().filter_map(|a| Size::parse(a)).collect();
    let sizes = if sizes.is_empty() {
        vec![Size {
            services: 10_000,
            endpoints: 5,
        }]
    } else {
        sizes
    };
    let opts = Opts {
        render_only: flag("--render-only"),
        no_floor: flag("--no-floor"),
        parts: flag("--parts"),
        chunks: args
            .iter()
            .position(|a| a == "--chunks")
            .and_then(|i| args.get(i + 1))
            .map(|l| l.split(',').filter_map(|c| c.parse().ok()).collect())
            .unwrap_or_else(|| vec![NEW_CHAINS_PER_RESTORE]),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    for size in &sizes {
        rows.push(bench(&rt, *size, &opts));
    }
    let through = Size {
        services: 10_000,
        endpoints: 5,
    };
    let per_sec = model_throughput(through);
    println!();
    println!(
        "| Services × endpoints | full render: best wall time (mean CPU time) | partial render, 1 endpoint: no cache (before) / cache, KUBE-SERVICES rewritten / cache, edited | bench process VmHWM / VmRSS, cluster loaded |"
    );
    println!("| --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} / {} / {} | {} |",
            r.size, r.full_render, r.partial_uncached, r.partial_rewrite, r.partial_edit, r.rss
        );
    }
    if rows.iter().any(|r| !r.kernel.is_empty()) {
        println!();
        println!(
            "| Services × endpoints | back end | floor: one full restore | daemon first sync | daemon one-endpoint partial sync (edit) | raw restore: edit input / rewrite input (before) | full re-sync |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for r in &rows {
            for k in &r.kernel {
                println!("| {} | {k} |", r.size);
            }
        }
    }
    println!();
    println!("model throughput at {through}: {per_sec:.0} EndpointSlice updates/s");
}

struct Opts {
    render_only: bool,
    no_floor: bool,
    /// `--parts`: the first sync's steps timed one by one, per chunk size in `chunks`.
    parts: bool,
    /// `--chunks A,B`: new chains per preparatory nft transaction (default the daemon's).
    chunks: Vec<usize>,
}

/// The first sync's steps, timed one by one in a fresh namespace in the daemon's starting
/// state: `iptables-save -t nat` and its parse, the render, the split into transactions
/// (nft; `chunk` new chains each), and each `iptables-restore`.
fn first_sync_parts(
    rt: &tokio::runtime::Runtime,
    variant: IptablesVariant,
    tool: &str,
    model: &ProxyModel,
    config: &RenderConfig,
    chunk: usize,
) -> String {
    let ns = Netns::new("parts");
    let empty = ProxyModel::default();
    sync(
        rt,
        &mut proxier(&ns, variant, config),
        &empty,
        &BTreeSet::new(),
        true,
        config,
    );
    let save_tool = tool.replace("-restore", "-save");
    let t = Instant::now();
    let saved = Command::new("ip")
        .args(["netns", "exec", &ns.0, &save_tool, "-t", "nat"])
        .output()
        .expect("iptables-save");
    let save_t = t.elapsed();
    let t = Instant::now();
    let existing = Dump::parse(&String::from_utf8_lossy(&saved.stdout))
        .expect("parse")
        .chain_names("nat");
    let parse_t = t.elapsed();
    let t = Instant::now();
    let rendered = render(&RenderInput {
        model,
        config,
        scope: SyncScope::Full,
        existing_nat_chains: Some(&existing),
    });
    let render_t = t.elapsed();
    let t = Instant::now();
    let parts = if variant == IptablesVariant::Nft {
        split_new_chains(&rendered.text, "nat", &existing, chunk)
    } else {
        vec![rendered.text.clone()]
    };
    let split_t = t.elapsed();
    let times: Vec<Duration> = parts
        .iter()
        .map(|p| restore(&ns.0, tool, p).unwrap_or(CAP))
        .collect();
    let (last, new) = times.split_last().expect("one part at least");
    let new_sum: Duration = new.iter().sum();
    format!(
        "{tool} first sync parts (chunk {chunk}): save {}, parse {}, render {}, split {}; \
         {} new-chain restores {:.2} s (first {}, last {}), final restore {:.2} s; total {:.2} s",
        ms(save_t),
        ms(parse_t),
        ms(render_t),
        ms(split_t),
        new.len(),
        new_sum.as_secs_f64(),
        new.first().map_or("-".into(), |d| ms(*d)),
        new.last().map_or("-".into(), |d| ms(*d)),
        last.as_secs_f64(),
        (save_t + parse_t + render_t + split_t + new_sum + *last).as_secs_f64(),
    )
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    }
}

fn bench(rt: &tokio::runtime::Runtime, size: Size, opts: &Opts) -> Row {
    let n = size.services;
    let t = Instant::now();
    let mut state = build_state(n, size.endpoints);
    println!("cluster: {size} (state built in {:?})", t.elapsed());
    let (snap_t, model) = best_of(3, || state.snapshot(kube_proxy_rs::model::IpFamily::V4));
    let config = bench_config();
    let input = |model, scope| RenderInput {
        model,
        config: &config,
        scope,
        existing_nat_chains: None,
    };
    let (full_t, full) = best_of(3, || render(&input(&model, SyncScope::Full)));
    let cpu_runs = if n > 10_000 { 4 } else { 10 };
    let full_cpu = cpu_per_run(cpu_runs, || render(&input(&model, SyncScope::Full)));
    // One endpoint change in one service: what a partial sync writes.
    state.apply_slice(&slice_of(7, size.endpoints, 1));
    let changed: BTreeSet<ServiceName> = state.take_changes().services;
    let model2 = state.snapshot(kube_proxy_rs::model::IpFamily::V4);
    let partial_scope = SyncScope::Partial { changed: &changed };
    // Without the cache: every unchanged service formatted to count its rules (before).
    let (uncached_t, rewrite_text) = best_of(3, || render(&input(&model2, partial_scope)).text);
    // As the daemon renders: the cache holds the previous sync's services.
    let timed = |shared| {
        let mut cache = RenderCache::default();
        cache.render(&input(&model, SyncScope::Full), shared);
        // The same change rendered again writes the same text: the daemon's steady state.
        best_of(5, || cache.render(&input(&model2, partial_scope), shared))
    };
    let (rewrite_t, _) = timed(SharedChains::Rewrite);
    let (edit_t, edit) = timed(SharedChains::Edit);
    // The model's pass over every service that each render makes (src/model).
    let (health_t, _) = best_of(5, || model2.health_checks());
    let rss = rss_of(size).map_or("?".into(), |(h, r)| format!("{h:.0} / {r:.0} MiB"));
    println!(
        "ruleset: {} restore lines, {:.1} MB; partial: {} lines (rewrite), {} lines (edit)",
        full.text.lines().count(),
        full.text.len() as f64 / 1e6,
        rewrite_text.lines().count(),
        edit.text.lines().count()
    );
    println!(
        "ours: snapshot {snap_t:?}, full render {full_t:?} (CPU {full_cpu:?}), partial render {uncached_t:?} without \
         the cache, {rewrite_t:?} cached (rewrite), {edit_t:?} cached (edit), of which \
         model.health_checks() {health_t:?}; RSS {rss}"
    );
    let mut row = Row {
        size: size.to_string(),
        full_render: format!("{} (CPU {})", ms(full_t), ms(full_cpu)),
        partial_uncached: ms(uncached_t),
        partial_rewrite: ms(rewrite_t),
        partial_edit: ms(edit_t),
        rss,
        kernel: Vec::new(),
    };
    if opts.render_only {
        return row;
    }
    if !is_root() {
        println!("kernel: not measured (needs root for a network namespace)");
        return row;
    }
    if opts.parts {
        for (variant, tool) in [
            (IptablesVariant::Legacy, "iptables-legacy-restore"),
            (IptablesVariant::Nft, "iptables-nft-restore"),
        ] {
            let chunks = if variant == IptablesVariant::Nft {
                opts.chunks.clone()
            } else {
                vec![0]
            };
            for chunk in chunks {
                let line = first_sync_parts(rt, variant, tool, &model, &config, chunk);
                println!("{line}");
            }
        }
        return row;
    }
    let none = BTreeSet::new();
    for (variant, tool) in [
        (IptablesVariant::Legacy, "iptables-legacy-restore"),
        (IptablesVariant::Nft, "iptables-nft-restore"),
    ] {
        // The floor: the daemon's starting state (an empty sync creates the jump rules and
        // canaries), then the whole ruleset in one restore.
        let floor = if opts.no_floor {
            "not run".to_string()
        } else {
            let floor_ns = Netns::new("floor");
            let empty = ProxyModel::default();
            sync(
                rt,
                &mut proxier(&floor_ns, variant, &config),
                &empty,
                &none,
                true,
                &config,
            );
            show(restore(&floor_ns.0, tool, &full.text))
        };
        let ns = Netns::new("daemon");
        let mut p = proxier(&ns, variant, &config);
        let first = sync(rt, &mut p, &model, &none, true, &config);
        let part = sync(rt, &mut p, &model2, &changed, false, &config);
        // Both partial inputs are idempotent here: chains flushed and refilled, no -D/-I
        // (the change keeps svc7's KUBE-SERVICES rule).
        let raw_edit = restore(&ns.0, tool, &edit.text);
        let raw_rewrite = restore(&ns.0, tool, &rewrite_text);
        let resync = if (variant == IptablesVariant::Nft && n > 2_000) || n > 10_000 {
            "not run".to_string()
        } else {
            format!(
                "{:.2} s",
                sync(rt, &mut p, &model2, &none, true, &config).as_secs_f64()
            )
        };
        let line = format!(
            "{} | {floor} | {:.2} s | {} | {} / {} | {resync}",
            tool.trim_end_matches("-restore"),
            first.as_secs_f64(),
            ms(part),
            show(raw_edit),
            show(raw_rewrite),
        );
        println!("{line}");
        row.kernel.push(line);
    }
    row
}
