//! Upstream's test judgement (`pkg/proxy/iptables/proxier_test.go`): `sortIPTablesRules`
//! (tables by name; KUBE-NODEPORTS, KUBE-SERVICES, other KUBE-* chains, then the rest, each
//! group alphabetical; rules grouped by chain) and `checkIPTablesRuleJumps`.
//!
//! Two widenings, both for orders upstream leaves to Go map iteration (so any order is
//! upstream-conformant): top-level chains holding rules of several services are stable-sorted
//! by the service *port* name of the comment (upstream keys on the service name, which leaves
//! the ports of one Service in map order), and this also applies to KUBE-EXTERNAL-SERVICES
//! and KUBE-PROXY-FIREWALL; the "must be the last rule" jumps (one per node IP from
//! `GetNodeIPs`, a map) stay last, sorted among themselves.

use std::collections::{BTreeMap, BTreeSet};

/// One table: chain declarations and rules per chain, in input order.
#[derive(Debug, Default)]
struct Table {
    chains: BTreeSet<String>,
    rules: BTreeMap<String, Vec<String>>,
    lines: Vec<String>,
}

fn parse(text: &str) -> Result<BTreeMap<String, Table>, String> {
    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t.to_string());
            tables.entry(t.to_string()).or_default();
            continue;
        }
        let Some(t) = current.as_ref() else {
            return Err(format!("line outside a table: {line}"));
        };
        let table = tables.get_mut(t).ok_or("no table")?;
        if line == "COMMIT" {
            current = None;
            continue;
        }
        table.lines.push(line.to_string());
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split(' ').next().unwrap_or_default();
            table.chains.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split(' ').next().unwrap_or_default().to_string();
            table.rules.entry(chain).or_default().push(line.to_string());
        } else if line.starts_with("-X ") {
            // Deleted chains: kept in `lines` for the jump check.
        } else {
            return Err(format!("unexpected line in {t}: {line}"));
        }
    }
    Ok(tables)
}

/// The comment of a rule (quotes removed), if any.
fn comment(rule: &str) -> Option<String> {
    let at = rule.find("--comment ")? + "--comment ".len();
    let rest = &rule[at..];
    if let Some(q) = rest.strip_prefix('"') {
        Some(q.split('"').next().unwrap_or_default().to_string())
    } else {
        Some(rest.split(' ').next().unwrap_or_default().to_string())
    }
}

fn service_port_key(rule: &str) -> String {
    let c = comment(rule).unwrap_or_default();
    c.split(' ').next().unwrap_or_default().to_string()
}

fn chain_rank(name: &str) -> (u8, &str) {
    match name {
        "KUBE-NODEPORTS" => (0, name),
        "KUBE-SERVICES" => (1, name),
        n if n.starts_with("KUBE-") => (2, n),
        n => (3, n),
    }
}

/// `sortIPTablesRules`, widened as the module says.
pub fn sort_rules(text: &str) -> Result<String, String> {
    let tables = parse(text)?;
    let mut out = String::new();
    for (name, table) in &tables {
        out.push_str(&format!("*{name}\n"));
        let mut chains: Vec<&String> = table.chains.iter().collect();
        // Chains with rules but no declaration still print (the jump check reports them).
        let undeclared: Vec<&String> = table
            .rules
            .keys()
            .filter(|c| !table.chains.contains(*c))
            .collect();
        chains.extend(undeclared);
        chains.sort_by(|a, b| chain_rank(a).cmp(&chain_rank(b)));
        chains.dedup();
        for c in &chains {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &chains {
            let mut rules = table.rules.get(*c).cloned().unwrap_or_default();
            if matches!(
                c.as_str(),
                "KUBE-NODEPORTS"
                    | "KUBE-SERVICES"
                    | "KUBE-EXTERNAL-SERVICES"
                    | "KUBE-PROXY-FIREWALL"
            ) {
                let is_last =
                    |r: &String| comment(r).is_some_and(|c| c.contains("must be the last rule"));
                let (mut last, mut normal): (Vec<String>, Vec<String>) =
                    rules.into_iter().partition(is_last);
                normal.sort_by_key(|r| service_port_key(r));
                last.sort();
                normal.extend(last);
                rules = normal;
            }
            for r in rules {
                out.push_str(&r);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    Ok(out)
}

fn jump_target(rule: &str) -> Option<&str> {
    let at = rule.find(" -j ")? + 4;
    rule[at..].split(' ').next()
}

/// `checkIPTablesRuleJumps`.
pub fn check_jumps(text: &str) -> Result<(), String> {
    let tables = parse(text)?;
    for (name, table) in &tables {
        let mut created: BTreeSet<String> = table.chains.clone();
        for l in &table.lines {
            if let Some(x) = l.strip_prefix("-X ") {
                created.remove(x.split(' ').next().unwrap_or_default());
            }
        }
        let filled: BTreeSet<String> = table.rules.keys().cloned().collect();
        let mut jumped: BTreeSet<String> = table
            .lines
            .iter()
            .filter_map(|l| jump_target(l))
            .map(str::to_string)
            .collect();
        for t in [
            "ACCEPT",
            "REJECT",
            "DROP",
            "MARK",
            "RETURN",
            "DNAT",
            "SNAT",
            "MASQUERADE",
        ] {
            jumped.remove(t);
        }
        let missing: Vec<&String> = jumped
            .difference(&created)
            .chain(filled.difference(&created))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "some chains in {name} are used but were not created: {missing:?}"
            ));
        }
        let empty: Vec<&String> = jumped
            .difference(&filled)
            .filter(|c| c.as_str() != "KUBE-NODEPORTS")
            .collect();
        if !empty.is_empty() {
            return Err(format!(
                "some chains in {name} are jumped to but have no rules: {empty:?}"
            ));
        }
        let top = [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-FORWARD",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-FIREWALL",
            "KUBE-FIREWALL",
        ];
        let extra: Vec<&String> = created
            .difference(&jumped)
            .filter(|c| !top.contains(&c.as_str()))
            .collect();
        if !extra.is_empty() {
            return Err(format!(
                "some chains in {name} are created but not used: {extra:?}"
            ));
        }
    }
    Ok(())
}

/// A short diff of two sorted dumps: lines only in one side, or the first place the order
/// differs when both hold the same lines.
pub fn minimal_diff(expected: &str, got: &str) -> String {
    let count = |t: &str| {
        let mut m: BTreeMap<String, i32> = BTreeMap::new();
        for l in t.lines() {
            *m.entry(l.to_string()).or_default() += 1;
        }
        m
    };
    let (e, g) = (count(expected), count(got));
    let mut out = String::new();
    for (l, n) in &e {
        let d = n - g.get(l).copied().unwrap_or(0);
        for _ in 0..d {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for (l, n) in &g {
        let d = n - e.get(l).copied().unwrap_or(0);
        for _ in 0..d {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    if out.is_empty() {
        let (el, gl): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), got.lines().collect());
        if let Some(i) = el.iter().zip(gl.iter()).position(|(a, b)| a != b) {
            out.push_str(&format!(
                "same rules, order differs at line {i}:\n- {}\n+ {}\n",
                el[i], gl[i]
            ));
        }
    }
    out
}
