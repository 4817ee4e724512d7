//! `explain --mode nftables`: walks one new connection through the `ip`/`ip6 kube-proxy`
//! table, read from the kernel (`nft list table`) or from a render, with the nftables
//! tracer ([`crate::backend::nftables::tracer::paths`]): the verdict-map elements it
//! matches, the chains it takes, each endpoint with its odds (either layout: upstream's
//! `numgen … vmap` or the large-cluster one rule per endpoint), session affinity,
//! masquerading and why, or the rule that rejects or drops it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use super::{ExplainArgs, ExplainError, Packet};
use crate::backend::nftables::Table;
use crate::backend::nftables::listing::parse_listing;
use crate::backend::nftables::names::FamilyTokens as _;
use crate::backend::nftables::tracer::{self, Path};
use crate::config::ProxyMode;
use crate::model::IpFamily;

/// A table to explain against.
#[derive(Debug, Clone)]
pub struct NftRuleset {
    /// The `kube-proxy` table of the destination's family.
    pub table: Table,
    /// The node's addresses (`fib … type local`, and which hooks a connection enters).
    pub node_ips: Vec<IpAddr>,
    /// Where the table came from, for the header.
    pub origin: String,
}

/// Sources used when `--from` is not given: outside the node and any pod network.
const OUTSIDE_V4: &str = "198.18.0.1";
const OUTSIDE_V6: &str = "2001:db8:ffff::1";

/// Reads `ip|ip6 kube-proxy` and the local addresses of this network namespace.
pub async fn table_from_kernel(packet: &Packet) -> Result<NftRuleset, ExplainError> {
    let family = IpFamily::of(&packet.destination).nft();
    let text = crate::kernel::nft::Nft::new()
        .list_table(family)
        .await?
        .ok_or_else(|| ExplainError::NoNftTable(family.to_string()))?;
    let table = parse_listing(&text).ok_or_else(|| ExplainError::NoNftTable(family.to_string()))?;
    let node_ips = crate::kernel::Addresses::new()
        .list()
        .await?
        .into_iter()
        .map(|a| a.addr)
        .collect();
    Ok(NftRuleset {
        table,
        node_ips,
        origin: format!("kernel (nft list table {family} kube-proxy)"),
    })
}

/// The table `render --proxy-mode nftables` would leave for `args`.
pub fn table_from_render(
    args: &ExplainArgs,
    warnings: &mut Vec<String>,
) -> Result<NftRuleset, ExplainError> {
    let r = crate::explain::render_for(args, ProxyMode::Nftables, warnings)?;
    let mut table = Table::default();
    table
        .apply(&r.text)
        .map_err(|e| ExplainError::NftRender(e.to_string()))?;
    Ok(NftRuleset {
        table,
        node_ips: r.node_ips,
        origin: format!("render of {}", r.files),
    })
}

/// One fate of the connection, merged over the paths that lead to it.
#[derive(Debug, Clone, PartialEq)]
struct Fate {
    odds: f64,
    /// The DNAT destination, `DROP`, `REJECT`, or empty (not NATed, accepted).
    output: String,
    /// The endpoint chain the DNAT was in.
    endpoint_chain: Option<String>,
    /// The rule that marked the connection for masquerading, if it was masqueraded.
    masquerade: Option<Option<String>>,
    local_delivery: bool,
    /// For a drop or reject: the rule, and the map element that led there.
    why: Option<String>,
}

fn fate(p: &Path) -> Fate {
    let rules = &p.trace.matched_rules;
    let output = p.trace.output();
    let endpoint_chain = rules
        .iter()
        .rev()
        .find(|r| r.contains(" dnat to "))
        .and_then(|r| r.split_once(": ").map(|(c, _)| c.to_string()));
    let marked_by = rules
        .iter()
        .find(|r| {
            !r.starts_with("mark-for-masquerade: ")
                && (r.contains("jump mark-for-masquerade") || r.contains("mark set mark or"))
        })
        .cloned();
    let blocked = output == "DROP" || output == "REJECT";
    let why = blocked.then(|| {
        let rule = rules.last().cloned().unwrap_or_default();
        match p.maps.last() {
            Some((map, element, value)) if value.contains(rule.split(':').next().unwrap_or("")) => {
                format!(
                    "{rule}\n    reached through @{map} {{ {element} }}{}",
                    map_meaning(map)
                )
            }
            _ => rule,
        }
    });
    Fate {
        odds: p.odds,
        output,
        endpoint_chain,
        masquerade: p.trace.masquerade.then_some(marked_by),
        local_delivery: p.local_delivery,
        why,
    }
}

/// What a drop or reject reached through `map` means.
fn map_meaning(map: &str) -> &'static str {
    match map {
        "no-endpoint-services" | "no-endpoint-nodeports" => {
            ": the service has no endpoints to serve it"
        }
        "firewall-ips" => ": the source is outside the service's loadBalancerSourceRanges",
        _ => "",
    }
}

/// The layout the random picks on the paths show.
fn layout(paths: &[Path]) -> &'static str {
    let rules: Vec<&str> = paths
        .iter()
        .flat_map(|p| p.choices.iter().map(|c| c.rule.as_str()))
        .collect();
    if rules.is_empty() {
        "no endpoint choice on this path"
    } else if rules.iter().any(|r| r.contains(" vmap ")) {
        "upstream (one `numgen … vmap` per service)"
    } else {
        "large-cluster (one `numgen random mod K 0 goto` rule per endpoint)"
    }
}

/// The affinity sets a path updates, with their timeouts, and whether the source is
/// already in one (it then sticks to that set's endpoint).
fn affinity_text(rs: &NftRuleset, paths: &[Path]) -> Vec<String> {
    let mut out = Vec::new();
    let mut sets: Vec<&String> = paths.iter().flat_map(|p| &p.affinity_updates).collect();
    sets.sort();
    sets.dedup();
    for set in &sets {
        let timeout = rs
            .table
            .sets
            .get(set.as_str())
            .and_then(|s| {
                s.spec
                    .split(';')
                    .map(str::trim)
                    .find_map(|p| p.strip_prefix("timeout "))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "?".to_string());
        out.push(format!("@{set} (timeout {timeout})"));
    }
    let sticky: Vec<&String> = paths
        .iter()
        .flat_map(|p| &p.trace.matched_rules)
        .filter(|r| r.contains("saddr @affinity-") && r.contains(" goto "))
        .collect();
    if let Some(r) = sticky.first() {
        out.push(format!("this source is already in an affinity set: {r}"));
    }
    out
}

fn percent(p: f64) -> String {
    format!("{:.1}%", p * 100.0)
}

/// Explains `packet` against `rs`: the text `explain` prints.
pub fn explain(rs: &NftRuleset, packet: &Packet) -> String {
    let outside = packet.source.is_none();
    let source = packet.source.unwrap_or_else(|| {
        let s = if packet.destination.is_ipv4() {
            OUTSIDE_V4
        } else {
            OUTSIDE_V6
        };
        s.parse().unwrap_or(packet.destination)
    });
    let pkt = tracer::Packet {
        source,
        protocol: packet.protocol,
        destination: packet.destination,
        dport: packet.port,
        in_interface: None,
    };
    let paths = tracer::paths(&rs.table, &rs.node_ips, &pkt);
    let mut out = String::new();
    let dest = super::endpoint_string(packet.destination, packet.port);
    let _ = write!(
        out,
        "Connection: {} {source} -> {dest}",
        packet.protocol.lower().to_uppercase()
    );
    if outside {
        out.push_str(" (source: a client outside the node and the pod network; --from sets it)");
    }
    let _ = writeln!(out, "\nRules: {}", rs.origin);
    let _ = writeln!(out, "Layout: {}", layout(&paths));
    if let Some(first) = paths.first() {
        let _ = writeln!(out, "Hooks: {}", first.hooks.join(" -> "));
    }
    write_maps(&mut out, &paths);
    write_common_path(&mut out, &paths);
    write_fates(&mut out, &paths);
    let affinity = affinity_text(rs, &paths);
    if !affinity.is_empty() {
        let _ = writeln!(
            out,
            "Session affinity (ClientIP): the first connection picks an endpoint with the odds above; later ones from {source} go to the same endpoint until its entry times out:"
        );
        for a in affinity {
            let _ = writeln!(out, "  {a}");
        }
    }
    out
}

fn write_maps(out: &mut String, paths: &[Path]) {
    let mut maps: Vec<&(String, String, String)> = paths.iter().flat_map(|p| &p.maps).collect();
    maps.dedup();
    let mut seen = Vec::new();
    maps.retain(|m| {
        let new = !seen.contains(m);
        seen.push(*m);
        new
    });
    if maps.is_empty() {
        out.push_str("Verdict maps matched: none\n");
        return;
    }
    out.push_str("Verdict maps matched:\n");
    for (map, element, _) in maps {
        let _ = writeln!(out, "  @{map} {{ {element} }}");
    }
}

/// The rules every path matches before the first random pick.
fn write_common_path(out: &mut String, paths: &[Path]) {
    let Some(first) = paths.first() else { return };
    let common: Vec<&String> = first
        .trace
        .matched_rules
        .iter()
        .enumerate()
        .take_while(|(i, r)| {
            paths
                .iter()
                .all(|p| p.trace.matched_rules.get(*i) == Some(*r))
        })
        .map(|(_, r)| r)
        .collect();
    out.push_str("Rules matched (chain: rule):\n");
    for r in &common {
        let _ = writeln!(out, "  {r}");
    }
    if common.is_empty() {
        out.push_str("  none\n");
    }
}

fn write_fates(out: &mut String, paths: &[Path]) {
    let mut fates: BTreeMap<String, Fate> = BTreeMap::new();
    let mut order = Vec::new();
    for f in paths.iter().map(fate) {
        let key = format!("{}|{:?}|{:?}", f.output, f.endpoint_chain, f.masquerade);
        match fates.get_mut(&key) {
            Some(have) => have.odds += f.odds,
            None => {
                order.push(key.clone());
                fates.insert(key, f);
            }
        }
    }
    let fates: Vec<&Fate> = order.iter().filter_map(|k| fates.get(k)).collect();
    let endpoints: Vec<&&Fate> = fates
        .iter()
        .filter(|f| f.endpoint_chain.is_some())
        .collect();
    if !endpoints.is_empty() {
        let _ = writeln!(out, "Endpoints ({}):", endpoints.len());
        for f in &endpoints {
            let _ = writeln!(
                out,
                "  {:>6}  {}  via {}",
                percent(f.odds),
                f.output,
                f.endpoint_chain.as_deref().unwrap_or("?")
            );
            let _ = writeln!(out, "          {}", masquerade_text(f));
        }
    }
    for f in fates.iter().filter(|f| f.endpoint_chain.is_none()) {
        let odds = if fates.len() > 1 {
            format!(" ({})", percent(f.odds))
        } else {
            String::new()
        };
        match f.output.as_str() {
            "DROP" | "REJECT" => {
                let _ = writeln!(
                    out,
                    "Result{odds}: {} by {}",
                    f.output,
                    f.why.as_deref().unwrap_or("?")
                );
            }
            _ if f.local_delivery => {
                let _ = writeln!(
                    out,
                    "Result{odds}: accepted, delivered to the node itself (no kube-proxy rule changes it)"
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "Result{odds}: accepted unchanged (no kube-proxy rule translates it); {}",
                    masquerade_text(f)
                );
            }
        }
    }
}

fn masquerade_text(f: &Fate) -> String {
    match (&f.masquerade, f.local_delivery) {
        (_, true) => "not masqueraded (delivered locally)".to_string(),
        (Some(Some(rule)), _) => format!("masqueraded: marked by {rule}"),
        (Some(None), _) => "masqueraded".to_string(),
        (None, _) => "not masqueraded (source address kept)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nftables::proxier::render_config;
    use crate::backend::nftables::{Committed, Prior, build, render};

    const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo-cluster.yaml");

    /// The demo cluster's first-sync table for node1, switching to the large-cluster layout
    /// above `threshold` service ports.
    fn demo(threshold: usize) -> NftRuleset {
        let args: Vec<String> = [
            "--proxy-mode=nftables",
            "--hostname-override=node1",
            "--cluster-cidr=10.244.0.0/16",
            &format!("--objects={DEMO}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let args = crate::config::parse_render_args(&args, "node1").unwrap();
        let model = crate::render::model(&args, true, IpFamily::V4, &mut Vec::new()).unwrap();
        let mut cfg = render_config(&args.options, IpFamily::V4);
        let facts =
            crate::host::HostSettings::from_options(&args.options).facts(&model.node, IpFamily::V4);
        cfg.apply_node_facts(&facts, &model.node.ips);
        cfg.large_cluster_threshold = threshold;
        let tx = build(
            &render(&model, &cfg),
            Prior::Known(&Committed::default()),
            true,
            true,
        );
        let mut table = Table::default();
        table.apply(&tx.text).unwrap();
        NftRuleset {
            table,
            node_ips: model.node.ips.clone(),
            origin: "test".into(),
        }
    }

    fn explain_to(rs: &NftRuleset, from: Option<&str>, to: &str) -> String {
        let (destination, port, protocol) = super::super::parse_destination(to).unwrap();
        explain(
            rs,
            &Packet {
                source: from.map(|f| f.parse().unwrap()),
                destination,
                port,
                protocol,
            },
        )
    }

    /// `(odds, endpoint)` of each endpoint line.
    fn endpoints(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter(|l| l.contains("  via endpoint-"))
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w[0].to_string(), w[1].to_string())
            })
            .collect()
    }

    #[test]
    fn both_layouts_give_each_endpoint_the_same_odds() {
        let want = [
            ("33.3%", "10.244.1.11:8080"),
            ("33.3%", "10.244.2.12:8080"),
            ("33.3%", "10.244.3.13:8080"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()));
        let upstream = explain_to(&demo(1000), None, "10.96.0.10:80");
        assert_eq!(endpoints(&upstream), want, "{upstream}");
        assert!(upstream.contains("Layout: upstream"), "{upstream}");
        assert!(
            upstream.contains(
                "@service-ips { 10.96.0.10 . tcp . 80 : goto service-AXK6CI2C-demo/web/tcp/http }"
            ),
            "{upstream}"
        );
        let large = explain_to(&demo(0), None, "10.96.0.10:80");
        assert_eq!(endpoints(&large), want, "{large}");
        assert!(large.contains("Layout: large-cluster"), "{large}");
    }

    #[test]
    fn masquerade_depends_on_the_source_and_says_which_rule() {
        let rs = demo(1000);
        let outside = explain_to(&rs, None, "10.96.0.10:80");
        assert_eq!(
            outside.matches("masqueraded: marked by service-AXK6CI2C-demo/web/tcp/http: ip daddr 10.96.0.10 ip saddr != 10.244.0.0/16 jump mark-for-masquerade").count(),
            3,
            "{outside}"
        );
        let pod = explain_to(&rs, Some("10.244.3.99"), "10.96.0.10:80");
        assert_eq!(
            pod.matches("not masqueraded (source address kept)").count(),
            3,
            "{pod}"
        );
        // A pod reaching itself through the service is masqueraded by its endpoint chain.
        let hairpin = explain_to(&rs, Some("10.244.1.11"), "10.96.0.10:80");
        assert!(
            hairpin.contains("masqueraded: marked by endpoint-S4ZL6AMI-demo/web/tcp/http__10.244.1.11/8080: ip saddr 10.244.1.11 jump mark-for-masquerade"),
            "{hairpin}"
        );
    }

    #[test]
    fn from_the_node_enters_the_output_hooks() {
        let text = explain_to(&demo(1000), Some("192.168.50.1"), "10.96.0.10:80");
        assert!(
            text.contains(
                "Hooks: filter-output-pre-dnat -> nat-output -> filter-output -> nat-postrouting"
            ),
            "{text}"
        );
        assert_eq!(endpoints(&text).len(), 3, "{text}");
    }

    #[test]
    fn rejects_and_drops_name_the_rule_and_why() {
        let rs = demo(1000);
        let empty = explain_to(&rs, None, "10.96.0.130:80");
        assert!(
            empty.contains("Result: REJECT by reject-chain: reject\n    reached through @no-endpoint-services { 10.96.0.130 . tcp . 80 comment \"demo/empty:http\" : goto reject-chain }: the service has no endpoints to serve it"),
            "{empty}"
        );
        let outsider = explain_to(&rs, None, "203.0.113.10:443");
        assert!(
            outsider.contains("Result: DROP by firewall-LLLKJ2GE-demo/edge/tcp/https: ip saddr != { 198.51.100.0/24 } drop"),
            "{outsider}"
        );
        assert!(outsider.contains("loadBalancerSourceRanges"), "{outsider}");
        let allowed = explain_to(&rs, Some("198.51.100.7"), "203.0.113.10:443");
        assert!(!allowed.contains("DROP"), "{allowed}");
        assert_eq!(endpoints(&allowed).len(), 1, "eTP=Local: {allowed}");
        let wrong_port = explain_to(&rs, None, "10.96.0.10:81");
        assert!(
            wrong_port.contains("Result: REJECT by cluster-ips-check: ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""),
            "{wrong_port}"
        );
        let unknown = explain_to(&rs, None, "10.96.0.99:80");
        assert!(unknown.contains("Verdict maps matched: none"), "{unknown}");
        assert!(unknown.contains("accepted unchanged"), "{unknown}");
    }

    #[test]
    fn affinity_names_the_sets_and_their_timeout() {
        let text = explain_to(&demo(1000), None, "10.96.0.80:80");
        assert!(text.contains("Session affinity (ClientIP)"), "{text}");
        assert!(
            text.contains("@affinity-V7TIFHB5-demo/shop/tcp/http__10.244.1.21/8080 (timeout 600s)"),
            "{text}"
        );
        assert_eq!(endpoints(&text).len(), 2, "{text}");
        let plain = explain_to(&demo(1000), None, "10.96.0.10:80");
        assert!(!plain.contains("affinity"), "{plain}");
    }
}
