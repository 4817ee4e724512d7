//! nftables mode against the real kernel, in fresh network namespaces: every rendered
//! transaction passes `nft --check`, a sync leaves exactly the desired table, a repeated
//! sync writes nothing, partial syncs converge to what a fresh full sync writes, and a failed
//! transaction leaves the previous ruleset and is repaired by the next (full) sync.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use kube_proxy_rs::backend::netfilter::LocalDetector;
use kube_proxy_rs::backend::nftables::proxier::{NftablesProxier, render_config};
use kube_proxy_rs::backend::nftables::{Committed, Prior, RenderConfig, Table, build, render};
use kube_proxy_rs::backend::{Backend, BackendError, SyncRequest};
use kube_proxy_rs::config::parse_render_args;
use kube_proxy_rs::host::{NodeFacts, NodePortDestinations};
use kube_proxy_rs::kernel::nft::Nft;
use kube_proxy_rs::kernel::{Addresses, Conntrack};
use kube_proxy_rs::model::{
    Endpoint, IpFamily, Protocol, ProxyModel, ServiceName, ServicePort, ServicePortName,
    ServiceType,
};
use kube_proxy_rs::render::{DEMO_CLUSTER, state_from};
use kube_proxy_rs::watch::file::{Objects, parse_objects};
use support::netns::Netns;

const FLAGS: [&str; 2] = ["--proxy-mode=nftables", "--cluster-cidr=10.244.0.0/16"];

fn demo_model() -> ProxyModel {
    let mut o = Objects::default();
    parse_objects("demo", DEMO_CLUSTER, &mut o, &mut Vec::new()).unwrap();
    state_from(&o, "node1", &mut Vec::new()).snapshot(kube_proxy_rs::model::IpFamily::V4)
}

fn options() -> kube_proxy_rs::config::ProxyOptions {
    let args: Vec<String> = FLAGS.iter().map(|s| s.to_string()).collect();
    parse_render_args(&args, "node1").unwrap().options
}

fn facts(model: &ProxyModel) -> NodeFacts {
    kube_proxy_rs::host::HostSettings::from_options(&options())
        .facts(&model.node, kube_proxy_rs::model::IpFamily::V4)
}

fn proxier(ns: &Netns) -> NftablesProxier {
    NftablesProxier::new(
        Nft::new().with_netns(ns.name()),
        Conntrack::new().with_netns(ns.name()),
        Addresses::new().with_netns(ns.name()),
        render_config(&options(), IpFamily::V4),
    )
}

async fn sync(p: &mut NftablesProxier, model: &ProxyModel, full: bool) -> Result<(), BackendError> {
    sync_outcome(p, model, full).await.map(drop)
}

async fn sync_outcome(
    p: &mut NftablesProxier,
    model: &ProxyModel,
    full: bool,
) -> Result<kube_proxy_rs::backend::SyncOutcome, BackendError> {
    p.sync(SyncRequest {
        model,
        changed: &changed_services(),
        full,
        node_facts: &facts(model),
    })
    .await
}

/// The kernel's table as read back with `nft -j`: rules per chain (in order) and elements
/// per set, handles dropped, so two equal states compare equal whatever their history.
#[derive(Debug, PartialEq, Eq)]
struct KernelState {
    chains: BTreeMap<String, Vec<String>>,
    sets: BTreeMap<String, BTreeSet<String>>,
}

fn kernel_state(ns: &Netns, family: &str) -> KernelState {
    let text = ns.run_ok("nft", ["-j", "list", "table", family, "kube-proxy"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut st = KernelState {
        chains: BTreeMap::new(),
        sets: BTreeMap::new(),
    };
    for obj in v["nftables"].as_array().unwrap() {
        if let Some(c) = obj.get("chain") {
            st.chains
                .entry(c["name"].as_str().unwrap().to_string())
                .or_default();
        } else if let Some(r) = obj.get("rule") {
            let rule = format!(
                "{} {}",
                r["expr"],
                r.get("comment").unwrap_or(&serde_json::Value::Null)
            );
            st.chains
                .entry(r["chain"].as_str().unwrap().to_string())
                .or_default()
                .push(rule);
        } else if let Some(s) = obj.get("set").or_else(|| obj.get("map")) {
            let elems = st
                .sets
                .entry(s["name"].as_str().unwrap().to_string())
                .or_default();
            if let Some(list) = s.get("elem").and_then(|e| e.as_array()) {
                elems.extend(list.iter().map(|e| e.to_string()));
            }
        }
    }
    st
}

/// What the in-memory table says a first full sync of `model` leaves.
fn desired(model: &ProxyModel, cfg: &RenderConfig) -> Table {
    let tx = build(
        &render(model, cfg),
        Prior::Known(&Committed::default()),
        true,
        true,
    );
    let mut t = Table::default();
    t.apply(&tx.text).unwrap();
    t
}

fn assert_matches_desired(k: &KernelState, want: &Table) {
    let names: BTreeSet<&String> = k.chains.keys().collect();
    assert_eq!(names, want.chains.keys().collect());
    for (name, c) in &want.chains {
        assert_eq!(
            k.chains[name].len(),
            c.rules.len(),
            "rules of {name}: {:#?}",
            k.chains[name]
        );
    }
    let sets: BTreeSet<&String> = k.sets.keys().collect();
    assert_eq!(sets, want.sets.keys().collect());
    for (name, s) in &want.sets {
        assert_eq!(k.sets[name].len(), s.elements.len(), "elements of {name}");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A small IPv6 model: NodePort with two endpoints, one with affinity, one without endpoints.
fn v6_model() -> ProxyModel {
    let name = |n: &str| ServicePortName::new("ns", n, "p", Protocol::Tcp);
    let mut np = ServicePort::basic(name("np"), ip("fd00:10:96::1"), 80);
    np.service_type = ServiceType::NodePort;
    np.node_port = 30001;
    let mut aff = ServicePort::basic(name("aff"), ip("fd00:10:96::2"), 80);
    aff.session_affinity_timeout = Some(600);
    let empty = ServicePort::basic(name("empty"), ip("fd00:10:96::3"), 80);
    let mut m = ProxyModel::default();
    for s in [np, aff, empty] {
        m.services.insert(s.name.clone(), s);
    }
    let eps = vec![
        Endpoint::ready(ip("fd00:10:244::5"), 8080),
        Endpoint::ready(ip("fd00:10:244::6"), 8080),
    ];
    m.endpoints.insert(name("np"), eps.clone());
    m.endpoints.insert(name("aff"), eps);
    m
}

#[tokio::test]
async fn every_rendered_transaction_passes_nft_check() {
    support::require_root();
    let ns = Netns::new("nftchk");
    let nft = Nft::new().with_netns(ns.name());
    let demo = demo_model();
    let base = RenderConfig {
        local_detector: LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
        node_ports: NodePortDestinations::Ips(vec![ip("192.168.50.1")]),
        primary_node_ip: Some(ip("192.168.50.1")),
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ..RenderConfig::default()
    };
    let v6 = RenderConfig {
        family: IpFamily::V6,
        local_detector: LocalDetector::Cidr("fd00:10:244::/64".parse().unwrap()),
        node_ports: NodePortDestinations::AllLocal,
        primary_node_ip: None,
        service_cidrs: vec!["fd00:10:96::/112".parse().unwrap()],
        ..base.clone()
    };
    let cases = [
        ("cidr detector, node IPs", &demo, base.clone()),
        (
            "match-all node ports, masquerade-all, bridge",
            &demo,
            RenderConfig {
                node_ports: NodePortDestinations::AllLocal,
                masquerade_all: true,
                local_detector: LocalDetector::BridgeInterface("cbr0".into()),
                ..base.clone()
            },
        ),
        (
            "interface prefix, no ServiceCIDR",
            &demo,
            RenderConfig {
                local_detector: LocalDetector::InterfaceNamePrefix("veth".into()),
                service_cidrs: Vec::new(),
                ..base.clone()
            },
        ),
        ("no detector", &demo, RenderConfig::default()),
        (
            "large-cluster layout",
            &demo,
            RenderConfig {
                large_cluster_threshold: 0,
                ..base.clone()
            },
        ),
        ("IPv6", &v6_model(), v6),
    ];
    for (what, model, cfg) in cases {
        let tx = build(
            &render(model, &cfg),
            Prior::Known(&Committed::default()),
            true,
            true,
        );
        if let Err(e) = nft.check(&tx.text).await {
            panic!("{what}: {e}\n{}", tx.text);
        }
    }
}

#[tokio::test]
async fn sync_leaves_the_desired_table_and_a_repeat_writes_nothing() {
    support::require_root();
    let ns = Netns::new("nftsync");
    let model = demo_model();
    let mut p = proxier(&ns);
    sync(&mut p, &model, true).await.unwrap();
    let k = kernel_state(&ns, "ip");
    assert_matches_desired(&k, &desired(&model, p.config()));
    // The hooks are upstream's.
    let listing = ns.run_ok(
        "nft",
        ["list", "chain", "ip", "kube-proxy", "filter-forward"],
    );
    assert!(
        listing.contains("type filter hook forward priority filter; policy accept;"),
        "{listing}"
    );

    sync(&mut p, &model, false).await.unwrap();
    assert_eq!(
        p.last_operations(),
        0,
        "an unchanged partial sync writes nothing"
    );
    sync(&mut p, &model, true).await.unwrap();
    assert!(p.last_operations() > 0);
    assert_eq!(
        kernel_state(&ns, "ip"),
        k,
        "a later full sync changes nothing"
    );
}

/// The services [`changed`] changes: what the sync loop names in every partial sync here
/// (re-rendering an unchanged service writes nothing).
fn changed_services() -> BTreeSet<ServiceName> {
    ["web", "legacy", "shop"]
        .into_iter()
        .map(|n| ServiceName::new("demo", n))
        .collect()
}

/// Another model: one endpoint added to `web` and to `shop` (session affinity: its rules
/// name sets), `legacy` removed.
fn changed(model: &ProxyModel) -> ProxyModel {
    let mut m = model.clone();
    for (name, ep) in [("web", "10.244.9.9"), ("shop", "10.244.9.10")] {
        let port = m
            .services
            .keys()
            .find(|k| k.service == ServiceName::new("demo", name))
            .unwrap()
            .clone();
        m.endpoints
            .get_mut(&port)
            .unwrap()
            .push(Endpoint::ready(ip(ep), 8080));
    }
    m.services.retain(|k, _| k.service.name != "legacy");
    m.endpoints.retain(|k, _| k.service.name != "legacy");
    m
}

#[tokio::test]
async fn partial_syncs_converge_to_a_fresh_full_sync() {
    support::require_root();
    let a = Netns::new("nftpa");
    let b = Netns::new("nftpb");
    let m1 = demo_model();
    let m2 = changed(&m1);
    let mut pa = proxier(&a);
    sync(&mut pa, &m1, true).await.unwrap();
    let full_ops = pa.last_operations();
    sync(&mut pa, &m2, false).await.unwrap();
    let partial_ops = pa.last_operations();
    assert!(
        partial_ops < full_ops / 4,
        "partial sync wrote {partial_ops} of {full_ops} operations"
    );
    assert!(
        pa.pending_stale_chains() > 0,
        "legacy's chains wait for deletion"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A sync soon after leaves them (deleting them would make nft fetch every chain)...
    sync(&mut pa, &m2, false).await.unwrap();
    assert!(pa.pending_stale_chains() > 0);
    // ... the loop's idle check deletes them.
    assert!(!pa.needs_full_sync().await);
    assert_eq!(pa.pending_stale_chains(), 0);

    let mut pb = proxier(&b);
    sync(&mut pb, &m2, true).await.unwrap();
    assert_eq!(kernel_state(&a, "ip"), kernel_state(&b, "ip"));
    assert_matches_desired(&kernel_state(&a, "ip"), &desired(&m2, pa.config()));
}

#[tokio::test]
async fn failed_transaction_keeps_the_ruleset_and_the_next_sync_repairs_it() {
    support::require_root();
    let ns = Netns::new("nftfail");
    let m1 = demo_model();
    let m2 = changed(&m1);
    let mut p = proxier(&ns);
    sync(&mut p, &m1, true).await.unwrap();
    // Someone else removes an element our record says is there; removing `legacy` must
    // delete it, so the partial transaction fails as a whole.
    ns.run_ok(
        "nft",
        [
            "delete",
            "element",
            "ip",
            "kube-proxy",
            "cluster-ips",
            "{ 10.96.0.100 }",
        ],
    );
    let before = kernel_state(&ns, "ip");
    let err = sync(&mut p, &m2, false).await.unwrap_err();
    assert!(matches!(err, BackendError::NftablesTransaction(_)), "{err}");
    assert_eq!(
        kernel_state(&ns, "ip"),
        before,
        "nothing of the failed transaction applied"
    );
    // The next sync (asked as partial) rebuilds from the kernel and converges.
    sync(&mut p, &m2, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!p.needs_full_sync().await);
    assert_matches_desired(&kernel_state(&ns, "ip"), &desired(&m2, p.config()));
}

#[tokio::test]
async fn cleanup_removes_both_tables() {
    support::require_root();
    let ns = Netns::new("nftclean");
    let nft = Nft::new().with_netns(ns.name());
    let mut p = proxier(&ns);
    sync(&mut p, &demo_model(), true).await.unwrap();
    nft.run("add table ip6 kube-proxy\n").await.unwrap();
    NftablesProxier::cleanup(&nft).await.unwrap();
    assert_eq!(nft.list_table("ip").await.unwrap(), None);
    assert_eq!(nft.list_table("ip6").await.unwrap(), None);
    // Idempotent.
    NftablesProxier::cleanup(&nft).await.unwrap();
}

/// `kube-proxy-rs --cleanup` removes nftables mode's tables with everything else.
#[tokio::test]
async fn cleanup_flag_removes_the_tables() {
    support::require_root();
    let ns = Netns::new("nftcleanup");
    let nft = Nft::new().with_netns(ns.name());
    let mut p = proxier(&ns);
    sync(&mut p, &demo_model(), true).await.unwrap();
    assert!(nft.list_table("ip").await.unwrap().is_some());
    let out = ns.run(env!("CARGO_BIN_EXE_kube-proxy-rs"), ["--cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(nft.list_table("ip").await.unwrap(), None);
}

/// A stale chain that cannot be deleted (someone jumps to it) is found again by the next
/// sync, and deleted once the reference is gone.
#[tokio::test]
async fn undeletable_stale_chain_is_retried() {
    support::require_root();
    let ns = Netns::new("nftstale");
    let m1 = demo_model();
    let m2 = changed(&m1);
    let mut p = proxier(&ns);
    sync(&mut p, &m1, true).await.unwrap();
    sync(&mut p, &m2, false).await.unwrap();
    let stale = kernel_state(&ns, "ip")
        .chains
        .into_iter()
        .find(|(name, rules)| name.contains("demo/legacy/") && rules.is_empty())
        .map(|(name, _)| name)
        .expect("a flushed legacy chain");
    // A foreign reference from a fixed chain: the delayed delete fails.
    ns.run_ok(
        "nft",
        [
            "add",
            "rule",
            "ip",
            "kube-proxy",
            "firewall-check",
            "jump",
            &stale,
        ],
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The loop's idle check tries the delete and asks for a full sync.
    assert!(p.needs_full_sync().await);
    let out = sync_outcome(&mut p, &m2, false).await.unwrap();
    assert!(
        out.nftables_cleanup_failed,
        "counted in nftables_cleanup_failures_total"
    );
    // That sync was full (the fixed chains were rewritten, dropping the reference) and
    // found the chain again; the next idle check deletes it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!p.needs_full_sync().await);
    assert!(!kernel_state(&ns, "ip").chains.contains_key(&stale));
    assert_matches_desired(&kernel_state(&ns, "ip"), &desired(&m2, p.config()));
}

/// A proxier of `family` whose layout switches above `threshold` service ports.
fn proxier_with(ns: &Netns, family: IpFamily, threshold: usize) -> NftablesProxier {
    let mut cfg = render_config(&options(), family);
    cfg.large_cluster_threshold = threshold;
    NftablesProxier::new(
        Nft::new().with_netns(ns.name()),
        Conntrack::new().with_netns(ns.name()),
        Addresses::new().with_netns(ns.name()),
        cfg,
    )
}

async fn sync_family(p: &mut NftablesProxier, model: &ProxyModel, family: IpFamily, full: bool) {
    let facts =
        kube_proxy_rs::host::HostSettings::from_options(&options()).facts(&model.node, family);
    p.sync(SyncRequest {
        model,
        changed: &BTreeSet::new(),
        full,
        node_facts: &facts,
    })
    .await
    .unwrap();
}

/// The drift check finds nothing in a table as synced (both layouts, both families: a false
/// alarm would rewrite everything every sync period), finds a deleted hook and a flushed
/// dispatch chain in either layout and a flushed service chain in upstream's, and the full
/// sync it asks for restores the table.
#[tokio::test]
async fn drift_check_finds_deleted_and_flushed_chains_and_nothing_else() {
    support::require_root();
    for (family, model) in [(IpFamily::V4, demo_model()), (IpFamily::V6, v6_model())] {
        let fam = if family == IpFamily::V4 { "ip" } else { "ip6" };
        for threshold in [1000, 0] {
            let ns = Netns::new("nftdrift");
            let mut p = proxier_with(&ns, family, threshold);
            sync_family(&mut p, &model, family, true).await;
            sync_family(&mut p, &model, family, false).await;
            assert!(
                !p.needs_full_sync().await,
                "{fam} {threshold}: a false alarm"
            );
            let synced = kernel_state(&ns, fam);
            let service_chain = synced
                .chains
                .keys()
                .find(|c| c.starts_with("service-"))
                .unwrap()
                .clone();
            let mut drifts = vec![
                vec!["delete", "chain", fam, "kube-proxy", "nat-output"],
                vec!["flush", "chain", fam, "kube-proxy", "services"],
                vec!["delete", "table", fam, "kube-proxy"],
            ];
            if threshold > 0 {
                drifts.push(vec!["flush", "chain", fam, "kube-proxy", &service_chain]);
            }
            for drift in drifts {
                ns.run_ok("nft", &drift);
                assert!(
                    p.needs_full_sync().await,
                    "{fam} {threshold}: {drift:?} missed"
                );
                // Full, as the sync loop asks after a drift: that must clear the request.
                sync_family(&mut p, &model, family, true).await;
                assert_eq!(
                    kernel_state(&ns, fam),
                    synced,
                    "{fam} {threshold}: {drift:?}"
                );
                assert!(
                    !p.needs_full_sync().await,
                    "{fam} {threshold}: after {drift:?}"
                );
            }
        }
    }
}
