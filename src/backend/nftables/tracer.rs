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
    let mut t = Tracer {
        table,
        local: node_ips.iter().copied().collect(),
        pkt: pkt.clone(),
        mark: false,
        trace: Trace::default(),
    };
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

impl Tracer<'_> {
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
            "update" => Step::Next(group(w, i + 2).1),
            // Large-cluster layout: `numgen random mod K 0 goto X` takes X with odds 1/K and
            // otherwise goes on; both ways are followed.
            "numgen" if at(4) != "vmap" => {
                self.run_chain(at(6), depth + 1);
                Step::NoMatch
            }
            "numgen" => {
                let (entries, _) = group(w, i + 5);
                for e in entries.chunks(4) {
                    if let [_, ":", "goto", target] = e {
                        self.run_chain(target, depth + 1);
                    }
                }
                Step::Verdict("accept".into())
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
    fn lookup(&self, map: &str, key: &str) -> Step {
        let map = map.trim_start_matches('@');
        match self.map_value(map, key) {
            Some(v) => Step::Verdict(v),
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
