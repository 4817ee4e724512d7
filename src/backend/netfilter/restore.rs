//! Writing `iptables-restore` input shared by both backends.

use std::collections::{BTreeMap, BTreeSet};

/// The declaration line of a chain (`:NAME - [0:0]`): creates it, or flushes it under
/// `--noflush`.
pub fn chain_line(name: &str) -> String {
    format!(":{name} - [0:0]")
}

/// Restore input that flushes and deletes `chains` of `table` (declared first so links
/// between them are gone before any `-X`).
pub fn flush_and_delete<S: AsRef<str>>(table: &str, chains: &[S]) -> String {
    let mut s = format!("*{table}\n");
    for c in chains {
        s.push_str(&chain_line(c.as_ref()));
        s.push('\n');
    }
    for c in chains {
        s.push_str(&format!("-X {}\n", c.as_ref()));
    }
    s.push_str("COMMIT\n");
    s
}

/// How many new chains one preparatory transaction of [`split_new_chains`] writes: small enough
/// that iptables-nft's per-command cost (linear in the chains named so far) stays flat.
pub const NEW_CHAINS_PER_RESTORE: usize = 1000;

/// Splits restore input for iptables-nft, whose `--noflush` restore (1.8.9) keeps the chains
/// a transaction names in a sorted list searched linearly for every command: a transaction
/// naming n chains costs O(n × lines) (minutes at 10k services).
///
/// Chains of `table` the kernel does not have (`existing` is its chain list) are written
/// first, `per_restore` at a time, each after the chains it jumps to. That is invisible to
/// packets: nothing in the kernel jumps to a chain that does not exist, and the only rules
/// that will are in the last input, which is the rest of `input` (every existing chain, the
/// deletions, the other tables) and stays one transaction per table, as upstream. Returns
/// `input` alone when there are few new chains or the input is not what the renderers write.
pub fn split_new_chains(
    input: &str,
    table: &str,
    existing: &BTreeSet<String>,
    per_restore: usize,
) -> Vec<String> {
    let Some(split) = NewChains::collect(input, table, existing) else {
        return vec![input.to_string()];
    };
    if split.order.len() <= per_restore {
        return vec![input.to_string()];
    }
    let Some(order) = split.dependency_order() else {
        return vec![input.to_string()];
    };
    let mut out: Vec<String> = order
        .chunks(per_restore.max(1))
        .map(|chunk| split.restore_input(table, chunk))
        .collect();
    out.push(split.rest);
    out
}

/// New chains of one table, taken out of a restore input.
struct NewChains<'a> {
    /// Declaration order.
    order: Vec<&'a str>,
    /// Each new chain's rule lines and the new chains they jump to.
    chains: BTreeMap<&'a str, (Vec<&'a str>, Vec<String>)>,
    /// The input without the new chains' lines.
    rest: String,
}

impl<'a> NewChains<'a> {
    fn collect(input: &'a str, table: &str, existing: &BTreeSet<String>) -> Option<Self> {
        let mut new = NewChains {
            order: Vec::new(),
            chains: BTreeMap::new(),
            rest: String::with_capacity(input.len()),
        };
        let mut in_table = false;
        for line in input.lines() {
            if let Some(t) = line.strip_prefix('*') {
                in_table = t == table;
            } else if in_table && new.take(line, existing)? {
                continue;
            }
            new.rest.push_str(line);
            new.rest.push('\n');
        }
        let names: BTreeSet<&str> = new.order.iter().copied().collect();
        for (rules, deps) in new.chains.values_mut() {
            for r in rules.iter() {
                if let Some(t) = super::parse::rule_target(r).filter(|t| names.contains(t)) {
                    deps.push(t.to_string());
                }
            }
        }
        Some(new)
    }

    /// Takes `line` if it declares or appends to a new chain; `None` if it is malformed.
    fn take(&mut self, line: &'a str, existing: &BTreeSet<String>) -> Option<bool> {
        if let Some(decl) = line.strip_prefix(':') {
            let mut words = decl.split_whitespace();
            let name = words.next()?;
            // A user chain ("-" policy) the kernel lacks; builtin chains are never new.
            if words.next() != Some("-") || existing.contains(name) {
                return Some(false);
            }
            if self.chains.insert(name, (Vec::new(), Vec::new())).is_some() {
                return None;
            }
            self.order.push(name);
            return Some(true);
        }
        let Some(rule) = line.strip_prefix("-A ") else {
            return Some(false);
        };
        let chain = rule.split_whitespace().next()?;
        match self.chains.get_mut(chain) {
            Some((rules, _)) => {
                rules.push(line);
                Some(true)
            }
            None => Some(false),
        }
    }

    /// Declaration order, with every chain after the new chains it jumps to; `None` on a loop.
    fn dependency_order(&self) -> Option<Vec<&'a str>> {
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut out = Vec::with_capacity(self.order.len());
        for &root in &self.order {
            // Iterative depth-first walk: (chain, whether its dependencies are out).
            let mut stack = vec![(root, false)];
            let mut on_path: BTreeSet<&str> = BTreeSet::new();
            while let Some((c, expanded)) = stack.pop() {
                if done.contains(c) {
                    continue;
                }
                if expanded {
                    on_path.remove(c);
                    done.insert(c);
                    out.push(c);
                    continue;
                }
                if !on_path.insert(c) {
                    return None;
                }
                stack.push((c, true));
                // Reversed: the stack pops them in rule order.
                for d in self.chains.get(c)?.1.iter().rev() {
                    let (&d, _) = self.chains.get_key_value(d.as_str())?;
                    if !done.contains(d) {
                        stack.push((d, false));
                    }
                }
            }
        }
        Some(out)
    }

    fn restore_input(&self, table: &str, chains: &[&str]) -> String {
        let mut s = format!("*{table}\n");
        for c in chains {
            s.push_str(&chain_line(c));
            s.push('\n');
        }
        for c in chains {
            for r in self.chains.get(c).map(|(r, _)| r.as_slice()).unwrap_or(&[]) {
                s.push_str(r);
                s.push('\n');
            }
        }
        s.push_str("COMMIT\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    const INPUT: &str = "*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n\
:KUBE-MARK-MASQ - [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-A1 - [0:0]\n:KUBE-SEP-A2 - [0:0]\n\
:KUBE-SVC-B - [0:0]\n:KUBE-SEP-B1 - [0:0]\n\
-A KUBE-SERVICES -d 10.0.0.1 -j KUBE-SVC-A\n-A KUBE-SERVICES -d 10.0.0.2 -j KUBE-SVC-B\n\
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
-A KUBE-SVC-A -m statistic --mode random --probability 0.5 -j KUBE-SEP-A1\n-A KUBE-SVC-A -j KUBE-SEP-A2\n\
-A KUBE-SEP-A1 -s 10.1.0.1 -j KUBE-MARK-MASQ\n-A KUBE-SEP-A1 -p tcp -j DNAT --to-destination 10.1.0.1:80\n\
-A KUBE-SEP-A2 -p tcp -j DNAT --to-destination 10.1.0.2:80\n\
-A KUBE-SVC-B -j KUBE-SEP-B1\n-A KUBE-SEP-B1 -p tcp -j DNAT --to-destination 10.1.0.3:80\n\
-X KUBE-SEP-OLD\nCOMMIT\n";

    #[test]
    fn new_chains_go_first_after_their_targets_and_the_rest_stays_one_transaction() {
        let existing: BTreeSet<String> = ["KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-SVC-B"]
            .map(String::from)
            .into();
        let parts = super::split_new_chains(INPUT, "nat", &existing, 2);
        assert_eq!(
            parts,
            [
                // SVC-A jumps to both of its endpoints: they are written before it.
                "*nat\n:KUBE-SEP-A1 - [0:0]\n:KUBE-SEP-A2 - [0:0]\n\
-A KUBE-SEP-A1 -s 10.1.0.1 -j KUBE-MARK-MASQ\n\
-A KUBE-SEP-A1 -p tcp -j DNAT --to-destination 10.1.0.1:80\n\
-A KUBE-SEP-A2 -p tcp -j DNAT --to-destination 10.1.0.2:80\nCOMMIT\n",
                "*nat\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-B1 - [0:0]\n\
-A KUBE-SVC-A -m statistic --mode random --probability 0.5 -j KUBE-SEP-A1\n\
-A KUBE-SVC-A -j KUBE-SEP-A2\n-A KUBE-SEP-B1 -p tcp -j DNAT --to-destination 10.1.0.3:80\nCOMMIT\n",
                // Everything that makes the new chains reachable, in one transaction.
                "*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n\
:KUBE-MARK-MASQ - [0:0]\n:KUBE-SVC-B - [0:0]\n\
-A KUBE-SERVICES -d 10.0.0.1 -j KUBE-SVC-A\n-A KUBE-SERVICES -d 10.0.0.2 -j KUBE-SVC-B\n\
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n-A KUBE-SVC-B -j KUBE-SEP-B1\n\
-X KUBE-SEP-OLD\nCOMMIT\n",
            ]
        );
    }

    #[test]
    fn few_new_chains_or_a_loop_leave_the_input_whole() {
        let existing = BTreeSet::new();
        assert_eq!(
            super::split_new_chains(INPUT, "nat", &existing, 100),
            [INPUT]
        );
        let looped = "*nat\n:A - [0:0]\n:B - [0:0]\n-A A -j B\n-A B -j A\nCOMMIT\n";
        assert_eq!(
            super::split_new_chains(looped, "nat", &existing, 1),
            [looped]
        );
    }

    #[test]
    fn declares_every_chain_before_deleting_any() {
        assert_eq!(
            super::flush_and_delete("nat", &["A", "B"]),
            "*nat\n:A - [0:0]\n:B - [0:0]\n-X A\n-X B\nCOMMIT\n"
        );
    }
}
