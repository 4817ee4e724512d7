//! Writing `iptables-restore` input shared by both backends.

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

#[cfg(test)]
mod tests {
    #[test]
    fn declares_every_chain_before_deleting_any() {
        assert_eq!(
            super::flush_and_delete("nat", &["A", "B"]),
            "*nat\n:A - [0:0]\n:B - [0:0]\n-X A\n-X B\nCOMMIT\n"
        );
    }
}
