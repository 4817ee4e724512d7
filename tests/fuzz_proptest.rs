//! Property tests on hostile input (issue 11, "Bad input"), bounded in cases so they run in
//! `cargo test`: the config decoder, object → model conversion, the plan and the iptables and
//! IPVS renderers never panic; every iptables ruleset rendered from random objects loads with
//! `iptables-restore` and every nftables transaction with `nft -f` in a throwaway namespace
//! (stricter than `--test` / `--check`); and no object's rules land in another object's
//! chains or in a chain that is not kube-proxy's.
//! `PROPTEST_CASES` raises the number of cases for a longer run.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::Stdio;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube_proxy_rs::backend::Kind;
use kube_proxy_rs::config::{decode_config, parse_command_line, parse_render_args};
use kube_proxy_rs::render::state_from;
use kube_proxy_rs::watch::file::{Objects, parse_objects};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use support::netns::Netns;

const NODE: &str = "node1";

fn cases(default: u32) -> Config {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Names, valid and hostile: quotes, newlines, rule text, COMMIT, long ones.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z][a-z0-9-]{0,12}",
        1 => Just("ns\" -j ACCEPT\n-A KUBE-SERVICES -j ACCEPT\n#".to_string()),
        1 => Just("COMMIT".to_string()),
        1 => Just("a".repeat(300)),
        1 => "\\PC{0,20}",
    ]
}

fn ipv4() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0u8..=255, 0u8..=255).prop_map(|(a, b)| format!("10.96.{a}.{b}")),
        2 => (0u8..=255).prop_map(|a| format!("10.244.1.{a}")),
        1 => Just("192.168.50.1".to_string()),
        1 => Just("None".to_string()),
        1 => Just("10.0.0.999".to_string()),
        1 => Just("fd00::1".to_string()),
        1 => Just("127.0.0.1".to_string()),
        1 => Just("0.0.0.0".to_string()),
        1 => "\\PC{0,16}",
    ]
}

fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..=255, 0u8..=33).prop_map(|(a, l)| format!("192.168.{a}.0/{l}")),
        Just("0.0.0.0/0".to_string()),
        Just("fd00::/64".to_string()),
        "\\PC{0,12}",
    ]
}

fn port_number() -> impl Strategy<Value = i64> {
    prop_oneof![8 => 1i64..65536, 1 => Just(0i64), 1 => Just(70000i64), 1 => Just(-1i64)]
}

fn protocol() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just("TCP".to_string()),
        3 => Just("UDP".to_string()),
        2 => Just("SCTP".to_string()),
        1 => Just("ICMP".to_string()),
    ]
}

fn port_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("p".to_string()),
        2 => Just(String::new()),
        1 => Just("q".to_string()),
        1 => name(),
    ]
}

fn service_port() -> impl Strategy<Value = Value> {
    (
        port_name(),
        port_number(),
        protocol(),
        port_number(),
        port_number(),
    )
        .prop_map(|(name, port, proto, node_port, target)| {
            json!({"name": name, "port": port, "protocol": proto,
                   "nodePort": 30000 + node_port.rem_euclid(2768), "targetPort": target})
        })
}

fn service() -> impl Strategy<Value = Value> {
    (
        (name(), name(), ipv4()),
        prop::sample::select(vec![
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
            "X",
        ]),
        prop::collection::vec(service_port(), 0..4),
        prop::collection::vec(ipv4(), 0..3),
        prop::collection::vec(cidr(), 0..3),
        prop::collection::vec(ipv4(), 0..2),
        (
            prop::sample::select(vec!["Cluster", "Local", "X"]),
            prop::sample::select(vec!["Cluster", "Local"]),
            prop::sample::select(vec!["None", "ClientIP"]),
            0i64..100_000,
            port_number(),
        ),
    )
        .prop_map(
            |((ns, name, ip), ty, ports, external, ranges, ingress, (etp, itp, aff, t, hc))| {
                json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"namespace": ns, "name": name},
                    "spec": {
                        "type": ty, "clusterIP": ip, "ports": ports, "externalIPs": external,
                        "loadBalancerSourceRanges": ranges,
                        "externalTrafficPolicy": etp, "internalTrafficPolicy": itp,
                        "sessionAffinity": aff,
                        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": t}},
                        "healthCheckNodePort": hc,
                    },
                    "status": {"loadBalancer": {"ingress":
                        ingress.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>()}},
                })
            },
        )
}

fn endpoint() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(ipv4(), 1..3),
        any::<[bool; 3]>(),
        prop::sample::select(vec![NODE, "node2", ""]),
    )
        .prop_map(|(addrs, [ready, serving, terminating], node)| {
            json!({"addresses": addrs, "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
}

fn slice_for(svc: &Value) -> impl Strategy<Value = Value> + use<> {
    let ns = svc["metadata"]["namespace"].clone();
    let owner = svc["metadata"]["name"].clone();
    (
        name(),
        prop::sample::select(vec!["IPv4", "IPv6", "FQDN"]),
        prop::collection::vec((port_name(), port_number(), protocol()), 0..3),
        prop::collection::vec(endpoint(), 0..4),
    )
        .prop_map(move |(name, family, ports, endpoints)| {
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": ns, "name": name,
                             "labels": {"kubernetes.io/service-name": owner}},
                "addressType": family,
                "ports": ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect::<Vec<_>>(),
                "endpoints": endpoints,
            })
        })
}

/// A cluster: services, a slice or two for each, and this node.
fn cluster() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(service(), 1..6).prop_flat_map(|services| {
        let slices: Vec<_> = services
            .iter()
            .map(|s| prop::collection::vec(slice_for(s), 0..2))
            .collect();
        (Just(services), slices).prop_map(|(services, slices)| {
            let mut all = services;
            all.extend(slices.into_iter().flatten());
            all.push(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]}}));
            all
        })
    })
}

fn objects_of(values: &[Value]) -> Objects {
    let mut out = Objects::default();
    for v in values {
        // Objects the typed decoder refuses are what the API server would refuse too.
        match v["kind"].as_str() {
            Some("Service") => out
                .services
                .extend(serde_json::from_value::<Service>(v.clone())),
            Some("EndpointSlice") => out
                .slices
                .extend(serde_json::from_value::<EndpointSlice>(v.clone())),
            _ => out.nodes.extend(serde_json::from_value::<Node>(v.clone())),
        }
    }
    out
}

fn render(values: &[Value], kind: Kind, flags: &[&str]) -> String {
    let mut args: Vec<String> = vec![format!("--hostname-override={NODE}")];
    args.extend(flags.iter().map(|f| f.to_string()));
    let parsed = parse_render_args(&args, NODE).expect("render flags");
    // The random clusters are IPv4 ones; their ruleset is loaded with iptables-restore.
    let v4 = kube_proxy_rs::model::IpFamily::V4;
    let model = state_from(&objects_of(values), NODE, &mut Vec::new()).snapshot(v4);
    kind.render(
        &parsed.options,
        &model,
        v4,
        vec!["192.168.50.1".parse().unwrap()],
    )
}

/// The first `ns/name[:port]` word of a rule's comment: the service the rule is for.
fn owner(rule: &str) -> Option<String> {
    let rest = rule.split("--comment ").nth(1)?;
    let comment = match rest.strip_prefix('"') {
        Some(q) => q.split('"').next()?,
        None => rest.split(' ').next()?,
    };
    comment
        .split(' ')
        .find(|w| w.contains('/') && !w.contains("0/"))
        .map(str::to_string)
}

const PER_SERVICE: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// Every rule is in a kube-proxy chain declared in its table; every per-service chain holds
/// the rules of one service only; a jump to a per-service chain comes from that service.
fn assert_rules_stay_in_their_chains(text: &str) {
    let mut declared = BTreeSet::new();
    let mut owners: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut jumps: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('*') {
            declared.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            declared.insert(decl.split(' ').next().unwrap_or_default().to_string());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default();
            assert!(
                chain.starts_with("KUBE-") && declared.contains(chain),
                "rule outside kube-proxy's declared chains: {line}\n{text}"
            );
            let per_service = PER_SERVICE.iter().any(|p| chain.starts_with(p));
            if let Some(o) = owner(line) {
                if per_service {
                    owners
                        .entry(chain.to_string())
                        .or_default()
                        .insert(o.clone());
                }
                if let Some(target) = rule.split(" -j ").nth(1)
                    && PER_SERVICE.iter().any(|p| target.starts_with(p))
                {
                    jumps.push((o, target.split(' ').next().unwrap_or_default().to_string()));
                }
            }
        }
    }
    for (chain, set) in &owners {
        assert!(set.len() == 1, "{chain} holds rules of {set:?}\n{text}");
    }
    for (from, target) in jumps {
        if let Some(set) = owners.get(&target) {
            assert!(
                set.contains(&from),
                "{from} jumps to {target} of {set:?}\n{text}"
            );
        }
    }
}

/// The iptables-restore input of an iptables render; in IPVS mode the part after the
/// ipset section.
fn restore_input(text: &str) -> &str {
    text.find("*filter")
        .or_else(|| text.find("*nat"))
        .map_or("", |i| &text[i..])
}

/// The `ipset save` part of an IPVS render.
fn ipset_input(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("create ") || l.starts_with("add "))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn feed(ns: &Netns, cmd: &str, args: &[&str], text: &str) -> Result<(), String> {
    let mut child = ns
        .command(cmd, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Loads an iptables render for real in the throwaway namespace (stricter than `--test`,
/// which on the nft back end accepts jumps to chains that do not exist). An IPVS render's
/// ipsets must load too; its rules are only `--test`ed, as this host's kernel has no `ipvs`
/// match (the VM tests load them). The tables and sets are emptied again afterwards.
fn restore_test(ns: &Netns, text: &str) -> Result<(), String> {
    let sets = ipset_input(text);
    let args: &[&str] = if sets.is_empty() { &[] } else { &["--test"] };
    let result = feed(ns, "ipset", &["restore"], &sets)
        .and_then(|()| feed(ns, "iptables-restore", args, restore_input(text)));
    feed(
        ns,
        "iptables-restore",
        &[],
        "*filter\nCOMMIT\n*nat\nCOMMIT\n",
    )
    .expect("empty tables");
    ns.run_ok("ipset", ["destroy"]);
    result
}

#[test]
fn rendered_rulesets_load_and_stay_in_their_chains() {
    support::require_root();
    let ns = Netns::new("fuzz");
    let mut runner = TestRunner::new(cases(32));
    runner
        .run(&cluster(), |values| {
            for (kind, flags) in [
                (Kind::Iptables, &["--cluster-cidr=10.244.0.0/16"][..]),
                (
                    Kind::Iptables,
                    &["--masquerade-all", "--nodeport-addresses=primary"][..],
                ),
                (
                    Kind::Ipvs,
                    &["--proxy-mode=ipvs", "--cluster-cidr=10.244.0.0/16"][..],
                ),
            ] {
                let text = render(&values, kind, flags);
                let rules = restore_input(&text);
                prop_assert!(!rules.is_empty(), "no iptables part:\n{text}");
                if let Err(e) = restore_test(&ns, &text) {
                    prop_assert!(false, "iptables-restore refused ({flags:?}): {e}\n{rules}");
                }
                assert_rules_stay_in_their_chains(rules);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn object_files_of_any_text_never_panic() {
    let mut runner = TestRunner::new(cases(256));
    let text = prop_oneof![
        "\\PC{0,200}",
        cluster().prop_map(|v| v
            .iter()
            .map(|o| serde_json::to_string(o).unwrap())
            .collect::<Vec<_>>()
            .join("\n---\n")),
        // Random YAML punctuation, the parser's hard cases.
        prop::collection::vec(
            prop::sample::select(vec![
                "[", "]", "{", "}", ": ", "- ", "\n", "  ", "&a ", "*a", "'", "\"", "? ", "---\n",
                "!!str ", "|\n", "#"
            ]),
            0..80
        )
        .prop_map(|v| v.concat()),
    ];
    runner
        .run(&text, |text| {
            let mut out = Objects::default();
            let _ = parse_objects("fuzz.yaml", &text, &mut out, &mut Vec::new());
            let state = state_from(&out, NODE, &mut Vec::new());
            let opts = parse_render_args(&[], NODE).expect("defaults").options;
            for family in kube_proxy_rs::model::IpFamily::ALL {
                let model = state.snapshot(family);
                let _ = Kind::Iptables.render(&opts, &model, family, vec![]);
                let _ = Kind::Ipvs.render(&opts, &model, family, vec![]);
            }
            Ok(())
        })
        .unwrap();
}

/// A value of any JSON type, for config fields.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "30s",
            "-1s",
            "1h2m",
            "0",
            "5parsecs",
            "9999999999h",
            "10.0.0.0/8",
            "::/0",
            "0.0.0.0:10249",
            "iptables",
            "ipvs"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const CONFIG_KEYS: &[&str] = &[
    "featureGates",
    "clientConnection",
    "logging",
    "hostnameOverride",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "bindAddressHardFail",
    "enableProfiling",
    "mode",
    "iptables",
    "ipvs",
    "nftables",
    "detectLocalMode",
    "detectLocal",
    "clusterCIDR",
    "nodePortAddresses",
    "oomScoreAdj",
    "conntrack",
    "configSyncPeriod",
    "portRange",
];
const NESTED_KEYS: &[&str] = &[
    "masqueradeBit",
    "syncPeriod",
    "minSyncPeriod",
    "scheduler",
    "excludeCIDRs",
    "strictARP",
    "tcpTimeout",
    "maxPerCore",
    "min",
    "tcpEstablishedTimeout",
    "kubeconfig",
    "qps",
    "burst",
    "verbosity",
    "flushFrequency",
    "localhostNodePorts",
    "bridgeInterface",
    "ipSet",
    "hashSize",
];

fn config_document() -> impl Strategy<Value = String> {
    let nested = prop::collection::btree_map(prop::sample::select(NESTED_KEYS), any_value(), 0..4)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
    let field = prop_oneof![any_value(), nested];
    prop::collection::btree_map(prop::sample::select(CONFIG_KEYS), field, 0..6).prop_map(|m| {
        let mut doc = serde_json::Map::new();
        doc.insert(
            "apiVersion".into(),
            "kubeproxy.config.k8s.io/v1alpha1".into(),
        );
        doc.insert("kind".into(), "KubeProxyConfiguration".into());
        doc.extend(m.into_iter().map(|(k, v)| (k.to_string(), v)));
        serde_json::to_string(&Value::Object(doc)).unwrap()
    })
}

#[test]
fn config_decoder_and_validation_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    let mut runner = TestRunner::new(cases(256));
    let text = prop_oneof![3 => config_document(), 1 => "\\PC{0,200}"];
    runner
        .run(&text, |text| {
            let decoded = decode_config(&text);
            std::fs::write(&file, &text).unwrap();
            let args = vec![format!("--config={}", file.display())];
            let parsed = parse_command_line(&args, NODE);
            // Whatever the decoder refuses, the daemon's start-up refuses, naming the file.
            if let Err(e) = &decoded {
                let err = parsed.err().map(|p| p.to_string()).unwrap_or_default();
                prop_assert!(err.contains("config.yaml"), "{e} not reported: {err:?}");
            }
            Ok(())
        })
        .unwrap();
}

/// The chain check itself: a rule of service b in a's chain, and a rule on a built-in chain.
#[test]
#[should_panic(expected = "holds rules of")]
fn chain_check_catches_a_rule_in_another_services_chain() {
    assert_rules_stay_in_their_chains(
        "*nat\n:KUBE-SVC-AAAA - [0:0]\n\
         -A KUBE-SVC-AAAA -m comment --comment \"ns/a:p -> 10.1.1.1:80\" -j KUBE-SEP-X\n\
         -A KUBE-SVC-AAAA -m comment --comment \"ns/b:p -> 10.1.1.2:80\" -j KUBE-SEP-Y\nCOMMIT\n",
    );
}

#[test]
#[should_panic(expected = "outside kube-proxy's declared chains")]
fn chain_check_catches_a_rule_on_a_builtin_chain() {
    assert_rules_stay_in_their_chains(
        "*filter\n:KUBE-FORWARD - [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n",
    );
}

#[test]
fn restore_test_refuses_a_broken_rule() {
    support::require_root();
    let ns = Netns::new("fuzzself");
    let good = "*filter\n:KUBE-FORWARD - [0:0]\n-A KUBE-FORWARD -m comment --comment \"ns/a\" -j ACCEPT\nCOMMIT\n";
    assert_eq!(restore_test(&ns, good), Ok(()));
    for bad in [
        good.replace("-m comment", "-m nosuchmatch"),
        good.replace("ACCEPT", "KUBE-NOWHERE"),
        good.replace("COMMIT\n", ""),
    ] {
        assert!(restore_test(&ns, &bad).is_err(), "{bad}");
    }
}

/// The service (`ns/name`) a per-service nftables chain belongs to: `KIND-HASH-ns/name/…`.
fn nft_chain_owner(chain: &str) -> Option<String> {
    if !chain.contains('/') {
        return None;
    }
    let (_, rest) = chain.split_once('-')?;
    let (_, rest) = rest.split_once('-')?;
    let mut parts = rest.split('/');
    Some(format!("{}/{}", parts.next()?, parts.next()?))
}

/// `(chain, rule)` of every `add rule ip kube-proxy CHAIN RULE` line.
fn nft_rules(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("add rule ip kube-proxy "))
        .filter_map(|l| l.split_once(' '))
        .collect()
}

/// Rules on kube-proxy's fixed chains are the fixed section's (what a cluster without
/// services gets); a per-service chain's rules jump only to that service's chains or fixed
/// ones.
fn assert_nft_rules_stay_in_their_chains(text: &str, fixed: &BTreeSet<(&str, &str)>) {
    for (chain, rule) in nft_rules(text) {
        let Some(owner) = nft_chain_owner(chain) else {
            assert!(
                fixed.contains(&(chain, rule)),
                "a service's rule on the fixed chain {chain}: {rule}"
            );
            continue;
        };
        for word in rule.split([' ', ',', '{', '}']) {
            if let Some(other) = nft_chain_owner(word) {
                assert_eq!(other, owner, "{chain} jumps to another service's {word}");
            }
        }
    }
}

/// nftables mode: every transaction rendered from random objects loads into a throwaway
/// namespace's kernel (stricter than `nft --check`), and no object's rules land in another
/// object's chains or on the fixed chains.
#[test]
fn nftables_rulesets_load_and_stay_in_their_chains() {
    support::require_root();
    let ns = Netns::new("fuzznft");
    let flag_sets: [&[&str]; 2] = [
        &["--proxy-mode=nftables", "--cluster-cidr=10.244.0.0/16"],
        &[
            "--proxy-mode=nftables",
            "--masquerade-all",
            "--nodeport-addresses=primary",
        ],
    ];
    let mut runner = TestRunner::new(cases(32));
    runner
        .run(&cluster(), |values| {
            // The fixed section depends on the node only.
            let nodes: Vec<Value> = values
                .iter()
                .filter(|v| v["kind"] == "Node")
                .cloned()
                .collect();
            for flags in flag_sets {
                let baseline = render(&nodes, Kind::Nftables, flags);
                let fixed: BTreeSet<(&str, &str)> = nft_rules(&baseline).into_iter().collect();
                let text = render(&values, Kind::Nftables, flags);
                let loaded = feed(&ns, "nft", &["-f", "-"], &text);
                let _ = feed(&ns, "nft", &["delete", "table", "ip", "kube-proxy"], "");
                if let Err(e) = loaded {
                    prop_assert!(false, "nft refused ({flags:?}): {e}\n{text}");
                }
                assert_nft_rules_stay_in_their_chains(&text, &fixed);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn nft_chain_check_catches_a_jump_to_another_service() {
    let text = "add rule ip kube-proxy service-AAAAAAAA-ns1/a/tcp/p goto endpoint-BBBBBBBB-ns2/b/tcp/p__10.0.0.1/80\n";
    let r =
        std::panic::catch_unwind(|| assert_nft_rules_stay_in_their_chains(text, &BTreeSet::new()));
    assert!(r.is_err());
    let fixed_rule = "add rule ip kube-proxy services ip daddr 1.2.3.4 drop\n";
    let r = std::panic::catch_unwind(|| {
        assert_nft_rules_stay_in_their_chains(fixed_rule, &BTreeSet::new())
    });
    assert!(r.is_err());
}

/// IPVS mode: every virtual and real server rendered from random objects survives the
/// netlink codec's round trip (what the daemon sends is what it meant), in both families'
/// request shapes the proxier uses (add, edit, delete).
#[test]
fn ipvs_requests_of_random_clusters_round_trip_through_the_codec() {
    use kube_proxy_rs::backend::ipvs::render::{ipvs_config_for, render as ipvs_render};
    use kube_proxy_rs::kernel::ipvs::codec::{IpvsMessage, NetlinkMessage, NetlinkPayload, parse};
    const FAMILY_ID: u16 = 0x24;
    let checked = std::cell::Cell::new(0usize);
    let mut runner = TestRunner::new(cases(64));
    runner
        .run(&cluster(), |values| {
            let args = [
                format!("--hostname-override={NODE}"),
                "--proxy-mode=ipvs".into(),
            ];
            let parsed = parse_render_args(&args, NODE).expect("render flags");
            let v4 = kube_proxy_rs::model::IpFamily::V4;
            let model = state_from(&objects_of(&values), NODE, &mut Vec::new()).snapshot(v4);
            let facts = kube_proxy_rs::host::HostSettings::from_options(&parsed.options)
                .facts(&model.node, v4);
            let local = ["192.168.50.1".parse().unwrap()];
            let cfg = ipvs_config_for(&parsed.options, &facts, &local, v4);
            let desired = ipvs_render(&model, &cfg);
            let mut requests = Vec::new();
            for d in &desired.services {
                requests.push(IpvsMessage::new_service(&d.vs));
                requests.push(IpvsMessage::set_service(&d.vs));
                requests.push(IpvsMessage::del_service(&d.vs));
                for rs in &d.dests {
                    requests.push(IpvsMessage::new_dest(&d.vs, rs));
                    requests.push(IpvsMessage::set_dest(&d.vs, rs));
                    requests.push(IpvsMessage::del_dest(&d.vs, rs));
                }
            }
            for (seq, msg) in requests.into_iter().enumerate() {
                let sent = NetlinkMessage::ipvs(FAMILY_ID, 5, seq as u32, msg);
                let bytes = sent.emit().expect("encodes");
                let back = parse(&bytes, FAMILY_ID).expect("decodes");
                prop_assert_eq!(back.len(), 1);
                prop_assert_eq!(&back[0], &sent);
                prop_assert!(matches!(back[0].payload, NetlinkPayload::Ipvs(_)));
                checked.set(checked.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    assert!(checked.get() > 0, "no random cluster had a virtual server");
}
