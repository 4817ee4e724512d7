//! Counting the rules of a few chains of the `kube-proxy` table over nf_tables netlink
//! (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_NFTABLES`), for the drift check of a large
//! table.
//!
//! `nft list chain` (nft 1.0.6) fetches its cache of the whole table before it prints one
//! chain: about 0.15–0.3 s per call at 10k Services (60k chains), every sync period, for each
//! chain checked. The kernel answers a rule dump filtered by table and chain from its chain
//! hash table, so a count costs the size of the chain. (Several `list chain` commands in one
//! `nft` run do not help: 1.0.6 answers all but a lone one with ENOENT.)

use std::collections::BTreeMap;
use std::io;

use netlink_sys::{AsyncSocketExt, TokioSocket};

use super::KernelError;
use super::nfnl::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attrs, error_code, message,
    messages,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;

const ENOENT: i32 = 2;

/// A handle on nf_tables in a network namespace (`None`: this process's).
#[derive(Debug, Clone, Default)]
pub struct NfTables {
    netns: Option<String>,
}

fn net_error(op: &str, source: io::Error) -> KernelError {
    KernelError::Netlink {
        op: format!("nf_tables: {op}"),
        source,
    }
}

impl NfTables {
    /// A handle in `netns` (`None`: this process's namespace).
    pub fn new(netns: Option<&str>) -> Self {
        NfTables {
            netns: netns.map(str::to_string),
        }
    }

    async fn socket(&self, op: &str) -> Result<TokioSocket, KernelError> {
        super::nfnl::open(self.netns.as_deref())
            .await
            .map_err(|e| net_error(op, e))
    }

    /// The number of rules in each of `chains` of table `table` (`family`: `NFPROTO_IPV4` 2
    /// or `NFPROTO_IPV6` 10), in order; `None` for a chain (or table) that does not exist.
    pub async fn rule_counts(
        &self,
        family: u8,
        table: &str,
        chains: &[&str],
    ) -> Result<Vec<Option<usize>>, KernelError> {
        let op = format!("counting rules of {table}");
        let socket = self.socket(&op).await?;
        let mut counts = Vec::with_capacity(chains.len());
        for (seq, chain) in (1u32..).step_by(2).zip(chains) {
            let exists = chain_exists(&socket, seq, family, table, chain)
                .await
                .map_err(|e| net_error(&op, e))?;
            let count = match exists {
                false => None,
                true => {
                    let mut rules = 0;
                    let only_chain = |b: &mut Vec<u8>| {
                        attr_str(b, NFTA_RULE_TABLE, table);
                        attr_str(b, NFTA_RULE_CHAIN, chain);
                    };
                    dump(
                        &socket,
                        seq + 1,
                        NFT_MSG_GETRULE,
                        family,
                        only_chain,
                        |_| rules += 1,
                    )
                    .await
                    .map_err(|e| net_error(&op, e))?;
                    Some(rules)
                }
            };
            counts.push(count);
        }
        Ok(counts)
    }

    /// Every chain of `table` with the number of its rules: a chain dump and a rule dump of
    /// the table, at the cost of the table's size in the kernel (no cache of it, as `nft`
    /// builds). Empty when the table does not exist.
    pub async fn table_rule_counts(
        &self,
        family: u8,
        table: &str,
    ) -> Result<BTreeMap<String, usize>, KernelError> {
        let op = format!("counting rules of {table}");
        let socket = self.socket(&op).await?;
        let mut counts = BTreeMap::new();
        dump(
            &socket,
            1,
            NFT_MSG_GETCHAIN,
            family,
            |_| {},
            |body| {
                if string_attr(body, NFTA_CHAIN_TABLE) == Some(table)
                    && let Some(chain) = string_attr(body, NFTA_CHAIN_NAME)
                {
                    counts.insert(chain.to_string(), 0);
                }
            },
        )
        .await
        .map_err(|e| net_error(&op, e))?;
        let this_table = |b: &mut Vec<u8>| attr_str(b, NFTA_RULE_TABLE, table);
        dump(&socket, 2, NFT_MSG_GETRULE, family, this_table, |body| {
            if let Some(chain) = string_attr(body, NFTA_RULE_CHAIN) {
                *counts.entry(chain.to_string()).or_default() += 1;
            }
        })
        .await
        .map_err(|e| net_error(&op, e))?;
        Ok(counts)
    }
}

/// Whether `chain` exists: a `GETCHAIN` answers with the chain or ENOENT.
async fn chain_exists(
    socket: &TokioSocket,
    seq: u32,
    family: u8,
    table: &str,
    chain: &str,
) -> io::Result<bool> {
    let mut req = Vec::with_capacity(64);
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    message(
        &mut req,
        nft_type(NFT_MSG_GETCHAIN),
        flags,
        seq,
        family,
        |b| {
            attr_str(b, NFTA_CHAIN_TABLE, table);
            attr_str(b, NFTA_CHAIN_NAME, chain);
        },
    );
    socket.send(&req).await?;
    let mut found = false;
    loop {
        let (datagram, _) = socket.recv_from_full().await?;
        for (kind, body) in messages(&datagram) {
            match kind {
                k if k == nft_type(NFT_MSG_GETCHAIN - 1) => found = true,
                NLMSG_ERROR => {
                    return match error_code(body) {
                        0 => Ok(found),
                        ENOENT => Ok(false),
                        errno => Err(io::Error::from_raw_os_error(errno)),
                    };
                }
                _ => {}
            }
        }
    }
}

/// A dump request `get` (filtered by what `attrs` appends); `each` sees the attributes of
/// every object answered (the `NEW…` message, `get - 1`).
async fn dump(
    socket: &TokioSocket,
    seq: u32,
    get: u16,
    family: u8,
    attrs: impl FnOnce(&mut Vec<u8>),
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut req = Vec::with_capacity(64);
    message(
        &mut req,
        nft_type(get),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        attrs,
    );
    socket.send(&req).await?;
    loop {
        let (datagram, _) = socket.recv_from_full().await?;
        for (kind, body) in messages(&datagram) {
            match kind {
                // The attributes follow the 4-byte nfgenmsg.
                k if k == nft_type(get - 1) => each(body.get(4..).unwrap_or_default()),
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => match error_code(body) {
                    0 => {}
                    errno => return Err(io::Error::from_raw_os_error(errno)),
                },
                _ => {}
            }
        }
    }
}

/// The NUL-terminated string attribute `kind` of a message's attributes.
fn string_attr(body: &[u8], kind: u16) -> Option<&str> {
    let (_, payload) = attrs(body).find(|(k, _)| *k == kind)?;
    let text = payload.split(|b| *b == 0).next()?;
    std::str::from_utf8(text).ok()
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// Appends a NUL-terminated string attribute (padded to 4 bytes).
fn attr_str(buf: &mut Vec<u8>, kind: u16, value: &str) {
    let len = 4 + value.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value.as_bytes());
    buf.push(0);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_dump_request_names_table_and_chain() {
        let mut b = Vec::new();
        message(
            &mut b,
            nft_type(NFT_MSG_GETRULE),
            NLM_F_REQUEST | NLM_F_DUMP,
            7,
            2,
            |b| {
                attr_str(b, NFTA_RULE_TABLE, "kube-proxy");
                attr_str(b, NFTA_RULE_CHAIN, "services");
            },
        );
        // header 16 + nfgenmsg 4 + "kube-proxy\0" (4 + 11 → 16) + "services\0" (4 + 9 → 16)
        assert_eq!(b.len(), 52);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 52);
        assert_eq!(
            u16::from_ne_bytes(b[4..6].try_into().unwrap()),
            (10 << 8) | 7
        );
        assert_eq!(u16::from_ne_bytes(b[6..8].try_into().unwrap()), 0x301);
        assert_eq!(b[16], 2);
        assert_eq!(&b[24..35], b"kube-proxy\0");
        assert_eq!(u16::from_ne_bytes(b[38..40].try_into().unwrap()), 2);
        assert_eq!(&b[40..49], b"services\0");
    }
}
