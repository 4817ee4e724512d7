//! Thin wrappers over the system: iptables-restore/save, conntrack, sysctl, netlink.
pub mod ipvs;
