//! Runs a packet through a [`Table`] the way upstream's test `nftablesTracer` does:
//! `filter-prerouting-pre-dnat`, `nat-prerouting` (a DNAT changes the destination the later
//! chains see), then `filter-forward` and `filter-input`, then `nat-postrouting` for the
//! masquerade. A `numgen` map follows every branch, so every candidate endpoint is
//! collected. Affinity sets are empty (no history), `ct state new` always matches.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::table::Table;
use crate::model::Cidr;

pub use crate::backend::netfilter::trace::{Packet, Trace};

/// How a chain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Fell off the end or `return`ed: the caller goes on.
    Return,
    /// A terminal verdict (accept, drop, reject, DNAT).
    Done,
}

const MAX_DEPTH: usize = 64;

/// Traces `pkt`; `node_ips` are the host's addresses (`fib … type local`).
pub fn trace_packet(table: &Table, node_ips: &[IpAddr], pkt: &Packet) -> Trace {
    let mut t = Tracer::new(table, node_ips, pkt, None);
    t.run_chain("filter-prerouting-pre-dnat", 0);
    if t.blocked() {
        return t.trace;
    }
    t.run_chain("nat-prerouting", 0);
    if let Some(first) = t.trace.outputs.first()
        && let Some(ip) = dnat_ip(first)
    {
        t.pkt.destination = ip;
    }
    t.run_chain("filter-forward", 0);
    if !t.blocked() {
        t.run_chain("filter-input", 0);
    }
    if !t.blocked() {
        t.run_chain("nat-postrouting", 0);
    }
    t.trace
}

/// One random pick on a [`Path`]: the `numgen` rule, which of its ways was taken
/// (`vmap`: the entry; one rule per endpoint: 0 taken, 1 passed), and that way's odds.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// `chain: rule`.
    pub rule: String,
    /// The way taken.
    pub taken: usize,
    /// How many ways there were.
    pub ways: usize,
    /// The odds of the way taken.
    pub odds: f64,
}

/// One way a new connection can go (for `explain`): a single walk through the hooks it
/// meets, with every `numgen` pick made one way.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    /// The base chains entered, in order.
    pub hooks: Vec<&'static str>,
    /// The walk (outputs: the DNAT destination, or `DROP`/`REJECT`).
    pub trace: Trace,
    /// Its odds: the product of its choices'.
    pub odds: f64,
    /// The random picks made on the way.
    pub choices: Vec<Choice>,
    /// Verdict-map lookups that matched: map, the element (key, comment, value), value.
    pub maps: Vec<(String, String, String)>,
    /// Affinity sets the connection's source would be added to.
    pub affinity_updates: Vec<String>,
    /// The packet was delivered to the node itself (`filter-input`, no `nat-postrouting`).
    pub local_delivery: bool,
}

/// Most paths [`paths`] follows (endpoints of one service, times affinity and firewall picks).
pub const MAX_PATHS: usize = 10_000;

/// Every way `pkt` can go, most-significant pick first: a connection from one of `node_ips`
/// enters `filter-output-pre-dnat` and `nat-output`, others the prerouting chains; after the
/// DNAT, `filter-output`, `filter-input` (to the node) or `filter-forward`, then
/// `nat-postrouting` unless delivered locally. Unlike [`trace_packet`], each `numgen` pick is
/// one path of its own, so each endpoint comes out with its odds.
pub fn paths(table: &Table, node_ips: &[IpAddr], pkt: &Packet) -> Vec<Path> {
    let mut out = Vec::new();
    let mut script: Vec<usize> = Vec::new();
    while out.len() < MAX_PATHS {
        let mut t = Tracer::new(table, node_ips, pkt, Some(script));
        let (hooks, local_delivery) = t.walk();
        let choices = t.made;
        // The next script: the last pick with a way left, one way further.
        script = Vec::new();
        if let Some(j) = choices.iter().rposition(|c| c.taken + 1 < c.ways) {
            script = choices[..j].iter().map(|c| c.taken).collect();
            script.push(choices[j].taken + 1);
        }
        out.push(Path {
            hooks,
            odds: choices.iter().map(|c| c.odds).product(),
            trace: t.trace,
            choices,
            maps: t.maps,
            affinity_updates: t.affinity_updates,
            local_delivery,
        });
        if script.is_empty() {
            break;
        }
    }
    out
}

fn dnat_ip(target: &str) -> Option<IpAddr> {
    let host = target.rsplit_once(':')?.0;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

struct Tracer<'a> {
    table: &'a Table,
    local: BTreeSet<IpAddr>,
    pkt: Packet,
    mark: bool,
    trace: Trace,
    /// `Some`: follow one way per `numgen` (these picks first, then way 0), recording each
    /// in `made`; `None`: follow every way at once, as upstream's tracer.
    script: Option<Vec<usize>>,
    made: Vec<Choice>,
    maps: Vec<(String, String, String)>,
    affinity_updates: Vec<String>,
}

/// Splits a rule into words, keeping a quoted string as one word.
fn words(rule: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = rule.trim();
    while !rest.is_empty() {
        if let Some(q) = rest.strip_prefix('"') {
            let end = q.find('"').map_or(rest.len(), |e| e + 2);
            out.push(&rest[..end]);
            rest = rest[end..].trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
    }
    out
}

/// The words of a `{ a , b }` group starting at `w[i]`, and the index after it.
fn group<'a>(w: &[&'a str], i: usize) -> (Vec<&'a str>, usize) {
    let mut items = Vec::new();
    let mut j = i + 1;
    while j < w.len() && w[j] != "}" {
        if w[j] != "," {
            items.push(w[j]);
        }
        j += 1;
    }
    (items, j + 1)
}

fn in_cidr(value: &str, ip: IpAddr) -> bool {
    if let Ok(c) = value.parse::<Cidr>() {
        return c.contains(&ip);
    }
    value.parse::<IpAddr>().is_ok_and(|v| v == ip)
}

impl<'a> Tracer<'a> {
    fn new(
        table: &'a Table,
        node_ips: &[IpAddr],
        pkt: &Packet,
        script: Option<Vec<usize>>,
    ) -> Self {
        Tracer {
            table,
            local: node_ips.iter().copied().collect(),
            pkt: pkt.clone(),
            mark: false,
            trace: Trace::default(),
            script,
            made: Vec::new(),
            maps: Vec::new(),
            affinity_updates: Vec::new(),
        }
    }

    /// One path through the hooks (see [`paths`]); returns the base chains entered and
    /// whether the packet was delivered locally.
    fn walk(&mut self) -> (Vec<&'static str>, bool) {
        let from_node = self.local.contains(&self.pkt.source) || self.pkt.source.is_loopback();
        let (pre, nat) = if from_node {
            ("filter-output-pre-dnat", "nat-output")
        } else {
            ("filter-prerouting-pre-dnat", "nat-prerouting")
        };
        let mut hooks = vec![pre];
        self.run_chain(pre, 0);
        if self.blocked() {
            return (hooks, false);
        }
        hooks.push(nat);
        self.run_chain(nat, 0);
        if let Some(ip) = self.trace.outputs.first().and_then(|o| dnat_ip(o)) {
            self.pkt.destination = ip;
        }
        let to_node = self.local.contains(&self.pkt.destination);
        let filter = match (from_node, to_node) {
            (true, _) => "filter-output",
            (false, true) => "filter-input",
            (false, false) => "filter-forward",
        };
        hooks.push(filter);
        self.run_chain(filter, 0);
        if self.blocked() || filter == "filter-input" {
            return (hooks, filter == "filter-input" && !self.blocked());
        }
        hooks.push("nat-postrouting");
        self.run_chain("nat-postrouting", 0);
        (hooks, false)
    }

    /// The next scripted pick among `ways` (way 0 past the script).
    fn pick(&mut self, rule: String, ways: usize, odds: impl Fn(usize) -> f64) -> usize {
        let taken = self
            .script
            .as_ref()
            .and_then(|s| s.get(self.made.len()).copied())
            .unwrap_or(0)
            .min(ways.saturating_sub(1));
        self.made.push(Choice {
            rule,
            taken,
            ways,
            odds: odds(taken),
        });
        taken
    }

    fn blocked(&self) -> bool {
        self.trace
            .outputs
            .iter()
            .any(|o| o == "DROP" || o == "REJECT")
    }

    fn set_has(&self, set: &str, key: &str) -> bool {
        self.table
            .sets
            .get(set)
            .is_some_and(|s| s.elements.iter().any(|(k, _)| k == key))
    }

    fn map_value(&self, map: &str, key: &str) -> Option<String> {
        let s = self.table.sets.get(map)?;
        let (_, body) = s.elements.iter().find(|(k, _)| k == key)?;
        body.rsplit_once(" : ").map(|(_, v)| v.to_string())
    }

    fn proto(&self) -> &'static str {
        self.pkt.protocol.lower()
    }

    fn run_chain(&mut self, chain: &str, depth: usize) -> Flow {
        let Some(c) = self.table.chains.get(chain) else {
            return Flow::Return;
        };
        if depth > MAX_DEPTH {
            return Flow::Done;
        }
        self.trace.chains.push(chain.to_string());
        for rule in &c.rules {
            if let Some(flow) = self.run_rule(chain, rule, depth) {
                return flow;
            }
        }
        Flow::Return
    }

    /// Runs one rule: `None` when the packet goes on to the next rule.
    fn run_rule(&mut self, chain: &str, rule: &str, depth: usize) -> Option<Flow> {
        let w = words(rule);
        let mut i = 0;
        while i < w.len() {
            match self.step(&w, i, depth) {
                Step::Next(n) => i = n,
                Step::NoMatch => return None,
                Step::Verdict(v) => {
                    self.trace.matched_rules.push(format!("{chain}: {rule}"));
                    return self.verdict(&v, depth);
                }
            }
        }
        self.trace.matched_rules.push(format!("{chain}: {rule}"));
        None
    }

    fn verdict(&mut self, v: &str, depth: usize) -> Option<Flow> {
        let (word, target) = v.split_once(' ').unwrap_or((v, ""));
        match word {
            "jump" => match self.run_chain(target, depth + 1) {
                Flow::Done => Some(Flow::Done),
                Flow::Return => None,
            },
            "goto" => Some(self.run_chain(target, depth + 1)),
            "return" => Some(Flow::Return),
            "accept" => Some(Flow::Done),
            "drop" => {
                self.trace.outputs.push("DROP".into());
                Some(Flow::Done)
            }
            "reject" => {
                self.trace.outputs.push("REJECT".into());
                Some(Flow::Done)
            }
            _ => None,
        }
    }

    /// Evaluates the expression at `w[i]`.
    fn step(&mut self, w: &[&str], i: usize, depth: usize) -> Step {
        let at = |k: usize| w.get(i + k).copied().unwrap_or("");
        match at(0) {
            "ct" => Step::Next(i + 3),
            "comment" => Step::Next(w.len()),
            "ip" | "ip6" => self.addr_match(w, i),
            "meta" if at(2) == "." => {
                let key = format!("{} . {}", self.proto(), self.pkt.dport);
                self.lookup(at(6), &key)
            }
            "meta" => Step::when(at(2) == self.proto(), i + 3),
            "fib" => {
                let ip = if at(1) == "saddr" {
                    self.pkt.source
                } else {
                    self.pkt.destination
                };
                Step::when(self.local.contains(&ip), i + 4)
            }
            "iifname" => {
                let (neg, v) = if at(1) == "!=" {
                    (true, at(2))
                } else {
                    (false, at(1))
                };
                let pat = v.trim_matches('"');
                let m = self.pkt.in_interface.as_deref().is_some_and(|iface| {
                    pat.strip_suffix('*')
                        .map_or(iface == pat, |p| iface.starts_with(p))
                });
                Step::when(m != neg, i + if neg { 3 } else { 2 })
            }
            "mark" if at(1) == "set" => {
                if at(3) == "or" {
                    self.mark = true;
                }
                Step::Next(i + 5)
            }
            // `mark and M == 0`: not marked.
            "mark" => Step::when(!self.mark, i + 5),
            "masquerade" => {
                self.trace.masquerade = true;
                Step::Verdict("accept".into())
            }
            "update" => {
                self.affinity_updates
                    .push(at(1).trim_start_matches('@').to_string());
                Step::Next(group(w, i + 2).1)
            }
            // Large-cluster layout: `numgen random mod K 0 goto X` takes X with odds 1/K and
            // otherwise goes on; both ways are followed (or, scripted, one).
            "numgen" if at(4) != "vmap" => {
                if self.script.is_none() {
                    self.run_chain(at(6), depth + 1);
                    return Step::NoMatch;
                }
                let k = at(3).parse::<usize>().unwrap_or(1).max(1);
                let ways = if k == 1 { 1 } else { 2 };
                let p = 1.0 / k as f64;
                let rule = w.join(" ");
                match self.pick(rule, ways, |t| if t == 0 { p } else { 1.0 - p }) {
                    0 => Step::Verdict(format!("goto {}", at(6))),
                    _ => Step::NoMatch,
                }
            }
            "numgen" => {
                let (entries, _) = group(w, i + 5);
                let targets: Vec<&str> = entries
                    .chunks(4)
                    .filter_map(|e| match e {
                        [_, ":", "goto", target] => Some(*target),
                        _ => None,
                    })
                    .collect();
                if self.script.is_none() {
                    for target in targets {
                        self.run_chain(target, depth + 1);
                    }
                    return Step::Verdict("accept".into());
                }
                let k = at(3).parse::<usize>().unwrap_or(targets.len()).max(1);
                let taken = self.pick(w.join(" "), targets.len(), |_| 1.0 / k as f64);
                match targets.get(taken) {
                    Some(t) => Step::Verdict(format!("goto {t}")),
                    None => Step::NoMatch,
                }
            }
            "dnat" => {
                self.trace.outputs.push(at(2).to_string());
                Step::Verdict("accept".into())
            }
            "jump" | "goto" => Step::Verdict(format!("{} {}", at(0), at(1))),
            v => Step::Verdict(v.to_string()),
        }
    }

    /// `ip saddr|daddr [!=] VALUE`, or the `ip daddr . meta l4proto . th dport vmap @M` key.
    fn addr_match(&mut self, w: &[&str], i: usize) -> Step {
        let at = |k: usize| w.get(i + k).copied().unwrap_or("");
        let ip = if at(1) == "saddr" {
            self.pkt.source
        } else {
            self.pkt.destination
        };
        if at(2) == "." {
            let key = format!("{ip} . {} . {}", self.proto(), self.pkt.dport);
            return self.lookup(at(9), &key);
        }
        let (neg, j) = if at(2) == "!=" {
            (true, i + 3)
        } else {
            (false, i + 2)
        };
        let v = w.get(j).copied().unwrap_or("");
        let (m, next) = if let Some(set) = v.strip_prefix('@') {
            (self.set_has(set, &ip.to_string()), j + 1)
        } else if v == "{" {
            let (items, next) = group(w, j);
            (items.iter().any(|c| in_cidr(c, ip)), next)
        } else {
            (in_cidr(v, ip), j + 1)
        };
        Step::when(m != neg, next)
    }

    /// `vmap @MAP`: the map's verdict for `key`, or no match.
    fn lookup(&mut self, map: &str, key: &str) -> Step {
        let map = map.trim_start_matches('@');
        match self.map_value(map, key) {
            Some(v) => {
                let element = self.table.sets.get(map).and_then(|s| {
                    s.elements
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, e)| e.clone())
                });
                self.maps
                    .push((map.to_string(), element.unwrap_or_default(), v.clone()));
                Step::Verdict(v)
            }
            None => Step::NoMatch,
        }
    }
}

enum Step {
    /// Matched; go on at this word.
    Next(usize),
    /// The rule does not match.
    NoMatch,
    /// The rule's verdict.
    Verdict(String),
}

impl Step {
    fn when(cond: bool, next: usize) -> Step {
        if cond {
            Step::Next(next)
        } else {
            Step::NoMatch
        }
    }
}
