//! From a desired [`Ruleset`] and the in-memory record of what the last successful
//! transaction committed, the next `nft -f -` transaction: the whole ruleset on a full sync,
//! only changed chains and element adds/deletes on a partial one (upstream's
//! `nftElementStorage` and `skipServiceUpdate`, without re-listing the kernel).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use super::names;
use super::render::{ELEMENT_CONTAINERS, Element, Op, Ruleset, ServiceBlock, Writer, write_setup};
use crate::model::IpFamily;

/// What the kernel holds after the last successful transaction (per-service objects only;
/// the fixed section is rewritten by every full sync).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Per-service chains and a hash of their rules.
    pub chains: HashMap<String, u64>,
    /// Affinity sets.
    pub sets: HashSet<String>,
    /// Elements per container: key → what follows it (comment and value).
    pub elements: HashMap<&'static str, HashMap<String, String>>,
}

/// What the next transaction may assume about the kernel.
#[derive(Debug, Clone, Copy)]
pub enum Prior<'a> {
    /// Exactly this was committed (an empty record: the table does not exist).
    Known(&'a Committed),
    /// Unknown contents (first sync after a restart, or after a failed transaction): a full
    /// sync flushes the element containers; `existing` lists the chains and sets found, so
    /// stale ones are still cleaned up.
    Unknown {
        /// Chain and set names present in the table.
        existing: &'a Existing,
    },
}

/// Names found in the kernel's table (`nft -t list table`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Chain names.
    pub chains: Vec<String>,
    /// Set names.
    pub sets: Vec<String>,
}

/// One transaction and the record it leaves when it commits.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    /// The `nft -f -` input (empty when nothing changed).
    pub text: String,
    /// Number of operations (lines).
    pub ops: usize,
    /// The record after a successful commit.
    pub next: Committed,
    /// Per-service chains flushed by this transaction, to delete in a later one.
    pub flushed_stale: Vec<String>,
}

/// Builds the transaction of one sync. `full` writes the fixed section and every chain;
/// `first_after_start` adds upstream's add+delete of the base chains.
pub fn build(rs: &Ruleset, prior: Prior, full: bool, first_after_start: bool) -> Transaction {
    let empty = Committed::default();
    let (record, trusted) = match prior {
        Prior::Known(c) => (c, true),
        Prior::Unknown { .. } => (&empty, false),
    };
    let full = full || !trusted;
    let mut text = String::new();
    let mut w = Writer::new(rs.family, &mut text);
    if full {
        write_setup(&mut w, &rs.config, first_after_start);
    }
    if !trusted {
        for (name, kind) in ELEMENT_CONTAINERS {
            w.line("flush", kind.word(), name);
        }
    }
    let mut next = Committed::default();
    for block in &rs.services {
        write_block(&mut w, &block.ops, record, full, &mut next);
    }
    let (old_chains, old_sets): (Vec<&String>, Vec<&String>) = match prior {
        Prior::Known(c) => (c.chains.keys().collect(), c.sets.iter().collect()),
        Prior::Unknown { existing } => (
            existing.chains.iter().collect(),
            existing.sets.iter().collect(),
        ),
    };
    let flushed_stale = write_leftovers(&mut w, old_chains, old_sets, record, &next);
    let ops = w.ops;
    Transaction {
        text,
        ops,
        next,
        flushed_stale,
    }
}

/// A partial sync's transaction at the cost of the change: `old` are the objects of the
/// changed services' blocks as last committed, `new` their blocks now; every other object stays as `record`
/// (the last commit) holds it. Writes the same objects as [`build`] of the whole ruleset
/// would (proven by the `partial_build_equals_the_whole_build` test).
pub fn build_partial(
    family: IpFamily,
    old: &[Owned],
    new: &[ServiceBlock],
    record: Committed,
) -> Transaction {
    let mut next = record;
    let removed = take_objects(&mut next, old);
    let mut text = String::new();
    let mut w = Writer::new(family, &mut text);
    for block in new {
        write_block(&mut w, &block.ops, &removed, false, &mut next);
    }
    let flushed_stale = write_leftovers(
        &mut w,
        removed.chains.keys().collect(),
        removed.sets.iter().collect(),
        &removed,
        &next,
    );
    let ops = w.ops;
    Transaction {
        text,
        ops,
        next,
        flushed_stale,
    }
}

/// The named objects a service port's block owns: all a partial sync needs of what it last
/// committed (the rules' text is in the record as a hash only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Its chains and the number of rules in each.
    pub chains: Vec<(String, usize)>,
    /// Its affinity sets.
    pub sets: Vec<String>,
    /// Its elements: container and key.
    pub elements: Vec<(&'static str, String)>,
}

impl Owned {
    /// The objects `ops` write.
    pub fn of(ops: &[Op]) -> Self {
        let mut owned = Owned::default();
        for op in ops {
            match op {
                Op::Chain(chain) => owned.chains.push((chain.clone(), 0)),
                Op::Rule { chain, .. } => match owned.chains.iter_mut().find(|(c, _)| c == chain) {
                    Some((_, n)) => *n += 1,
                    None => owned.chains.push((chain.clone(), 1)),
                },
                Op::Set { name, .. } => owned.sets.push(name.clone()),
                Op::Element(e) => owned.elements.push((e.container, e.key.clone())),
            }
        }
        owned
    }
}

/// Moves the objects `blocks` own out of `record`: what they held when last committed.
fn take_objects(record: &mut Committed, blocks: &[Owned]) -> Committed {
    let mut taken = Committed::default();
    for owned in blocks {
        for (chain, _) in &owned.chains {
            if let Some(h) = record.chains.remove(chain) {
                taken.chains.insert(chain.clone(), h);
            }
        }
        for name in &owned.sets {
            if record.sets.remove(name) {
                taken.sets.insert(name.clone());
            }
        }
        for (container, key) in &owned.elements {
            let rest = record
                .elements
                .get_mut(container)
                .and_then(|m| m.remove(key));
            if let Some(rest) = rest {
                let m = taken.elements.entry(container).or_default();
                m.insert(key.clone(), rest);
            }
        }
    }
    // A whole build records no container it has no element for.
    record.elements.retain(|_, m| !m.is_empty());
    taken
}

/// Flushes the per-service chains, deletes the affinity sets and elements of `old` that
/// `next` no longer has; returns the flushed chains (deleted by a later transaction).
fn write_leftovers(
    w: &mut Writer,
    old_chains: Vec<&String>,
    old_sets: Vec<&String>,
    old: &Committed,
    next: &Committed,
) -> Vec<String> {
    let mut flushed_stale = Vec::new();
    let mut old_chains: Vec<&String> = old_chains
        .into_iter()
        .filter(|c| names::is_service_chain(c) && !next.chains.contains_key(*c))
        .collect();
    old_chains.sort();
    for c in old_chains {
        w.line("flush", "chain", c);
        flushed_stale.push(c.clone());
    }
    let mut old_sets: Vec<&String> = old_sets
        .into_iter()
        .filter(|s| names::is_affinity_set(s) && !next.sets.contains(*s))
        .collect();
    old_sets.sort();
    for s in old_sets {
        w.line("delete", "set", s);
    }
    for (container, _) in ELEMENT_CONTAINERS {
        let (Some(gone), new) = (old.elements.get(container), next.elements.get(container)) else {
            continue;
        };
        let mut gone: Vec<&String> = gone
            .keys()
            .filter(|k| new.is_none_or(|n| !n.contains_key(*k)))
            .collect();
        gone.sort();
        for key in gone {
            w.delete_element(container, key);
        }
    }
    flushed_stale
}

fn hash_rules(rules: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    rules.hash(&mut h);
    h.finish()
}

/// One service's block: chains rewritten when new, changed or on a full sync (a partial
/// sync writes each one's rules as an `add chain` block, see [`Writer::rules`]); elements
/// ensured against the record; affinity sets added when new (or on a full sync).
fn write_block(w: &mut Writer, ops: &[Op], record: &Committed, full: bool, next: &mut Committed) {
    let mut rules: HashMap<&str, Vec<&str>> = HashMap::new();
    for op in ops {
        match op {
            Op::Chain(c) => {
                rules.entry(c.as_str()).or_default();
            }
            Op::Rule { chain, rule } => rules.entry(chain.as_str()).or_default().push(rule),
            Op::Set { .. } | Op::Element(_) => {}
        }
    }
    let mut rewrite: HashSet<&str> = HashSet::new();
    for (chain, rs) in &rules {
        let h = hash_rules(rs);
        if full || record.chains.get(*chain) != Some(&h) {
            rewrite.insert(chain);
        }
        next.chains.insert((*chain).to_string(), h);
    }
    // Rules of each chain met so far (a partial sync writes them at the chain's last one).
    let mut unwritten: HashMap<&str, usize> = HashMap::new();
    for op in ops {
        match op {
            Op::Chain(c) if rewrite.contains(c.as_str()) => w.chain(c),
            Op::Chain(_) => {}
            Op::Rule { chain, rule } if full && rewrite.contains(chain.as_str()) => {
                w.rule(chain, rule)
            }
            // A partial sync writes a chain's rules together where its last rule was, so
            // every chain and set they name is added before them.
            Op::Rule { chain, .. } if !full && rewrite.contains(chain.as_str()) => {
                let left = unwritten.entry(chain.as_str()).or_default();
                *left += 1;
                let all = rules.get(chain.as_str()).map_or(&[][..], Vec::as_slice);
                if *left == all.len() {
                    w.rules(chain, all);
                }
            }
            Op::Rule { .. } => {}
            Op::Set { name, spec } => {
                if full || !record.sets.contains(name) {
                    w.line("add", "set", &format!("{name} {{ {spec} }}"));
                }
                next.sets.insert(name.clone());
            }
            Op::Element(e) => ensure_element(w, e, record, next),
        }
    }
}

/// Upstream `ensureElem`: add if absent, delete+add if its value changed.
fn ensure_element(w: &mut Writer, e: &Element, record: &Committed, next: &mut Committed) {
    let taken = next
        .elements
        .get(e.container)
        .is_some_and(|m| m.contains_key(&e.key));
    if taken {
        // Two services claim one destination (a conflict the API should have refused):
        // the first keeps it, as a second `add element` would fail the transaction.
        return;
    }
    match record.elements.get(e.container).and_then(|m| m.get(&e.key)) {
        Some(rest) if *rest == e.rest => {}
        Some(_) => {
            w.delete_element(e.container, &e.key);
            w.element(e);
        }
        None => w.element(e),
    }
    next.elements
        .entry(e.container)
        .or_default()
        .insert(e.key.clone(), e.rest.clone());
}
