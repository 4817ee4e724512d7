//! Chain names: the fixed top-level chains and the hashed per-service chains, exactly as
//! upstream names them (`portProtoHash` and friends in pkg/proxy/iptables/proxier.go).

use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePortName};

/// nat/filter: the main service dispatch chain.
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// filter: rejects/drops for external destinations without (local) endpoints.
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
/// nat: node ports; filter: health-check node port accepts.
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
/// nat: masquerade marked traffic.
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// nat: sets the masquerade mark.
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// filter: forwarding accept rules.
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
/// filter: drops for loadBalancerSourceRanges.
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// mangle/nat/filter: canary used to detect a flushed ruleset.
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// filter: kube-proxy's copy of kubelet's anti-martian chain.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// Prefix of the Cluster-policy service chain.
pub const SVC_PREFIX: &str = "KUBE-SVC-";
/// Prefix of the Local-policy service chain.
pub const SVL_PREFIX: &str = "KUBE-SVL-";
/// Prefix of the external-destinations chain.
pub const EXT_PREFIX: &str = "KUBE-EXT-";
/// Prefix of the loadBalancerSourceRanges chain.
pub const FW_PREFIX: &str = "KUBE-FW-";
/// Prefix of the per-endpoint chain.
pub const SEP_PREFIX: &str = "KUBE-SEP-";

/// Upstream `portProtoHash`: the first 16 characters of base32(sha256(input)). They encode
/// the digest's first 10 bytes exactly (5 bytes per 8 characters, no padding).
fn hash16(input: &[u8]) -> Hash16 {
    let digest = sha256_head(input);
    let mut out = [0u8; 16];
    data_encoding::BASE32.encode_mut(&digest, &mut out);
    Hash16(out)
}

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// The first 10 bytes of sha256(`input`). A render hashes tens of thousands of short keys:
/// those that fit two blocks are padded here (FIPS 180-4, 5.1.1) and go straight to the
/// `sha2` compression function, without the streaming hasher's buffering.
fn sha256_head(input: &[u8]) -> [u8; 10] {
    let n = input.len();
    let mut head = [0u8; 10];
    if n > 2 * 64 - 9 {
        head.copy_from_slice(&Sha256::digest(input)[..10]);
        return head;
    }
    let mut blocks = [[0u8; 64]; 2];
    let (first, rest) = input.split_at(n.min(64));
    blocks[0][..first.len()].copy_from_slice(first);
    blocks[1][..rest.len()].copy_from_slice(rest);
    blocks[n / 64][n % 64] = 0x80;
    let count = if n <= 64 - 9 { 1 } else { 2 };
    blocks[count - 1][56..].copy_from_slice(&(8 * n as u64).to_be_bytes());
    let mut state = SHA256_IV;
    sha2::block_api::compress256(&mut state, &blocks[..count]);
    for (i, b) in head.iter_mut().enumerate() {
        *b = state[i / 4].to_be_bytes()[i % 4];
    }
    head
}

/// The 16-character hash that names a service port's (or an endpoint's) chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hash16([u8; 16]);

impl Hash16 {
    /// The hash as text (base32 is ASCII).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// The longest name a hashed chain gets: the longest prefix and the hash.
const HASHED_CHAIN_MAX: usize = 9 + 16;

/// A per-service chain name (`KUBE-SVC-…`, `KUBE-SEP-…`, …) held inline: a render names
/// tens of thousands of them, and they need no allocation each.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainName {
    bytes: [u8; HASHED_CHAIN_MAX],
    len: u8,
}

impl ChainName {
    /// `prefix` (one of the `*_PREFIX` constants) followed by `hash`.
    pub fn new(prefix: &'static str, hash: &Hash16) -> ChainName {
        let mut bytes = [0u8; HASHED_CHAIN_MAX];
        let len = prefix.len().min(HASHED_CHAIN_MAX - 16);
        bytes[..len].copy_from_slice(&prefix.as_bytes()[..len]);
        bytes[len..len + 16].copy_from_slice(&hash.0);
        ChainName {
            bytes,
            len: (len + 16) as u8,
        }
    }

    /// `name` held inline, if it is no longer than a hashed chain's name.
    pub fn parse(name: &str) -> Option<ChainName> {
        let len = name.len();
        let mut bytes = [0u8; HASHED_CHAIN_MAX];
        bytes.get_mut(..len)?.copy_from_slice(name.as_bytes());
        Some(ChainName {
            bytes,
            len: len as u8,
        })
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The name's bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for ChainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for ChainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string upstream hashes for a service port (`ns/name[:port]` + lowercase protocol),
/// kept to hash the port's chain names and each endpoint's (key + `ip:port`) without
/// building the key again.
#[derive(Debug, Clone)]
pub struct PortHasher {
    key: String,
    /// The length of the port's key in `key` (an endpoint's address follows it).
    len: usize,
}

impl PortHasher {
    /// `name`'s key.
    pub fn new(name: &ServicePortName) -> PortHasher {
        let service = &name.service;
        let mut key = String::with_capacity(
            service.namespace.len() + service.name.len() + name.port.len() + 64,
        );
        key.push_str(&service.namespace);
        key.push('/');
        key.push_str(&service.name);
        if !name.port.is_empty() {
            key.push(':');
            key.push_str(&name.port);
        }
        key.push_str(name.protocol.lower());
        let len = key.len();
        PortHasher { key, len }
    }

    /// The hash of the port's SVC/SVL/EXT/FW chains.
    pub fn port(&self) -> Hash16 {
        hash16(&self.key.as_bytes()[..self.len])
    }

    /// The hash of the KUBE-SEP chain of the endpoint that `write_addr` writes (`ip:port`).
    pub fn endpoint(&mut self, write_addr: impl FnOnce(&mut String)) -> Hash16 {
        self.key.truncate(self.len);
        write_addr(&mut self.key);
        hash16(self.key.as_bytes())
    }
}

/// `KUBE-SVC-…`: endpoints for Cluster traffic policy.
pub fn service_chain(name: &ServicePortName) -> String {
    ChainName::new(SVC_PREFIX, &PortHasher::new(name).port()).to_string()
}

/// `KUBE-SVL-…`: endpoints for Local traffic policy.
pub fn local_service_chain(name: &ServicePortName) -> String {
    ChainName::new(SVL_PREFIX, &PortHasher::new(name).port()).to_string()
}

/// `KUBE-EXT-…`: external destinations (node ports, external IPs, LB IPs).
pub fn external_chain(name: &ServicePortName) -> String {
    ChainName::new(EXT_PREFIX, &PortHasher::new(name).port()).to_string()
}

/// `KUBE-FW-…`: loadBalancerSourceRanges filtering.
pub fn firewall_chain(name: &ServicePortName) -> String {
    ChainName::new(FW_PREFIX, &PortHasher::new(name).port()).to_string()
}

/// `KUBE-SEP-…` for an endpoint given as upstream's `Endpoint.String()` (`ip:port`).
pub fn endpoint_chain_for(name: &ServicePortName, endpoint_addr: &str) -> String {
    let hash = PortHasher::new(name).endpoint(|key| key.push_str(endpoint_addr));
    ChainName::new(SEP_PREFIX, &hash).to_string()
}

/// `KUBE-SEP-…` for an endpoint of a service port.
pub fn endpoint_chain(name: &ServicePortName, endpoint: &Endpoint) -> String {
    endpoint_chain_for(name, &endpoint.addr_string())
}

/// Upstream `isServiceChainName`: whether a chain is a per-service chain kube-proxy owns
/// (and may therefore delete when stale).
pub fn is_service_chain(chain: &str) -> bool {
    [SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX]
        .iter()
        .any(|p| chain.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName::new(ns, name, port, Protocol::Tcp)
    }

    #[test]
    fn vectors_from_upstream() {
        assert_eq!(
            service_chain(&spn("ns1", "svc1", "p80")),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            endpoint_chain_for(&spn("ns1", "svc1", "p80"), "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        let svc4 = spn("ns4", "svc4", "p80");
        assert_eq!(service_chain(&svc4), "KUBE-SVC-4SW47YFZTEDKD3PK");
        assert_eq!(external_chain(&svc4), "KUBE-EXT-4SW47YFZTEDKD3PK");
        assert_eq!(
            endpoint_chain_for(&svc4, "10.180.0.4:80"),
            "KUBE-SEP-UKSFD7AGPMPPLUHC"
        );
        assert_eq!(
            endpoint_chain_for(&svc4, "10.180.0.5:80"),
            "KUBE-SEP-C6EBXVWJJZMIWKLZ"
        );
        let svc2 = spn("ns2", "svc2", "p80");
        assert_eq!(local_service_chain(&svc2), "KUBE-SVL-GNZBNJ2PO5MGZ6GT");
        assert_eq!(
            firewall_chain(&spn("ns5", "svc5", "p80")),
            "KUBE-FW-NUKIZ6OKUXPJNT4C"
        );
        assert_eq!(
            endpoint_chain_for(&spn("ns5", "svc5", "p80"), "10.180.0.3:80"),
            "KUBE-SEP-I77PXRDZVX7PMWMN"
        );
        assert_eq!(
            service_chain(&spn("ns2", "svc2", "p8080")),
            "KUBE-SVC-2VJB64SDSIJUP5T6"
        );
    }

    #[test]
    fn protocol_and_port_name_are_part_of_the_hash() {
        let tcp = spn("ns1", "svc1", "p80");
        let udp = ServicePortName::new("ns1", "svc1", "p80", Protocol::Udp);
        let unnamed = spn("ns1", "svc1", "");
        assert_ne!(service_chain(&tcp), service_chain(&udp));
        assert_ne!(service_chain(&tcp), service_chain(&unnamed));
        // Every name fits iptables' 28-character chain limit.
        assert!(endpoint_chain_for(&tcp, "[fd00::1]:80").len() <= 28);
        assert!(is_service_chain("KUBE-SVL-X") && !is_service_chain("KUBE-SERVICES"));
        assert!(!is_service_chain("KUBE-MARK-MASQ") && is_service_chain("KUBE-FW-X"));
    }

    /// The inline names and the kept key hash what upstream hashes (sha256 of the whole
    /// string, base32, 16 characters), and parse back.
    #[test]
    fn chain_names_hash_upstream_keys() {
        let direct = |key: &str| {
            let mut e = data_encoding::BASE32.encode(&Sha256::digest(key.as_bytes()));
            e.truncate(16);
            e
        };
        let tcp = spn("ns1", "svc1", "p80");
        let sctp = ServicePortName::new("ns1", "svc1", "", Protocol::Sctp);
        assert_eq!(
            service_chain(&tcp),
            format!("KUBE-SVC-{}", direct("ns1/svc1:p80tcp"))
        );
        assert_eq!(
            firewall_chain(&sctp),
            format!("KUBE-FW-{}", direct("ns1/svc1sctp"))
        );
        assert_eq!(
            endpoint_chain_for(&tcp, "[fd00::1]:80"),
            format!("KUBE-SEP-{}", direct("ns1/svc1:p80tcp[fd00::1]:80"))
        );
        // One hasher for every endpoint of a port: each hash is of the key and its address.
        let mut h = PortHasher::new(&tcp);
        let first = h.endpoint(|k| k.push_str("10.0.0.1:80"));
        let second = h.endpoint(|k| k.push_str("10.0.0.2:80"));
        assert_eq!(first.as_str(), direct("ns1/svc1:p80tcp10.0.0.1:80"));
        assert_eq!(second.as_str(), direct("ns1/svc1:p80tcp10.0.0.2:80"));
        assert_eq!(h.port().as_str(), direct("ns1/svc1:p80tcp"));

        // Keys of every length up to and past two blocks, padding boundaries included.
        for len in 0..200 {
            let key = "k".repeat(len);
            assert_eq!(
                hash16(key.as_bytes()).as_str(),
                direct(&key),
                "length {len}"
            );
        }

        let sep = ChainName::new(SEP_PREFIX, &first);
        assert_eq!(ChainName::parse(sep.as_str()), Some(sep));
        assert_eq!(
            ChainName::parse("KUBE-SEP-TOO-LONG-FOR-A-HASHED-NAME"),
            None
        );
    }
}
