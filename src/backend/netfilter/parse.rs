//! Parser for `iptables-save` output and `iptables-restore` input.
//!
//! Accepts both what the renderers write (`-m comment --comment … -m tcp -p tcp -d IP …`)
//! and what the kernel hands back through `iptables-save` (reordered arguments, `/32`
//! suffixes, `0x4000/0x4000` marks, `--set-xmark`, always-quoted comments, optional
//! `[packets:bytes]` counters). Rules keep their raw text and their words, and the matches
//! kube-proxy uses are lifted into typed fields. Unknown options are skipped, as upstream's
//! test parser (pkg/util/iptables/testing/parse.go) does.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use crate::model::Cidr;

/// Why a dump could not be parsed (or applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("iptables data line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number in the input (0 if not tied to a line).
    pub line: usize,
    /// What was wrong.
    pub message: String,
}

impl ParseError {
    fn new(line: usize, message: impl Into<String>) -> Self {
        ParseError {
            line,
            message: message.into(),
        }
    }
}

/// A whole dump: tables in input order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
    /// Tables in the order they appeared.
    pub tables: Vec<Table>,
}

/// One table (`*nat`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// Table name without the `*`.
    pub name: String,
    /// Chains in declaration order.
    pub chains: Vec<Chain>,
}

/// One chain and its rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Chain name.
    pub name: String,
    /// Policy of a builtin chain (`ACCEPT`, `DROP`); `None` for a user chain (`-`).
    pub policy: Option<String>,
    /// Packet counter from the declaration.
    pub packets: u64,
    /// Byte counter from the declaration.
    pub bytes: u64,
    /// Rules in order.
    pub rules: Vec<Rule>,
    /// Set when restore input carries `-X NAME` (never in `iptables-save` output).
    pub deleted: bool,
}

/// A possibly negated match value (`! -s 10.0.0.0/8`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// Preceded by `!`.
    pub negated: bool,
    /// The value as written.
    pub value: String,
}

impl Value {
    fn new(negated: bool, value: &str) -> Self {
        Value {
            negated,
            value: value.to_string(),
        }
    }

    /// Whether `candidate` satisfies this (exact string comparison, honouring negation).
    pub fn matches(&self, candidate: &str) -> bool {
        (self.value == candidate) != self.negated
    }

    /// Whether `ip` satisfies this address match (`1.2.3.4`, `1.2.3.4/32`, `10.0.0.0/8`).
    /// An unparsable value never matches (and so always matches when negated).
    pub fn matches_ip(&self, ip: &IpAddr) -> bool {
        let hit = parse_addr(&self.value).is_some_and(|c| c.contains(ip));
        hit != self.negated
    }

    /// Whether an input/output interface satisfies this (`eth0`, or `veth+` as a prefix).
    /// A packet with no known interface matches no positive interface match.
    pub fn matches_interface(&self, iface: Option<&str>) -> bool {
        let hit = match iface {
            None => false,
            Some(name) => match self.value.strip_suffix('+') {
                Some(prefix) => name.starts_with(prefix),
                None => name == self.value,
            },
        };
        hit != self.negated
    }
}

/// Parses an address or prefix as printed by iptables.
pub fn parse_addr(s: &str) -> Option<Cidr> {
    if s.contains('/') {
        s.parse().ok()
    } else {
        s.parse::<IpAddr>().ok().map(Cidr::host)
    }
}

/// `-m recent` state (ClientIP session affinity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recent {
    /// `--name`.
    pub name: Option<String>,
    /// `--rcheck` present (checks the list).
    pub rcheck: bool,
    /// `--set` present (adds the source to the list).
    pub set: bool,
    /// `--seconds`.
    pub seconds: Option<u32>,
    /// `--reap` present.
    pub reap: bool,
}

/// One rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// The original line, trimmed (counters prefix included if there was one).
    pub raw: String,
    /// The chain the rule is in.
    pub chain: String,
    /// The unquoted words after `-A CHAIN`.
    pub args: Vec<String>,
    /// `-m` modules in order.
    pub modules: Vec<String>,
    /// `--comment`.
    pub comment: Option<String>,
    /// `-p`.
    pub protocol: Option<Value>,
    /// `-s`.
    pub source: Option<Value>,
    /// `-d`.
    pub destination: Option<Value>,
    /// `-m addrtype --src-type`.
    pub src_type: Option<Value>,
    /// `-m addrtype --dst-type`.
    pub dst_type: Option<Value>,
    /// `-i`.
    pub in_interface: Option<Value>,
    /// `-o`.
    pub out_interface: Option<Value>,
    /// `--sport`.
    pub sport: Option<Value>,
    /// `--dport`.
    pub dport: Option<Value>,
    /// `-m mark --mark`.
    pub mark: Option<Value>,
    /// `-m conntrack --ctstate` (or `-m state --state`).
    pub ctstate: Option<Value>,
    /// `-m statistic --mode`.
    pub statistic_mode: Option<String>,
    /// `-m statistic --probability`, as written.
    pub probability: Option<String>,
    /// `-m recent`.
    pub recent: Option<Recent>,
    /// `-m nfacct --nfacct-name`.
    pub nfacct_name: Option<String>,
    /// `-j` target.
    pub jump: Option<String>,
    /// `-g` target.
    pub goto: Option<String>,
    /// `DNAT --to-destination`.
    pub to_destination: Option<String>,
    /// `SNAT --to-source`.
    pub to_source: Option<String>,
    /// `MARK` operation and value (`--or-mark`, `0x4000`); `iptables-save` prints `--set-xmark`.
    pub set_mark: Option<(String, String)>,
    /// `--random-fully`.
    pub random_fully: bool,
}

impl Rule {
    /// Parses a rule line (`-A CHAIN …`, optionally preceded by `[packets:bytes]`).
    pub fn parse(line: &str) -> Result<Rule, String> {
        let words = split_words(line)?;
        let mut rest: &[String] = &words;
        if rest.first().is_some_and(|w| is_counters(w)) {
            rest = &rest[1..];
        }
        let (chain, args) = match rest {
            [flag, chain, args @ ..] if flag == "-A" || flag == "--append" => (chain, args),
            _ => return Err(format!("not a rule (expected \"-A CHAIN\"): {line:?}")),
        };
        let mut rule = Rule {
            raw: line.trim().to_string(),
            chain: chain.clone(),
            args: args.to_vec(),
            ..Rule::default()
        };
        rule.fill(args)?;
        Ok(rule)
    }

    fn fill(&mut self, args: &[String]) -> Result<(), String> {
        let mut negated = false;
        let mut i = 0;
        while i < args.len() {
            let word = args[i].as_str();
            if word == "!" {
                negated = true;
                i += 1;
                continue;
            }
            let next = args.get(i + 1).map(String::as_str);
            let takes_value = option_takes_value(word);
            if takes_value && next.is_none() {
                return Err(format!("option {word} needs a value"));
            }
            let val = next.unwrap_or("");
            let v = || Some(Value::new(negated, val));
            match word {
                "-m" | "--match" => self.modules.push(val.to_string()),
                "--comment" => self.comment = Some(val.to_string()),
                "-p" | "--protocol" => self.protocol = v(),
                "-s" | "--source" | "--src" => self.source = v(),
                "-d" | "--destination" | "--dst" => self.destination = v(),
                "--src-type" => self.src_type = v(),
                "--dst-type" => self.dst_type = v(),
                "-i" | "--in-interface" => self.in_interface = v(),
                "-o" | "--out-interface" => self.out_interface = v(),
                "--sport" | "--source-port" => self.sport = v(),
                "--dport" | "--destination-port" => self.dport = v(),
                "--mark" => self.mark = v(),
                "--ctstate" | "--state" => self.ctstate = v(),
                "--mode" => self.statistic_mode = Some(val.to_string()),
                "--probability" => self.probability = Some(val.to_string()),
                "--name" => self.recent_mut().name = Some(val.to_string()),
                "--rcheck" => self.recent_mut().rcheck = true,
                "--set" => self.recent_mut().set = true,
                "--reap" => self.recent_mut().reap = true,
                "--seconds" => {
                    let secs = val.parse().map_err(|_| format!("bad --seconds {val:?}"))?;
                    self.recent_mut().seconds = Some(secs);
                }
                "--nfacct-name" => self.nfacct_name = Some(val.to_string()),
                "-j" | "--jump" => self.jump = Some(val.to_string()),
                "-g" | "--goto" => self.goto = Some(val.to_string()),
                "--to-destination" => self.to_destination = Some(val.to_string()),
                "--to-source" => self.to_source = Some(val.to_string()),
                "--or-mark" | "--xor-mark" | "--and-mark" | "--set-xmark" | "--set-mark" => {
                    self.set_mark = Some((word.to_string(), val.to_string()))
                }
                "--random-fully" => self.random_fully = true,
                _ => {}
            }
            negated = false;
            i += if takes_value { 2 } else { 1 };
        }
        Ok(())
    }

    fn recent_mut(&mut self) -> &mut Recent {
        self.recent.get_or_insert_with(Recent::default)
    }

    /// The jump or goto target, if any.
    pub fn target(&self) -> Option<&str> {
        self.jump.as_deref().or(self.goto.as_deref())
    }
}

/// Options known to take exactly one value word. Anything else is a flag or unknown (and
/// then skipped one word at a time, like upstream's non-strict parser).
fn option_takes_value(word: &str) -> bool {
    matches!(
        word,
        "-m" | "--match"
            | "--comment"
            | "-p"
            | "--protocol"
            | "-s"
            | "--source"
            | "--src"
            | "-d"
            | "--destination"
            | "--dst"
            | "--src-type"
            | "--dst-type"
            | "-i"
            | "--in-interface"
            | "-o"
            | "--out-interface"
            | "--sport"
            | "--source-port"
            | "--dport"
            | "--destination-port"
            | "--mark"
            | "--ctstate"
            | "--state"
            | "--mode"
            | "--probability"
            | "--every"
            | "--packet"
            | "--name"
            | "--seconds"
            | "--hitcount"
            | "--mask"
            | "--nfacct-name"
            | "-j"
            | "--jump"
            | "-g"
            | "--goto"
            | "--to-destination"
            | "--to-source"
            | "--to-ports"
            | "--or-mark"
            | "--xor-mark"
            | "--and-mark"
            | "--set-xmark"
            | "--set-mark"
            | "--reject-with"
            | "--match-set"
    )
}

fn is_counters(word: &str) -> bool {
    word.len() >= 5
        && word.starts_with('[')
        && word.ends_with(']')
        && word[1..word.len() - 1]
            .split_once(':')
            .is_some_and(|(p, b)| p.parse::<u64>().is_ok() && b.parse::<u64>().is_ok())
}

/// Splits a line into words the way iptables-restore does: whitespace separates words and a
/// double-quoted string (with `\"`, `\\` and `\'` escapes, as `iptables-save` writes them)
/// is one word.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            break;
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some(e) => word.push(e),
                        None => break,
                    },
                    c => word.push(c),
                }
            }
            if !closed {
                return Err(format!("unterminated quote in {line:?}"));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word);
    }
    Ok(words)
}

/// The `-j`/`-g` target of a rule line, as [`Rule::parse`] would find it, without building
/// the rule: the first sync's split looks at every rule of every new chain only for this.
pub fn rule_target(line: &str) -> Option<&str> {
    let mut words = raw_words(line);
    while let Some(word) = words.next() {
        match word {
            "-j" | "--jump" | "-g" | "--goto" => {
                return words.next().filter(|w| !w.starts_with('"'));
            }
            w if option_takes_value(w) => {
                words.next();
            }
            _ => {}
        }
    }
    None
}

/// The words of a line as slices of it; a double-quoted string (escapes as in
/// [`split_words`]) is one word, quotes included.
fn raw_words(line: &str) -> impl Iterator<Item = &str> {
    let bytes = line.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at >= bytes.len() {
            return None;
        }
        let start = at;
        if bytes[at] == b'"' {
            at += 1;
            while at < bytes.len() && bytes[at] != b'"' {
                at += if bytes[at] == b'\\' { 2 } else { 1 };
            }
            at = (at + 1).min(bytes.len());
        } else {
            while at < bytes.len() && !bytes[at].is_ascii_whitespace() {
                at += 1;
            }
        }
        line.get(start..at)
    })
}

/// The builtin chains of a table (created implicitly by the kernel).
pub fn builtin_chains(table: &str) -> &'static [&'static str] {
    match table {
        "filter" => &["INPUT", "FORWARD", "OUTPUT"],
        "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        "mangle" => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        "raw" => &["PREROUTING", "OUTPUT"],
        "security" => &["INPUT", "FORWARD", "OUTPUT"],
        _ => &[],
    }
}

enum Op {
    Table(String),
    Chain {
        name: String,
        policy: Option<String>,
        packets: u64,
        bytes: u64,
    },
    Append(Rule),
    Insert(Rule, usize),
    /// `-D CHAIN spec`: deletes the first rule of CHAIN with exactly these words.
    DeleteRule(String, Vec<String>),
    Delete(String),
    Flush(String),
    New(String),
    Commit,
}

fn parse_ops(data: &str) -> Result<Vec<(usize, Op)>, ParseError> {
    let mut ops = Vec::new();
    for (idx, raw_line) in data.lines().enumerate() {
        let n = idx + 1;
        let line = raw_line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |m: String| ParseError::new(n, m);
        let op = if let Some(name) = line.strip_prefix('*') {
            Op::Table(name.trim().to_string())
        } else if let Some(decl) = line.strip_prefix(':') {
            let words: Vec<&str> = decl.split_whitespace().collect();
            let (name, policy, counters) = match words.as_slice() {
                [name] => (*name, "-", "[0:0]"),
                [name, policy] => (*name, *policy, "[0:0]"),
                [name, policy, counters] => (*name, *policy, *counters),
                _ => return Err(err(format!("bad chain declaration {line:?}"))),
            };
            let (packets, bytes) = counters
                .strip_prefix('[')
                .and_then(|c| c.strip_suffix(']'))
                .and_then(|c| c.split_once(':'))
                .and_then(|(p, b)| Some((p.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| err(format!("bad chain counters {line:?}")))?;
            Op::Chain {
                name: name.to_string(),
                policy: (policy != "-").then(|| policy.to_string()),
                packets,
                bytes,
            }
        } else if line == "COMMIT" {
            Op::Commit
        } else {
            let words = split_words(line).map_err(err)?;
            let mut w: &[String] = &words;
            if w.first().is_some_and(|x| is_counters(x)) {
                w = &w[1..];
            }
            match w {
                [flag, ..] if flag == "-A" || flag == "--append" => {
                    Op::Append(Rule::parse(line).map_err(err)?)
                }
                [flag, chain, rest @ ..] if flag == "-I" || flag == "--insert" => {
                    let (pos, rest) = match rest.split_first() {
                        Some((num, tail)) if num.parse::<usize>().is_ok() => {
                            (num.parse::<usize>().unwrap_or(1), tail)
                        }
                        _ => (1, rest),
                    };
                    let mut rule = Rule {
                        raw: as_append(line, chain, rest.len() < w.len() - 2),
                        chain: chain.clone(),
                        args: rest.to_vec(),
                        ..Rule::default()
                    };
                    rule.fill(rest).map_err(err)?;
                    Op::Insert(rule, pos.max(1))
                }
                [flag, chain, spec @ ..]
                    if (flag == "-D" || flag == "--delete")
                        && !(spec.len() == 1 && spec[0].parse::<usize>().is_ok()) =>
                {
                    Op::DeleteRule(chain.clone(), spec.to_vec())
                }
                [flag, chain] if flag == "-X" || flag == "--delete-chain" => {
                    Op::Delete(chain.clone())
                }
                [flag, chain] if flag == "-F" || flag == "--flush" => Op::Flush(chain.clone()),
                [flag, chain] if flag == "-N" || flag == "--new-chain" => Op::New(chain.clone()),
                _ => return Err(err(format!("cannot parse {line:?}"))),
            }
        };
        ops.push((n, op));
    }
    Ok(ops)
}

/// The `-A CHAIN …` form of the insert `line` (`numbered`: it names a position), so an
/// inserted rule prints as `iptables-save` would print it.
fn as_append(line: &str, chain: &str, numbered: bool) -> String {
    let skip = if numbered { 3 } else { 2 };
    match line.splitn(skip + 1, ' ').nth(skip) {
        Some(spec) if line.starts_with("-I ") => format!("-A {chain} {spec}"),
        _ => line.to_string(),
    }
}

/// The chains `iptables-save` output declares in `table`, read from the `:NAME` lines
/// only (upstream's `GetChainsFromTable`): the large-cluster stale-chain check needs nothing
/// else, and parsing every rule of a 10k-service table held hundreds of MiB for it.
pub fn chain_names_in_save(data: &str, table: &str) -> BTreeSet<String> {
    let mut in_table = false;
    let mut names = BTreeSet::new();
    for line in data.lines() {
        if let Some(name) = line.strip_prefix('*') {
            in_table = name.trim() == table;
        } else if in_table && let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if line.starts_with("COMMIT") {
            in_table = false;
        }
    }
    names
}

impl Dump {
    /// Parses `iptables-save` output or `iptables-restore` input.
    pub fn parse(data: &str) -> Result<Dump, ParseError> {
        let mut dump = Dump::default();
        dump.run(data, false)?;
        Ok(dump)
    }

    /// Applies restore input to this dump the way `iptables-restore --noflush` changes the
    /// kernel: a declared user chain is created or flushed, `-A` appends (to declared or
    /// existing chains), `-X` removes an unreferenced chain. On error the dump is unchanged.
    pub fn apply_restore(&mut self, data: &str) -> Result<(), ParseError> {
        let mut work = self.clone();
        work.run(data, true)?;
        *self = work;
        Ok(())
    }

    fn run(&mut self, data: &str, kernel: bool) -> Result<(), ParseError> {
        // Chains are found by name for every line: through an index, so a save of n chains
        // parses in O(n), not O(n²) (28 s per sync at 10k services with a linear search).
        let mut index: Vec<ChainIndex> = self.tables.iter().map(ChainIndex::of).collect();
        let mut current: Option<usize> = None;
        let mut last_line = 0;
        for (n, op) in parse_ops(data)? {
            last_line = n;
            let err = |m: String| ParseError::new(n, m);
            if let Op::Table(name) = &op {
                if current.is_some() {
                    return Err(err("table started before COMMIT".into()));
                }
                let ti = self.table_index_or_insert(name, kernel);
                if ti == index.len() {
                    index.push(ChainIndex::of(&self.tables[ti]));
                }
                current = Some(ti);
                continue;
            }
            let Some(ti) = current else {
                return Err(err("line outside of a table".into()));
            };
            let table = &mut self.tables[ti];
            let index = &mut index[ti];
            match op {
                // Handled before `table` was looked up.
                Op::Table(_) => {}
                Op::Commit => current = None,
                Op::Chain {
                    name,
                    policy,
                    packets,
                    bytes,
                } => match index.get(&name).map(|i| &mut table.chains[i]) {
                    Some(c) => {
                        if policy.is_none() {
                            c.rules.clear();
                        }
                        c.policy = policy;
                        c.deleted = false;
                        if !kernel {
                            c.packets = packets;
                            c.bytes = bytes;
                        }
                    }
                    None => index.push(
                        table,
                        Chain {
                            name,
                            policy,
                            packets,
                            bytes,
                            ..Chain::default()
                        },
                    ),
                },
                Op::New(name) => {
                    if index.get(&name).is_some() {
                        return Err(err(format!("chain {name} already exists")));
                    }
                    index.push(
                        table,
                        Chain {
                            name,
                            ..Chain::default()
                        },
                    );
                }
                Op::Flush(name) => index.live_chain(table, &name).map_err(err)?.rules.clear(),
                Op::Append(rule) => {
                    let name = rule.chain.clone();
                    index
                        .live_chain(table, &name)
                        .map_err(err)?
                        .rules
                        .push(rule);
                }
                Op::Insert(rule, pos) => {
                    let name = rule.chain.clone();
                    let chain = index.live_chain(table, &name).map_err(err)?;
                    // The kernel refuses a position past the end; a parsed save allows it.
                    if kernel && pos > chain.rules.len() + 1 {
                        return Err(err(format!("index of insertion too big in {name}")));
                    }
                    let at = (pos - 1).min(chain.rules.len());
                    chain.rules.insert(at, rule);
                }
                Op::DeleteRule(name, spec) => {
                    let chain = index.live_chain(table, &name).map_err(err)?;
                    let at = chain
                        .rules
                        .iter()
                        .position(|r| r.args == spec)
                        .ok_or_else(|| err(format!("no such rule in {name}")))?;
                    chain.rules.remove(at);
                }
                Op::Delete(name) => {
                    let idx = index
                        .get(&name)
                        .filter(|&i| !table.chains[i].deleted)
                        .ok_or_else(|| err(format!("no chain {name} to delete")))?;
                    if !table.chains[idx].rules.is_empty() {
                        return Err(err(format!("cannot delete non-empty chain {name}")));
                    }
                    if kernel {
                        let referenced = table.chains.iter().any(|c| {
                            !c.deleted && c.rules.iter().any(|r| r.target() == Some(name.as_str()))
                        });
                        if referenced {
                            return Err(err(format!("cannot delete chain {name}: in use")));
                        }
                        table.chains.remove(idx);
                        *index = ChainIndex::of(table);
                    } else {
                        table.chains[idx].deleted = true;
                    }
                }
            }
        }
        if current.is_some() {
            return Err(ParseError::new(last_line, "missing COMMIT"));
        }
        Ok(())
    }

    fn table_index_or_insert(&mut self, name: &str, kernel: bool) -> usize {
        if let Some(i) = self.tables.iter().position(|t| t.name == name) {
            return i;
        }
        let mut table = Table {
            name: name.to_string(),
            chains: Vec::new(),
        };
        if kernel {
            for b in builtin_chains(name) {
                table.chains.push(Chain {
                    name: b.to_string(),
                    policy: Some("ACCEPT".into()),
                    ..Chain::default()
                });
            }
        }
        self.tables.push(table);
        self.tables.len() - 1
    }

    /// A table by name.
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// A chain by table and name (deleted chains included).
    pub fn chain(&self, table: &str, chain: &str) -> Option<&Chain> {
        self.table(table)?.chains.iter().find(|c| c.name == chain)
    }

    /// A mutable chain by table and name.
    pub fn chain_mut(&mut self, table: &str, chain: &str) -> Option<&mut Chain> {
        self.tables
            .iter_mut()
            .find(|t| t.name == table)?
            .chains
            .iter_mut()
            .find(|c| c.name == chain)
    }

    /// Names of the (not deleted) chains of a table: upstream `GetChainsFromTable`.
    pub fn chain_names(&self, table: &str) -> BTreeSet<String> {
        self.table(table)
            .map(|t| {
                t.chains
                    .iter()
                    .filter(|c| !c.deleted)
                    .map(|c| c.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Number of rules in a table.
    pub fn rule_count(&self, table: &str) -> usize {
        self.table(table)
            .map(|t| t.chains.iter().map(|c| c.rules.len()).sum())
            .unwrap_or(0)
    }
}

/// Where each chain of a table is in its `chains`, kept in step with it while a dump is
/// parsed or applied (one entry per name: a redeclared chain reuses its slot).
#[derive(Debug)]
struct ChainIndex {
    positions: HashMap<String, usize>,
}

impl ChainIndex {
    fn of(table: &Table) -> Self {
        ChainIndex {
            positions: (table.chains.iter().enumerate())
                .map(|(i, c)| (c.name.clone(), i))
                .collect(),
        }
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.positions.get(name).copied()
    }

    fn push(&mut self, table: &mut Table, chain: Chain) {
        self.positions
            .insert(chain.name.clone(), table.chains.len());
        table.chains.push(chain);
    }

    fn live_chain<'t>(&self, table: &'t mut Table, name: &str) -> Result<&'t mut Chain, String> {
        match self.get(name).map(|i| &mut table.chains[i]) {
            Some(c) if c.deleted => Err(format!("chain {name} was deleted")),
            Some(c) => Ok(c),
            None => Err(format!("no chain {name} in table {}", table.name)),
        }
    }
}

/// Writes the dump in restore format, grouped like upstream's `IPTablesDump.String()`:
/// every chain line, then every chain's rules, then `-X` lines, per table.
impl fmt::Display for Dump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            writeln!(f, "*{}", t.name)?;
            for c in &t.chains {
                let policy = c.policy.as_deref().unwrap_or("-");
                writeln!(f, ":{} {policy} [{}:{}]", c.name, c.packets, c.bytes)?;
            }
            for c in &t.chains {
                for r in &c.rules {
                    writeln!(f, "{}", r.raw)?;
                }
            }
            for c in t.chains.iter().filter(|c| c.deleted) {
                writeln!(f, "-X {}", c.name)?;
            }
            writeln!(f, "COMMIT")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real `iptables-save -t nat` output (iptables 1.8, nf_tables) of a kube-proxy node.
    const SAVE: &str = r#"# Generated by iptables-save v1.8.7 on Mon Jan  1 00:00:00 2024
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [100:6000]
:POSTROUTING ACCEPT [100:6000]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-UKSFD7AGPMPPLUHC -s 10.180.0.4/32 -m comment --comment "ns4/svc4:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-UKSFD7AGPMPPLUHC -p tcp -m comment --comment "ns4/svc4:p80" -m recent --set --name KUBE-SEP-UKSFD7AGPMPPLUHC --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.180.0.4:80
-A KUBE-SERVICES -d 172.30.0.44/32 -p tcp -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-4SW47YFZTEDKD3PK ! -s 10.0.0.0/8 -d 172.30.0.44/32 -p tcp -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-UKSFD7AGPMPPLUHC --mask 255.255.255.255 --rsource -j KUBE-SEP-UKSFD7AGPMPPLUHC
-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
COMMIT
# Completed on Mon Jan  1 00:00:00 2024
"#;

    #[test]
    fn parses_real_iptables_save_output() {
        let dump = Dump::parse(SAVE).unwrap();
        assert_eq!(dump.tables.len(), 1);
        let pre = dump.chain("nat", "PREROUTING").unwrap();
        assert_eq!(pre.policy.as_deref(), Some("ACCEPT"));
        assert_eq!((pre.packets, pre.bytes), (12, 720));
        assert_eq!(dump.chain("nat", "KUBE-SERVICES").unwrap().policy, None);
        assert!(
            dump.chain_names("nat")
                .contains("KUBE-SVC-4SW47YFZTEDKD3PK")
        );
        assert_eq!(dump.rule_count("nat"), 13);

        let svc = &dump
            .chain("nat", "KUBE-SVC-4SW47YFZTEDKD3PK")
            .unwrap()
            .rules;
        let masq = &svc[0];
        assert_eq!(masq.source, Some(Value::new(true, "10.0.0.0/8")));
        assert_eq!(masq.destination, Some(Value::new(false, "172.30.0.44/32")));
        assert!(
            masq.destination
                .as_ref()
                .unwrap()
                .matches_ip(&"172.30.0.44".parse().unwrap())
        );
        assert!(
            !masq
                .source
                .as_ref()
                .unwrap()
                .matches_ip(&"10.1.2.3".parse().unwrap())
        );
        assert!(
            masq.source
                .as_ref()
                .unwrap()
                .matches_ip(&"192.168.0.2".parse().unwrap())
        );
        assert_eq!(masq.protocol, Some(Value::new(false, "tcp")));
        assert_eq!(masq.dport, Some(Value::new(false, "80")));
        assert_eq!(masq.comment.as_deref(), Some("ns4/svc4:p80 cluster IP"));
        assert_eq!(masq.jump.as_deref(), Some("KUBE-MARK-MASQ"));
        assert_eq!(masq.modules, ["comment", "tcp"]);

        let affinity = svc[1].recent.as_ref().unwrap();
        assert!(affinity.rcheck && affinity.reap && !affinity.set);
        assert_eq!(affinity.seconds, Some(10800));
        assert_eq!(affinity.name.as_deref(), Some("KUBE-SEP-UKSFD7AGPMPPLUHC"));
        // --mask's value must not be mistaken for anything and the jump must survive it.
        assert_eq!(svc[1].jump.as_deref(), Some("KUBE-SEP-UKSFD7AGPMPPLUHC"));
        assert_eq!(svc[2].probability.as_deref(), Some("0.50000000000"));
        assert_eq!(svc[2].statistic_mode.as_deref(), Some("random"));

        let sep = &dump
            .chain("nat", "KUBE-SEP-UKSFD7AGPMPPLUHC")
            .unwrap()
            .rules;
        assert!(sep[1].recent.as_ref().unwrap().set);
        assert_eq!(sep[1].to_destination.as_deref(), Some("10.180.0.4:80"));
        assert_eq!(sep[1].jump.as_deref(), Some("DNAT"));

        let post = &dump.chain("nat", "KUBE-POSTROUTING").unwrap().rules;
        assert_eq!(post[0].mark, Some(Value::new(true, "0x4000/0x4000")));
        assert_eq!(
            post[1].set_mark,
            Some(("--set-xmark".to_string(), "0x4000/0x0".to_string()))
        );
        assert!(post[2].random_fully);
        let nodeports = &dump.chain("nat", "KUBE-SERVICES").unwrap().rules[1];
        assert_eq!(nodeports.dst_type, Some(Value::new(false, "LOCAL")));
        assert_eq!(
            nodeports.comment.as_deref(),
            Some("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
        );
    }

    #[test]
    fn parses_restore_input_with_deletions_and_counters() {
        let input = "*filter\n:KUBE-FORWARD - [0:0]\n[5:300] -A KUBE-FORWARD -i cbr0 ! -o veth+ -m conntrack ! --ctstate RELATED -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\nCOMMIT\n*nat\n:KUBE-SEP-X - [0:0]\n-X KUBE-SEP-X\nCOMMIT\n";
        let dump = Dump::parse(input).unwrap();
        let r = &dump.chain("filter", "KUBE-FORWARD").unwrap().rules[0];
        assert_eq!(r.in_interface, Some(Value::new(false, "cbr0")));
        assert!(
            r.out_interface
                .as_ref()
                .unwrap()
                .matches_interface(Some("eth0"))
        );
        assert!(
            !r.out_interface
                .as_ref()
                .unwrap()
                .matches_interface(Some("veth12"))
        );
        assert!(
            r.in_interface
                .as_ref()
                .unwrap()
                .matches_interface(Some("cbr0"))
        );
        assert!(!r.in_interface.as_ref().unwrap().matches_interface(None));
        assert_eq!(r.ctstate, Some(Value::new(true, "RELATED")));
        assert_eq!(
            r.nfacct_name.as_deref(),
            Some("ct_state_invalid_dropped_pkts")
        );
        assert!(dump.chain("nat", "KUBE-SEP-X").unwrap().deleted);
        assert!(!dump.chain_names("nat").contains("KUBE-SEP-X"));
        // Round trip keeps the -X and the raw rule.
        let again = Dump::parse(&dump.to_string()).unwrap();
        assert_eq!(again, dump);
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in [
            "-A FOO -j ACCEPT\n",                                 // outside a table
            "*nat\n:FOO - [0:0]\n-A FOO -j ACCEPT\n",             // no COMMIT
            "*nat\n-A FOO -j ACCEPT\nCOMMIT\n",                   // undeclared chain
            "*nat\n:FOO - [0:0]\n-A FOO --comment \"x\nCOMMIT\n", // unterminated quote
            "*nat\n:FOO - [0:0]\n-A FOO -j\nCOMMIT\n",            // option without value
            "*nat\n:FOO - [0:0]\n-A FOO -j X\n-X FOO\nCOMMIT\n",  // delete after adding rules
            "*nat\n:FOO - [x:0]\nCOMMIT\n",
            "*nat\nbogus\nCOMMIT\n",
        ] {
            assert!(Dump::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quoted_words_and_escapes() {
        assert_eq!(
            split_words(r#"-A X -m comment --comment "a \"b\" c" -j Y"#).unwrap(),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a \"b\" c",
                "-j",
                "Y"
            ]
        );
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn apply_restore_has_noflush_semantics() {
        let mut kernel = Dump::default();
        kernel
            .apply_restore("*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n-A KUBE-A -j KUBE-B\n-A KUBE-B -j ACCEPT\n-A PREROUTING -j KUBE-A\nCOMMIT\n")
            .unwrap();
        assert!(kernel.chain_names("nat").contains("PREROUTING"));
        // Chains not mentioned are untouched; a declared one is flushed.
        kernel
            .apply_restore("*nat\n:KUBE-A - [0:0]\nCOMMIT\n")
            .unwrap();
        assert!(kernel.chain("nat", "KUBE-A").unwrap().rules.is_empty());
        assert_eq!(kernel.chain("nat", "KUBE-B").unwrap().rules.len(), 1);
        assert_eq!(kernel.chain("nat", "PREROUTING").unwrap().rules.len(), 1);
        // Deleting a referenced chain fails and leaves the dump unchanged.
        let before = kernel.clone();
        assert!(
            kernel
                .apply_restore("*nat\n:KUBE-A - [0:0]\n-X KUBE-A\nCOMMIT\n")
                .is_err()
        );
        assert_eq!(kernel, before);
        // Unreferenced: deleted for real.
        kernel
            .apply_restore("*nat\n:KUBE-B - [0:0]\n-X KUBE-B\nCOMMIT\n")
            .unwrap();
        assert!(!kernel.chain_names("nat").contains("KUBE-B"));
        // -A to a chain that exists only in the kernel is fine in --noflush mode.
        kernel
            .apply_restore("*nat\n-A KUBE-A -j RETURN\nCOMMIT\n")
            .unwrap();
        assert_eq!(kernel.chain("nat", "KUBE-A").unwrap().rules.len(), 1);
    }

    /// A save of `n` chains with one rule each, the shape of a large cluster's nat table.
    fn big_save(n: usize) -> String {
        let mut s = String::from("*nat\n");
        for i in 0..n {
            s.push_str(&format!(":KUBE-SEP-{i:016} - [0:0]\n"));
        }
        for i in 0..n {
            s.push_str(&format!(
                "-A KUBE-SEP-{i:016} -p tcp -m tcp -j DNAT --to-destination 10.0.{}.{}:80\n",
                i / 256 % 256,
                i % 256
            ));
        }
        s.push_str("COMMIT\n");
        s
    }

    /// The fastest of three parses (the least disturbed by other load).
    fn parse_time(text: &str) -> std::time::Duration {
        (0..3)
            .map(|_| {
                let start = std::time::Instant::now();
                let dump = Dump::parse(text).unwrap();
                let elapsed = start.elapsed();
                assert!(!dump.tables[0].chains.is_empty());
                elapsed
            })
            .min()
            .unwrap_or_default()
    }

    /// The quick target scan agrees with the full parse, quoted comments that mention a
    /// jump included.
    #[test]
    fn rule_target_agrees_with_the_parse() {
        for line in [
            "-A KUBE-SVC-X -m comment --comment \"ns/a:p -> 10.1.0.1:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-A",
            "-A KUBE-SERVICES -m comment --comment \"x -j KUBE-FAKE\" -d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-X",
            "-A KUBE-SEP-A -p tcp -m comment --comment \"a \\\" -j Q\" -m tcp -j DNAT --to-destination 10.1.0.1:80",
            "-A KUBE-EXT-X -g KUBE-SVC-X",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "[5:300] -A KUBE-FW-X -s 1.2.3.4/32 -j KUBE-EXT-X",
            "-A KUBE-SERVICES -m comment --comment -j -d 10.0.0.1/32",
            "-A KUBE-SERVICES -d 10.0.0.1/32",
        ] {
            let want = Rule::parse(line).unwrap();
            assert_eq!(rule_target(line), want.target(), "{line}");
        }
    }

    /// The `:NAME` scan finds exactly the chains a full parse finds, per table, in a save
    /// of two tables whose rules mention other chains' names.
    #[test]
    fn chain_names_from_declarations_equal_the_full_parse() {
        let save = "# Generated by iptables-save v1.8.9\n\
            *filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n\
            -A INPUT -j KUBE-FIREWALL\nCOMMIT\n\
            *nat\n:PREROUTING ACCEPT [3:180]\n:OUTPUT ACCEPT [0:0]\n\
            :KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABC - [0:0]\n\
            -A PREROUTING -m comment --comment \"x :KUBE-FAKE\" -j KUBE-SERVICES\n\
            -A KUBE-SERVICES -j KUBE-SVC-ABC\nCOMMIT\n# Completed\n";
        let dump = Dump::parse(save).unwrap();
        for table in ["nat", "filter", "mangle"] {
            assert_eq!(
                chain_names_in_save(save, table),
                dump.chain_names(table),
                "{table}"
            );
        }
        assert_eq!(chain_names_in_save(save, "nat").len(), 4);
    }

    #[test]
    fn parsing_is_linear_in_the_number_of_chains() {
        // 10x the chains must cost about 10x, not 100x (a lookup by linear search made a
        // 10k-service save take seconds). The bound is relative to the small parse on the
        // same machine, and generous: linear is ~10, quadratic ~100 at these sizes.
        let (small, big) = (2_000, 20_000);
        let small_text = big_save(small);
        let big_text = big_save(big);
        let dump = Dump::parse(&big_text).unwrap();
        assert_eq!(dump.chain_names("nat").len(), big);
        assert_eq!(dump.rule_count("nat"), big);
        let (t_small, t_big) = (parse_time(&small_text), parse_time(&big_text));
        let ratio = t_big.as_secs_f64() / t_small.as_secs_f64().max(1e-6);
        assert!(
            ratio < 35.0,
            "parsing {big} chains took {ratio:.1}x as long as {small} ({t_big:?} vs {t_small:?})"
        );
    }

    #[test]
    fn a_redeclared_deleted_chain_is_found_again() {
        // The index must follow -X and a later declaration in the same input.
        let dump =
            Dump::parse("*nat\n:A - [0:0]\n-X A\n:A - [0:0]\n-A A -j RETURN\nCOMMIT\n").unwrap();
        assert_eq!(dump.chain("nat", "A").unwrap().rules.len(), 1);
        assert!(!dump.chain("nat", "A").unwrap().deleted);
        let mut kernel = Dump::default();
        kernel
            .apply_restore(
                "*nat\n:A - [0:0]\n:B - [0:0]\n:C - [0:0]\n-X A\n-A C -j RETURN\nCOMMIT\n",
            )
            .unwrap();
        // A's removal shifted B and C: the index must still find C.
        assert_eq!(kernel.chain("nat", "C").unwrap().rules.len(), 1);
        assert!(kernel.chain("nat", "A").is_none());
    }
}
