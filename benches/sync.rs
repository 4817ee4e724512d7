//! Sync cost against the kernel floor, measured in the same run.
//!
//! Builds an upstream-shaped cluster (N ClusterIP services × 5 endpoints), then times:
//! - our work: snapshot of the state store, full render, partial render of one service;
//! - the kernel floor: `iptables-restore` of that full ruleset into a fresh network namespace
//!   (legacy and nft), and a `--noflush` restore of the one-service partial.
//!
//! Prints each figure and its ratio to the floor. Needs root for the floor (network namespace).
//!
//! `cargo bench --bench sync [-- N]` (default N = 10000).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube_proxy_rs::backend::iptables::render::{RenderConfig, RenderInput, SyncScope, render};
use kube_proxy_rs::model::{ClusterState, ServiceName};
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

fn restore(ns: &str, tool: &str, input: &str, noflush: bool) -> Duration {
    let mut args = vec!["netns", "exec", ns, tool, "-w", "5"];
    if noflush {
        args.push("--noflush");
    }
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn iptables-restore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let st = child.wait().expect("wait");
    assert!(st.success(), "{tool} failed");
    t.elapsed()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
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
    let (partial_t, partial) = best_of(5, || {
        render(&RenderInput {
            model: &model2,
            config: &config,
            scope: SyncScope::Partial { changed: &changed },
            existing_nat_chains: None,
        })
    });
    let lines = full.text.lines().count();
    println!(
        "ruleset: {lines} restore lines, {:.1} MB; partial: {} lines",
        full.text.len() as f64 / 1e6,
        partial.text.lines().count()
    );
    println!("ours: snapshot {snap_t:?}, full render {full_t:?}, partial render {partial_t:?}");

    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !is_root {
        println!("kernel floor: not measured (needs root for a network namespace)");
        return;
    }
    for tool in ["iptables-legacy-restore", "iptables-nft-restore"] {
        let ns = format!("kprs-bench-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "add", &ns]).status();
        let first = restore(&ns, tool, &full.text, false);
        let again = restore(&ns, tool, &full.text, false);
        let part = restore(&ns, tool, &partial.text, true);
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let ratio = |ours: Duration, floor: Duration| ours.as_secs_f64() / floor.as_secs_f64();
        println!(
            "{tool}: first load {first:?}, reload {again:?}, partial --noflush {part:?} | \
             full sync ours/floor = {:.3} (snapshot+render {:?} vs reload {again:?}), \
             partial ours/floor = {:.3} (snapshot+render {:?} vs partial restore {part:?})",
            ratio(snap_t + full_t, again),
            snap_t + full_t,
            ratio(snap_t + partial_t, part),
            snap_t + partial_t,
        );
    }
}
