//! iptables mode: upstream-compatible NAT and filter chains written with iptables-restore.
//!
//! Everything here is pure: [`render`] turns a [`crate::model::ProxyModel`] into the exact
//! restore input upstream kube-proxy writes, [`parse`] reads `iptables-save` output back,
//! [`tracer`] runs a packet through a parsed ruleset, and [`jumps`] describes the jump rules
//! and `--cleanup` as data for the kernel layer to execute.

pub mod jumps;
pub mod names;
pub mod parse;
pub mod proxier;
pub mod render;
pub mod tracer;

#[cfg(test)]
mod tests;

pub use jumps::{CleanupPlan, JumpRule, cleanup_plan, jump_rules};
pub use parse::{Dump, ParseError, Rule};
pub use render::{LocalDetector, RenderConfig, RenderInput, Rendered, SyncScope, render};
pub use tracer::{Packet, Trace, trace_packet};
