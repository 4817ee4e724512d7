//! nftables mode beside iptables mode, at N services × 5 endpoints, in one run:
//! - full sync: our render + transaction build, and `nft -f` of that transaction into a
//!   fresh network namespace (elapsed and `nft`'s peak RSS, from /usr/bin/time);
//! - one-endpoint change: partial render + transaction, and `nft -f` of it (median of 20
//!   changes, each to another service);
//! - iptables mode's full `iptables-nft-restore` of the same cluster, for comparison.
//!
//! `cargo bench --bench nftables [-- N...]` (default 1000 10000). Needs root.
//! `KPRS_NFT_DUMP_DIR=DIR` writes the transactions there (`full-N.nft`, `partial-N-K.nft`),
//! to time them by hand against the loaded table.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube_proxy_rs::backend::iptables::render as ipt;
use kube_proxy_rs::backend::netfilter::LocalDetector;
use kube_proxy_rs::backend::nftables::render::{is_large, render_ports};
use kube_proxy_rs::backend::nftables::{
    Committed, Owned, Prior, RenderConfig, build, build_partial, render,
};
use kube_proxy_rs::host::NodePortDestinations;
use kube_proxy_rs::model::{IpFamily, ServiceName};
#[path = "common/cluster.rs"]
mod cluster;

/// Runs `tool args` in `ns` with `input` on stdin: (elapsed, peak RSS in KiB).
fn timed(ns: &str, tool: &[&str], input: &str) -> (Duration, u64) {
    let mut args = vec!["-f", "%M", "ip", "netns", "exec", ns];
    args.extend_from_slice(tool);
    let t = Instant::now();
    let mut child = Command::new("/usr/bin/time")
        .args(&args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let elapsed = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{tool:?} failed: {err}");
    let rss = err
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    (elapsed, rss)
}

/// What the proxier keeps between syncs, by the sizes of its parts (heap bytes of names and
/// table slots, allocator rounding not counted).
fn held<'a>(c: &Committed, blocks: impl Iterator<Item = &'a Owned>) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let slot = |cap: usize, entry: usize| cap * (entry + 1);
    let chains =
        c.chains.keys().map(String::capacity).sum::<usize>() + slot(c.chains.capacity(), 32);
    let elements: usize = c
        .elements
        .values()
        .map(|m| {
            m.iter()
                .map(|(k, v)| k.capacity() + v.capacity())
                .sum::<usize>()
                + slot(m.capacity(), 48)
        })
        .sum();
    let (mut names, mut ports) = (0, 0);
    for o in blocks {
        ports += 1;
        names += o
            .chains
            .iter()
            .map(|(n, _)| n.capacity() + 32)
            .sum::<usize>();
        names += o
            .elements
            .iter()
            .map(|(_, k)| k.capacity() + 40)
            .sum::<usize>();
        names += o.sets.iter().map(|n| n.capacity() + 24).sum::<usize>();
    }
    format!(
        "held between syncs: record chains {:.1} MiB ({} names), record elements {:.1} MiB, per-port names {:.1} MiB ({ports} ports)",
        chains as f64 / MIB,
        c.chains.len(),
        elements as f64 / MIB,
        names as f64 / MIB,
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(n: usize) {
    let mut state = cluster::build_state(n, 5);
    let model = state.snapshot(kube_proxy_rs::model::IpFamily::V4);
    let cfg = RenderConfig {
        mark: "0x00004000".into(),
        local_detector: LocalDetector::Cidr("10.0.0.0/8".parse().unwrap()),
        node_ports: NodePortDestinations::Ips(vec!["192.168.0.2".parse().unwrap()]),
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        family: IpFamily::V4,
        ..RenderConfig::default()
    };
    let t = Instant::now();
    let empty = Committed::default();
    let tx = build(&render(&model, &cfg), Prior::Known(&empty), true, true);
    let ours_full = t.elapsed();

    let ns = format!("kprs-nftbench-{}-{n}", std::process::id());
    let _ = Command::new("ip").args(["netns", "add", &ns]).status();
    let (nft_full, nft_rss) = timed(&ns, &["nft", "-f", "-"], &tx.text);
    let dump = std::env::var_os("KPRS_NFT_DUMP_DIR").map(std::path::PathBuf::from);
    if let Some(d) = &dump {
        std::fs::write(d.join(format!("full-{n}.nft")), &tx.text).expect("dump");
    }

    // The proxier's partial path: only the changed service is rendered (its blocks as
    // last committed come from the previous render), then the transaction against the record.
    let large = is_large(&model, &cfg);
    let mut blocks: BTreeMap<_, _> = render_ports(&model, &cfg, large, |_| true)
        .blocks
        .into_iter()
        .map(|b| (b.port.clone(), Owned::of(&b.ops)))
        .collect();
    let mut committed = tx.next;
    let mut ours = Vec::new();
    let mut kernel = Vec::new();
    let mut ops = 0;
    for k in 0..20 {
        let i = (k * 7919) % n;
        let mut slice = cluster::slice_of(i, 5, 0);
        slice
            .endpoints
            .get_or_insert_default()
            .push(k8s_openapi::api::discovery::v1::Endpoint {
                addresses: vec![format!("10.200.{}.{}", k / 250, k % 250)],
                node_name: Some("node2".to_string()),
                ..Default::default()
            });
        state.apply_slice(&slice);
        let changed: BTreeSet<ServiceName> = state.take_changes().services;
        let m = state.snapshot(kube_proxy_rs::model::IpFamily::V4);
        let t = Instant::now();
        let fresh = render_ports(&m, &cfg, is_large(&m, &cfg), |s| {
            changed.contains(&s.name.service)
        });
        let old: Vec<_> = fresh
            .blocks
            .iter()
            .filter_map(|b| blocks.remove(&b.port))
            .collect();
        let ptx = build_partial(cfg.family, &old, &fresh.blocks, committed);
        ours.push(t.elapsed());
        blocks.extend(
            fresh
                .blocks
                .iter()
                .map(|b| (b.port.clone(), Owned::of(&b.ops))),
        );
        ops = ptx.ops;
        if let Some(d) = &dump {
            std::fs::write(d.join(format!("partial-{n}-{k}.nft")), &ptx.text).expect("dump");
        }
        kernel.push(timed(&ns, &["nft", "-f", "-"], &ptx.text).0);
        committed = ptx.next;
    }
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    println!("{}", held(&committed, blocks.values()));

    let icfg = ipt::RenderConfig {
        local_detector: LocalDetector::Cidr("10.0.0.0/8".parse().unwrap()),
        random_fully: true,
        ..ipt::RenderConfig::default()
    };
    let t = Instant::now();
    let itext = ipt::render(&ipt::RenderInput {
        model: &model,
        config: &icfg,
        scope: ipt::SyncScope::Full,
        existing_nat_chains: None,
    })
    .text;
    let ours_ipt = t.elapsed();
    let ns = format!("kprs-iptbench-{}-{n}", std::process::id());
    let _ = Command::new("ip").args(["netns", "add", &ns]).status();
    let (ipt_full, ipt_rss) = timed(&ns, &["iptables-nft-restore", "-w", "5"], &itext);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();

    println!(
        "| {n} | nftables | {ours_full:.2?} | {nft_full:.2?} | {} MiB | {:.2?} + {:.2?} ({ops} ops) |",
        nft_rss / 1024,
        median(ours),
        median(kernel),
    );
    println!(
        "| {n} | iptables | {ours_ipt:.2?} | {ipt_full:.2?} | {} MiB | |",
        ipt_rss / 1024
    );
}

fn main() {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() {
        vec![1000, 10_000]
    } else {
        ns
    };
    println!(
        "| services (x5 endpoints) | mode | render full | kernel load (first) | tool peak RSS | one-endpoint change: render + kernel (median of 20) |"
    );
    println!("|---|---|---|---|---|---|");
    for n in ns {
        run(n);
    }
}
