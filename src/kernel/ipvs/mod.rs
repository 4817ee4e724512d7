//! IPVS over generic netlink: a pure codec ([`codec`]) and a thin async client ([`client`]).
//!
//! No mature Rust IPVS crate exists (see the reference notes), so the generic-netlink header
//! and attribute encoding are implemented here; only `netlink-sys` is used, for the socket.

pub mod client;
pub mod codec;

pub use client::{Errno, IpvsClient, IpvsError, IpvsOp};
pub use codec::{
    AddressFamily, ForwardMethod, IpvsInfo, Protocol, RealServer, ServiceFlags, Timeouts,
    VirtualService,
};
