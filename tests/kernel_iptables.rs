//! iptables mode against the real kernel: renders applied with the real `iptables-restore` in a
//! fresh network namespace, read back with `iptables-save`, for both iptables back ends.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use kube_proxy_rs::backend::iptables::proxier::{IptablesProxier, render_config};
use kube_proxy_rs::backend::netfilter::parse::Dump;
use kube_proxy_rs::backend::{Backend, SyncRequest};
use kube_proxy_rs::config::parse_render_args;
use kube_proxy_rs::kernel::iptables::{Iptables, IptablesVariant, Table};
use kube_proxy_rs::kernel::{Addresses, Conntrack, IpFamily};
use kube_proxy_rs::model::{ProxyModel, ServiceName};
use kube_proxy_rs::render::{DEMO_CLUSTER, state_from};
use kube_proxy_rs::watch::file::{Objects, parse_objects};
use support::netns::Netns;

fn demo_objects() -> Objects {
    let mut o = Objects::default();
    parse_objects("demo", DEMO_CLUSTER, &mut o, &mut Vec::new()).unwrap();
    o
}

fn model_of(objects: &Objects) -> ProxyModel {
    state_from(objects, "node1", &mut Vec::new()).snapshot(kube_proxy_rs::model::IpFamily::V4)
}

fn proxier(
    ns: &Netns,
    variant: IptablesVariant,
    model: &ProxyModel,
) -> (IptablesProxier, Iptables) {
    let args = parse_render_args(&["--cluster-cidr=10.244.0.0/16".to_string()], "node1").unwrap();
    let ipt = Iptables::new(variant, IpFamily::V4).with_netns(ns.name());
    let mut config = render_config(
        &args.options,
        &model.node,
        kube_proxy_rs::model::IpFamily::V4,
        Vec::new(),
    );
    config.random_fully = true;
    let p = IptablesProxier::new(
        ipt.clone(),
        Conntrack::new().with_netns(ns.name()),
        Addresses::new().with_netns(ns.name()),
        config,
    );
    (p, ipt)
}

/// The node facts the daemon's sync loop would pass for `model` with the same flags.
fn facts(model: &ProxyModel) -> kube_proxy_rs::host::NodeFacts {
    let args = parse_render_args(&["--cluster-cidr=10.244.0.0/16".to_string()], "node1").unwrap();
    kube_proxy_rs::host::HostSettings::from_options(&args.options)
        .facts(&model.node, kube_proxy_rs::model::IpFamily::V4)
}

async fn save(ipt: &Iptables) -> (Dump, Dump) {
    let nat = Dump::parse(&ipt.save(Table::Nat).await.unwrap()).unwrap();
    let filter = Dump::parse(&ipt.save(Table::Filter).await.unwrap()).unwrap();
    (nat, filter)
}

/// Rules per chain, with counters and iptables-save's normalisations left as the kernel
/// prints them: equality of two of these means the kernel state did not change.
fn rules_by_chain(d: &Dump, table: &str) -> BTreeMap<String, Vec<String>> {
    d.table(table)
        .map(|t| {
            t.chains
                .iter()
                .map(|c| {
                    (
                        c.name.clone(),
                        c.rules.iter().map(|r| r.raw.clone()).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn full_sync(p: &mut IptablesProxier, model: &ProxyModel) {
    p.sync(SyncRequest {
        model,
        changed: &BTreeSet::new(),
        full: true,
        node_facts: &facts(model),
    })
    .await
    .expect("full sync");
}

async fn check_variant(variant: IptablesVariant) {
    support::require_root();
    let ns = Netns::new("kipt");
    let objects = demo_objects();
    let model = model_of(&objects);
    let (mut p, ipt) = proxier(&ns, variant, &model);
    full_sync(&mut p, &model).await;

    // Every chain and rule count of the render is what the kernel holds.
    let rendered = kube_proxy_rs::backend::iptables::render::render(
        &kube_proxy_rs::backend::iptables::RenderInput {
            model: &model,
            config: p.config(),
            scope: kube_proxy_rs::backend::iptables::SyncScope::Full,
            existing_nat_chains: None,
        },
    );
    let want = Dump::parse(&rendered.text).unwrap();
    let (nat, filter) = save(&ipt).await;
    for (table, got) in [("nat", &nat), ("filter", &filter)] {
        for chain in &want.table(table).unwrap().chains {
            let kernel = got
                .chain(table, &chain.name)
                .unwrap_or_else(|| panic!("{variant}: {table} chain {} missing", chain.name));
            assert_eq!(
                kernel.rules.len(),
                chain.rules.len(),
                "{variant}: {table} {} rule count\nkernel: {:#?}",
                chain.name,
                kernel.rules.iter().map(|r| &r.raw).collect::<Vec<_>>()
            );
        }
    }
    // DNAT targets survive the round trip exactly.
    let dnat = |d: &Dump| -> BTreeSet<String> {
        d.table("nat")
            .unwrap()
            .chains
            .iter()
            .flat_map(|c| c.rules.iter())
            .filter_map(|r| r.to_destination.clone())
            .collect()
    };
    assert_eq!(dnat(&nat), dnat(&want), "{variant}: DNAT destinations");
    assert!(dnat(&nat).contains("10.244.1.11:8080"));
    // Jump rules from the builtin chains exist exactly once.
    let services_jumps = nat
        .chain("nat", "PREROUTING")
        .unwrap()
        .rules
        .iter()
        .filter(|r| r.jump.as_deref() == Some("KUBE-SERVICES"))
        .count();
    assert_eq!(services_jumps, 1, "{variant}");
    assert!(
        ipt.chain_exists(Table::Mangle, "KUBE-PROXY-CANARY")
            .await
            .unwrap()
    );

    // A second full sync of the same state changes nothing (jump rules are not duplicated).
    full_sync(&mut p, &model).await;
    let (nat2, filter2) = save(&ipt).await;
    assert_eq!(
        rules_by_chain(&nat2, "nat"),
        rules_by_chain(&nat, "nat"),
        "{variant}: nat changed"
    );
    assert_eq!(
        rules_by_chain(&filter2, "filter"),
        rules_by_chain(&filter, "filter"),
        "{variant}: filter changed"
    );
    assert!(!p.needs_full_sync().await);

    // Partial sync: mark two service chains, change one service, sync partially. The unchanged
    // service's chain keeps the marker (not rewritten); the changed one is rewritten.
    let web = ServiceName::new("demo", "web");
    let shop = ServiceName::new("demo", "shop");
    let chain_of = |m: &ProxyModel, svc: &ServiceName| {
        let (name, _) = m.services.iter().find(|(k, _)| &k.service == svc).unwrap();
        kube_proxy_rs::backend::netfilter::names::service_chain(name)
    };
    let (web_chain, shop_chain) = (chain_of(&model, &web), chain_of(&model, &shop));
    for chain in [&web_chain, &shop_chain] {
        ipt.restore(&format!(
            "*nat\n-A {chain} -m comment --comment marker -j RETURN\nCOMMIT\n"
        ))
        .await
        .unwrap();
    }
    let mut objects2 = objects.clone();
    for s in objects2
        .slices
        .iter_mut()
        .filter(|s| s.metadata.name.as_deref() == Some("web-7x2k9"))
    {
        s.endpoints.as_mut().unwrap().pop();
    }
    let model2 = model_of(&objects2);
    let changed = BTreeSet::from([web.clone()]);
    p.sync(SyncRequest {
        model: &model2,
        changed: &changed,
        full: false,
        node_facts: &facts(&model2),
    })
    .await
    .expect("partial sync");
    let (nat3, _) = save(&ipt).await;
    let has_marker = |chain: &str| {
        nat3.chain("nat", chain)
            .unwrap()
            .rules
            .iter()
            .any(|r| r.comment.as_deref() == Some("marker"))
    };
    assert!(
        !has_marker(&web_chain),
        "{variant}: changed service chain must be rewritten"
    );
    assert!(
        has_marker(&shop_chain),
        "{variant}: unchanged service chain must not be touched"
    );
    // The removed endpoint's SEP chain is gone, the others stay.
    assert!(
        !dnat(&nat3).contains("10.244.3.13:8080"),
        "{variant}: stale endpoint chain left"
    );
    assert!(dnat(&nat3).contains("10.244.2.12:8080"));

    // Cleanup removes every chain of ours and keeps a foreign chain and jump.
    ipt.restore("*nat\n:FOREIGN - [0:0]\n-A FOREIGN -j RETURN\n-A PREROUTING -j FOREIGN\nCOMMIT\n")
        .await
        .unwrap();
    IptablesProxier::cleanup(&ipt).await.expect("cleanup");
    let (nat4, filter4) = save(&ipt).await;
    let ours = |d: &Dump, t: &str| -> Vec<String> {
        d.chain_names(t)
            .into_iter()
            .filter(|c| c.starts_with("KUBE-") && c != "KUBE-FIREWALL")
            .collect()
    };
    assert!(
        ours(&nat4, "nat").is_empty(),
        "{variant}: left {:?}",
        ours(&nat4, "nat")
    );
    assert!(
        ours(&filter4, "filter").is_empty(),
        "{variant}: left {:?}",
        ours(&filter4, "filter")
    );
    assert!(nat4.chain("nat", "FOREIGN").is_some());
    assert!(
        nat4.chain("nat", "PREROUTING")
            .unwrap()
            .rules
            .iter()
            .any(|r| r.jump.as_deref() == Some("FOREIGN"))
    );
    assert!(
        !ipt.chain_exists(Table::Mangle, "KUBE-PROXY-CANARY")
            .await
            .unwrap()
    );
    // And a full sync brings everything back after the canary is gone.
    assert!(
        p.needs_full_sync().await,
        "{variant}: missing canary must force a full sync"
    );
}

#[tokio::test]
async fn iptables_legacy_apply_resync_partial_cleanup() {
    check_variant(IptablesVariant::Legacy).await;
}

#[tokio::test]
async fn iptables_nft_apply_resync_partial_cleanup() {
    check_variant(IptablesVariant::Nft).await;
}

/// iptables mode's nfacct counters end to end in a fresh namespace: the start-up step creates
/// them, the rules it enables restore and count, and `/metrics` serves the counts.
async fn check_nfacct(variant: IptablesVariant) {
    use kube_proxy_rs::backend::iptables::proxier::setup_nfacct;
    use kube_proxy_rs::kernel::nfacct::Nfacct;
    use kube_proxy_rs::server::IpFamily as MetricsFamily;
    use kube_proxy_rs::server::metrics::Metrics;

    support::require_root();
    let ns = Netns::new("knfacct");
    let model = model_of(&demo_objects());
    let args = parse_render_args(&["--cluster-cidr=10.244.0.0/16".to_string()], "node1").unwrap();
    let mut config = render_config(
        &args.options,
        &model.node,
        kube_proxy_rs::model::IpFamily::V4,
        Vec::new(),
    );
    let acct = Nfacct::new().with_netns(ns.name());
    assert_eq!(acct.get("localhost_nps_accepted_pkts").unwrap(), None);
    assert!(setup_nfacct(&acct, &mut config), "{variant}: nfacct probe");
    assert!(config.nfacct_ct_state_invalid && config.nfacct_localhost_nodeports);
    for name in [
        "ct_state_invalid_dropped_pkts",
        "localhost_nps_accepted_pkts",
    ] {
        assert_eq!(
            acct.get(name).unwrap().map(|c| c.packets),
            Some(0),
            "{name}"
        );
    }

    let ipt = Iptables::new(variant, IpFamily::V4).with_netns(ns.name());
    let mut p = IptablesProxier::new(
        ipt.clone(),
        Conntrack::new().with_netns(ns.name()),
        Addresses::new().with_netns(ns.name()),
        config,
    );
    full_sync(&mut p, &model).await;
    // iptables-save writes `--nfacct-name  NAME` (two spaces): compare words.
    let words = |text: String| -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let filter = words(ipt.save(Table::Filter).await.unwrap()).join("\n");
    let nat = words(ipt.save(Table::Nat).await.unwrap()).join("\n");
    assert!(
        filter.contains("--nfacct-name ct_state_invalid_dropped_pkts"),
        "{variant}: {filter}"
    );
    let localhost_rules = nat
        .lines()
        .filter(|l| l.contains("--nfacct-name localhost_nps_accepted_pkts"))
        .count();
    assert_eq!(localhost_rules, 2, "{variant}: one per node port\n{nat}");

    // A connection to a node port on 127.0.0.1 from the node itself is counted (where it
    // goes after the DNAT does not matter here).
    ns.in_netns(|| {
        let to = "127.0.0.1:30080".parse().unwrap();
        let _ = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(300));
    });
    let counted = acct
        .get("localhost_nps_accepted_pkts")
        .unwrap()
        .unwrap()
        .packets;
    assert!(counted >= 1, "{variant}: nothing counted");
    let text = Metrics::with_nfacct(MetricsFamily::V4, acct.clone())
        .encode()
        .unwrap();
    let served = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("kubeproxy_iptables_localhost_nodeports_accepted_packets_total ")
        })
        .unwrap_or_else(|| panic!("{variant}: not served\n{text}"));
    assert!(
        served.parse::<u64>().unwrap() >= counted,
        "{served} < {counted}"
    );
    assert!(
        text.contains("\nkubeproxy_iptables_ct_state_invalid_dropped_packets_total 0\n"),
        "{text}"
    );
}

#[tokio::test]
async fn iptables_legacy_nfacct_counters() {
    check_nfacct(IptablesVariant::Legacy).await;
}

#[tokio::test]
async fn iptables_nft_nfacct_counters() {
    check_nfacct(IptablesVariant::Nft).await;
}

/// The service chains (`KUBE-SVC-…`, `KUBE-SEP-…`) of the kernel's nat table.
async fn service_chains(ipt: &Iptables) -> BTreeSet<String> {
    let (nat, _) = save(ipt).await;
    nat.chain_names("nat")
        .into_iter()
        .filter(|c| c.starts_with("KUBE-SVC-") || c.starts_with("KUBE-SEP-"))
        .collect()
}

async fn partial_sync(
    p: &mut IptablesProxier,
    model: &ProxyModel,
    changed: &BTreeSet<ServiceName>,
) -> kube_proxy_rs::backend::SyncOutcome {
    p.sync(SyncRequest {
        model,
        changed,
        full: false,
        node_facts: &facts(model),
    })
    .await
    .expect("partial sync")
}

/// Upstream's large-cluster mode: stale chains are looked for (an `iptables-save`) at most
/// once per syncPeriod; below the threshold, on every sync.
async fn check_large_cluster_cleanup(variant: IptablesVariant) {
    support::require_root();
    let ns = Netns::new("kiptlc");
    let mut objects = demo_objects();
    let model = model_of(&objects);
    let (p, ipt) = proxier(&ns, variant, &model);
    let mut config = p.config().clone();
    config.large_cluster_threshold = 1;
    let mut p = IptablesProxier::new(
        ipt.clone(),
        Conntrack::new().with_netns(ns.name()),
        Addresses::new().with_netns(ns.name()),
        config,
    )
    .with_cleanup_period(std::time::Duration::from_secs(3600));
    full_sync(&mut p, &model).await;
    let before = service_chains(&ipt).await;

    objects
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("web"));
    let smaller = model_of(&objects);
    let web = BTreeSet::from([ServiceName::new("demo", "web")]);
    let out = partial_sync(&mut p, &smaller, &web).await;
    assert!(out.iptables_rules.is_some());
    assert_eq!(
        service_chains(&ipt).await,
        before,
        "{variant}: within the period a large cluster keeps stale chains"
    );
    // A full sync too, as upstream, where no chain must be split off (iptables-nft's full
    // syncs always look, to write the chains the kernel lacks first).
    if variant == IptablesVariant::Legacy {
        full_sync(&mut p, &smaller).await;
        assert_eq!(
            service_chains(&ipt).await,
            before,
            "{variant}: a full sync within the period keeps them too"
        );
    }

    // Once the period has passed, the next sync deletes them.
    let mut p = p.with_cleanup_period(std::time::Duration::ZERO);
    partial_sync(&mut p, &smaller, &BTreeSet::new()).await;
    let after = service_chains(&ipt).await;
    assert!(
        after.len() < before.len() && after.is_subset(&before),
        "{variant}: {before:?} -> {after:?}"
    );
    // The chains a full sync of the smaller model alone creates.
    let ns2 = Netns::new("kiptlc2");
    let (mut q, ipt2) = proxier(&ns2, variant, &smaller);
    full_sync(&mut q, &smaller).await;
    let fresh = service_chains(&ipt2).await;
    assert_eq!(after, fresh, "{variant}: exactly the stale chains went");
}

#[tokio::test]
async fn iptables_legacy_large_cluster_cleans_stale_chains_once_per_period() {
    check_large_cluster_cleanup(IptablesVariant::Legacy).await;
}

#[tokio::test]
async fn iptables_nft_large_cluster_cleans_stale_chains_once_per_period() {
    check_large_cluster_cleanup(IptablesVariant::Nft).await;
}

/// Upstream's canary is in mangle, nat and filter: a flush of any one table forces a full
/// sync, which puts it back.
async fn check_canary_each_table(variant: IptablesVariant) {
    support::require_root();
    let ns = Netns::new("kiptcan");
    let model = model_of(&demo_objects());
    let (mut p, ipt) = proxier(&ns, variant, &model);
    full_sync(&mut p, &model).await;
    assert!(!p.needs_full_sync().await, "{variant}: canaries in place");
    for table in [Table::Mangle, Table::Nat, Table::Filter] {
        ipt.flush_and_delete_chain(table, "KUBE-PROXY-CANARY")
            .await
            .expect("delete canary");
        assert!(
            p.needs_full_sync().await,
            "{variant}: canary gone from {}",
            table.as_str()
        );
        full_sync(&mut p, &model).await;
        assert!(
            !p.needs_full_sync().await,
            "{variant}: the full sync restored it"
        );
    }
}

#[tokio::test]
async fn iptables_legacy_canary_in_each_table() {
    check_canary_each_table(IptablesVariant::Legacy).await;
}

#[tokio::test]
async fn iptables_nft_canary_in_each_table() {
    check_canary_each_table(IptablesVariant::Nft).await;
}

/// `n` ClusterIP services × 5 endpoints on other nodes, upstream-shaped.
fn big_model(n: usize) -> ProxyModel {
    let mut st = kube_proxy_rs::model::ClusterState::new("node1");
    for i in 0..n {
        let (hi, lo) = (i / 250, i % 250);
        let svc = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "big", "name": format!("svc{i}")},
            "spec": {"clusterIP": format!("10.96.{hi}.{lo}"), "ports": [{"name": "p", "port": 80}]}
        }))
        .unwrap();
        st.apply_service(&svc);
        let eps: Vec<_> = (0..5)
            .map(|e| serde_json::json!({"addresses": [format!("10.{}.{hi}.{lo}", 100 + e)], "nodeName": "node2"}))
            .collect();
        let slice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "big", "name": format!("svc{i}-1"),
                         "labels": {"kubernetes.io/service-name": format!("svc{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps
        }))
        .unwrap();
        st.apply_slice(&slice);
    }
    st.snapshot(kube_proxy_rs::model::IpFamily::V4)
}

/// A timed first full sync of `model` into a fresh namespace; the kernel's nat table after it.
async fn timed_first_sync(
    variant: IptablesVariant,
    model: &ProxyModel,
) -> (std::time::Duration, Dump, IptablesProxier) {
    let ns = Netns::new("kiptbig");
    let (mut p, ipt) = proxier(&ns, variant, model);
    let t = std::time::Instant::now();
    tokio::time::timeout(
        std::time::Duration::from_secs(600),
        full_sync(&mut p, model),
    )
    .await
    .unwrap_or_else(|_| panic!("{variant}: first sync took over 10 minutes"));
    let took = t.elapsed();
    (took, save(&ipt).await.0, p)
}

/// The floor the split avoids: `text` restored as one transaction naming every chain, the way
/// the daemon calls `iptables-restore` (`--noflush --counters`), into a fresh namespace where a
/// first sync of no services has already put the base chains and jumps in place.
async fn timed_one_transaction(variant: IptablesVariant, text: &str) -> std::time::Duration {
    let ns = Netns::new("kiptone");
    let empty = kube_proxy_rs::model::ClusterState::new("node1")
        .snapshot(kube_proxy_rs::model::IpFamily::V4);
    let (mut p, ipt) = proxier(&ns, variant, &empty);
    full_sync(&mut p, &empty).await;
    let t = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(600), ipt.restore(text))
        .await
        .unwrap_or_else(|_| panic!("{variant}: one transaction took over 10 minutes"))
        .expect("one-transaction restore");
    t.elapsed()
}

/// iptables-nft 1.8.9's `--noflush` restore is quadratic in the chains one transaction names:
/// the first sync of a large cluster writes its new chains in small transactions first. Its
/// first sync (render, `iptables-save` and every restore included) must leave the rendered
/// chains and beat the same text restored as one transaction in the same run, which at 2,000
/// services costs several times more (the ratio grows with n). The comparison is with the same
/// back end because the legacy one's speed says nothing about iptables-nft's quadratic path.
#[tokio::test]
async fn iptables_nft_first_sync_of_a_large_cluster_is_not_quadratic() {
    support::require_root();
    let model = big_model(2_000);
    let (split, nat, p) = timed_first_sync(IptablesVariant::Nft, &model).await;
    let rendered = kube_proxy_rs::backend::iptables::render::render(
        &kube_proxy_rs::backend::iptables::RenderInput {
            model: &model,
            config: p.config(),
            scope: kube_proxy_rs::backend::iptables::SyncScope::Full,
            existing_nat_chains: None,
        },
    );
    let want = Dump::parse(&rendered.text).unwrap();
    let want_chains = want.chain_names("nat");
    assert!(want_chains.len() > 12_000, "{} chains", want_chains.len());
    for name in &want_chains {
        let got = nat
            .chain("nat", name)
            .unwrap_or_else(|| panic!("nat chain {name} missing"));
        let w = want.chain("nat", name).unwrap();
        assert_eq!(got.rules.len(), w.rules.len(), "{name}");
        let targets = |c: &kube_proxy_rs::backend::netfilter::parse::Chain| -> Vec<Option<String>> {
            c.rules
                .iter()
                .map(|r| r.target().map(str::to_string))
                .collect()
        };
        assert_eq!(targets(got), targets(w), "{name}: jumps in order");
    }
    let one = timed_one_transaction(IptablesVariant::Nft, &rendered.text).await;
    eprintln!(
        "first sync of 2000 services x 5 with iptables-nft: split {split:?}, one transaction {one:?}"
    );
    assert!(
        split < one,
        "the split first sync {split:?} is no faster than one transaction {one:?}"
    );
}

// === partial syncs edit KUBE-SERVICES instead of rewriting it ===

fn edit_service(
    st: &mut kube_proxy_rs::model::ClusterState,
    name: &str,
    ip: &str,
    port: u16,
    node_port: Option<u16>,
) {
    let mut spec = serde_json::json!({"clusterIP": ip, "ports": [{"name": "p", "port": port}]});
    if let Some(np) = node_port {
        spec["type"] = "NodePort".into();
        spec["ports"][0]["nodePort"] = np.into();
        spec["externalIPs"] = serde_json::json!(["192.0.2.10"]);
    }
    let svc = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "ed", "name": name}, "spec": spec
    }))
    .unwrap();
    st.apply_service(&svc);
}

fn edit_slice(st: &mut kube_proxy_rs::model::ClusterState, name: &str, ips: &[&str]) {
    let eps: Vec<_> = ips
        .iter()
        .map(|ip| serde_json::json!({"addresses": [ip], "nodeName": "node2"}))
        .collect();
    let slice = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "ed", "name": format!("{name}-1"),
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .unwrap();
    st.apply_slice(&slice);
}

/// Our chains of both tables as `iptables-save` prints them, rule order included.
async fn our_chains(ipt: &Iptables) -> BTreeMap<String, Vec<String>> {
    let (nat, filter) = save(ipt).await;
    let mut out = BTreeMap::new();
    for (table, d) in [("nat", &nat), ("filter", &filter)] {
        for (chain, rules) in rules_by_chain(d, table) {
            out.insert(format!("{table} {chain}"), rules);
        }
    }
    out
}

/// A series of partial syncs that edit the shared chains (`-D`/`-I`) leaves the kernel equal
/// to full rewrites of the same models, rule order included; a drifted chain makes the edit
/// fail, and the next sync rewrites.
async fn check_edits(variant: IptablesVariant) {
    support::require_root();
    let mut st = kube_proxy_rs::model::ClusterState::new("node1");
    for i in 0..12u8 {
        let name = format!("svc{i}");
        edit_service(
            &mut st,
            &name,
            &format!("10.96.0.{}", 10 + i),
            80,
            (i == 4).then_some(30080),
        );
        edit_slice(
            &mut st,
            &name,
            &[&format!("10.100.0.{i}"), &format!("10.101.0.{i}")],
        );
    }
    st.take_changes();
    let snapshot =
        |st: &kube_proxy_rs::model::ClusterState| st.snapshot(kube_proxy_rs::model::IpFamily::V4);
    let model = snapshot(&st);
    let (edit_ns, rewrite_ns) = (Netns::new("kipted"), Netns::new("kiptrw"));
    let (mut edit, edit_ipt) = proxier(&edit_ns, variant, &model);
    let (mut rewrite, rewrite_ipt) = proxier(&rewrite_ns, variant, &model);
    full_sync(&mut edit, &model).await;
    full_sync(&mut rewrite, &model).await;

    type Step = Box<dyn Fn(&mut kube_proxy_rs::model::ClusterState)>;
    let steps: Vec<(&str, Step)> = vec![
        (
            "add a service",
            Box::new(|st| {
                edit_service(st, "svc5a", "10.96.0.99", 80, None);
                edit_slice(st, "svc5a", &["10.102.0.1"]);
            }),
        ),
        (
            "change an endpoint",
            Box::new(|st| edit_slice(st, "svc3", &["10.100.0.3", "10.103.0.3"])),
        ),
        (
            "endpoints gone",
            Box::new(|st| st.remove_slice("ed", "svc6-1")),
        ),
        (
            "delete a service",
            Box::new(|st| {
                st.remove_service(&ServiceName::new("ed", "svc7"));
                st.remove_slice("ed", "svc7-1");
            }),
        ),
        (
            "change ports",
            Box::new(|st| edit_service(st, "svc4", "10.96.0.14", 81, Some(30081))),
        ),
        (
            "endpoints back",
            Box::new(|st| edit_slice(st, "svc6", &["10.100.0.6"])),
        ),
    ];
    for (what, step) in steps {
        step(&mut st);
        let changed = st.take_changes().services;
        let model = snapshot(&st);
        let out = partial_sync(&mut edit, &model, &changed).await;
        full_sync(&mut rewrite, &model).await;
        let rules = out.iptables_rules.expect("iptables counts");
        assert!(
            rules.nat_last <= 12 && rules.nat_total > 80,
            "{variant} {what}: the partial sync wrote {} of {} nat rules (KUBE-SERVICES rewritten?)",
            rules.nat_last,
            rules.nat_total
        );
        assert_eq!(
            our_chains(&edit_ipt).await,
            our_chains(&rewrite_ipt).await,
            "{variant} {what}: edited chains differ from a rewrite"
        );
    }
    let (nat, _) = save(&edit_ipt).await;
    let services = nat.chain("nat", "KUBE-SERVICES").unwrap();
    assert!(
        services
            .rules
            .last()
            .unwrap()
            .raw
            .contains("-j KUBE-NODEPORTS")
    );

    // Someone removes a rule: the next edit of that service fails (its `-D` finds nothing)...
    let first = services.rules[0].clone();
    let svc = first
        .comment
        .as_deref()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .split('/')
        .nth(1)
        .unwrap()
        .to_string();
    edit_ipt
        .delete_rule(Table::Nat, "KUBE-SERVICES", &first.args)
        .await
        .unwrap();
    edit_service(
        &mut st,
        &svc,
        &first.destination.as_ref().unwrap().value.replace("/32", ""),
        82,
        None,
    );
    let changed = st.take_changes().services;
    let model = snapshot(&st);
    let failed = edit
        .sync(SyncRequest {
            model: &model,
            changed: &changed,
            full: false,
            node_facts: &facts(&model),
        })
        .await;
    assert!(
        failed.is_err(),
        "{variant}: an edit of a drifted chain must fail"
    );
    // ...and the retry rewrites the shared chains (even as a partial sync).
    let out = partial_sync(&mut edit, &model, &changed).await;
    full_sync(&mut rewrite, &model).await;
    assert!(
        out.iptables_rules.unwrap().nat_last > 12,
        "{variant}: the retry rewrites"
    );
    assert_eq!(
        our_chains(&edit_ipt).await,
        our_chains(&rewrite_ipt).await,
        "{variant}: after the retry"
    );
}

#[tokio::test]
async fn iptables_legacy_partial_syncs_edit_shared_chains_like_a_rewrite() {
    check_edits(IptablesVariant::Legacy).await;
}

#[tokio::test]
async fn iptables_nft_partial_syncs_edit_shared_chains_like_a_rewrite() {
    check_edits(IptablesVariant::Nft).await;
}
