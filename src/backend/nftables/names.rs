//! Object names in the `kube-proxy` nftables table, exactly as upstream names them
//! (pkg/proxy/nftables/proxier.go `servicePortChainNameBase`, `servicePortEndpointChainNameBase`,
//! `hashAndTruncate`), and the family-dependent tokens.

use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::model::{Endpoint, IpFamily, ServicePortName};

/// The table name in both families.
pub const TABLE: &str = "kube-proxy";

/// Fixed chains (no `/` in their names: that is how per-service chains are told apart).
pub const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
/// nat postrouting's target: masquerades marked traffic.
pub const MASQUERADING: &str = "masquerading";
/// Rejects traffic to invalid ClusterIP ports, drops unallocated ClusterIPs.
pub const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
/// Target of `no-endpoint-*` verdicts for services without any endpoint.
pub const REJECT_CHAIN: &str = "reject-chain";
/// Filter check against `no-endpoint-services`.
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
/// Filter check against `no-endpoint-nodeports`.
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
/// Pre-DNAT check against `firewall-ips`.
pub const FIREWALL_CHECK: &str = "firewall-check";
/// nat dispatch through `service-ips` / `service-nodeports`.
pub const SERVICES: &str = "services";

/// Set of active ClusterIPs.
pub const CLUSTER_IPS: &str = "cluster-ips";
/// Set of addresses accepting node ports.
pub const NODEPORT_IPS: &str = "nodeport-ips";
/// Verdict map for services without (local) endpoints.
pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
/// Verdict map for node ports without (local) endpoints.
pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
/// Verdict map of loadBalancerSourceRanges destinations.
pub const FIREWALL_IPS: &str = "firewall-ips";
/// Verdict map of ClusterIP, external IP and LB IP destinations.
pub const SERVICE_IPS: &str = "service-ips";
/// Verdict map of node ports.
pub const SERVICE_NODEPORTS: &str = "service-nodeports";

/// Prefix of affinity sets.
pub const AFFINITY_PREFIX: &str = "affinity-";

/// Upstream `NameLengthMax` (256) minus the longest prefix (16).
const MAX_BASE: usize = 240;

/// The family's table and address tokens.
pub trait FamilyTokens {
    /// `ip` / `ip6`: the table family and the address match keyword.
    fn nft(self) -> &'static str;
    /// `ipv4_addr` / `ipv6_addr`.
    fn addr_type(self) -> &'static str;
    /// The loopback range never serving node ports.
    fn loopback(self) -> &'static str;
}

impl FamilyTokens for IpFamily {
    fn nft(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }

    fn addr_type(self) -> &'static str {
        match self {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1",
        }
    }
}

/// Upstream `hashAndTruncate`: `H8-S`, truncated to 237 characters plus `...` when longer
/// than 240; H8 is the first 8 characters of base32(sha256(S)).
fn hash_and_truncate(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut name = data_encoding::BASE32.encode(&digest);
    name.truncate(8);
    name.push('-');
    name.push_str(s);
    if name.len() > MAX_BASE {
        let mut cut = MAX_BASE - 3;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name.push_str("...");
    }
    name
}

/// `ns/name/proto/port`.
fn port_string(name: &ServicePortName) -> String {
    format!(
        "{}/{}/{}/{}",
        name.service.namespace,
        name.service.name,
        name.protocol.lower(),
        name.port
    )
}

/// Upstream `servicePortChainNameBase`: the suffix of `service-`, `local-`, `external-` and
/// `firewall-` chains.
pub fn service_base(name: &ServicePortName) -> String {
    hash_and_truncate(&port_string(name))
}

/// Upstream `servicePortEndpointChainNameBase`: the suffix of `endpoint-` chains and
/// `affinity-` sets. IPv6 colons become dots (nft names cannot hold `:`).
pub fn endpoint_base(name: &ServicePortName, ep: &Endpoint) -> String {
    let ip = ep.ip.to_string().replace(':', ".");
    hash_and_truncate(&format!("{}__{ip}/{}", port_string(name), ep.port))
}

/// The per-service chains of one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChains {
    /// Cluster-policy chain.
    pub service: String,
    /// Local-policy chain.
    pub local: String,
    /// External-destinations chain.
    pub external: String,
    /// loadBalancerSourceRanges chain.
    pub firewall: String,
}

impl ServiceChains {
    /// The chain names of `name`.
    pub fn of(name: &ServicePortName) -> Self {
        let base = service_base(name);
        ServiceChains {
            service: format!("service-{base}"),
            local: format!("local-{base}"),
            external: format!("external-{base}"),
            firewall: format!("firewall-{base}"),
        }
    }
}

/// Upstream `isServiceChainName`: per-service chains are the ones with a `/`.
pub fn is_service_chain(name: &str) -> bool {
    name.contains('/')
}

/// Upstream `isAffinitySetName`.
pub fn is_affinity_set(name: &str) -> bool {
    name.starts_with(AFFINITY_PREFIX)
}

/// An address as a DNAT target: `IP:port`, IPv6 as `[IP]:port`.
pub fn dnat_target(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName::new(ns, name, port, Protocol::Tcp)
    }

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint::ready(ip.parse().unwrap(), port)
    }

    /// Vectors from upstream's tests and goldens.
    #[test]
    fn names_match_upstream_vectors() {
        assert_eq!(
            service_base(&spn("ns1", "svc1", "p80")),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            service_base(&spn("testing", "service", "http")),
            "P4ZYZVCF-testing/service/tcp/http"
        );
        assert_eq!(
            endpoint_base(&spn("ns1", "svc1", "p80"), &ep("10.180.0.1", 80)),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert_eq!(
            endpoint_base(&spn("ns1", "svc1", "p80"), &ep("fd00:10:180::2:1", 80)),
            "2CRNCTTE-ns1/svc1/tcp/p80__fd00.10.180..2.1/80"
        );
    }

    #[test]
    fn long_names_are_truncated_to_240_with_an_ellipsis() {
        let long = "x".repeat(250);
        let b = service_base(&spn("ns", &long, "p"));
        assert_eq!(b.len(), 240);
        assert!(b.ends_with("...") && b.starts_with(&hash_and_truncate("ns/")[..0]));
        assert!(is_service_chain(&format!("service-{b}")));
        assert!(!is_service_chain(SERVICES));
    }
}
