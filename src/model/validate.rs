//! The API server's name rules (apimachinery `IsDNS1123Label` / `IsDNS1123Subdomain`), checked
//! again here because every name ends up in iptables-restore or ipset input: a name the API
//! server would refuse (a newline, a quote, a space, 1,100 characters) must never get that far.
//!
//! The rules are exactly the API server's, no stricter, so no object it accepts is refused.

use std::fmt;

/// Longest DNS-1123 label (namespaces, Service names, port names).
const LABEL_MAX: usize = 63;
/// Longest DNS-1123 subdomain (EndpointSlice names).
const SUBDOMAIN_MAX: usize = 253;
/// How much of a rejected value a warning quotes: enough to find the object, not a flood.
const SHOWN_MAX: usize = 80;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty where a name is required.
    #[error("is empty")]
    Empty,
    /// Longer than the rule allows.
    #[error("is {len} characters long (at most {max})")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Holds a character outside `[a-z0-9-]` (`.` too for subdomains), or starts or ends
    /// with something other than `[a-z0-9]`.
    #[error(
        "must consist of lower case alphanumeric characters or '-', and start and end with one"
    )]
    Malformed,
}

/// `IsDNS1123Label`: at most 63 of `[a-z0-9-]`, starting and ending alphanumeric.
/// Namespaces, Service names (the API server's relaxed rule; the strict one is a subset) and
/// Service / EndpointSlice port names follow it.
pub fn dns1123_label(s: &str) -> Result<(), NameError> {
    check_len(s, LABEL_MAX)?;
    label_chars(s)
}

/// `IsDNS1123Subdomain`: at most 253 characters, dot-separated DNS-1123 labels (each label
/// only checked for its characters, as upstream's regular expression does).
pub fn dns1123_subdomain(s: &str) -> Result<(), NameError> {
    check_len(s, SUBDOMAIN_MAX)?;
    s.split('.').try_for_each(label_chars)
}

fn check_len(s: &str, max: usize) -> Result<(), NameError> {
    match s.len() {
        0 => Err(NameError::Empty),
        len if len > max => Err(NameError::TooLong { len, max }),
        _ => Ok(()),
    }
}

fn label_chars(s: &str) -> Result<(), NameError> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return Err(NameError::Malformed);
    };
    if alnum(first) && alnum(last) && bytes.iter().all(|&b| alnum(b) || b == b'-') {
        Ok(())
    } else {
        Err(NameError::Malformed)
    }
}

/// A refused value as a warning shows it: escaped (a newline stays on the warning's line)
/// and cut to a readable length.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(SHOWN_MAX) {
            Some((cut, _)) => write!(f, "{:?}...", &self.0[..cut]),
            None => write!(f, "{:?}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_api_server_rule_exactly() {
        for ok in ["a", "0", "kube-system", "a-b-c", "9abc", &"a".repeat(63)] {
            assert_eq!(dns1123_label(ok), Ok(()), "{ok}");
        }
        assert_eq!(dns1123_label(""), Err(NameError::Empty));
        assert_eq!(
            dns1123_label(&"a".repeat(64)),
            Err(NameError::TooLong { len: 64, max: 63 })
        );
        for bad in [
            "-a",
            "a-",
            "A",
            "a b",
            "a.b",
            "a_b",
            "ns\" -j ACCEPT\n-A KUBE-SERVICES -j ACCEPT\n#",
            "COMMIT",
            "*filter",
            "é",
        ] {
            assert_eq!(dns1123_label(bad), Err(NameError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn subdomains_allow_dots_and_253_characters() {
        for ok in [
            "web-abc12",
            "a.b.c",
            &format!("{}.{}", "a".repeat(63), "b".repeat(189)),
        ] {
            assert_eq!(dns1123_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["a..b", ".a", "a.", "a.-b", "A.b", "a b"] {
            assert_eq!(dns1123_subdomain(bad), Err(NameError::Malformed), "{bad:?}");
        }
        assert!(matches!(
            dns1123_subdomain(&"a".repeat(254)),
            Err(NameError::TooLong { len: 254, .. })
        ));
    }

    #[test]
    fn shown_values_are_escaped_and_cut() {
        assert_eq!(Shown("a\nb").to_string(), r#""a\nb""#);
        let long = Shown(&"x".repeat(1100)).to_string();
        assert!(long.len() < 100 && long.ends_with("..."), "{long}");
    }
}
