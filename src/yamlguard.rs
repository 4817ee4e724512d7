//! Limits on untrusted YAML/JSON text before it reaches the YAML decoder.
//!
//! `serde_yaml_ng` (libyaml) scans the whole document into events before its recursion
//! limit applies, and libyaml's scanner is quadratic in flow nesting: a 200 KB `[[[[…` took
//! 20–40 s to be rejected. A streaming pass with `serde-saphyr`'s budget stops at the first
//! limit crossed, in milliseconds, and allocates no tree.

use serde_saphyr::budget::{BudgetBreach, EnforcingPolicy, check_yaml_budget};
use serde_saphyr::granit_parser::ErrorKind;

/// Deepest nesting of sequences and mappings accepted: `serde_yaml_ng`'s own recursion limit,
/// so no document it used to accept is refused.
pub const MAX_DEPTH: usize = 128;

/// Why a text was refused before decoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum YamlGuardError {
    /// The text is larger than the caller's limit.
    #[error("input is {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// Size of the text.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Collections nested deeper than [`MAX_DEPTH`].
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// Another resource limit (nodes, events, aliases, documents) was crossed.
    #[error("input exceeds a resource limit: {0}")]
    Budget(String),
    /// The text is not YAML at all.
    #[error("invalid YAML/JSON: {message}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// The parser's message (kind and position, never the text itself).
        message: String,
    },
}

/// How much a text may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest text in bytes.
    pub max_bytes: usize,
    /// Most nodes (scalars, sequences, mappings) over all documents.
    pub max_nodes: usize,
}

impl Limits {
    /// A `KubeProxyConfiguration` file: a few hundred nodes in practice.
    pub const CONFIG: Limits = Limits {
        max_bytes: 1 << 20,
        max_nodes: 100_000,
    };
    /// A cluster dump for `render`/`explain --objects`: tens of thousands of objects.
    pub const OBJECTS: Limits = Limits {
        max_bytes: 512 << 20,
        max_nodes: 50_000_000,
    };
}

/// Checks `text` against `limits` and [`MAX_DEPTH`] in one streaming pass.
pub fn check(text: &str, limits: Limits) -> Result<(), YamlGuardError> {
    if text.len() > limits.max_bytes {
        return Err(YamlGuardError::TooLarge {
            size: text.len(),
            limit: limits.max_bytes,
        });
    }
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.flow_nesting_limit = MAX_DEPTH;
    budget.max_nodes = limits.max_nodes;
    // Every node is at least one event, plus one end event per collection.
    budget.max_events = limits.max_nodes.saturating_mul(2);
    budget.max_documents = limits.max_nodes;
    budget.max_total_scalar_bytes = limits.max_bytes;
    let report = check_yaml_budget(text, budget, EnforcingPolicy::AllContent).map_err(|e| {
        // The scanner enforces the flow-nesting limit itself, before any event.
        if matches!(e.kind(), ErrorKind::RecursionLimitExceeded) {
            YamlGuardError::TooDeep
        } else {
            YamlGuardError::Syntax {
                line: e.marker().line(),
                message: e.to_string(),
            }
        }
    })?;
    match report.breached {
        None => Ok(()),
        Some(BudgetBreach::Depth { .. }) => Err(YamlGuardError::TooDeep),
        Some(other) => Err(YamlGuardError::Budget(format!("{other:?}"))),
    }
}

/// The 1-based document of a multi-document stream that holds `line` (1-based): a `---`
/// line starts a new document unless nothing but comments came before it.
pub fn document_at(text: &str, line: usize) -> usize {
    let mut index = 1;
    let mut content = false;
    for l in text.lines().take(line.saturating_sub(1)) {
        let is_start = l == "---" || l.starts_with("--- ") || l.starts_with("---\t");
        if is_start {
            if content {
                index += 1;
            }
            content = true;
        } else if !l.trim().is_empty() && !l.trim_start().starts_with('#') {
            content = true;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// 200 KB documents of each nesting shape the old decoder choked on.
    fn hostile() -> Vec<(&'static str, String)> {
        let n = 100_000;
        vec![
            ("flow list", format!("{}{}", "[".repeat(n), "]".repeat(n))),
            (
                "flow map",
                format!("{}1{}", "{a: ".repeat(n / 4), "}".repeat(n / 4)),
            ),
            (
                "json",
                format!("{}1{}", "{\"a\":".repeat(n / 5), "}".repeat(n / 5)),
            ),
            (
                "block map",
                (0..600)
                    .map(|i| format!("{}a:\n", "  ".repeat(i)))
                    .collect(),
            ),
        ]
    }

    #[test]
    fn deep_documents_are_refused_in_milliseconds() {
        for (what, text) in hostile() {
            let start = Instant::now();
            let got = check(&text, Limits::OBJECTS);
            assert_eq!(got, Err(YamlGuardError::TooDeep), "{what}");
            // Debug build on a loaded 2-core machine; the unguarded decoder needed 3–40 s.
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{what}: {:?}",
                start.elapsed()
            );
        }
    }

    #[test]
    fn nesting_at_the_limit_is_accepted() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(check(&ok, Limits::CONFIG), Ok(()));
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(check(&deep, Limits::CONFIG), Err(YamlGuardError::TooDeep));
    }

    #[test]
    fn syntax_errors_carry_their_document() {
        let text = "a: 1\n---\nb: 2\n---\n: : [\n";
        let Err(YamlGuardError::Syntax { line, .. }) = check(text, Limits::OBJECTS) else {
            panic!("not a syntax error");
        };
        assert_eq!(document_at(text, line), 3);
        assert_eq!(document_at("---\na: [\n", 2), 1);
    }

    #[test]
    fn oversized_text_is_refused() {
        let big = "a: 1\n".repeat((Limits::CONFIG.max_bytes / 5) + 1);
        assert!(matches!(
            check(&big, Limits::CONFIG),
            Err(YamlGuardError::TooLarge { .. })
        ));
    }
}
