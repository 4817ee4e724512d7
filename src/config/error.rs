//! Errors of flag parsing, config loading and validation. Every message is one line and names
//! the flag or the configuration field at fault.

use std::fmt;
use std::path::PathBuf;

/// One invalid configuration field, formatted like apimachinery's `field.Error`:
/// `iptables.masqueradeBit: Invalid value: 33: must be within the range [0, 31]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field (`iptables.masqueradeBit`, `nodePortAddresses[1]`).
    pub field: String,
    /// The rest of the message (`Invalid value: 33: must be ...`).
    pub detail: String,
}

impl FieldError {
    /// `field: Invalid value: <value>: <reason>`; `value` is already formatted (strings
    /// quoted by the caller through [`quote`]).
    pub fn invalid(field: impl Into<String>, value: impl fmt::Display, reason: &str) -> Self {
        FieldError {
            field: field.into(),
            detail: format!("Invalid value: {value}: {reason}"),
        }
    }

    /// `field: Unsupported value: "x": supported values: "a", "b"`.
    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| quote(s)).collect();
        FieldError {
            field: field.into(),
            detail: format!(
                "Unsupported value: {}: supported values: {}",
                quote(value),
                list.join(", ")
            ),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.detail)
    }
}

/// Quotes a string the way Go's `%q` does for the common cases.
pub fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// Why the command line or configuration cannot be used. `main` prints it and exits 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Command-line syntax: unknown flag, missing or malformed flag value.
    #[error("{0}")]
    Flag(String),
    /// Positional arguments were given (kube-proxy takes none).
    #[error("\"kube-proxy\" does not take any arguments, got {0:?}")]
    UnexpectedArguments(Vec<String>),
    /// The config file could not be read.
    #[error("failed to read config file {}: {message}", .path.display())]
    ReadFile {
        /// The `--config` path.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// The config file is malformed (syntax, apiVersion/kind, a field of the wrong type).
    #[error("failed to load config file {}: {message}", .path.display())]
    File {
        /// The `--config` path.
        path: PathBuf,
        /// What is wrong, naming the field where there is one.
        message: String,
    },
    /// Validation failed; one entry per invalid field.
    #[error("invalid configuration: {}", join_field_errors(.0))]
    Invalid(Vec<FieldError>),
    /// The node name is empty.
    #[error("{0}")]
    Hostname(String),
    /// `--write-config-to` failed.
    #[error("failed to write configuration to {}: {message}", .path.display())]
    Write {
        /// The target path.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
}

fn join_field_errors(errs: &[FieldError]) -> String {
    match errs {
        [one] => one.to_string(),
        many => {
            let parts: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("[{}]", parts.join(", "))
        }
    }
}
