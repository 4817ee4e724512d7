//! The netfilter layer both the iptables and the IPVS backends build on: chain names and
//! their hashing ([`names`]), the `iptables-save` parser ([`parse`]), the jump rules from
//! builtin chains and iptables-mode cleanup ([`jumps`]), restore-input writing ([`restore`])
//! and the local-traffic matches ([`local`]). Nothing here names a backend.

pub mod jumps;
pub mod local;
pub mod names;
pub mod parse;
pub mod restore;
pub mod trace;

pub use jumps::JumpRule;
pub use local::LocalDetector;
pub use parse::{Dump, ParseError, Rule};

/// nfacct counter counting dropped ctstate INVALID packets.
pub const NFACCT_CT_STATE_INVALID: &str = "ct_state_invalid_dropped_pkts";
/// nfacct counter counting accepted localhost node-port packets.
pub const NFACCT_LOCALHOST_NODEPORTS: &str = "localhost_nps_accepted_pkts";

/// The masquerade mark for `--iptables-masquerade-bit`, as upstream formats it
/// (`fmt.Sprintf("%#08x", 1<<bit)`: `0x00004000` for bit 14).
pub fn masquerade_mark(bit: u8) -> String {
    let value = 1u64 << u32::from(bit.min(63));
    format!("{value:#010x}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn masquerade_mark_is_zero_padded_hex() {
        assert_eq!(super::masquerade_mark(14), "0x00004000");
        assert_eq!(super::masquerade_mark(0), "0x00000001");
        assert_eq!(super::masquerade_mark(31), "0x80000000");
    }
}
