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
//! `cargo bench --bench sync [-- [--render-only] N...]` (default N = 10000).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube_proxy_rs::backend::iptables::proxier::IptablesProxier;
use kube_proxy_rs::backend::iptables::render::{
    RenderCache, RenderConfig, RenderInput, SharedChains, SyncScope, render,
};
use kube_proxy_rs::backend::{Backend, SyncRequest};
use kube_proxy_rs::kernel::iptables::{Iptables, IptablesVariant};
use kube_proxy_rs::kernel::{Addresses, Conntrack, IpFamily};
use kube_proxy_rs::model::{ClusterState, ProxyModel, ServiceName};
use serde_json::json;

fn build_state(n: usize) -> ClusterState {
    let mut st = ClusterState::new("node1");
    for i in 0..n {
        let (hi, lo) = (i / 250, i % 250);
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"namespace": "bench", "name": format!("svc{i}")},
            "spec": {"clusterIP": format!("10.96.{hi}.{lo}"), "ports": [{"name": "p80", "port": 80}]}
        }))
        .unwrap();
        st.apply_service(&svc);
        let eps: Vec<_> = (0..5)
            .map(|e| json!({"addresses": [format!("10.{}.{}.{}", 100 + e, hi, lo)], "nodeName": "node2"}))
            .collect();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "bench", "name": format!("svc{i}-1"),
                         "labels": {"kubernetes.io/service-name": format!("svc{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "p80", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps
        }))
        .unwrap();
        st.apply_slice(&slice);
    }
    st.take_changes();
    st
}

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

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000]
    } else {
        sizes
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let render_only = std::env::args().any(|a| a == "--render-only");
    for n in sizes {
        bench(&rt, n, render_only);
    }
}

fn bench(rt: &tokio::runtime::Runtime, n: usize, render_only: bool) {
    let t = Instant::now();
    let mut state = build_state(n);
    println!(
        "cluster: {n} services x 5 endpoints (state built in {:?})",
        t.elapsed()
    );

    let (snap_t, model) = best_of(3, || state.snapshot(kube_proxy_rs::model::IpFamily::V4));
    let config = RenderConfig {
        local_detector: kube_proxy_rs::backend::iptables::render::LocalDetector::Cidr(
            "10.0.0.0/8".parse().unwrap(),
        ),
        random_fully: true,
        ..RenderConfig::default()
    };
    let (full_t, full) = best_of(3, || {
        render(&RenderInput {
            model: &model,
            config: &config,
            scope: SyncScope::Full,
            existing_nat_chains: None,
        })
    });
    // One endpoint change in one service: what a partial sync writes.
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": "svc7-1", "labels": {"kubernetes.io/service-name": "svc7"}},
        "addressType": "IPv4", "ports": [{"name": "p80", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.200.0.7"]}]
    }))
    .unwrap();
    state.apply_slice(&slice);
    let changed: BTreeSet<ServiceName> = state.take_changes().services;
    let model2 = state.snapshot(kube_proxy_rs::model::IpFamily::V4);
    // As the daemon renders it: the cache holds the previous sync's services.
    let mut cache = RenderCache::default();
    let input = |model, scope| RenderInput {
        model,
        config: &config,
        scope,
        existing_nat_chains: None,
    };
    // Without the cache (every unchanged service formatted to count its rules, as before).
    let (uncached_t, _) = best_of(3, || {
        render(&input(&model2, SyncScope::Partial { changed: &changed }))
    });
    cache.render(&input(&model, SyncScope::Full), SharedChains::Rewrite);
    let (partial_t, partial) = best_of(5, || {
        cache.render(
            &input(&model2, SyncScope::Partial { changed: &changed }),
            SharedChains::Rewrite,
        )
    });
    let lines = full.text.lines().count();
    println!(
        "ruleset: {lines} restore lines, {:.1} MB; partial: {} lines",
        full.text.len() as f64 / 1e6,
        partial.text.lines().count()
    );
    println!(
        "ours: snapshot {snap_t:?}, full render {full_t:?}, partial render {partial_t:?} \
         (without the cache: {uncached_t:?})"
    );
    if render_only {
        return;
    }
    if !is_root() {
        println!("kernel: not measured (needs root for a network namespace)");
        return;
    }
    let none = BTreeSet::new();
    for (variant, tool) in [
        (IptablesVariant::Legacy, "iptables-legacy-restore"),
        (IptablesVariant::Nft, "iptables-nft-restore"),
    ] {
        // The floor: the daemon's starting state (an empty sync creates the jump rules and
        // canaries), then the whole ruleset in one restore.
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
        let floor = restore(&floor_ns.0, tool, &full.text);
        drop(floor_ns);

        let ns = Netns::new("daemon");
        let mut p = proxier(&ns, variant, &config);
        let first = sync(rt, &mut p, &model, &none, true, &config);
        let part = sync(rt, &mut p, &model2, &changed, false, &config);
        let raw_part = restore(&ns.0, tool, &partial.text);
        let resync = if variant == IptablesVariant::Nft && n > 2_000 {
            None
        } else {
            Some(sync(rt, &mut p, &model2, &none, true, &config))
        };
        println!(
            "{tool} n={n}: floor (one restore, as the daemon calls it) {} | daemon first sync {:.3}s \
             | partial sync {:.3}s (raw restore {}) | full re-sync {}",
            show(floor),
            first.as_secs_f64(),
            part.as_secs_f64(),
            show(raw_part),
            resync.map_or("not run (quadratic, see docs)".to_string(), |d| format!(
                "{:.3}s",
                d.as_secs_f64()
            )),
        );
    }
}
