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

/// Upstream `portProtoHash`: the first 16 characters of base32(sha256(input)).
fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = data_encoding::BASE32.encode(&digest);
    encoded.truncate(16);
    encoded
}

/// The string upstream hashes for a service port: `ns/name[:port]` + lowercase protocol.
fn port_key(name: &ServicePortName) -> String {
    format!("{}{}", name, name.protocol.lower())
}

/// `KUBE-SVC-…`: endpoints for Cluster traffic policy.
pub fn service_chain(name: &ServicePortName) -> String {
    format!("{SVC_PREFIX}{}", hash16(&port_key(name)))
}

/// `KUBE-SVL-…`: endpoints for Local traffic policy.
pub fn local_service_chain(name: &ServicePortName) -> String {
    format!("{SVL_PREFIX}{}", hash16(&port_key(name)))
}

/// `KUBE-EXT-…`: external destinations (node ports, external IPs, LB IPs).
pub fn external_chain(name: &ServicePortName) -> String {
    format!("{EXT_PREFIX}{}", hash16(&port_key(name)))
}

/// `KUBE-FW-…`: loadBalancerSourceRanges filtering.
pub fn firewall_chain(name: &ServicePortName) -> String {
    format!("{FW_PREFIX}{}", hash16(&port_key(name)))
}

/// `KUBE-SEP-…` for an endpoint given as upstream's `Endpoint.String()` (`ip:port`).
pub fn endpoint_chain_for(name: &ServicePortName, endpoint_addr: &str) -> String {
    format!(
        "{SEP_PREFIX}{}",
        hash16(&format!("{}{endpoint_addr}", port_key(name)))
    )
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
}
