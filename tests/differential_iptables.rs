//! Differential check of iptables mode (issue 7): random clusters rendered by our `render`
//! path and by an independent transcription of upstream's rule generation, judged as
//! upstream's own test helper judges (`sortIPTablesRules`, then equality, then
//! `checkIPTablesRuleJumps`).
//!
//! Knobs (environment):
//! - `DIFFCHECK_SEED=N`: run only case N (prints both sides in full on failure).
//! - `DIFFCHECK_CASES=N`: number of cases (default 200).
//! - `DIFFCHECK_OFF=6,1,7,8,9,10,2,F1` (or `all` for every issue-7 item, `findings` for F1):
//!   switch off the generator features of those items (see `generate::Features`).
//! - `DIFFCHECK_DUMP=1`: also print the generated objects of failing cases.
//! - `DIFFCHECK_SHOW=N`: print the diffs of the first N failing cases (default 3).

#[path = "differential/generate.rs"]
mod generate;
#[path = "differential/judge.rs"]
mod judge;
#[path = "differential/reference.rs"]
mod reference;

use generate::{Case, Features};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;

const DEFAULT_CASES: u64 = 200;

fn typed<T: DeserializeOwned>(values: &[serde_json::Value]) -> Vec<T> {
    values
        .iter()
        .map(|v| serde_json::from_value(v.clone()).expect("generated object fits the API type"))
        .collect()
}

/// The flags as the reference reads them (mirrors what the generator emits).
fn ref_config(args: &[String]) -> reference::RefConfig {
    let mut cfg = reference::RefConfig {
        masquerade_bit: 14,
        localhost_nodeports: true,
        ..Default::default()
    };
    for a in args {
        let (k, v) = a.split_once('=').unwrap_or((a.as_str(), "true"));
        match k {
            "--hostname-override" => cfg.node_name = v.to_string(),
            // The IPv4 proxier's detector takes the IPv4 entry of a dual-stack pair.
            "--cluster-cidr" => {
                cfg.cluster_cidr = v.split(',').find(|c| c.contains('.')).map(str::to_string)
            }
            "--masquerade-all" => cfg.masquerade_all = v == "true",
            "--iptables-masquerade-bit" => cfg.masquerade_bit = v.parse().expect("bit"),
            "--iptables-localhost-nodeports" => cfg.localhost_nodeports = v == "true",
            "--nodeport-addresses" => {
                cfg.nodeport_addresses = v.split(',').map(str::to_string).collect()
            }
            "--bind-address" => cfg.bind_address = Some(v.to_string()),
            "--node-ip" => cfg.node_ip_flag = v.split(',').map(str::to_string).collect(),
            other => panic!("generator emitted a flag the reference does not read: {other}"),
        }
    }
    cfg
}

fn objects_yaml(case: &Case) -> String {
    let mut out = String::new();
    for v in case.nodes.iter().chain(&case.services).chain(&case.slices) {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(v).expect("yaml"));
    }
    out
}

/// Our side: the `render` subcommand's library path on the objects written to a file.
fn ours(case: &Case, dir: &std::path::Path, seed: u64) -> String {
    let path = dir.join(format!("case-{seed}.yaml"));
    std::fs::write(&path, objects_yaml(case)).expect("write objects");
    let mut argv = vec![
        "render".to_string(),
        "--objects".into(),
        path.display().to_string(),
    ];
    argv.extend(case.args.iter().cloned());
    let args = kube_proxy_rs::config::parse_render_args(&argv, "some-host")
        .unwrap_or_else(|e| panic!("seed {seed}: render flags {:?} refused: {e}", case.args));
    let mut warnings = Vec::new();
    // The reference transcribes upstream's IPv4 proxier: compare that family's render.
    let v4 = kube_proxy_rs::model::IpFamily::V4;
    kube_proxy_rs::render::run_family(&args, true, v4, &mut warnings)
        .unwrap_or_else(|e| panic!("seed {seed}: render failed: {e}"))
}

fn theirs(case: &Case) -> String {
    let services: Vec<Service> = typed(&case.services);
    let slices: Vec<EndpointSlice> = typed(&case.slices);
    let nodes: Vec<Node> = typed(&case.nodes);
    reference::render(&services, &slices, &nodes, &ref_config(&case.args))
}

/// Compares one case; `Err` holds the report to print.
fn check(seed: u64, f: Features, dir: &std::path::Path, verbose: bool) -> Result<(), String> {
    let case = generate::case(seed, f);
    let expected_raw = theirs(&case);
    judge::check_jumps(&expected_raw)
        .map_err(|e| format!("seed {seed}: the reference itself is inconsistent: {e}"))?;
    let got_raw = ours(&case, dir, seed);
    let expected = judge::sort_rules(&expected_raw).map_err(|e| format!("seed {seed}: {e}"))?;
    let got = judge::sort_rules(&got_raw).map_err(|e| format!("seed {seed}: ours: {e}"))?;
    let mut report = String::new();
    if expected != got {
        report.push_str(&format!(
            "seed {seed} (flags {:?}): render differs from upstream's rules\n{}",
            case.args,
            judge::minimal_diff(&expected, &got)
        ));
    } else if let Err(e) = judge::check_jumps(&got_raw) {
        report.push_str(&format!("seed {seed}: {e}\n"));
    }
    if report.is_empty() {
        return Ok(());
    }
    if verbose {
        report.push_str(&format!(
            "--- objects\n{}--- expected (sorted)\n{expected}--- got (sorted)\n{got}",
            objects_yaml(&case)
        ));
    }
    Err(report)
}

fn run(f: Features) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dump = std::env::var("DIFFCHECK_DUMP").is_ok();
    if let Ok(seed) = std::env::var("DIFFCHECK_SEED") {
        let seed: u64 = seed.parse().expect("DIFFCHECK_SEED is a number");
        if let Err(r) = check(seed, f, dir.path(), true) {
            panic!("{r}");
        }
        return;
    }
    let cases: u64 = std::env::var("DIFFCHECK_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let start = std::time::Instant::now();
    let mut failures = Vec::new();
    for seed in 0..cases {
        if let Err(r) = check(seed, f, dir.path(), dump) {
            failures.push((seed, r));
        }
    }
    eprintln!(
        "differential check: {cases} cases in {:?}, {} failing",
        start.elapsed(),
        failures.len()
    );
    if !failures.is_empty() {
        let seeds: Vec<u64> = failures.iter().map(|(s, _)| *s).collect();
        let show = std::env::var("DIFFCHECK_SHOW")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(3);
        let shown: Vec<&str> = failures
            .iter()
            .take(show)
            .map(|(_, r)| r.as_str())
            .collect();
        panic!(
            "{} of {cases} cases differ (seeds {seeds:?}); rerun one with DIFFCHECK_SEED=N\n{}",
            failures.len(),
            shown.join("\n")
        );
    }
}

/// Every generated feature, including the issue-7 items.
#[test]
fn render_matches_upstream_rederivation() {
    let off = std::env::var("DIFFCHECK_OFF").unwrap_or_default();
    run(Features::without(&off));
}

/// The same check with the issue-7 items' features (and the known finding F1) switched off:
/// everything else must already agree with upstream.
#[test]
fn render_matches_upstream_rederivation_without_issue7_items() {
    run(Features::without("all,findings"));
}

/// The reference's chain names against upstream's own vectors (proxier_test.go), so the
/// reference cannot drift with ours.
#[test]
fn reference_chain_names_match_upstream_vectors() {
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "svc1", "namespace": "ns1"},
        "spec": {"clusterIP": "172.30.0.41", "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}]}
    }))
    .expect("service");
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "svc1-0", "namespace": "ns1",
            "labels": {"kubernetes.io/service-name": "svc1"}},
        "addressType": "IPv4",
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.180.0.1"]}]
    }))
    .expect("slice");
    let cfg = ref_config(&["--hostname-override=node-a".to_string()]);
    let text = reference::render(&[svc], &[slice], &[], &cfg);
    assert!(
        text.contains(":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]"),
        "{text}"
    );
    assert!(
        text.contains(":KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]"),
        "{text}"
    );
}
