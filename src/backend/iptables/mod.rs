//! iptables mode: upstream-compatible NAT and filter chains written with iptables-restore.
//!
//! Everything here is pure: [`render`] turns a [`crate::model::ProxyModel`] into the exact
//! restore input upstream kube-proxy writes, and [`tracer`] runs a packet through a parsed
//! ruleset. Chain names, the `iptables-save` parser, the jump rules and the cleanup plan are
//! the shared [`crate::backend::netfilter`] layer's.

pub mod proxier;
pub mod render;
pub mod tracer;

#[cfg(test)]
mod tests;

pub use proxier::render_text;
pub use render::{LocalDetector, RenderConfig, RenderInput, Rendered, SyncScope, render};
pub use tracer::{Packet, Trace, trace_packet};
