//! The iptables side of IPVS mode: a constant-size ruleset matching the ipsets (upstream
//! `writeIptablesRules`, `createAndLinkKubeChain`, `iptablesJumpChain`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::ipset::{self, IpSetSpec};
use crate::backend::netfilter::{JumpRule, LocalDetector};
use crate::model::IpFamily;
use crate::model::plan::ClusterIpMasquerade;

/// nat and filter: the service portal chain.
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// filter: the kube-proxy firewall chain (loadBalancerSourceRanges).
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// filter: the source-ranges subchain.
pub const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";
/// nat: SNAT of marked traffic.
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// nat: sets the masquerade mark.
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// nat and filter: node ports (IPVS mode's name; iptables mode says `KUBE-NODEPORTS`).
pub const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
/// filter: forwarding of marked traffic.
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
/// nat: load-balancer ingress.
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
/// filter: blocks access to host ports through VIPs (#72236).
pub const KUBE_IPVS_FILTER: &str = "KUBE-IPVS-FILTER";
/// filter: blocks node access to LBs whose source ranges exclude the node (#119656).
pub const KUBE_IPVS_OUT_FILTER: &str = "KUBE-IPVS-OUT-FILTER";

/// Upstream `iptablesChains` (also `iptablesCleanupChains`): `(table, chain)` in order.
pub const IPVS_CHAINS: &[(&str, &str)] = &[
    ("nat", KUBE_SERVICES),
    ("nat", KUBE_POSTROUTING),
    ("nat", KUBE_NODE_PORT),
    ("nat", KUBE_LOAD_BALANCER),
    ("nat", KUBE_MARK_MASQ),
    ("filter", KUBE_FORWARD),
    ("filter", KUBE_NODE_PORT),
    ("filter", KUBE_PROXY_FIREWALL),
    ("filter", KUBE_SOURCE_RANGES_FIREWALL),
    ("filter", KUBE_IPVS_FILTER),
    ("filter", KUBE_IPVS_OUT_FILTER),
];

const fn jump(
    table: &'static str,
    chain: &'static str,
    target: &'static str,
    comment: &'static str,
) -> JumpRule {
    JumpRule {
        table,
        chain,
        target,
        comment,
        extra_args: &[],
    }
}

/// Upstream `iptablesJumpChain` for IPVS mode, in order (ensured with `-C`/`-I`, removed by
/// cleanup). None carries a conntrack match, unlike iptables mode's.
pub const IPVS_JUMPS: &[JumpRule] = &[
    jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    jump(
        "nat",
        "PREROUTING",
        KUBE_SERVICES,
        "kubernetes service portals",
    ),
    jump(
        "nat",
        "POSTROUTING",
        KUBE_POSTROUTING,
        "kubernetes postrouting rules",
    ),
    jump(
        "filter",
        "FORWARD",
        KUBE_FORWARD,
        "kubernetes forwarding rules",
    ),
    jump(
        "filter",
        "INPUT",
        KUBE_NODE_PORT,
        "kubernetes health check rules",
    ),
    jump(
        "filter",
        "INPUT",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules",
    ),
    jump(
        "filter",
        "FORWARD",
        KUBE_PROXY_FIREWALL,
        "kube-proxy firewall rules",
    ),
    jump(
        "filter",
        "INPUT",
        KUBE_IPVS_FILTER,
        "kubernetes ipvs access filter",
    ),
    jump(
        "filter",
        "OUTPUT",
        KUBE_IPVS_OUT_FILTER,
        "kubernetes ipvs access filter",
    ),
];

/// The builtin-chain jumps IPVS mode ensures.
pub fn ipvs_jump_rules() -> Vec<JumpRule> {
    IPVS_JUMPS.to_vec()
}

/// Upstream `ipsetWithIptablesChain`: set, table, from chain, target, match type, `-p`.
/// The LOCAL node-port sets come before their masquerade counterparts.
const SET_RULES: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        ipset::LOOP_BACK,
        "nat",
        KUBE_POSTROUTING,
        "MASQUERADE",
        "dst,dst,src",
        "",
    ),
    (
        ipset::LOAD_BALANCER,
        "nat",
        KUBE_SERVICES,
        KUBE_LOAD_BALANCER,
        "dst,dst",
        "",
    ),
    (
        ipset::LOAD_BALANCER_LOCAL,
        "nat",
        KUBE_LOAD_BALANCER,
        "RETURN",
        "dst,dst",
        "",
    ),
    (
        ipset::NODE_PORT_LOCAL_TCP,
        "nat",
        KUBE_NODE_PORT,
        "RETURN",
        "dst",
        "tcp",
    ),
    (
        ipset::NODE_PORT_TCP,
        "nat",
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst",
        "tcp",
    ),
    (
        ipset::NODE_PORT_LOCAL_UDP,
        "nat",
        KUBE_NODE_PORT,
        "RETURN",
        "dst",
        "udp",
    ),
    (
        ipset::NODE_PORT_UDP,
        "nat",
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst",
        "udp",
    ),
    (
        ipset::NODE_PORT_LOCAL_SCTP,
        "nat",
        KUBE_NODE_PORT,
        "RETURN",
        "dst,dst",
        "sctp",
    ),
    (
        ipset::NODE_PORT_SCTP,
        "nat",
        KUBE_NODE_PORT,
        KUBE_MARK_MASQ,
        "dst,dst",
        "sctp",
    ),
    (
        ipset::LOAD_BALANCER_FW,
        "filter",
        KUBE_PROXY_FIREWALL,
        KUBE_SOURCE_RANGES_FIREWALL,
        "dst,dst",
        "",
    ),
    (
        ipset::LOAD_BALANCER_SOURCE_CIDR,
        "filter",
        KUBE_SOURCE_RANGES_FIREWALL,
        "RETURN",
        "dst,dst,src",
        "",
    ),
    (
        ipset::LOAD_BALANCER_SOURCE_IP,
        "filter",
        KUBE_SOURCE_RANGES_FIREWALL,
        "RETURN",
        "dst,dst,src",
        "",
    ),
];

/// An LB `ip:port/proto` the node itself must not reach (its source ranges exclude the node
/// IP): one `KUBE-IPVS-OUT-FILTER` DROP rule each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoNodeAccess {
    /// LB ingress IP.
    pub ip: IpAddr,
    /// Lower-case protocol.
    pub proto: &'static str,
    /// Service port.
    pub port: u16,
}

/// Settings the ruleset depends on.
#[derive(Debug, Clone, Copy)]
pub struct RuleParams<'a> {
    /// How ClusterIP traffic is masqueraded (the plan's decision).
    pub cluster_ip_masquerade: ClusterIpMasquerade,
    /// The mark, formatted (`0x00004000`).
    pub mark: &'a str,
    /// Local traffic detection.
    pub local_detector: &'a LocalDetector,
    /// Append `--random-fully` to the MASQUERADE rule.
    pub random_fully: bool,
    /// The family written (the restore runs through that family's `ip[6]tables-restore`).
    pub family: IpFamily,
}

/// Sources KUBE-SERVICES leaves alone (upstream's "dismiss connects to localhost early"):
/// the IPv4 loopback net, or IPv6's only loopback address.
fn loopback_sources(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    }
}

/// The rendered ruleset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RulesText {
    /// `*nat … COMMIT *filter … COMMIT` (upstream writes nat first).
    pub text: String,
    /// `-A` lines in filter.
    pub filter_rules: usize,
    /// `-A` lines in nat.
    pub nat_rules: usize,
}

fn line(words: &[&str]) -> String {
    words.join(" ")
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

/// Writes the restore input for `sets` (keyed by name; a missing or empty set counts as
/// empty) in upstream's rule order.
pub fn write_rules(
    sets: &BTreeMap<&str, &IpSetSpec>,
    no_node_access: &[NoNodeAccess],
    p: &RuleParams<'_>,
) -> RulesText {
    let empty = |name: &str| sets.get(name).is_none_or(|s| s.entries.is_empty());
    let comment = |name: &str| {
        let c = sets
            .get(name)
            .map(|s| s.comment.clone())
            .or_else(|| IpSetSpec::empty(name, p.family).map(|s| s.comment))
            .unwrap_or_default();
        quoted(&c)
    };
    // `--match-set` takes the family's name of a set (`KUBE-6-*` for IPv6).
    let set = |name: &str| ipset::set_name(name, p.family);
    let mut nat: Vec<String> = Vec::new();
    let mut filter: Vec<String> = Vec::new();

    nat.push(line(&[
        "-A",
        KUBE_SERVICES,
        "-s",
        loopback_sources(p.family),
        "-j",
        "RETURN",
    ]));

    for (name, table, from, to, match_type, proto) in SET_RULES {
        if empty(name) {
            continue;
        }
        let mut w: Vec<String> = vec!["-A".into(), (*from).into()];
        if !proto.is_empty() {
            w.extend(["-p".into(), (*proto).into()]);
        }
        w.extend([
            "-m".into(),
            "comment".into(),
            "--comment".into(),
            comment(name),
            "-m".into(),
            "set".into(),
            "--match-set".into(),
            set(name),
            (*match_type).into(),
            "-j".into(),
            (*to).into(),
        ]);
        let l = w.join(" ");
        if *table == "filter" {
            filter.push(l);
        } else {
            nat.push(l);
        }
    }

    if !empty(ipset::CLUSTER_IP) {
        let c = comment(ipset::CLUSTER_IP);
        let cluster_ip = set(ipset::CLUSTER_IP);
        let base = [
            "-A",
            KUBE_SERVICES,
            "-m",
            "comment",
            "--comment",
            c.as_str(),
            "-m",
            "set",
            "--match-set",
            cluster_ip.as_str(),
        ];
        let mut w: Vec<&str> = base.to_vec();
        let not_local = p.local_detector.if_not_local();
        match p.cluster_ip_masquerade {
            ClusterIpMasquerade::All => w.push("dst,dst"),
            ClusterIpMasquerade::NonLocalSources => {
                w.push("dst,dst");
                w.extend(not_local.iter().map(String::as_str));
            }
            // No detector: masquerade node-originated traffic whose source is a VIP
            // (the VIPs on kube-ipvs0 are picked as source addresses).
            ClusterIpMasquerade::None => w.push("src,dst"),
        }
        w.extend(["-j", KUBE_MARK_MASQ]);
        nat.push(line(&w));
    }

    let external_rules = |nat: &mut Vec<String>, args: &[&str]| {
        let mut a = args.to_vec();
        a.extend([
            "-m",
            "physdev",
            "!",
            "--physdev-is-in",
            "-m",
            "addrtype",
            "!",
            "--src-type",
            "LOCAL",
            "-j",
            "ACCEPT",
        ]);
        nat.push(line(&a));
        let mut a = args.to_vec();
        a.extend(["-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT"]);
        nat.push(line(&a));
    };
    for (base, masq) in [
        (ipset::EXTERNAL_IP, true),
        (ipset::EXTERNAL_IP_LOCAL, false),
    ] {
        if empty(base) {
            continue;
        }
        let c = comment(base);
        let name = set(base);
        let args = [
            "-A",
            KUBE_SERVICES,
            "-m",
            "comment",
            "--comment",
            c.as_str(),
            "-m",
            "set",
            "--match-set",
            name.as_str(),
            "dst,dst",
        ];
        if masq {
            let mut a = args.to_vec();
            a.extend(["-j", KUBE_MARK_MASQ]);
            nat.push(line(&a));
        }
        external_rules(&mut nat, &args);
    }

    nat.push(line(&[
        "-A",
        KUBE_SERVICES,
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
        "-j",
        KUBE_NODE_PORT,
    ]));
    nat.push(line(&["-A", KUBE_LOAD_BALANCER, "-j", KUBE_MARK_MASQ]));
    filter.push(line(&["-A", KUBE_SOURCE_RANGES_FIREWALL, "-j", "DROP"]));

    for e in no_node_access {
        let ip = e.ip.to_string();
        let port = e.port.to_string();
        filter.push(line(&[
            "-A",
            KUBE_IPVS_OUT_FILTER,
            "-s",
            &ip,
            "-m",
            "ipvs",
            "--vaddr",
            &ip,
            "--vproto",
            e.proto,
            "--vport",
            &port,
            "-j",
            "DROP",
        ]));
    }

    // Accept traffic to IPVS virtual services in case other rules would drop it.
    for base in [ipset::CLUSTER_IP, ipset::LOAD_BALANCER] {
        if !empty(base) {
            nat.push(line(&[
                "-A",
                KUBE_SERVICES,
                "-m",
                "set",
                "--match-set",
                &set(base),
                "dst,dst",
                "-j",
                "ACCEPT",
            ]));
        }
    }

    let mark_match = format!("{0}/{0}", p.mark);
    let fwd_comment = quoted("kubernetes forwarding rules");
    filter.push(line(&[
        "-A",
        KUBE_FORWARD,
        "-m",
        "comment",
        "--comment",
        &fwd_comment,
        "-m",
        "mark",
        "--mark",
        &mark_match,
        "-j",
        "ACCEPT",
    ]));
    let ct_comment = quoted("kubernetes forwarding conntrack rule");
    filter.push(line(&[
        "-A",
        KUBE_FORWARD,
        "-m",
        "comment",
        "--comment",
        &ct_comment,
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ]));
    let hc_comment = comment(ipset::HEALTH_CHECK_NODE_PORT);
    filter.push(line(&[
        "-A",
        KUBE_NODE_PORT,
        "-m",
        "comment",
        "--comment",
        &hc_comment,
        "-m",
        "set",
        "--match-set",
        &set(ipset::HEALTH_CHECK_NODE_PORT),
        "dst",
        "-j",
        "ACCEPT",
    ]));

    for (base, match_type) in [
        (ipset::LOAD_BALANCER, "dst,dst"),
        (ipset::CLUSTER_IP, "dst,dst"),
        (ipset::EXTERNAL_IP, "dst,dst"),
        (ipset::EXTERNAL_IP_LOCAL, "dst,dst"),
        (ipset::HEALTH_CHECK_NODE_PORT, "dst"),
    ] {
        filter.push(line(&[
            "-A",
            KUBE_IPVS_FILTER,
            "-m",
            "set",
            "--match-set",
            &set(base),
            match_type,
            "-j",
            "RETURN",
        ]));
    }
    filter.push(line(&[
        "-A",
        KUBE_IPVS_FILTER,
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "set",
        "--match-set",
        &set(ipset::IPVS_IPS),
        "dst",
        "-j",
        "REJECT",
    ]));

    nat.push(line(&[
        "-A",
        KUBE_POSTROUTING,
        "-m",
        "mark",
        "!",
        "--mark",
        &mark_match,
        "-j",
        "RETURN",
    ]));
    nat.push(line(&[
        "-A",
        KUBE_POSTROUTING,
        "-j",
        "MARK",
        "--xor-mark",
        p.mark,
    ]));
    let snat_comment = quoted("kubernetes service traffic requiring SNAT");
    let mut masq = vec![
        "-A",
        KUBE_POSTROUTING,
        "-m",
        "comment",
        "--comment",
        &snat_comment,
        "-j",
        "MASQUERADE",
    ];
    if p.random_fully {
        masq.push("--random-fully");
    }
    nat.push(line(&masq));
    nat.push(line(&[
        "-A",
        KUBE_MARK_MASQ,
        "-j",
        "MARK",
        "--or-mark",
        p.mark,
    ]));

    let mut text = String::new();
    write_table(&mut text, "nat", &nat);
    write_table(&mut text, "filter", &filter);
    RulesText {
        text,
        filter_rules: filter.len(),
        nat_rules: nat.len(),
    }
}

/// Appends one table's section: its chain lines (from [`IPVS_CHAINS`]), rules and `COMMIT`.
fn write_table(text: &mut String, table: &str, rules: &[String]) {
    text.push_str(&format!("*{table}\n"));
    for (t, c) in IPVS_CHAINS {
        if *t == table {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
    }
    for l in rules {
        text.push_str(l);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
}
