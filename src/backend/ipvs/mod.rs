//! IPVS mode: upstream-compatible virtual servers, ipsets and the constant iptables ruleset
//! that goes with them, so kube-proxy and kube-proxy-rs can replace each other in place.
//!
//! [`render`] is pure: it turns a [`crate::model::ProxyModel`] into [`IpvsDesired`]; the
//! proxier applies that through [`crate::kernel::ipvs`], `ipset` and `iptables-restore`.

pub mod ipset;
pub mod proxier;
pub mod render;
pub mod rules;

#[cfg(test)]
mod tests;

pub use ipset::IpSetSpec;
pub use proxier::{render_text, render_text_for};
pub use render::{
    DesiredService, IpvsConfig, IpvsDesired, ipset_save, ipvs_config, ipvs_config_for,
    ipvs_jump_rules, ipvsadm_save, real_server, render,
};
