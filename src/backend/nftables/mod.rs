//! nftables mode: upstream's v1.34/1.35 `kube-proxy` tables (`ip` and `ip6`), written as
//! `nft -f -` transactions.
//!
//! [`render`] serialises the per-family plan into upstream's objects (pure), [`tx`] turns
//! that into a full or partial transaction against the in-memory record of what was
//! committed, [`table`] applies transactions in memory as the kernel would (for tests and
//! the [`tracer`]), and [`proxier`] drives the kernel through [`crate::kernel::nft`].

pub mod listing;
pub mod names;
pub mod proxier;
pub mod render;
pub mod table;
pub mod tracer;
pub mod tx;

#[cfg(test)]
mod tests;

pub use proxier::render_text;
pub use render::{RenderConfig, Ruleset, render};
pub use table::Table;
pub use tx::{Committed, Existing, Owned, Prior, Transaction, build, build_partial};
