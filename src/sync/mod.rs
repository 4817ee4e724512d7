//! The sync loop: bounded-frequency runner deciding full or partial syncs.

pub mod conntrack;
pub mod runner;
pub mod shared;
