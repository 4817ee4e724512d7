//! An in-memory `kube-proxy` table that applies `nft -f` transactions the way the kernel
//! does (atomically, refusing what nft refuses: a missing object, a changed chain spec, a
//! duplicate element with another value, deleting a referenced chain), like
//! upstream's knftables `Fake`. Tests check transactions against it, and the tracer walks it.

use std::collections::BTreeMap;

use super::render::SetKind;

/// A regular or base chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// What was between the braces of its `add chain`, if anything.
    pub spec: Option<String>,
    /// Its rules, in order.
    pub rules: Vec<String>,
}

/// A set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetObj {
    /// Set or map.
    pub kind: SetKind,
    /// What was between the braces of its `add`.
    pub spec: String,
    /// Elements in insertion order: key and the whole element text.
    pub elements: Vec<(String, String)>,
}

/// The table's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// `ip kube-proxy` / `ip6 kube-proxy`; `None` while the table does not exist.
    pub header: Option<String>,
    /// The table's `add table` braces.
    pub spec: String,
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
    /// Sets and maps by name.
    pub sets: BTreeMap<String, SetObj>,
}

/// Why a transaction was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}: {text}")]
pub struct ApplyError {
    /// 1-based line number.
    pub line: usize,
    /// The line.
    pub text: String,
    /// What was wrong.
    pub message: String,
}

/// `{ X }` → `X`.
fn braced(s: &str) -> Option<&str> {
    s.trim().strip_prefix('{')?.strip_suffix('}').map(str::trim)
}

/// The key of an element body: what precedes ` comment ` or ` : `.
pub fn element_key(body: &str) -> &str {
    let end = [body.find(" comment "), body.find(" : ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(body.len());
    body[..end].trim()
}

impl Table {
    /// Applies a whole transaction, or nothing.
    pub fn apply(&mut self, text: &str) -> Result<(), ApplyError> {
        let mut next = self.clone();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            next.apply_line(line).map_err(|message| ApplyError {
                line: i + 1,
                text: line.to_string(),
                message,
            })?;
        }
        *self = next;
        Ok(())
    }

    fn apply_line(&mut self, line: &str) -> Result<(), String> {
        let mut words = line.splitn(5, ' ');
        let (verb, object, family, table) = (
            words.next().unwrap_or(""),
            words.next().unwrap_or(""),
            words.next().unwrap_or(""),
            words.next().unwrap_or(""),
        );
        let rest = words.next().unwrap_or("");
        let header = format!("{family} {table}");
        if object == "table" {
            return self.table_op(verb, header, rest);
        }
        if self.header.as_deref() != Some(header.as_str()) {
            return Err(format!("no table {header}"));
        }
        let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        match (verb, object) {
            ("add", "chain") => self.add_chain(name, braced(tail)),
            ("flush", "chain") => self.chain_mut(name).map(|c| c.rules.clear()),
            ("delete", "chain") => self.delete_chain(name),
            ("add", "rule") => self.add_rules(name, [tail]),
            ("add", "set") => self.add_set(SetKind::Set, name, tail),
            ("add", "map") => self.add_set(SetKind::Map, name, tail),
            ("flush", "set" | "map") => self.set_mut(name).map(|s| s.elements.clear()),
            ("delete", "set" | "map") => self.delete_set(name),
            ("add", "element") => self.add_element(name, tail),
            ("delete", "element") => self.delete_element(name, tail),
            _ => Err("unknown operation".to_string()),
        }
    }

    fn table_op(&mut self, verb: &str, header: String, rest: &str) -> Result<(), String> {
        match verb {
            "add" => {
                self.header = Some(header);
                if let Some(spec) = braced(rest) {
                    self.spec = spec.to_string();
                }
                Ok(())
            }
            "delete" if self.header.is_some() => {
                *self = Table::default();
                Ok(())
            }
            _ => Err("no such table".to_string()),
        }
    }

    fn chain_mut(&mut self, name: &str) -> Result<&mut Chain, String> {
        self.chains
            .get_mut(name)
            .ok_or_else(|| format!("no chain {name}"))
    }

    fn set_mut(&mut self, name: &str) -> Result<&mut SetObj, String> {
        self.sets
            .get_mut(name)
            .ok_or_else(|| format!("no set {name}"))
    }

    /// `add chain NAME [{ BODY }]`: a body opening with a chain property (`type`, `policy`,
    /// `comment`, `flags`, `devices`) is the chain's spec, any other is rules separated by
    /// ` ; `, appended as `add rule` would (nft's grammar admits both in one block; the
    /// writer never mixes them).
    fn add_chain(&mut self, name: &str, body: Option<&str>) -> Result<(), String> {
        const PROPERTIES: [&str; 5] = ["type", "policy", "comment", "flags", "devices"];
        let is_spec = |b: &str| PROPERTIES.contains(&b.split(' ').next().unwrap_or(""));
        let (spec, rules) = match body {
            Some(b) if !is_spec(b) => (None, Some(b)),
            b => (b, None),
        };
        let chain = self.chains.entry(name.to_string()).or_default();
        let old_spec = chain.spec.clone();
        if let Some(rules) = rules {
            let rules = rules
                .split(" ; ")
                .map(|r| r.trim().trim_end_matches(';').trim());
            self.add_rules(name, rules.filter(|r| !r.is_empty()))?;
        }
        let chain = self.chains.entry(name.to_string()).or_default();
        match (&old_spec, spec) {
            (Some(old), Some(new)) if old != new => Err(format!("chain {name} exists as {old}")),
            (_, Some(new)) => {
                chain.spec = Some(new.to_string());
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Appends `rules` to chain `name`; as nft, refuses a rule naming a set (`@NAME`) not
    /// added yet.
    fn add_rules<'r>(
        &mut self,
        name: &str,
        rules: impl IntoIterator<Item = &'r str>,
    ) -> Result<(), String> {
        for rule in rules {
            let missing = rule
                .split(' ')
                .filter_map(|w| w.strip_prefix('@'))
                .find(|set| !self.sets.contains_key(*set));
            if let Some(set) = missing {
                return Err(format!("no set {set}"));
            }
            self.chain_mut(name)?.rules.push(rule.to_string());
        }
        Ok(())
    }

    fn referenced(&self, name: &str) -> bool {
        let rule_refs = self.chains.values().flat_map(|c| &c.rules).any(|r| {
            r.split([' ', ','])
                .any(|w| w == name || w.strip_prefix('@') == Some(name))
        });
        let elem_refs = self
            .sets
            .values()
            .flat_map(|s| &s.elements)
            .any(|(_, text)| text.split(' ').any(|w| w == name));
        rule_refs || elem_refs
    }

    fn delete_chain(&mut self, name: &str) -> Result<(), String> {
        // The kernel deletes a chain's rules with it; only a reference keeps it.
        self.chain_mut(name)?.rules.clear();
        if self.referenced(name) {
            return Err(format!("chain {name} is referenced"));
        }
        self.chains.remove(name);
        Ok(())
    }

    fn add_set(&mut self, kind: SetKind, name: &str, tail: &str) -> Result<(), String> {
        let spec = braced(tail).ok_or("set without spec")?.to_string();
        match self.sets.get(name) {
            Some(s) if s.spec != spec || s.kind != kind => {
                Err(format!("{name} exists as {}", s.spec))
            }
            Some(_) => Ok(()),
            None => {
                self.sets.insert(
                    name.to_string(),
                    SetObj {
                        kind,
                        spec,
                        elements: Vec::new(),
                    },
                );
                Ok(())
            }
        }
    }

    fn delete_set(&mut self, name: &str) -> Result<(), String> {
        self.set_mut(name)?;
        let used = self
            .chains
            .values()
            .flat_map(|c| &c.rules)
            .any(|r| r.split(' ').any(|w| w.strip_prefix('@') == Some(name)));
        if used {
            return Err(format!("set {name} is in use"));
        }
        self.sets.remove(name);
        Ok(())
    }

    fn add_element(&mut self, name: &str, tail: &str) -> Result<(), String> {
        let body = braced(tail).ok_or("element without braces")?.to_string();
        let key = element_key(&body).to_string();
        let set = self.set_mut(name)?;
        match set.elements.iter().find(|(k, _)| *k == key) {
            Some((_, old)) if *old != body => Err(format!("element {key} exists as {old}")),
            Some(_) => Ok(()),
            None => {
                set.elements.push((key, body));
                Ok(())
            }
        }
    }

    fn delete_element(&mut self, name: &str, tail: &str) -> Result<(), String> {
        let key = braced(tail).ok_or("element without braces")?;
        let set = self.set_mut(name)?;
        let before = set.elements.len();
        set.elements.retain(|(k, _)| k != key);
        if set.elements.len() == before {
            return Err(format!("no element {key}"));
        }
        Ok(())
    }

    /// The state as `add` lines (knftables `Fake.Dump()` content, unsorted).
    pub fn dump(&self) -> Vec<String> {
        let Some(h) = &self.header else {
            return Vec::new();
        };
        let mut out = vec![format!("add table {h} {{ {} }}", self.spec)];
        for (name, c) in &self.chains {
            match &c.spec {
                Some(spec) => out.push(format!("add chain {h} {name} {{ {spec} }}")),
                None => out.push(format!("add chain {h} {name}")),
            }
        }
        for (name, s) in &self.sets {
            out.push(format!("add {} {h} {name} {{ {} }}", s.kind.word(), s.spec));
        }
        for (name, c) in &self.chains {
            out.extend(c.rules.iter().map(|r| format!("add rule {h} {name} {r}")));
        }
        for (name, s) in &self.sets {
            out.extend(
                s.elements
                    .iter()
                    .map(|(_, body)| format!("add element {h} {name} {{ {body} }}")),
            );
        }
        out
    }
}

/// Upstream's `sortNFTablesTransaction` (helpers_test.go): blank and `#` lines dropped, then
/// a stable sort by object type (table, chain, rule, set, map, element), then object name;
/// rules of one chain keep their order, anything else is ordered by the whole line.
pub fn sort_transaction(text: &str) -> Vec<String> {
    fn rank(line: &str) -> usize {
        let object = line.split(' ').nth(1).unwrap_or("");
        ["table", "chain", "rule", "set", "map", "element"]
            .iter()
            .position(|o| *o == object)
            .unwrap_or(6)
    }
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    lines.sort_by(|a, b| {
        let name = |l: &str| l.split(' ').nth(4).unwrap_or("").to_string();
        rank(a)
            .cmp(&rank(b))
            .then_with(|| name(a).cmp(&name(b)))
            .then_with(|| {
                if rank(a) == 2 {
                    std::cmp::Ordering::Equal
                } else {
                    a.cmp(b)
                }
            })
    });
    lines
}
