//! `kube-proxy-rs explain`: why a packet goes where it goes.
//!
//! Reads a ruleset (the kernel's `iptables-save -t nat` and `-t filter`, or the render of a set
//! of objects) and walks one new connection through it the way netfilter does: nat PREROUTING
//! (nat OUTPUT when the source is one of the node's addresses), then filter INPUT, FORWARD or
//! OUTPUT, then nat POSTROUTING. Unlike the upstream-style test tracer
//! ([`crate::backend::iptables::tracer`]), every `-m statistic --probability` jump splits the
//! walk in two, so each candidate endpoint comes out with its probability
//! (endpoint *i* gets p_i × Π(1−p_j) over the earlier rules *j*), and the mark set by
//! KUBE-MARK-MASQ is carried through to KUBE-POSTROUTING to tell whether the connection is
//! masqueraded and why.
//!
//! Everything here but [`ruleset_from_kernel`] is pure: the walk and the text are unit-tested
//! on rendered rulesets; the kernel read is two `iptables-save` calls and `ip -j addr`.

pub mod ipvs;
pub mod nftables;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::backend::Kind;
use crate::backend::netfilter::jumps::{KUBE_PROXY_JUMPS, jump_rules};
use crate::backend::netfilter::names::{KUBE_MARK_MASQ, SEP_PREFIX};
use crate::backend::netfilter::parse::{Chain, Dump, ParseError, Rule, Table, Value};
use crate::config::{ConfigError, ProxyMode, RenderArgs, parse_render_args};
use crate::model::Protocol;

/// Usage text of `kube-proxy-rs explain`.
pub const USAGE: &str = "\
Prints the path a new connection takes through kube-proxy's rules: the chains and rules it
matches (with their comments), the candidate endpoints and their probabilities, session
affinity, whether it is masqueraded and why, or which rule rejects or drops it. In IPVS mode:
the virtual server, its scheduler and persistence, and each real server's share by weight. In
nftables mode: the verdict-map elements matched, the chains taken, each endpoint's odds (either
layout: upstream's numgen vmap or the large-cluster one rule per endpoint).

Usage:
  kube-proxy-rs explain --to IP:PORT[/PROTO] [--from IP] [--mode iptables|ipvs|nftables]
                        [--objects FILE...] [--node-ip IP] [kube-proxy flags]

  --to IP:PORT[/PROTO]  destination (PROTO: tcp, udp or sctp; default tcp); IPv6 as [IP]:PORT
  --from IP             source address; default: a client outside the node and the pod network
  --mode MODE           iptables, ipvs or nftables; default: the mode of --proxy-mode/--config,
                        else iptables
  --objects FILE...     explain the render of these objects (as `render` prints it) instead of
                        the rules in the kernel; --node-ip, --cluster-cidr, --config and
                        --hostname-override apply to the render as for `render`

Without --objects the rules are read from the kernel, as root: in iptables mode with
iptables-save, the back end detected as the daemon does (KUBE_PROXY_RS_IPTABLES_MODE=legacy|nft
forces one); in IPVS mode from the kernel's IPVS table; in nftables mode with
`nft list table ip|ip6 kube-proxy` (the destination's family).";

/// Why `explain` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// Bad command line.
    #[error("{0}\n\n{USAGE}")]
    Usage(String),
    /// Bad kube-proxy flags or config file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A mode without an explainer yet.
    #[error("explain does not support --mode={0} yet: iptables and ipvs can be explained")]
    Unsupported(ProxyMode),
    /// The IPVS table could not be read.
    #[error("cannot read the IPVS table from the kernel: {0}")]
    Ipvs(String),
    /// The objects could not be rendered.
    #[error(transparent)]
    Render(#[from] crate::render::RenderError),
    /// The ruleset is not valid iptables-save text.
    #[error("cannot parse the ruleset: {0}")]
    Parse(#[from] ParseError),
    /// The kernel could not be read.
    #[error("cannot read the rules from the kernel: {0}")]
    Kernel(#[from] crate::kernel::KernelError),
    /// nftables mode: the kernel has no `kube-proxy` table of the destination's family.
    #[error("there is no `{0} kube-proxy` nftables table: is kube-proxy running in nftables mode?")]
    NoNftTable(String),
    /// nftables mode: the render is not a transaction nft would accept.
    #[error("the nftables render does not apply: {0}")]
    NftRender(String),
}

/// A new connection to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Source address; `None` is "a client outside the node and outside the pod network".
    pub source: Option<IpAddr>,
    /// Destination address.
    pub destination: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// The parsed `explain` command line.
#[derive(Debug, Clone, PartialEq)]
pub struct ExplainArgs {
    /// The connection.
    pub packet: Packet,
    /// Which mode's rules to read.
    pub mode: ProxyMode,
    /// kube-proxy flags, `--node-ip` and `--objects` (empty objects: read the kernel).
    pub render: RenderArgs,
    /// Whether `--hostname-override` was given (render picks the node otherwise).
    pub explicit_hostname: bool,
}

/// Parses `IP:PORT[/PROTO]` (`[IPv6]:PORT[/PROTO]`); the protocol defaults to TCP.
pub fn parse_destination(s: &str) -> Result<(IpAddr, u16, Protocol), String> {
    let (addr, protocol) = match s.rsplit_once('/') {
        Some((addr, proto)) => {
            let p = Protocol::from_api(&proto.to_ascii_uppercase())
                .ok_or_else(|| format!("unknown protocol {proto:?} in {s:?} (tcp, udp, sctp)"))?;
            (addr, p)
        }
        None => (s, Protocol::Tcp),
    };
    let sa: SocketAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not IP:PORT[/PROTO] (IPv6: [IP]:PORT)"))?;
    Ok((sa.ip(), sa.port(), protocol))
}

/// Parses the arguments after `explain`. `system_hostname` is as for `render`.
pub fn parse_explain_args(
    args: &[String],
    system_hostname: &str,
) -> Result<ExplainArgs, ExplainError> {
    let usage = |m: String| ExplainError::Usage(m);
    let mut to = None;
    let mut from = None;
    let mut mode = None;
    let mut rest = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let mut take = |name: &str| -> Result<Option<String>, ExplainError> {
            if let Some(v) = arg.strip_prefix(&format!("--{name}=")) {
                return Ok(Some(v.to_string()));
            }
            if arg == &format!("--{name}") {
                let v = args
                    .get(i)
                    .ok_or_else(|| usage(format!("flag needs an argument: --{name}")))?;
                i += 1;
                return Ok(Some(v.clone()));
            }
            Ok(None)
        };
        if let Some(v) = take("to")? {
            to = Some(v);
        } else if let Some(v) = take("from")? {
            from = Some(v);
        } else if let Some(v) = take("mode")? {
            mode = Some(v);
        } else {
            rest.push(arg.clone());
        }
    }
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        return Err(usage("explain: help requested".to_string()));
    }
    let to = to.ok_or_else(|| usage("explain needs --to IP:PORT[/PROTO]".to_string()))?;
    let (destination, port, protocol) = parse_destination(&to).map_err(usage)?;
    let source = match from {
        Some(f) => Some(
            f.parse::<IpAddr>()
                .map_err(|_| usage(format!("--from {f:?} is not an IP address")))?,
        ),
        None => None,
    };
    let render = parse_render_args(&rest, system_hostname)?;
    let mode = match mode {
        Some(m) => ProxyMode::from_config(&m)
            .ok_or_else(|| usage(format!("--mode {m:?}: expected iptables, ipvs or nftables")))?,
        None => render.options.mode,
    };
    let explicit_hostname = render.options.hostname != system_hostname.to_lowercase();
    Ok(ExplainArgs {
        packet: Packet {
            source,
            destination,
            port,
            protocol,
        },
        mode,
        render,
        explicit_hostname,
    })
}

/// A ruleset to explain against.
#[derive(Debug, Clone)]
pub struct Ruleset {
    /// nat and filter tables.
    pub dump: Dump,
    /// The node's addresses (for `--src-type`/`--dst-type LOCAL` and local delivery).
    pub node_ips: Vec<IpAddr>,
    /// Where the rules came from, for the header.
    pub origin: String,
    /// True when the rules came from the kernel: missing jump rules are then reported.
    pub from_kernel: bool,
}

/// Adds the builtin-chain jump rules a full sync installs (`-I`, so in reverse order) to a
/// render, which holds only kube-proxy's own chains. Builtin chains already present are left
/// alone.
pub fn add_jump_rules(dump: &mut Dump) {
    let mut added: BTreeMap<(String, String), Vec<Rule>> = BTreeMap::new();
    for j in jump_rules() {
        if dump.chain(j.table, j.chain).is_some() {
            continue;
        }
        let words: Vec<String> = j
            .args()
            .iter()
            .map(|w| {
                if w.contains(' ') {
                    format!("\"{w}\"")
                } else {
                    w.clone()
                }
            })
            .collect();
        let line = format!("-A {} {}", j.chain, words.join(" "));
        if let Ok(rule) = Rule::parse(&line) {
            added
                .entry((j.table.to_string(), j.chain.to_string()))
                .or_default()
                .insert(0, rule);
        }
    }
    for ((table, chain), rules) in added {
        let t = match dump.tables.iter_mut().position(|t| t.name == table) {
            Some(i) => &mut dump.tables[i],
            None => {
                dump.tables.push(Table {
                    name: table.clone(),
                    chains: Vec::new(),
                });
                dump.tables.last_mut().expect("just pushed")
            }
        };
        t.chains.insert(
            0,
            Chain {
                name: chain,
                policy: Some("ACCEPT".to_string()),
                rules,
                ..Chain::default()
            },
        );
    }
}

/// What `render` prints for `args` in one mode, for the destination's family (its proxier's
/// rules are the ones the packet meets), with the node IPs the render used and the object
/// files it read (for the origin line).
pub(crate) struct Rendered {
    /// The render's text.
    pub text: String,
    /// The node's addresses as the render saw them.
    pub node_ips: Vec<IpAddr>,
    /// The object files, comma-separated.
    pub files: String,
}

/// Renders `args` in `mode` (whatever mode the flags or config file name: --mode decided).
pub(crate) fn render_for(
    args: &ExplainArgs,
    mode: ProxyMode,
    warnings: &mut Vec<String>,
) -> Result<Rendered, ExplainError> {
    let mut render = args.render.clone();
    render.options.mode = mode;
    let family = crate::model::IpFamily::of(&args.packet.destination);
    let text = crate::render::run_family(&render, args.explicit_hostname, family, warnings)?;
    // The same node addresses as render's (objects parsed again, warnings dropped).
    let node_ips = crate::render::model(&render, args.explicit_hostname, family, &mut Vec::new())?
        .node
        .ips;
    let files: Vec<String> = args
        .render
        .objects
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    Ok(Rendered {
        text,
        node_ips,
        files: files.join(", "),
    })
}

/// The ruleset `render` would write for `args` (with the jump rules added), and the node IPs
/// the render used.
pub fn ruleset_from_render(
    args: &ExplainArgs,
    warnings: &mut Vec<String>,
) -> Result<Ruleset, ExplainError> {
    let r = render_for(args, ProxyMode::Iptables, warnings)?;
    let mut dump = Dump::parse(&r.text)?;
    add_jump_rules(&mut dump);
    Ok(Ruleset {
        dump,
        node_ips: r.node_ips,
        origin: format!(
            "render of {} (plus the jump rules a full sync installs)",
            r.files
        ),
        from_kernel: false,
    })
}

/// Reads the nat and filter tables of this network namespace with the detected (or forced)
/// iptables back end, for the destination's IP family, and the local addresses.
pub async fn ruleset_from_kernel(destination: IpAddr) -> Result<Ruleset, ExplainError> {
    use crate::kernel::iptables::{Iptables, Table as KTable, detect_variant};
    use crate::kernel::{Addresses, IpFamily};
    let family = if destination.is_ipv4() {
        IpFamily::V4
    } else {
        IpFamily::V6
    };
    let variant = detect_variant(None).await?;
    let ipt = Iptables::new(variant, family);
    let nat = ipt.save(KTable::Nat).await?;
    let filter = ipt.save(KTable::Filter).await?;
    let dump = Dump::parse(&format!("{nat}\n{filter}"))?;
    let node_ips = Addresses::new()
        .list()
        .await?
        .into_iter()
        .map(|a| a.addr)
        .collect();
    let tool = if destination.is_ipv4() {
        "iptables"
    } else {
        "ip6tables"
    };
    Ok(Ruleset {
        dump,
        node_ips,
        origin: format!("kernel ({tool}-{variant}-save -t nat, -t filter)"),
        from_kernel: true,
    })
}

/// Which part of the packet's trip a rule was met in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// nat PREROUTING or OUTPUT (DNAT).
    Nat,
    /// filter INPUT, FORWARD or OUTPUT.
    Filter,
    /// nat POSTROUTING (masquerade).
    Postrouting,
}

/// A rule the packet matched.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Where.
    pub stage: Stage,
    /// `nat` or `filter`.
    pub table: String,
    /// The chain holding the rule.
    pub chain: String,
    /// The rule as read.
    pub rule: String,
    /// Its `--comment`.
    pub comment: Option<String>,
    /// What it did, in words (`-j KUBE-SVC-…`, `DNAT --to-destination …`).
    pub action: String,
    /// `--probability` of a statistic rule whose jump was taken.
    pub probability: Option<f64>,
}

/// What became of the connection in the filter table (or in nat, for a nat DROP).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Let through.
    Accepted,
    /// Dropped (the client times out) by this rule, or by a chain policy when `None`.
    Dropped(Option<Step>, String),
    /// Rejected (the client gets an ICMP error, "connection refused") by this rule.
    Rejected(Step),
}

/// Whether the source is rewritten on the way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Masquerade {
    /// Yes, with the reasons (the rules that asked for it).
    Yes(Vec<String>),
    /// No.
    No,
    /// Delivered to the node itself: POSTROUTING is not traversed.
    LocalDelivery,
    /// The packet never got that far.
    NotReached,
}

/// One possible fate of the connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Probability of this fate (all outcomes sum to 1).
    pub probability: f64,
    /// `DNAT --to-destination` value, if rewritten.
    pub dnat: Option<String>,
    /// The chain that did the DNAT (a KUBE-SEP-… chain).
    pub endpoint_chain: Option<String>,
    /// The comment of the rule that jumped to that chain (`ns/svc:port -> ip:port`).
    pub endpoint_comment: Option<String>,
    /// Filter verdict.
    pub verdict: Verdict,
    /// Masquerade.
    pub masquerade: Masquerade,
    /// Every rule matched, in order.
    pub steps: Vec<Step>,
}

/// A ClientIP affinity check met on the way.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Affinity {
    /// The recent list (the endpoint's KUBE-SEP chain).
    pub list: String,
    /// `--seconds`.
    pub seconds: Option<u32>,
    /// The rule's comment.
    pub comment: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The connection.
    pub packet: Packet,
    /// Where it enters (`nat/PREROUTING` or `nat/OUTPUT`).
    pub entry: String,
    /// Where the rules came from.
    pub origin: String,
    /// Possible fates, most likely first among equals in rule order.
    pub outcomes: Vec<Outcome>,
    /// ClientIP affinity checks (none: no affinity).
    pub affinity: Vec<Affinity>,
    /// Rules whose result depends on a source the caller did not give.
    pub source_dependent: Vec<String>,
    /// Rules with matches this tool cannot evaluate (assumed not to match).
    pub unevaluated: Vec<String>,
    /// kube-proxy jump rules missing from builtin chains (kernel rulesets only).
    pub missing_jumps: Vec<String>,
}

const MAX_DEPTH: usize = 64;
const MAX_BRANCHES: usize = 100_000;
const KNOWN_MODULES: &[&str] = &[
    "comment",
    "tcp",
    "udp",
    "sctp",
    "statistic",
    "recent",
    "addrtype",
    "conntrack",
    "state",
    "mark",
    "nfacct",
];

#[derive(Debug, Clone)]
struct Branch {
    prob: f64,
    dst: IpAddr,
    port: u16,
    mark: u32,
    dnat: Option<String>,
    endpoint_chain: Option<String>,
    verdict: Option<Verdict>,
    masqueraded: bool,
    masq_reasons: Vec<String>,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Go on after the rule (or the chain ended, or RETURN).
    Continue,
    /// RETURN from the current chain.
    Return,
    /// A terminal target decided the packet's fate in this table.
    Terminal,
}

struct Engine<'a> {
    dump: &'a Dump,
    local: BTreeSet<IpAddr>,
    source: Option<IpAddr>,
    source_local: bool,
    proto: &'static str,
    affinity: BTreeSet<Affinity>,
    source_dependent: BTreeSet<String>,
    unevaluated: BTreeSet<String>,
    branches: usize,
}

fn parse_mark(v: &str) -> Option<(u32, u32)> {
    let num = |s: &str| -> Option<u32> {
        match s.strip_prefix("0x") {
            Some(h) => u32::from_str_radix(h, 16).ok(),
            None => s.parse().ok(),
        }
    };
    match v.split_once('/') {
        Some((val, mask)) => Some((num(val)?, num(mask)?)),
        None => Some((num(v)?, u32::MAX)),
    }
}

fn port_matches(v: &Value, port: u16) -> bool {
    let hit = match v.value.split_once(':') {
        Some((lo, hi)) => {
            let lo = lo.parse().unwrap_or(0);
            let hi = hi.parse().unwrap_or(u16::MAX);
            (lo..=hi).contains(&port)
        }
        None => v.value.parse() == Ok(port),
    };
    hit != v.negated
}

fn ip_of_dnat(dest: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(sa) = dest.parse::<SocketAddr>() {
        return Some((sa.ip(), Some(sa.port())));
    }
    if let Ok(ip) = dest.parse() {
        return Some((ip, None));
    }
    dest.rsplit_once(':')
        .and_then(|(ip, port)| Some((ip.parse().ok()?, port.parse().ok())))
}

impl Engine<'_> {
    fn is_local(&self, ip: &IpAddr) -> bool {
        self.local.contains(ip)
    }

    fn note_source(&mut self, rule: &Rule) {
        // Hairpin rules in endpoint chains only matter when the source is that endpoint.
        if self.source.is_none() && !rule.chain.starts_with(SEP_PREFIX) {
            self.source_dependent.insert(describe_rule(rule));
        }
    }

    fn matches(&mut self, rule: &Rule, br: &Branch) -> bool {
        if let Some(m) = rule
            .modules
            .iter()
            .find(|m| !KNOWN_MODULES.contains(&m.as_str()))
        {
            self.unevaluated
                .insert(format!("{} (-m {m})", rule.raw.trim()));
            return false;
        }
        if rule.out_interface.is_some() || rule.sport.is_some() {
            self.unevaluated.insert(format!(
                "{} (output interface / source port)",
                rule.raw.trim()
            ));
            return false;
        }
        if rule
            .statistic_mode
            .as_deref()
            .is_some_and(|m| m != "random")
        {
            self.unevaluated
                .insert(format!("{} (statistic mode)", rule.raw.trim()));
            return false;
        }
        if let Some(p) = &rule.protocol
            && !p.matches(self.proto)
        {
            return false;
        }
        if let Some(d) = &rule.destination
            && !d.matches_ip(&br.dst)
        {
            return false;
        }
        if let Some(d) = &rule.dport
            && !port_matches(d, br.port)
        {
            return false;
        }
        if let Some(t) = &rule.dst_type {
            let ty = if self.is_local(&br.dst) {
                "LOCAL"
            } else {
                "UNICAST"
            };
            if !t.matches(ty) {
                return false;
            }
        }
        if let Some(m) = &rule.mark {
            let hit = parse_mark(&m.value).is_some_and(|(v, mask)| br.mark & mask == v);
            if hit == m.negated {
                return false;
            }
        }
        if let Some(ct) = &rule.ctstate {
            let mut states = vec!["NEW"];
            if br.dnat.is_some() {
                states.push("DNAT");
            }
            let hit = ct.value.split(',').any(|s| states.contains(&s));
            if hit == ct.negated {
                return false;
            }
        }
        if let Some(r) = &rule.recent
            && r.rcheck
        {
            // A new client has no entry yet; the check is reported as affinity.
            self.affinity.insert(Affinity {
                list: r.name.clone().unwrap_or_default(),
                seconds: r.seconds,
                comment: rule.comment.clone(),
            });
            return false;
        }
        // Source-dependent matches last, so they are only noted when they decide.
        if let Some(s) = &rule.source {
            self.note_source(rule);
            let hit = match self.source {
                Some(ip) => s.matches_ip(&ip),
                None => s.negated,
            };
            if !hit {
                return false;
            }
        }
        if let Some(t) = &rule.src_type {
            self.note_source(rule);
            let ty = if self.source_local {
                "LOCAL"
            } else {
                "UNICAST"
            };
            if !t.matches(ty) {
                return false;
            }
        }
        if let Some(i) = &rule.in_interface {
            // The input interface is unknown: a positive match fails, a negated one holds.
            self.source_dependent.insert(describe_rule(rule));
            if !i.negated {
                return false;
            }
        }
        true
    }

    fn step(&self, stage: Stage, table: &str, chain: &str, rule: &Rule, p: Option<f64>) -> Step {
        Step {
            stage,
            table: table.to_string(),
            chain: chain.to_string(),
            rule: rule.raw.trim().to_string(),
            comment: rule.comment.clone(),
            action: action_of(rule),
            probability: p,
        }
    }

    /// Runs `chain`; every result is a branch that either reached a terminal target or left
    /// the chain (end or RETURN).
    fn run_chain(
        &mut self,
        stage: Stage,
        table: &str,
        chain: &str,
        br: Branch,
        depth: usize,
    ) -> Vec<(Branch, Flow)> {
        let dump = self.dump;
        let Some(c) = dump.chain(table, chain) else {
            return vec![(br, Flow::Continue)];
        };
        if depth > MAX_DEPTH {
            return vec![(br, Flow::Continue)];
        }
        let mut out = Vec::new();
        let mut work: Vec<(Branch, usize)> = vec![(br, 0)];
        while let Some((mut br, start)) = work.pop() {
            let hit = (start..c.rules.len()).find(|&i| self.matches(&c.rules[i], &br));
            let Some(idx) = hit else {
                // Fell off the end of the chain.
                out.push((br, Flow::Continue));
                continue;
            };
            let rule = &c.rules[idx];
            let next = idx + 1;
            let mut p = None;
            if rule.statistic_mode.as_deref() == Some("random") {
                let prob = rule
                    .probability
                    .as_deref()
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(1.0)
                    .clamp(0.0, 1.0);
                if prob < 1.0 && self.branches < MAX_BRANCHES {
                    self.branches += 1;
                    let mut rest = br.clone();
                    rest.prob *= 1.0 - prob;
                    work.push((rest, next));
                }
                br.prob *= prob;
                p = Some(prob);
            }
            let step = self.step(stage, table, chain, rule, p);
            br.steps.push(step);
            for (b, flow) in self.apply(stage, table, chain, rule, br, depth) {
                match flow {
                    Flow::Terminal => out.push((b, Flow::Terminal)),
                    Flow::Return => out.push((b, Flow::Continue)),
                    Flow::Continue if rule.goto.is_some() => out.push((b, Flow::Continue)),
                    Flow::Continue => work.push((b, next)),
                }
            }
        }
        out
    }

    fn apply(
        &mut self,
        stage: Stage,
        table: &str,
        chain: &str,
        rule: &Rule,
        mut br: Branch,
        depth: usize,
    ) -> Vec<(Branch, Flow)> {
        let Some(target) = rule.target() else {
            return vec![(br, Flow::Continue)];
        };
        match target {
            "ACCEPT" => {
                br.verdict = Some(Verdict::Accepted);
                vec![(br, Flow::Terminal)]
            }
            "DROP" => {
                let step = br.steps.last().cloned();
                br.verdict = Some(Verdict::Dropped(step, String::new()));
                vec![(br, Flow::Terminal)]
            }
            "REJECT" => {
                let step = br.steps.last().cloned().expect("step pushed before apply");
                br.verdict = Some(Verdict::Rejected(step));
                vec![(br, Flow::Terminal)]
            }
            "DNAT" | "REDIRECT" => {
                let to = rule
                    .to_destination
                    .clone()
                    .unwrap_or_else(|| "the node itself".to_string());
                if let Some((ip, port)) = ip_of_dnat(&to) {
                    br.dst = ip;
                    if let Some(port) = port {
                        br.port = port;
                    }
                }
                br.dnat = Some(to);
                br.endpoint_chain = Some(chain.to_string());
                vec![(br, Flow::Terminal)]
            }
            "MASQUERADE" | "SNAT" => {
                br.masqueraded = true;
                vec![(br, Flow::Terminal)]
            }
            "MARK" => {
                if let Some((op, v)) = &rule.set_mark
                    && let Some((val, mask)) = parse_mark(v)
                {
                    br.mark = match op.as_str() {
                        "--or-mark" => br.mark | val,
                        "--xor-mark" => br.mark ^ val,
                        "--and-mark" => br.mark & val,
                        "--set-xmark" => (br.mark & !mask) ^ val,
                        _ => (br.mark & !mask) | val,
                    };
                }
                vec![(br, Flow::Continue)]
            }
            "RETURN" => vec![(br, Flow::Return)],
            sub if self.dump.chain(table, sub).is_some() => {
                if sub == KUBE_MARK_MASQ {
                    br.masq_reasons.push(masquerade_reason(rule, chain));
                }
                // A jump into a chain where nothing matched is left out of the path.
                let before = br.steps.len();
                let mut results = self.run_chain(stage, table, sub, br, depth + 1);
                for (b, flow) in &mut results {
                    if *flow == Flow::Continue && b.steps.len() == before {
                        b.steps.pop();
                    }
                }
                results
            }
            // LOG, CT, NFLOG, …: no effect on the path.
            _ => vec![(br, Flow::Continue)],
        }
    }
}

/// The rule in short: its comment if it has one, else its text.
fn describe_rule(rule: &Rule) -> String {
    match &rule.comment {
        Some(c) => format!("{}: \"{c}\"", rule.chain),
        None => format!("{}: {}", rule.chain, rule.raw.trim()),
    }
}

/// The conditions of a KUBE-MARK-MASQ jump, in words.
fn masquerade_reason(rule: &Rule, chain: &str) -> String {
    let mut conds = Vec::new();
    if let Some(s) = &rule.source {
        if chain.starts_with(SEP_PREFIX) && !s.negated {
            conds.push(format!(
                "the source {} is the endpoint itself (hairpin)",
                s.value.trim_end_matches("/32")
            ));
        } else if s.negated {
            conds.push(format!("the source is not in {}", s.value));
        } else {
            conds.push(format!("the source is in {}", s.value));
        }
    }
    if let Some(t) = &rule.src_type {
        conds.push(format!(
            "the source is {}a local address of the node",
            if t.negated { "not " } else { "" }
        ));
    }
    if let Some(i) = &rule.in_interface {
        conds.push(format!(
            "the input interface is {}{}",
            if i.negated { "not " } else { "" },
            i.value
        ));
    }
    let what = match &rule.comment {
        Some(c) => format!("{chain} \"{c}\""),
        None => chain.to_string(),
    };
    if conds.is_empty() {
        what
    } else {
        format!("{what}: {}", conds.join(", "))
    }
}

/// What a rule does, in iptables words.
fn action_of(rule: &Rule) -> String {
    let Some(target) = rule.target() else {
        return "(no target)".to_string();
    };
    let verb = if rule.goto.is_some() { "-g" } else { "-j" };
    match target {
        "DNAT" => format!(
            "DNAT --to-destination {}",
            rule.to_destination.as_deref().unwrap_or("?")
        ),
        "MARK" => match &rule.set_mark {
            Some((op, v)) => format!("MARK {op} {v}"),
            None => "MARK".to_string(),
        },
        "MASQUERADE" if rule.random_fully => "MASQUERADE --random-fully".to_string(),
        other => format!("{verb} {other}"),
    }
}

/// Walks `packet` through `ruleset`.
pub fn explain(ruleset: &Ruleset, packet: &Packet) -> Explanation {
    let mut local: BTreeSet<IpAddr> = ruleset.node_ips.iter().copied().collect();
    local.insert(IpAddr::V4(Ipv4Addr::LOCALHOST));
    local.insert(IpAddr::V6(Ipv6Addr::LOCALHOST));
    let source_local = packet
        .source
        .is_some_and(|s| local.contains(&s) || s.is_loopback());
    let mut engine = Engine {
        dump: &ruleset.dump,
        local,
        source: packet.source,
        source_local,
        proto: packet.protocol.lower(),
        affinity: BTreeSet::new(),
        source_dependent: BTreeSet::new(),
        unevaluated: BTreeSet::new(),
        branches: 0,
    };
    let entry = if source_local { "OUTPUT" } else { "PREROUTING" };
    let start = Branch {
        prob: 1.0,
        dst: packet.destination,
        port: packet.port,
        mark: 0,
        dnat: None,
        endpoint_chain: None,
        verdict: None,
        masqueraded: false,
        masq_reasons: Vec::new(),
        steps: Vec::new(),
    };
    let mut outcomes: Vec<Outcome> = Vec::new();
    for (mut br, _) in engine.run_chain(Stage::Nat, "nat", entry, start, 0) {
        // A nat DROP ends the trip; ACCEPT in nat only stops NAT.
        if let Some(v @ Verdict::Dropped(..)) = br.verdict.take() {
            outcomes.push(finish(br, v, Masquerade::NotReached));
            continue;
        }
        let to_node = engine.is_local(&br.dst);
        let fchain = if source_local {
            "OUTPUT"
        } else if to_node {
            "INPUT"
        } else {
            "FORWARD"
        };
        for (mut br, flow) in engine.run_chain(Stage::Filter, "filter", fchain, br, 0) {
            let verdict = match (br.verdict.take(), flow) {
                (Some(v), Flow::Terminal) => v,
                _ => {
                    let policy = ruleset
                        .dump
                        .chain("filter", fchain)
                        .and_then(|c| c.policy.clone())
                        .unwrap_or_else(|| "ACCEPT".to_string());
                    if policy == "DROP" {
                        Verdict::Dropped(None, format!("the policy of filter/{fchain} is DROP"))
                    } else {
                        Verdict::Accepted
                    }
                }
            };
            if verdict != Verdict::Accepted {
                outcomes.push(finish(br, verdict, Masquerade::NotReached));
                continue;
            }
            if fchain == "INPUT" {
                outcomes.push(finish(br, verdict, Masquerade::LocalDelivery));
                continue;
            }
            for (br, _) in engine.run_chain(Stage::Postrouting, "nat", "POSTROUTING", br, 0) {
                let m = if br.masqueraded {
                    Masquerade::Yes(br.masq_reasons.clone())
                } else {
                    Masquerade::No
                };
                outcomes.push(finish(br, Verdict::Accepted, m));
            }
        }
    }
    let outcomes = merge(outcomes);
    let missing_jumps = if ruleset.from_kernel {
        missing_jumps(&ruleset.dump)
    } else {
        Vec::new()
    };
    Explanation {
        packet: packet.clone(),
        entry: format!("nat/{entry}"),
        origin: ruleset.origin.clone(),
        outcomes,
        affinity: engine.affinity.into_iter().collect(),
        source_dependent: engine.source_dependent.into_iter().collect(),
        unevaluated: engine.unevaluated.into_iter().collect(),
        missing_jumps,
    }
}

fn finish(br: Branch, verdict: Verdict, masquerade: Masquerade) -> Outcome {
    let endpoint_comment = br.endpoint_chain.as_ref().and_then(|sep| {
        br.steps
            .iter()
            .rev()
            .find(|s| s.stage == Stage::Nat && s.action.ends_with(&format!(" {sep}")))
            .and_then(|s| s.comment.clone())
    });
    Outcome {
        probability: br.prob,
        dnat: br.dnat,
        endpoint_chain: br.endpoint_chain,
        endpoint_comment,
        verdict,
        masquerade,
        steps: br.steps,
    }
}

/// Merges outcomes with the same fate (for instance one endpoint reached through two
/// chains), keeping the first path.
fn merge(outcomes: Vec<Outcome>) -> Vec<Outcome> {
    let mut merged: Vec<Outcome> = Vec::new();
    for o in outcomes {
        if o.probability <= 0.0 {
            continue;
        }
        match merged.iter_mut().find(|m| {
            m.dnat == o.dnat
                && m.endpoint_chain == o.endpoint_chain
                && m.verdict == o.verdict
                && m.masquerade == o.masquerade
        }) {
            Some(m) => m.probability += o.probability,
            None => merged.push(o),
        }
    }
    merged
}

/// kube-proxy's jump rules that are not in their builtin chains.
fn missing_jumps(dump: &Dump) -> Vec<String> {
    KUBE_PROXY_JUMPS
        .iter()
        .filter(|j| {
            !dump
                .chain(j.table, j.chain)
                .is_some_and(|c| c.rules.iter().any(|r| r.target() == Some(j.target)))
        })
        .map(|j| format!("{}/{} -> {}", j.table, j.chain, j.target))
        .collect()
}

fn percent(p: f64) -> String {
    format!("{:.2}%", p * 100.0)
}

fn quoted(c: &Option<String>) -> String {
    c.as_ref().map(|c| format!("\"{c}\"")).unwrap_or_default()
}

fn write_steps(out: &mut String, steps: &[&Step], indent: &str) {
    let w1 = steps
        .iter()
        .map(|s| s.table.len() + s.chain.len() + 1)
        .max()
        .unwrap_or(0);
    let actions: Vec<String> = steps
        .iter()
        .map(|s| match s.probability {
            Some(p) => format!("{} (probability {p})", s.action),
            None => s.action.clone(),
        })
        .collect();
    let w2 = actions.iter().map(String::len).max().unwrap_or(0);
    for (s, a) in steps.iter().zip(&actions) {
        let place = format!("{}/{}", s.table, s.chain);
        let line = format!("{indent}{place:<w1$}  {a:<w2$}  {}", quoted(&s.comment));
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn common_prefix<'a>(lists: &[Vec<&'a Step>]) -> Vec<&'a Step> {
    let Some(first) = lists.first() else {
        return Vec::new();
    };
    let mut n = first.len();
    for l in &lists[1..] {
        n = n.min(l.len());
        n = (0..n).find(|&i| l[i] != first[i]).unwrap_or(n);
    }
    first[..n].to_vec()
}

/// `ip:port`, IPv6 in brackets.
fn endpoint_string(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

fn endpoint_label(o: &Outcome) -> String {
    match &o.dnat {
        Some(d) => d.clone(),
        None => "(not rewritten)".to_string(),
    }
}

/// The explanation as text.
pub fn format(e: &Explanation) -> String {
    let mut out = String::new();
    let p = &e.packet;
    let dest = SocketAddr::new(p.destination, p.port);
    let from = match p.source {
        Some(s) => s.to_string(),
        None => "a client outside the node and the pod network (no --from)".to_string(),
    };
    let _ = writeln!(out, "Connection: {} {from} -> {dest}", p.protocol.api());
    let how = if e.entry.ends_with("OUTPUT") {
        "sent by the node itself"
    } else {
        "arriving at the node"
    };
    let _ = writeln!(out, "Enters:     {} ({how})", e.entry);
    let _ = writeln!(out, "Rules:      {}", e.origin);
    for m in &e.missing_jumps {
        let _ = writeln!(
            out,
            "WARNING: kube-proxy's jump {m} is missing: is kube-proxy running in iptables mode \
             on this iptables back end?"
        );
    }

    // nat path: common part, then per endpoint.
    let nat: Vec<Vec<&Step>> = e
        .outcomes
        .iter()
        .map(|o| o.steps.iter().filter(|s| s.stage == Stage::Nat).collect())
        .collect();
    let prefix = common_prefix(&nat);
    out.push_str("\nPath:\n");
    if prefix.is_empty() {
        out.push_str("  (no rule matched in the nat table)\n");
    } else {
        write_steps(&mut out, &prefix, "  ");
    }

    let dnat: Vec<&Outcome> = e.outcomes.iter().filter(|o| o.dnat.is_some()).collect();
    if !dnat.is_empty() {
        let _ = writeln!(out, "\nEndpoints ({}), for a new connection:", dnat.len());
        let w = dnat
            .iter()
            .map(|o| endpoint_label(o).len())
            .max()
            .unwrap_or(0);
        for o in &dnat {
            let line = format!(
                "  {:>7}  {:<w$}  via {}  {}",
                percent(o.probability),
                endpoint_label(o),
                o.endpoint_chain.as_deref().unwrap_or("?"),
                quoted(&o.endpoint_comment),
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if dnat.len() > 1 {
            // The rules after the common path, per endpoint.
            for (o, steps) in e.outcomes.iter().zip(&nat) {
                if o.dnat.is_none() || steps.len() <= prefix.len() {
                    continue;
                }
                let _ = writeln!(out, "  path to {}:", endpoint_label(o));
                write_steps(&mut out, &steps[prefix.len()..], "    ");
            }
        }
    }

    out.push_str("\nSession affinity: ");
    if e.affinity.is_empty() {
        out.push_str("none\n");
    } else {
        let secs: BTreeSet<String> = e
            .affinity
            .iter()
            .map(|a| a.seconds.map_or("?".to_string(), |s| s.to_string()))
            .collect();
        let secs: Vec<String> = secs.into_iter().collect();
        let _ = writeln!(
            out,
            "ClientIP, {}s: a client that used an endpoint within the last {}s goes back to it \
             (-m recent --rcheck on {}); the probabilities above are for a new client",
            secs.join("/"),
            secs.join("/"),
            e.affinity
                .iter()
                .map(|a| a.list.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Filter: group outcomes by their filter path.
    let mut groups: Vec<(Vec<&Step>, Vec<&Outcome>)> = Vec::new();
    for o in &e.outcomes {
        let f: Vec<&Step> = o
            .steps
            .iter()
            .filter(|s| s.stage == Stage::Filter)
            .collect();
        match groups.iter_mut().find(|(g, _)| *g == f) {
            Some((_, os)) => os.push(o),
            None => groups.push((f, vec![o])),
        }
    }
    out.push_str("\nFilter:\n");
    for (steps, os) in &groups {
        let indent = if groups.len() > 1 {
            let who: Vec<String> = os.iter().map(|o| endpoint_label(o)).collect();
            let _ = writeln!(out, "  for {}:", who.join(", "));
            "    "
        } else {
            "  "
        };
        if steps.is_empty() {
            let _ = writeln!(
                out,
                "{indent}(no rule matched in the filter table; the chain policy applies)"
            );
        } else {
            write_steps(&mut out, steps, indent);
        }
    }

    out.push_str("\nMasquerade: ");
    let masq: BTreeSet<String> = e
        .outcomes
        .iter()
        .map(|o| masquerade_text(&o.masquerade))
        .collect();
    if masq.len() <= 1 {
        let _ = writeln!(out, "{}", masq.into_iter().next().unwrap_or_default());
    } else {
        out.push_str("depends on the endpoint\n");
        for o in &e.outcomes {
            let _ = writeln!(
                out,
                "  {}: {}",
                endpoint_label(o),
                masquerade_text(&o.masquerade)
            );
        }
    }

    out.push_str("\nResult: ");
    out.push_str(&result_text(e));
    out.push('\n');

    if !e.source_dependent.is_empty() && e.packet.source.is_none() {
        let _ = writeln!(
            out,
            "\nNote: these rules depend on the source and were evaluated for a client outside \
             the node and the pod network; pass --from to be exact:"
        );
        for r in &e.source_dependent {
            let _ = writeln!(out, "  {r}");
        }
    }
    if !e.unevaluated.is_empty() {
        let _ = writeln!(
            out,
            "\nNote: {} rule(s) use matches explain cannot evaluate and were assumed not to match:",
            e.unevaluated.len()
        );
        for r in e.unevaluated.iter().take(5) {
            let _ = writeln!(out, "  {r}");
        }
    }
    out
}

fn masquerade_text(m: &Masquerade) -> String {
    match m {
        Masquerade::Yes(reasons) if reasons.is_empty() => {
            "yes (source rewritten to the node's address by nat POSTROUTING)".to_string()
        }
        Masquerade::Yes(reasons) => format!(
            "yes (source rewritten to the node's address), marked by {}",
            reasons.join("; ")
        ),
        Masquerade::No => "no (the client's source address is kept)".to_string(),
        Masquerade::LocalDelivery => {
            "no (delivered to the node itself; POSTROUTING is not traversed)".to_string()
        }
        Masquerade::NotReached => "n/a (the connection does not get through)".to_string(),
    }
}

fn result_text(e: &Explanation) -> String {
    let mut parts = Vec::new();
    let mut rejected: BTreeMap<String, f64> = BTreeMap::new();
    let mut dropped: BTreeMap<String, f64> = BTreeMap::new();
    let mut accepted_dnat = 0usize;
    let mut accepted_plain = false;
    for o in &e.outcomes {
        match &o.verdict {
            Verdict::Rejected(s) => {
                *rejected
                    .entry(format!("{}/{} {}", s.table, s.chain, quoted(&s.comment)))
                    .or_default() += o.probability;
            }
            Verdict::Dropped(Some(s), _) => {
                let what = match &s.comment {
                    Some(_) => format!("{}/{} {}", s.table, s.chain, quoted(&s.comment)),
                    None => format!("{}/{}: {}", s.table, s.chain, s.rule),
                };
                *dropped.entry(what).or_default() += o.probability;
            }
            Verdict::Dropped(None, why) => {
                *dropped.entry(why.clone()).or_default() += o.probability;
            }
            Verdict::Accepted if o.dnat.is_some() => accepted_dnat += 1,
            Verdict::Accepted => accepted_plain = true,
        }
    }
    let share = |p: f64| {
        if (p - 1.0).abs() < 1e-9 {
            String::new()
        } else {
            format!(" ({})", percent(p))
        }
    };
    for (what, p) in &rejected {
        parts.push(format!(
            "REJECTED{} by {what}: the client gets an ICMP error at once (connection refused)",
            share(*p)
        ));
    }
    for (what, p) in &dropped {
        parts.push(format!(
            "DROPPED{} by {what}: the client gets no answer and times out",
            share(*p)
        ));
    }
    match accepted_dnat {
        0 => {}
        1 => {
            let o = e
                .outcomes
                .iter()
                .find(|o| o.dnat.is_some() && o.verdict == Verdict::Accepted);
            parts.push(format!(
                "DNAT to {}",
                o.and_then(|o| o.dnat.clone()).unwrap_or_default()
            ));
        }
        n => parts.push(format!(
            "DNAT to one of {n} endpoints (chosen at random per connection)"
        )),
    }
    if accepted_plain {
        let any_dnat = e.outcomes.iter().any(|o| o.dnat.is_some());
        if any_dnat || !rejected.is_empty() || !dropped.is_empty() {
            parts.push("otherwise accepted unchanged".to_string());
        } else {
            let dest = SocketAddr::new(e.packet.destination, e.packet.port);
            parts.push(format!(
                "no kube-proxy rule rewrites or blocks {} {dest}: it is not a service address \
                 this node knows (check the Service's IPs and ports, and `iptables-save | grep \
                 KUBE-SVC`); the packet is routed unchanged",
                e.packet.protocol.api()
            ));
        }
    }
    parts.join("; ")
}

/// Parses args, reads the rules (kernel or render) and returns the text to print.
/// `warnings` gets render's warnings about skipped objects.
pub async fn run(
    args: &[String],
    system_hostname: &str,
    warnings: &mut Vec<String>,
) -> Result<String, ExplainError> {
    let parsed = parse_explain_args(args, system_hostname)?;
    run_parsed(&parsed, warnings).await
}

/// [`run`] on parsed arguments.
pub async fn run_parsed(
    args: &ExplainArgs,
    warnings: &mut Vec<String>,
) -> Result<String, ExplainError> {
    match Kind::for_mode(args.mode) {
        Some(Kind::Iptables) => {}
        Some(Kind::Ipvs) => {
            let table = if args.render.objects.is_empty() {
                ipvs::table_from_kernel(&args.packet).await?
            } else {
                ipvs::table_from_render(args, warnings)?
            };
            return Ok(ipvs::explain(&table, &args.packet));
        }
        Some(Kind::Nftables) => {
            let rs = if args.render.objects.is_empty() {
                nftables::table_from_kernel(&args.packet).await?
            } else {
                nftables::table_from_render(args, warnings)?
            };
            return Ok(nftables::explain(&rs, &args.packet));
        }
        None => return Err(ExplainError::Unsupported(args.mode)),
    }
    let ruleset = if args.render.objects.is_empty() {
        ruleset_from_kernel(args.packet.destination).await?
    } else {
        ruleset_from_render(args, warnings)?
    };
    Ok(format(&explain(&ruleset, &args.packet)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_ruleset(extra: &[&str]) -> Ruleset {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(["--objects".to_string(), "demo.yaml".to_string()]);
        let mut render = parse_render_args(&args, "node1").unwrap();
        // The bundled demo cluster (render's default) instead of a file.
        render.objects.clear();
        let text = crate::render::run(&render, false, &mut Vec::new()).unwrap();
        let mut dump = Dump::parse(&text).unwrap();
        add_jump_rules(&mut dump);
        Ruleset {
            dump,
            node_ips: vec!["192.168.50.1".parse().unwrap()],
            origin: "demo".to_string(),
            from_kernel: false,
        }
    }

    fn pkt(from: Option<&str>, to: &str) -> Packet {
        let (destination, port, protocol) = parse_destination(to).unwrap();
        Packet {
            source: from.map(|f| f.parse().unwrap()),
            destination,
            port,
            protocol,
        }
    }

    fn run_demo(extra: &[&str], from: Option<&str>, to: &str) -> (Explanation, String) {
        let e = explain(&demo_ruleset(extra), &pkt(from, to));
        let text = format(&e);
        (e, text)
    }

    fn endpoints(e: &Explanation) -> Vec<(String, String)> {
        e.outcomes
            .iter()
            .filter_map(|o| Some((o.dnat.clone()?, percent(o.probability))))
            .collect()
    }

    #[test]
    fn destination_forms() {
        assert_eq!(
            parse_destination("10.96.0.10:80").unwrap(),
            ("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp)
        );
        assert_eq!(
            parse_destination("10.96.0.53:53/udp").unwrap(),
            ("10.96.0.53".parse().unwrap(), 53, Protocol::Udp)
        );
        assert_eq!(
            parse_destination("[fd00::1]:443/SCTP").unwrap(),
            ("fd00::1".parse().unwrap(), 443, Protocol::Sctp)
        );
        assert!(parse_destination("10.96.0.10").is_err());
        assert!(parse_destination("10.96.0.10:80/icmp").is_err());
        assert!(parse_destination("fd00::1:80").is_err());
    }

    #[test]
    fn args_and_modes() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let p = parse_explain_args(&a(&["--to=10.96.0.10:80", "--from", "10.0.0.1"]), "n").unwrap();
        assert_eq!(p.packet.source, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(p.mode, ProxyMode::Iptables);
        assert!(p.render.objects.is_empty());
        assert!(!p.explicit_hostname);
        let p = parse_explain_args(
            &a(&[
                "--to",
                "10.96.0.10:80",
                "--mode",
                "ipvs",
                "--objects",
                "a.yaml",
                "b.yaml",
                "--hostname-override=node1",
            ]),
            "n",
        )
        .unwrap();
        assert_eq!(p.mode, ProxyMode::Ipvs);
        assert_eq!(p.render.objects.len(), 2);
        assert!(p.explicit_hostname);
        let p = parse_explain_args(&a(&["--to", "1.2.3.4:5", "--proxy-mode=nftables"]), "n");
        assert_eq!(p.unwrap().mode, ProxyMode::Nftables);
        for bad in [
            &["--from", "10.0.0.1"][..],
            &["--to"],
            &["--to", "1.2.3.4:5", "--from", "nope"],
            &["--to", "1.2.3.4:5", "--mode", "userspace"],
            &["--to", "1.2.3.4:5", "--bogus-flag"],
        ] {
            assert!(parse_explain_args(&a(bad), "n").is_err(), "{bad:?}");
        }
        let err = parse_explain_args(&a(&["--from", "1.1.1.1"]), "n").unwrap_err();
        assert!(err.to_string().contains("Usage:"), "{err}");
    }

    #[tokio::test]
    async fn nftables_mode_explains_a_render() {
        let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo-cluster.yaml");
        let args: Vec<String> = [
            "--to",
            "10.96.0.10:80",
            "--mode",
            "nftables",
            "--objects",
            demo,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let text = run(&args, "node1", &mut Vec::new()).await.unwrap();
        assert!(text.contains("Endpoints (3):"), "{text}");
        assert!(text.contains("Rules: render of"), "{text}");
    }

    #[test]
    fn render_is_iptables_whatever_the_configured_mode() {
        let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo-cluster.yaml");
        let args: Vec<String> = [
            "--to",
            "10.96.0.10:80",
            "--proxy-mode=ipvs",
            "--mode",
            "iptables",
            "--objects",
            demo,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let parsed = parse_explain_args(&args, "node1").unwrap();
        assert_eq!(parsed.mode, ProxyMode::Iptables);
        let rs = ruleset_from_render(&parsed, &mut Vec::new()).unwrap();
        assert_eq!(rs.node_ips, vec!["192.168.50.1".parse::<IpAddr>().unwrap()]);
        let e = explain(&rs, &parsed.packet);
        assert_eq!(endpoints(&e).len(), 3);
        assert!(rs.origin.contains("demo-cluster.yaml"), "{}", rs.origin);
    }

    /// A dual-stack Service: `--to [IPv6]:port` walks the IPv6 proxier's rules, the IPv4
    /// address the IPv4 ones.
    #[test]
    fn each_family_is_explained_from_its_own_rules() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dual.yaml");
        std::fs::write(
            &file,
            r#"
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: dual}
spec:
  clusterIP: 10.96.0.7
  clusterIPs: [10.96.0.7, "fd00:96::7"]
  ports: [{name: p, port: 80, protocol: TCP, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns, name: dual-4, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
ports: [{name: p, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.0.7]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: ns, name: dual-6, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{name: p, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["fd00:244::7"]}, {addresses: ["fd00:244::8"]}]
"#,
        )
        .unwrap();
        let run = |to: &str| {
            let args: Vec<String> = ["--to", to, "--objects", &file.display().to_string()]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let parsed = parse_explain_args(&args, "node1").unwrap();
            let rs = ruleset_from_render(&parsed, &mut Vec::new()).unwrap();
            endpoints(&explain(&rs, &parsed.packet))
        };
        assert_eq!(
            run("[fd00:96::7]:80"),
            [
                ("[fd00:244::7]:8080".to_string(), "50.00%".to_string()),
                ("[fd00:244::8]:8080".to_string(), "50.00%".to_string()),
            ]
        );
        assert_eq!(
            run("10.96.0.7:80"),
            [("10.244.0.7:8080".to_string(), "100.00%".to_string())]
        );
    }

    #[test]
    fn cluster_ip_three_endpoints() {
        let (e, text) = run_demo(&[], Some("10.244.1.5"), "10.96.0.10:80");
        assert_eq!(
            endpoints(&e),
            [
                ("10.244.1.11:8080".to_string(), "33.33%".to_string()),
                ("10.244.2.12:8080".to_string(), "33.33%".to_string()),
                ("10.244.3.13:8080".to_string(), "33.33%".to_string()),
            ]
        );
        let total: f64 = e.outcomes.iter().map(|o| o.probability).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert_eq!(e.entry, "nat/PREROUTING");
        assert!(e.affinity.is_empty());
        for want in [
            "nat/PREROUTING",
            "-j KUBE-SERVICES",
            "\"kubernetes service portals\"",
            "\"demo/web:http cluster IP\"",
            "via KUBE-SEP-4R67FX26EEAQJQLI  \"demo/web:http -> 10.244.1.11:8080\"",
            "(probability 0.3333333333)",
            "Session affinity: none",
            "Masquerade: no",
            "Result: DNAT to one of 3 endpoints",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("REJECT"), "{text}");
    }

    #[test]
    fn probabilities_follow_the_statistic_rules() {
        // 0.5 then 0.5 then the rest: 50%, 25%, 25%; a 1.0 rule takes everything left.
        let dump = Dump::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:S - [0:0]\n:A - [0:0]\n:B - [0:0]\n:C - [0:0]\n:D - [0:0]\n\
             -A PREROUTING -d 10.0.0.1/32 -j S\n\
             -A S -m statistic --mode random --probability 0.50000000000 -j A\n\
             -A S -m statistic --mode random --probability 0.50000000000 -j B\n\
             -A S -m statistic --mode random --probability 1.0 -j C\n\
             -A S -j D\n\
             -A A -p tcp -j DNAT --to-destination 1.1.1.1:1\n\
             -A B -p tcp -j DNAT --to-destination 2.2.2.2:2\n\
             -A C -p tcp -j DNAT --to-destination 3.3.3.3:3\n\
             -A D -p tcp -j DNAT --to-destination 4.4.4.4:4\n\
             COMMIT\n",
        )
        .unwrap();
        let rs = Ruleset {
            dump,
            node_ips: vec![],
            origin: "test".into(),
            from_kernel: false,
        };
        let e = explain(&rs, &pkt(Some("9.9.9.9"), "10.0.0.1:80"));
        assert_eq!(
            endpoints(&e),
            [
                ("1.1.1.1:1".to_string(), "50.00%".to_string()),
                ("2.2.2.2:2".to_string(), "25.00%".to_string()),
                ("3.3.3.3:3".to_string(), "25.00%".to_string()),
            ]
        );
    }

    #[test]
    fn no_endpoints_is_rejected_with_the_rule_comment() {
        let (e, text) = run_demo(&[], Some("10.244.1.5"), "10.96.0.130:80");
        assert_eq!(e.outcomes.len(), 1);
        assert!(matches!(e.outcomes[0].verdict, Verdict::Rejected(_)));
        assert!(
            text.contains(
                "Result: REJECTED by filter/KUBE-SERVICES \"demo/empty:http has no endpoints\""
            ),
            "{text}"
        );
        assert!(text.contains("Masquerade: n/a"), "{text}");
    }

    #[test]
    fn load_balancer_source_ranges() {
        // Out of range: the FW chain lets it fall through and filter drops it.
        let (_, text) = run_demo(&[], Some("203.0.113.99"), "203.0.113.10:443");
        assert!(
            text.contains("DROPPED by filter/KUBE-PROXY-FIREWALL \"demo/edge:https traffic not accepted by KUBE-FW-F5MOWLRDBZEMUTAQ\""),
            "{text}"
        );
        assert!(
            text.contains(
                "\"other traffic to demo/edge:https will be dropped by KUBE-PROXY-FIREWALL\""
            ),
            "{text}"
        );
        // In range, eTP=Local: only the local endpoint, client IP kept.
        let (e, text) = run_demo(&[], Some("198.51.100.7"), "203.0.113.10:443");
        assert_eq!(
            endpoints(&e),
            [("10.244.1.31:8443".to_string(), "100.00%".to_string())]
        );
        assert!(text.contains("KUBE-SVL-F5MOWLRDBZEMUTAQ"), "{text}");
        assert!(text.contains("Masquerade: no"), "{text}");
        // Without --from the source-dependent rules are listed.
        let (_, text) = run_demo(&[], None, "203.0.113.10:443");
        assert!(text.contains("pass --from to be exact"), "{text}");
        assert!(text.contains("DROPPED"), "{text}");
    }

    #[test]
    fn node_port_is_masqueraded_with_affinity() {
        let (e, text) = run_demo(&[], Some("192.168.60.9"), "192.168.50.1:30080");
        assert_eq!(
            endpoints(&e),
            [
                ("10.244.1.21:8080".to_string(), "50.00%".to_string()),
                ("10.244.2.22:8080".to_string(), "50.00%".to_string()),
            ]
        );
        assert_eq!(e.affinity.len(), 2);
        for want in [
            "nat/KUBE-NODEPORTS",
            "Session affinity: ClientIP, 600s",
            "KUBE-SEP-NWQQSUKMA4LHI6IQ",
            "Masquerade: yes",
            "\"masquerade traffic for demo/shop:http external destinations\"",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn masquerade_depends_on_the_source() {
        let cidr = ["--cluster-cidr=10.244.0.0/16"];
        let (_, text) = run_demo(&cidr, Some("172.16.0.9"), "10.96.0.10:80");
        assert!(
            text.contains("the source is not in 10.244.0.0/16"),
            "off-cluster client: {text}"
        );
        let (_, text) = run_demo(&cidr, Some("10.244.7.7"), "10.96.0.10:80");
        assert!(text.contains("Masquerade: no"), "pod client: {text}");
        // Hairpin: the endpoint reaching itself is masqueraded, the others are not.
        let (e, text) = run_demo(&cidr, Some("10.244.1.11"), "10.96.0.10:80");
        assert!(
            text.contains("Masquerade: depends on the endpoint"),
            "{text}"
        );
        let hairpin = e
            .outcomes
            .iter()
            .find(|o| o.dnat.as_deref() == Some("10.244.1.11:8080"))
            .unwrap();
        assert!(
            matches!(&hairpin.masquerade, Masquerade::Yes(r) if r[0].contains("hairpin")),
            "{:?}",
            hairpin.masquerade
        );
    }

    #[test]
    fn from_the_node_enters_output() {
        let (e, text) = run_demo(&[], Some("192.168.50.1"), "10.96.0.53:53/udp");
        assert_eq!(e.entry, "nat/OUTPUT");
        assert!(text.contains("sent by the node itself"), "{text}");
        assert_eq!(endpoints(&e).len(), 2);
        assert!(
            text.contains("\"kube-system/dns:dns cluster IP\""),
            "{text}"
        );
    }

    #[test]
    fn unknown_destination() {
        let (e, text) = run_demo(&[], Some("10.244.1.5"), "10.96.0.99:80");
        assert_eq!(e.outcomes.len(), 1);
        assert!(text.contains("it is not a service address"), "{text}");
        // Right IP, wrong protocol.
        let (_, text) = run_demo(&[], Some("10.244.1.5"), "10.96.0.10:80/udp");
        assert!(text.contains("it is not a service address"), "{text}");
    }

    #[test]
    fn kernel_format_and_missing_jumps() {
        // As iptables-save prints it: /32, kernel probabilities, no jump rules in PREROUTING.
        let dump = Dump::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
             :KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n:KUBE-SEP-A - [0:0]\n:KUBE-SEP-B - [0:0]\n\
             -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"ns/web cluster IP\" -m tcp --dport 80 -j KUBE-SVC-X\n\
             -A KUBE-SVC-X -m comment --comment \"ns/web -> 10.1.0.1:80\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-A\n\
             -A KUBE-SVC-X -m comment --comment \"ns/web -> 10.1.0.2:80\" -j KUBE-SEP-B\n\
             -A KUBE-SEP-A -p tcp -m comment --comment ns/web -m tcp -j DNAT --to-destination 10.1.0.1:80\n\
             -A KUBE-SEP-B -p tcp -m comment --comment ns/web -m tcp -j DNAT --to-destination 10.1.0.2:80\n\
             COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             -A FORWARD -m set --match-set FOO dst -j ACCEPT\n\
             COMMIT\n",
        )
        .unwrap();
        let rs = Ruleset {
            dump,
            node_ips: vec![],
            origin: "kernel".into(),
            from_kernel: true,
        };
        let e = explain(&rs, &pkt(Some("10.2.0.1"), "10.96.0.10:80"));
        let text = format(&e);
        assert!(
            text.contains("WARNING: kube-proxy's jump nat/PREROUTING -> KUBE-SERVICES is missing"),
            "{text}"
        );
        assert!(
            text.contains("(no rule matched in the nat table)"),
            "{text}"
        );
        assert!(
            text.contains("the policy of filter/FORWARD is DROP"),
            "{text}"
        );
        assert!(text.contains("-m set"), "{text}");
    }
}
