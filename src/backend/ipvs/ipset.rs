//! The ipsets IPVS mode keeps (upstream `pkg/proxy/ipvs/ipset.go` and the `ipsetInfo` table
//! in `proxier.go`): names, types, comments, entry spelling, and `ipset save` output.
//!
//! The constants below are the IPv4 names; an IPv6 proxier's sets are named by
//! [`set_name`] (`KUBE-6-*`, as upstream's `NewIPSet`), so both families' sets coexist.

use std::collections::BTreeSet;

use crate::model::IpFamily;

/// `KUBE-LOOP-BACK`: endpoint `ip,proto:port,ip` for hairpin masquerade.
pub const LOOP_BACK: &str = "KUBE-LOOP-BACK";
/// `KUBE-CLUSTER-IP`: `clusterIP,proto:port`.
pub const CLUSTER_IP: &str = "KUBE-CLUSTER-IP";
/// `KUBE-EXTERNAL-IP`: externalIP `ip,proto:port` (externalTrafficPolicy Cluster).
pub const EXTERNAL_IP: &str = "KUBE-EXTERNAL-IP";
/// `KUBE-EXTERNAL-IP-LOCAL`: externalIP `ip,proto:port` (externalTrafficPolicy Local).
pub const EXTERNAL_IP_LOCAL: &str = "KUBE-EXTERNAL-IP-LOCAL";
/// `KUBE-LOAD-BALANCER`: every LB ingress `ip,proto:port`.
pub const LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
/// `KUBE-LOAD-BALANCER-FW`: LB ingress of services with loadBalancerSourceRanges.
pub const LOAD_BALANCER_FW: &str = "KUBE-LOAD-BALANCER-FW";
/// `KUBE-LOAD-BALANCER-LOCAL`: LB ingress of services with externalTrafficPolicy Local.
pub const LOAD_BALANCER_LOCAL: &str = "KUBE-LOAD-BALANCER-LOCAL";
/// `KUBE-LOAD-BALANCER-SOURCE-IP`: `lbIP,proto:port,lbIP` when a source range holds the node IP.
pub const LOAD_BALANCER_SOURCE_IP: &str = "KUBE-LOAD-BALANCER-SOURCE-IP";
/// `KUBE-LOAD-BALANCER-SOURCE-CIDR`: `lbIP,proto:port,cidr` per source range.
pub const LOAD_BALANCER_SOURCE_CIDR: &str = "KUBE-LOAD-BALANCER-SOURCE-CIDR";
/// `KUBE-NODE-PORT-TCP`.
pub const NODE_PORT_TCP: &str = "KUBE-NODE-PORT-TCP";
/// `KUBE-NODE-PORT-LOCAL-TCP`.
pub const NODE_PORT_LOCAL_TCP: &str = "KUBE-NODE-PORT-LOCAL-TCP";
/// `KUBE-NODE-PORT-UDP`.
pub const NODE_PORT_UDP: &str = "KUBE-NODE-PORT-UDP";
/// `KUBE-NODE-PORT-LOCAL-UDP`.
pub const NODE_PORT_LOCAL_UDP: &str = "KUBE-NODE-PORT-LOCAL-UDP";
/// `KUBE-NODE-PORT-SCTP-HASH`: `nodeIP,sctp:port` per node IP.
pub const NODE_PORT_SCTP: &str = "KUBE-NODE-PORT-SCTP-HASH";
/// `KUBE-NODE-PORT-LOCAL-SCTP-HASH`.
pub const NODE_PORT_LOCAL_SCTP: &str = "KUBE-NODE-PORT-LOCAL-SCTP-HASH";
/// `KUBE-HEALTH-CHECK-NODE-PORT`: healthCheckNodePorts.
pub const HEALTH_CHECK_NODE_PORT: &str = "KUBE-HEALTH-CHECK-NODE-PORT";
/// `KUBE-IPVS-IPS`: addresses bound to kube-ipvs0.
pub const IPVS_IPS: &str = "KUBE-IPVS-IPS";

/// `hash:ip,port`.
pub const HASH_IP_PORT: &str = "hash:ip,port";
/// `hash:ip,port,ip`.
pub const HASH_IP_PORT_IP: &str = "hash:ip,port,ip";
/// `hash:ip,port,net`.
pub const HASH_IP_PORT_NET: &str = "hash:ip,port,net";
/// `bitmap:port`.
pub const BITMAP_PORT: &str = "bitmap:port";
/// `hash:ip`.
pub const HASH_IP: &str = "hash:ip";

/// Upstream's default hash size, max elements and bitmap port range.
pub const HASH_SIZE: u32 = 1024;
/// Upstream `MaxElem` default.
pub const MAX_ELEM: u32 = 65536;
/// Upstream `DefaultPortRange`.
pub const PORT_RANGE: &str = "0-65535";

/// Upstream `ipsetInfo`, in its order: name, type, comment.
pub const SET_INFO: &[(&str, &str, &str)] = &[
    (
        LOOP_BACK,
        HASH_IP_PORT_IP,
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    ),
    (
        CLUSTER_IP,
        HASH_IP_PORT,
        "Kubernetes service cluster ip + port for masquerade purpose",
    ),
    (
        EXTERNAL_IP,
        HASH_IP_PORT,
        "Kubernetes service external ip + port for masquerade and filter purpose",
    ),
    (
        EXTERNAL_IP_LOCAL,
        HASH_IP_PORT,
        "Kubernetes service external ip + port with externalTrafficPolicy=local",
    ),
    (LOAD_BALANCER, HASH_IP_PORT, "Kubernetes service lb portal"),
    (
        LOAD_BALANCER_FW,
        HASH_IP_PORT,
        "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    ),
    (
        LOAD_BALANCER_LOCAL,
        HASH_IP_PORT,
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    ),
    (
        LOAD_BALANCER_SOURCE_IP,
        HASH_IP_PORT_IP,
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    ),
    (
        LOAD_BALANCER_SOURCE_CIDR,
        HASH_IP_PORT_NET,
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    ),
    (
        NODE_PORT_TCP,
        BITMAP_PORT,
        "Kubernetes nodeport TCP port for masquerade purpose",
    ),
    (
        NODE_PORT_LOCAL_TCP,
        BITMAP_PORT,
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    ),
    (
        NODE_PORT_UDP,
        BITMAP_PORT,
        "Kubernetes nodeport UDP port for masquerade purpose",
    ),
    (
        NODE_PORT_LOCAL_UDP,
        BITMAP_PORT,
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    ),
    (
        NODE_PORT_SCTP,
        HASH_IP_PORT,
        "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
    ),
    (
        NODE_PORT_LOCAL_SCTP,
        HASH_IP_PORT,
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
    ),
    (
        HEALTH_CHECK_NODE_PORT,
        BITMAP_PORT,
        "Kubernetes health check node port",
    ),
    (IPVS_IPS, HASH_IP, "Addresses on the ipvs interface"),
];

/// ipset's longest set name (`IPSET_MAXNAMELEN` 32, with the terminating NUL).
pub const MAX_NAME_LEN: usize = 31;

/// The name of the set called `base` (a [`SET_INFO`] name) in `family`: unchanged for IPv4;
/// for IPv6 `KUBE-` becomes `KUBE-6-`, cut to [`MAX_NAME_LEN`] characters as upstream's
/// `NewIPSet` does (`KUBE-6-LOAD-BALANCER-SOURCE-CID`).
pub fn set_name(base: &str, family: IpFamily) -> String {
    match (family, base.strip_prefix("KUBE-")) {
        (IpFamily::V6, Some(rest)) => {
            let mut name = format!("KUBE-6-{rest}");
            name.truncate(MAX_NAME_LEN);
            name
        }
        _ => base.to_string(),
    }
}

/// One ipset as a sync wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSetSpec {
    /// Set name (`KUBE-CLUSTER-IP`, `KUBE-6-CLUSTER-IP`).
    pub name: String,
    /// The family of the addresses in the set (`family inet`/`inet6` of hash sets).
    pub family: IpFamily,
    /// ipset type (`hash:ip,port`).
    pub set_type: String,
    /// Upstream's comment for the set (used in iptables `--comment`, not in the set itself).
    pub comment: String,
    /// Entries as upstream's `Entry.String()` spells them (`10.96.0.10,tcp:53`).
    pub entries: BTreeSet<String>,
}

impl IpSetSpec {
    /// An empty set of `family` from the [`SET_INFO`] table (`name` is the table's name);
    /// `None` for an unknown name.
    pub fn empty(name: &str, family: IpFamily) -> Option<Self> {
        SET_INFO
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(n, t, c)| IpSetSpec {
                name: set_name(n, family),
                family,
                set_type: (*t).to_string(),
                comment: (*c).to_string(),
                entries: BTreeSet::new(),
            })
    }

    /// The `ipset create` options upstream passes after the type (without `-exist`).
    pub fn create_options(&self) -> String {
        if self.set_type == BITMAP_PORT {
            format!("range {PORT_RANGE}")
        } else {
            let family = match self.family {
                IpFamily::V4 => "inet",
                IpFamily::V6 => "inet6",
            };
            format!("family {family} hashsize {HASH_SIZE} maxelem {MAX_ELEM}")
        }
    }

    /// The `ipset create` line (`create NAME TYPE OPTIONS`), as `ipset save` prints it
    /// (ipset ≥ 7.x appends `bucketsize` and a random `initval`, which nobody sets).
    pub fn create_line(&self) -> String {
        format!(
            "create {} {} {}",
            self.name,
            self.set_type,
            self.create_options()
        )
    }

    /// Entries in the order and spelling `ipset save` lists them: bitmap ports numerically,
    /// hash entries sorted; a host net (`/32`, `/128`) in `hash:ip,port,net` printed without
    /// the suffix (the kernel stores host nets as plain addresses).
    pub fn saved_entries(&self) -> Vec<String> {
        if self.set_type == BITMAP_PORT {
            let mut ports: Vec<(u32, &String)> = self
                .entries
                .iter()
                .map(|e| (e.parse().unwrap_or(u32::MAX), e))
                .collect();
            ports.sort();
            return ports.into_iter().map(|(_, e)| e.clone()).collect();
        }
        let host_suffix = match self.family {
            IpFamily::V4 => "/32",
            IpFamily::V6 => "/128",
        };
        self.entries
            .iter()
            .map(|e| {
                if self.set_type == HASH_IP_PORT_NET {
                    e.strip_suffix(host_suffix).unwrap_or(e).to_string()
                } else {
                    e.clone()
                }
            })
            .collect()
    }
}

/// Every set of [`SET_INFO`] for `family`, empty, in upstream order.
pub fn all_sets(family: IpFamily) -> Vec<IpSetSpec> {
    SET_INFO
        .iter()
        .filter_map(|(n, _, _)| IpSetSpec::empty(n, family))
        .collect()
}

/// Every set name either family's proxier may create (what `--cleanup` destroys).
pub fn all_set_names() -> Vec<String> {
    [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .flat_map(|f| SET_INFO.iter().map(move |(n, _, _)| set_name(n, f)))
        .collect()
}

/// `hash:ip,port` entry: `10.96.0.10,tcp:53`.
pub fn ip_port(ip: &std::net::IpAddr, proto: &str, port: u16) -> String {
    format!("{ip},{proto}:{port}")
}

/// `hash:ip,port,ip` / `hash:ip,port,net` entry: `10.0.0.5,tcp:8080,10.0.0.5`.
pub fn ip_port_extra(ip: &std::net::IpAddr, proto: &str, port: u16, extra: &str) -> String {
    format!("{ip},{proto}:{port},{extra}")
}

/// `ipset save` text for `sets`: per set its `create` line, then its `add` lines.
pub fn save(sets: &[IpSetSpec]) -> String {
    let mut out = String::new();
    for set in sets {
        out.push_str(&set.create_line());
        out.push('\n');
        for e in set.saved_entries() {
            out.push_str(&format!("add {} {e}\n", set.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sets_are_kube_6_names_cut_to_31_characters_as_upstream() {
        let v6: Vec<String> = SET_INFO
            .iter()
            .map(|(n, _, _)| set_name(n, IpFamily::V6))
            .collect();
        assert_eq!(
            v6,
            [
                "KUBE-6-LOOP-BACK",
                "KUBE-6-CLUSTER-IP",
                "KUBE-6-EXTERNAL-IP",
                "KUBE-6-EXTERNAL-IP-LOCAL",
                "KUBE-6-LOAD-BALANCER",
                "KUBE-6-LOAD-BALANCER-FW",
                "KUBE-6-LOAD-BALANCER-LOCAL",
                "KUBE-6-LOAD-BALANCER-SOURCE-IP",
                "KUBE-6-LOAD-BALANCER-SOURCE-CID",
                "KUBE-6-NODE-PORT-TCP",
                "KUBE-6-NODE-PORT-LOCAL-TCP",
                "KUBE-6-NODE-PORT-UDP",
                "KUBE-6-NODE-PORT-LOCAL-UDP",
                "KUBE-6-NODE-PORT-SCTP-HASH",
                "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS",
                "KUBE-6-HEALTH-CHECK-NODE-PORT",
                "KUBE-6-IPVS-IPS",
            ]
        );
        let unique: BTreeSet<&String> = v6.iter().collect();
        assert_eq!(unique.len(), v6.len());
        for (n, _, _) in SET_INFO {
            assert_eq!(set_name(n, IpFamily::V4), *n, "IPv4 names are upstream's");
        }
        assert_eq!(all_set_names().len(), 2 * SET_INFO.len());
    }

    #[test]
    fn ipv6_hash_sets_are_created_with_family_inet6() {
        let v6 = IpSetSpec::empty(CLUSTER_IP, IpFamily::V6).unwrap();
        assert_eq!(
            v6.create_line(),
            "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536"
        );
        let v4 = IpSetSpec::empty(CLUSTER_IP, IpFamily::V4).unwrap();
        assert_eq!(
            v4.create_line(),
            "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536"
        );
        // Bitmap sets hold ports only: no family, but still their own name per family.
        let bitmap = IpSetSpec::empty(NODE_PORT_TCP, IpFamily::V6).unwrap();
        assert_eq!(
            bitmap.create_line(),
            "create KUBE-6-NODE-PORT-TCP bitmap:port range 0-65535"
        );
    }

    #[test]
    fn ipv6_host_nets_are_saved_without_their_128_suffix() {
        let mut net = IpSetSpec::empty(LOAD_BALANCER_SOURCE_CIDR, IpFamily::V6).unwrap();
        net.entries.insert("fd00::1,tcp:80,fd01::5/128".into());
        net.entries.insert("fd00::1,tcp:80,fd02::/64".into());
        assert_eq!(
            net.saved_entries(),
            ["fd00::1,tcp:80,fd01::5", "fd00::1,tcp:80,fd02::/64"]
        );
    }
}
