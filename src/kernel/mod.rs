//! Thin wrappers over the system: iptables-restore/save, ipset, IPVS, conntrack, sysctl, local
//! addresses and the IPVS dummy link.
//!
//! This is the only module that touches the host. It makes no policy decisions: callers
//! decide what to write or delete; this module runs the tools, parses their output into
//! plain structs and reports failures with the tool's own words.
//!
//! Every tool is run through [`tokio::process::Command`] with an argument vector (never a
//! shell); the IPVS dummy link is managed over rtnetlink and IPVS over generic netlink. A
//! handle can be bound to a named network namespace (`ip netns exec NAME ...`, or a netlink
//! socket opened inside it), which the tests use; the daemon runs in its own namespace
//! without it.

pub mod addrs;
pub mod conntrack;
pub mod ctnetlink;
pub mod ipset;
pub mod iptables;
pub mod ipvs;
pub mod link;
pub mod nfacct;
mod nfnl;
pub mod nft;
pub mod nftnl;
pub mod sysctl;

mod exec;
#[cfg(test)]
pub(crate) mod testutil;

use std::path::PathBuf;

pub use addrs::{AddrScope, Addresses, LocalAddress};
pub use conntrack::{Conntrack, Flow};
pub use ipset::{Ipset, IpsetVersion};
pub use iptables::{Iptables, IptablesVariant, IptablesVersion, RulePosition, Table};
pub use link::DummyLink;
pub use sysctl::{ConntrackSettings, SettingOutcome, SettingReport, Sysctl};

pub use crate::model::IpFamily;

/// Everything that can go wrong while talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The tool could not be started at all (missing binary, no permission).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line, for display only.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("`{command}` failed ({}): {}", status_text(*status), stderr.trim())]
    Command {
        /// The command line, for display only.
        command: String,
        /// Exit status (`None` if killed by a signal).
        status: Option<i32>,
        /// The tool's stderr.
        stderr: String,
    },
    /// `iptables-restore` rejected its input.
    #[error(
        "`{command}` failed ({}): {}{}",
        status_text(*status),
        stderr.trim(),
        line_text(*line, input_line.as_deref())
    )]
    Restore {
        /// The command line, for display only.
        command: String,
        /// Exit status (`None` if killed by a signal).
        status: Option<i32>,
        /// The tool's stderr.
        stderr: String,
        /// The 1-based input line the tool named, if any.
        line: Option<usize>,
        /// That line of the input, if it exists.
        input_line: Option<String>,
    },
    /// An rtnetlink request failed: the kernel refused it (the errno, e.g. `EPERM`), or the
    /// netlink socket could not be opened, written or read.
    #[error("rtnetlink: {op}: {source}")]
    Netlink {
        /// What was being done, e.g. `adding 10.96.0.1/32 to kube-ipvs0`.
        op: String,
        /// The errno or I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Output of a tool could not be understood.
    #[error("cannot parse output of `{command}`: {detail}")]
    Parse {
        /// The command line, for display only.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// Reading or writing a file under /proc/sys or /sys failed.
    #[error("{op} {}: {source}", path.display())]
    Sysctl {
        /// `read` or `write`.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value (environment override, sysctl content) is invalid.
    #[error("invalid {what}: {value:?}")]
    Invalid {
        /// What was being parsed.
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

fn status_text(status: Option<i32>) -> String {
    match status {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    }
}

fn line_text(line: Option<usize>, input: Option<&str>) -> String {
    match (line, input) {
        (Some(n), Some(text)) => format!("; input line {n}: {text}"),
        (Some(n), None) => format!("; input line {n} (beyond end of input)"),
        _ => String::new(),
    }
}

impl KernelError {
    /// The tool's stderr, if this error came from a tool that ran.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            KernelError::Command { stderr, .. } | KernelError::Restore { stderr, .. } => {
                Some(stderr)
            }
            _ => None,
        }
    }
}
