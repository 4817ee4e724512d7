//! Pure rendering of one IPVS-mode sync (upstream `pkg/proxy/ipvs/proxier.go`
//! `syncProxyRules`/`syncEndpoint`/`writeIptablesRules`): the virtual servers with their real
//! servers, the addresses for kube-ipvs0, the ipsets and the iptables ruleset.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::ipset::{self, IpSetSpec};
use super::rules::{self, NoNodeAccess, RuleParams};
use crate::backend::netfilter::{JumpRule, LocalDetector, masquerade_mark};
use crate::host::{NodeFacts, NodePortDestinations};
use crate::kernel::ipvs::codec::{
    ForwardMethod, IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3, Protocol as IpvsProtocol, RealServer, ServiceFlags, VirtualService,
};
use crate::model::plan::{self, Disposition, IpFamily, PlanOptions, Policy, ServicePlan};
use crate::model::{Cidr, Endpoint, ProxyModel, ServiceName, ServicePort};

/// Upstream's default scheduler.
pub const DEFAULT_SCHEDULER: &str = "rr";

/// Upstream `FlagSourceHash` (0x10 = `IP_VS_SVC_F_SCHED2`, read by `mh` as "mh-port"), set on
/// every virtual server when the scheduler is `mh`.
pub const FLAG_SOURCE_HASH: u32 = IP_VS_SVC_F_SCHED2;

/// Settings that shape an IPVS-mode sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsConfig {
    /// `--ipvs-scheduler` (`rr` when empty).
    pub scheduler: String,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--iptables-masquerade-bit`.
    pub masquerade_bit: u8,
    /// `--detect-local-mode` and its parameter.
    pub local_detector: LocalDetector,
    /// Node addresses of [`Self::family`] NodePort virtual servers go on (loopback excluded;
    /// already filtered by `--nodeport-addresses`).
    pub node_ips: Vec<IpAddr>,
    /// `--ipvs-exclude-cidrs`: virtual servers there are never deleted (apply side only).
    pub exclude_cidrs: Vec<Cidr>,
    /// `--ipvs-strict-arp` (apply side only).
    pub strict_arp: bool,
    /// `iptables` supports `--random-fully`.
    pub random_fully: bool,
    /// The node IP of this family (upstream `nodeIP`): a loadBalancerSourceRange containing
    /// it lets the node reach the LB (KUBE-LOAD-BALANCER-SOURCE-IP), otherwise the node is
    /// blocked by KUBE-IPVS-OUT-FILTER.
    pub primary_node_ip: Option<IpAddr>,
    /// Every local address except kube-ipvs0's (upstream `nodeAddressSet`): externalIPs and
    /// LB IPs already on another interface are not bound to kube-ipvs0. `node_ips` counts
    /// too; loopback addresses do not (upstream leaves them out of the set).
    pub host_addrs: Vec<IpAddr>,
    /// The IP family programmed: only its services, endpoints and addresses are planned.
    pub family: IpFamily,
}

impl Default for IpvsConfig {
    fn default() -> Self {
        IpvsConfig {
            scheduler: DEFAULT_SCHEDULER.to_string(),
            masquerade_all: false,
            masquerade_bit: 14,
            local_detector: LocalDetector::None,
            node_ips: Vec::new(),
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            random_fully: false,
            primary_node_ip: None,
            host_addrs: Vec::new(),
            family: IpFamily::V4,
        }
    }
}

impl IpvsConfig {
    /// The scheduler in effect.
    pub fn scheduler(&self) -> &str {
        if self.scheduler.is_empty() {
            DEFAULT_SCHEDULER
        } else {
            &self.scheduler
        }
    }

    /// The masquerade mark (`0x00004000`), formatted as upstream does.
    pub fn masquerade_mark(&self) -> String {
        masquerade_mark(self.masquerade_bit)
    }
}

/// IPv4 IPVS settings from the options and what is known of the node (`local_ips`: the
/// host's addresses without kube-ipvs0's), with the node facts worked out from `opts`.
pub fn ipvs_config(
    opts: &crate::config::ProxyOptions,
    node: &crate::model::NodeInfo,
    local_ips: Vec<IpAddr>,
) -> IpvsConfig {
    let facts = crate::host::HostSettings::from_options(opts).facts(node, IpFamily::V4);
    ipvs_config_for(opts, &facts, &local_ips, IpFamily::V4)
}

/// The IPVS settings of the `family` proxier: from the options, that family's node `facts`
/// and the host's addresses (`local_ips`, kube-ipvs0's excluded; other families ignored).
pub fn ipvs_config_for(
    opts: &crate::config::ProxyOptions,
    facts: &NodeFacts,
    local_ips: &[IpAddr],
    family: IpFamily,
) -> IpvsConfig {
    let (host_addrs, node_ips) = node_addresses(facts, local_ips, family);
    IpvsConfig {
        scheduler: opts.ipvs.scheduler.clone(),
        masquerade_all: opts.masquerade_all,
        masquerade_bit: opts.masquerade_bit,
        local_detector: facts.local_detector.clone(),
        node_ips,
        // Both families' prefixes: one of the other family contains none of ours.
        exclude_cidrs: opts.ipvs.exclude_cidrs.clone(),
        strict_arp: opts.ipvs.strict_arp,
        random_fully: false,
        primary_node_ip: facts.primary_ip.filter(|ip| family.matches(ip)),
        host_addrs,
        family,
    }
}

/// Whether `ip` counts as a node address of `family` (upstream `isValidForSet`): of the
/// family, not loopback (so no localhost node ports, in either family) and, for IPv6, not
/// link-local (an IPVS virtual server has no scope to tell links apart).
pub fn is_node_address(ip: &IpAddr, family: IpFamily) -> bool {
    family.matches(ip) && !ip.is_loopback() && !is_ipv6_link_local(ip)
}

/// From the host's addresses (`local_ips`, kube-ipvs0's excluded): those of `family`
/// (upstream `nodeAddressSet`, sorted) and those NodePort virtual servers go on (the node
/// addresses `--nodeport-addresses` selects, upstream `nodeIPs`).
pub fn node_addresses(
    facts: &NodeFacts,
    local_ips: &[IpAddr],
    family: IpFamily,
) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let host: Vec<IpAddr> = local_ips
        .iter()
        .copied()
        .filter(|ip| family.matches(ip))
        .collect::<BTreeSet<IpAddr>>()
        .into_iter()
        .collect();
    let node_ips = match facts.node_port_ips(&host) {
        NodePortDestinations::AllLocal => host.clone(),
        NodePortDestinations::Ips(ips) => ips,
    }
    .into_iter()
    .filter(|ip| is_node_address(ip, family))
    .collect();
    (host, node_ips)
}

/// One virtual server and the real servers it should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// The virtual server (NAT, scheduler, flags, persistence timeout).
    pub vs: VirtualService,
    /// Real servers: weight 1, masquerading, sorted by (address, port).
    pub dests: Vec<RealServer>,
    /// Whether the real servers were chosen with a Local traffic policy (internal for the
    /// ClusterIP, external for the others).
    pub local_only: bool,
}

/// Everything one IPVS-mode sync should leave in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpvsDesired {
    /// Virtual servers, sorted by (address, protocol, port).
    pub services: Vec<DesiredService>,
    /// Addresses to bind on kube-ipvs0 (ClusterIPs, and externalIPs/LB IPs not already
    /// local); also the entries of KUBE-IPVS-IPS.
    pub bound_addrs: BTreeSet<IpAddr>,
    /// Every set of upstream's `ipsetInfo`, empty ones too, in its order.
    pub ipsets: Vec<IpSetSpec>,
    /// `iptables-restore --noflush` input: `*nat … COMMIT *filter … COMMIT`.
    pub iptables_restore: String,
    /// `-A` lines in the filter part.
    pub filter_rules: usize,
    /// `-A` lines in the nat part.
    pub nat_rules: usize,
    /// Services with internalTrafficPolicy Local whose virtual servers fell back to
    /// cluster endpoints (no local one).
    pub no_local_endpoints_internal: usize,
    /// Services with externalTrafficPolicy Local whose external virtual servers fell back
    /// to cluster endpoints.
    pub no_local_endpoints_external: usize,
    /// healthCheckNodePort and local ready endpoint count per eTP=Local LoadBalancer.
    pub health_checks: BTreeMap<ServiceName, (u16, usize)>,
}

impl IpvsDesired {
    /// The set called `name`, if rendered.
    pub fn ipset(&self, name: &str) -> Option<&IpSetSpec> {
        self.ipsets.iter().find(|s| s.name == name)
    }
}

fn ipvs_protocol(p: crate::model::Protocol) -> IpvsProtocol {
    match p {
        crate::model::Protocol::Tcp => IpvsProtocol::Tcp,
        crate::model::Protocol::Udp => IpvsProtocol::Udp,
        crate::model::Protocol::Sctp => IpvsProtocol::Sctp,
    }
}

type VsKey = (IpAddr, IpvsProtocol, u16);

struct Builder<'a> {
    cfg: &'a IpvsConfig,
    services: BTreeMap<VsKey, DesiredService>,
    sets: BTreeMap<&'static str, IpSetSpec>,
    no_local_internal: BTreeSet<ServiceName>,
    no_local_external: BTreeSet<ServiceName>,
}

impl Builder<'_> {
    fn add(&mut self, set: &'static str, entry: String) {
        if let Some(s) = self.sets.get_mut(set) {
            s.entries.insert(entry);
        }
    }

    fn virtual_server(&self, svc: &ServicePort, addr: IpAddr, port: u16) -> VirtualService {
        let mut vs = VirtualService::new(
            addr,
            ipvs_protocol(svc.name.protocol),
            port,
            self.cfg.scheduler(),
        );
        let mut flags = 0;
        if let Some(timeout) = svc.session_affinity_timeout {
            flags |= IP_VS_SVC_F_PERSISTENT;
            vs.timeout = timeout;
        }
        if self.cfg.scheduler() == "mh" {
            flags |= FLAG_SOURCE_HASH;
        }
        vs.flags = ServiceFlags::exactly(flags);
        vs
    }

    /// Upstream `syncEndpoint`: the real servers of a virtual server whose traffic the plan
    /// disposes of as `disposition`.
    ///
    /// IPVS cannot reject or drop per virtual server, so this backend serialises the plan's
    /// refusals its own way, as upstream's IPVS proxier does: a virtual server without
    /// endpoints has no real servers, and a Local policy without local endpoints (the
    /// plan's `Drop`) falls back to the cluster endpoints (kubernetes#97081), so local pods
    /// still reach the service; external clients are not served, since their replies are
    /// dropped on the way back.
    fn real_servers(&mut self, sp: &ServicePlan, disposition: Disposition) -> Vec<RealServer> {
        let chosen: &[Endpoint] = match disposition {
            Disposition::Serve(Policy::Local) => &sp.local,
            Disposition::Serve(Policy::Cluster) | Disposition::Reject(_) => &sp.cluster,
            Disposition::Drop(_) => {
                let service = &sp.service.name.service;
                if sp.internal.lacks_local_endpoints() {
                    self.no_local_internal.insert(service.clone());
                }
                if sp.external.lacks_local_endpoints() {
                    self.no_local_external.insert(service.clone());
                }
                &sp.cluster
            }
        };
        let unique: BTreeSet<(IpAddr, u16)> = chosen.iter().map(|e| (e.ip, e.port)).collect();
        // Sorted by (address, port) through the set.
        unique
            .into_iter()
            .map(|(ip, port)| real_server(ip, port))
            .collect()
    }

    /// One virtual server: for the ClusterIP (`external` false) or an external destination.
    fn sync_service(&mut self, sp: &ServicePlan, addr: IpAddr, port: u16, external: bool) {
        let svc = sp.service;
        let (disposition, only_local) = if external {
            (sp.external, svc.external_policy_local)
        } else {
            (sp.internal, svc.internal_policy_local)
        };
        let vs = self.virtual_server(svc, addr, port);
        let dests = self.real_servers(sp, disposition);
        // Two services on the same VIP:port/proto: the later one wins, as with upstream's
        // successive syncService/syncEndpoint calls.
        self.services.insert(
            (addr, vs.protocol, port),
            DesiredService {
                vs,
                dests,
                local_only: only_local,
            },
        );
    }
}

/// A NAT real server at weight 1.
pub fn real_server(address: IpAddr, port: u16) -> RealServer {
    RealServer::new(address, port, 1)
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// Renders one sync.
pub fn render(model: &ProxyModel, cfg: &IpvsConfig) -> IpvsDesired {
    let plan = plan::plan(model, cfg.family, &plan_options(cfg));
    let mut b = Builder {
        cfg,
        services: BTreeMap::new(),
        sets: ipset::SET_INFO
            .iter()
            .filter_map(|(n, _, _)| IpSetSpec::empty(n, cfg.family).map(|s| (*n, s)))
            .collect(),
        no_local_internal: BTreeSet::new(),
        no_local_external: BTreeSet::new(),
    };
    let mut bound: BTreeSet<IpAddr> = BTreeSet::new();
    // Upstream's nodeAddressSet leaves out loopback (and IPv6 link-local) addresses, so an
    // externalIP of 127.0.0.1 is still bound to kube-ipvs0.
    let host: BTreeSet<IpAddr> = cfg
        .host_addrs
        .iter()
        .chain(&cfg.node_ips)
        .copied()
        .filter(|ip| is_node_address(ip, cfg.family))
        .collect();
    let node_ips: Vec<IpAddr> = {
        let set: BTreeSet<IpAddr> = cfg
            .node_ips
            .iter()
            .copied()
            .filter(|ip| is_node_address(ip, cfg.family))
            .collect();
        set.into_iter().collect()
    };
    let mut no_node_access: Vec<NoNodeAccess> = Vec::new();

    for sp in &plan.services {
        let svc = sp.service;
        let name = &svc.name;
        let proto = name.protocol.lower();

        // Hairpin: every local endpoint, whatever its state.
        for ep in sp.endpoints.iter() {
            if ep.is_local && ep.port != 0 {
                let ip = ep.ip.to_string();
                b.add(
                    ipset::LOOP_BACK,
                    ipset::ip_port_extra(&ep.ip, proto, ep.port, &ip),
                );
            }
        }

        b.add(
            ipset::CLUSTER_IP,
            ipset::ip_port(&svc.cluster_ip, proto, svc.port),
        );
        b.sync_service(sp, svc.cluster_ip, svc.port, false);
        bound.insert(svc.cluster_ip);

        for ip in &sp.external_ips {
            let set = if svc.external_policy_local {
                ipset::EXTERNAL_IP_LOCAL
            } else {
                ipset::EXTERNAL_IP
            };
            b.add(set, ipset::ip_port(ip, proto, svc.port));
            b.sync_service(sp, *ip, svc.port, true);
            if !host.contains(ip) {
                bound.insert(*ip);
            }
        }

        for ip in &sp.load_balancer_ips {
            let entry = ipset::ip_port(ip, proto, svc.port);
            b.add(ipset::LOAD_BALANCER, entry.clone());
            if svc.external_policy_local {
                b.add(ipset::LOAD_BALANCER_LOCAL, entry.clone());
            }
            if let Some(fw) = &sp.firewall {
                b.add(ipset::LOAD_BALANCER_FW, entry);
                for cidr in &fw.allowed {
                    b.add(
                        ipset::LOAD_BALANCER_SOURCE_CIDR,
                        ipset::ip_port_extra(ip, proto, svc.port, &cidr.to_string()),
                    );
                }
                if fw.allow_from_node {
                    b.add(
                        ipset::LOAD_BALANCER_SOURCE_IP,
                        ipset::ip_port_extra(ip, proto, svc.port, &ip.to_string()),
                    );
                } else {
                    no_node_access.push(NoNodeAccess {
                        ip: *ip,
                        proto,
                        port: svc.port,
                    });
                }
            }
            b.sync_service(sp, *ip, svc.port, true);
            if !host.contains(ip) {
                bound.insert(*ip);
            }
        }

        if let Some(np) = sp.node_port {
            if node_ips.is_empty() {
                // Upstream skips the rest of this service, health check port included.
                continue;
            }
            let (set, local_set, entries): (&'static str, &'static str, Vec<String>) =
                match name.protocol {
                    crate::model::Protocol::Tcp => (
                        ipset::NODE_PORT_TCP,
                        ipset::NODE_PORT_LOCAL_TCP,
                        vec![np.to_string()],
                    ),
                    crate::model::Protocol::Udp => (
                        ipset::NODE_PORT_UDP,
                        ipset::NODE_PORT_LOCAL_UDP,
                        vec![np.to_string()],
                    ),
                    crate::model::Protocol::Sctp => (
                        ipset::NODE_PORT_SCTP,
                        ipset::NODE_PORT_LOCAL_SCTP,
                        node_ips
                            .iter()
                            .map(|ip| ipset::ip_port(ip, proto, np))
                            .collect(),
                    ),
                };
            for e in &entries {
                b.add(set, e.clone());
                if svc.external_policy_local {
                    b.add(local_set, e.clone());
                }
            }
            for ip in &node_ips {
                b.sync_service(sp, *ip, np, true);
            }
        }

        if let Some(hc) = sp.health_check {
            b.add(ipset::HEALTH_CHECK_NODE_PORT, hc.node_port.to_string());
        }
    }

    for ip in &bound {
        b.add(ipset::IPVS_IPS, ip.to_string());
    }

    let mark = cfg.masquerade_mark();
    let set_refs: BTreeMap<&str, &IpSetSpec> = b.sets.iter().map(|(k, v)| (*k, v)).collect();
    let text = rules::write_rules(
        &set_refs,
        &no_node_access,
        &RuleParams {
            cluster_ip_masquerade: crate::model::plan::cluster_ip_masquerade(&plan_options(cfg)),
            mark: &mark,
            local_detector: &cfg.local_detector,
            random_fully: cfg.random_fully,
            family: cfg.family,
        },
    );

    let mut sets = b.sets;
    let ipsets: Vec<IpSetSpec> = ipset::SET_INFO
        .iter()
        .filter_map(|(n, _, _)| sets.remove(n))
        .collect();

    IpvsDesired {
        services: b.services.into_values().collect(),
        bound_addrs: bound,
        ipsets,
        iptables_restore: text.text,
        filter_rules: text.filter_rules,
        nat_rules: text.nat_rules,
        no_local_endpoints_internal: b.no_local_internal.len(),
        no_local_endpoints_external: b.no_local_external.len(),
        health_checks: plan.health_checks,
    }
}

/// libipvs `ipvs_cmp_services`/`ipvs_cmp_dests` address order: the 32-bit difference taken
/// as a signed int (so 192.168.x sorts before 10.x, as `ipvsadm` prints them).
fn cmp_addr(a: &IpAddr, b: &IpAddr) -> Ordering {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let d = u32::from(*a).wrapping_sub(u32::from(*b)) as i32;
            d.cmp(&0)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let (a, b) = (a.octets(), b.octets());
            for i in 0..4 {
                let wa = u32::from_be_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
                let wb = u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
                let d = wa.wrapping_sub(wb) as i32;
                if d != 0 {
                    return d.cmp(&0);
                }
            }
            Ordering::Equal
        }
        (IpAddr::V4(_), IpAddr::V6(_)) => Ordering::Less,
        (IpAddr::V6(_), IpAddr::V4(_)) => Ordering::Greater,
    }
}

fn cmp_vs(a: &VirtualService, b: &VirtualService) -> Ordering {
    a.fwmark
        .cmp(&b.fwmark)
        .then(a.address_family.as_u16().cmp(&b.address_family.as_u16()))
        .then(a.protocol.as_u16().cmp(&b.protocol.as_u16()))
        .then_with(|| cmp_addr(&a.address, &b.address))
        .then(a.port.cmp(&b.port))
}

fn cmp_rs(a: &RealServer, b: &RealServer) -> Ordering {
    cmp_addr(&a.address, &b.address).then(a.port.cmp(&b.port))
}

/// Top-down merge sort as glibc's `qsort` (msort) does it, so a comparator that is not a
/// total order (libipvs' wrapping address difference) gives the same order as `ipvsadm`
/// and never panics.
fn msort<T: Clone>(v: &mut [T], cmp: &dyn Fn(&T, &T) -> Ordering) {
    let n = v.len();
    if n <= 1 {
        return;
    }
    let n1 = n / 2;
    msort(&mut v[..n1], cmp);
    msort(&mut v[n1..], cmp);
    let mut out = Vec::with_capacity(n);
    let (mut i, mut j) = (0, n1);
    while i < n1 && j < n {
        if cmp(&v[i], &v[j]) != Ordering::Greater {
            out.push(v[i].clone());
            i += 1;
        } else {
            out.push(v[j].clone());
            j += 1;
        }
    }
    out.extend_from_slice(&v[i..n1]);
    out.extend_from_slice(&v[j..n]);
    v.clone_from_slice(&out);
}

fn addr_port(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn sched_flags(vs: &VirtualService) -> String {
    let f = vs.flags.effective();
    let names: [(u32, &str); 3] = match vs.scheduler.as_str() {
        "sh" => [
            (IP_VS_SVC_F_SCHED1, "sh-fallback"),
            (IP_VS_SVC_F_SCHED2, "sh-port"),
            (0, ""),
        ],
        "mh" => [
            (IP_VS_SVC_F_SCHED1, "mh-fallback"),
            (IP_VS_SVC_F_SCHED2, "mh-port"),
            (0, ""),
        ],
        _ => [
            (IP_VS_SVC_F_SCHED1, "flag-1"),
            (IP_VS_SVC_F_SCHED2, "flag-2"),
            (IP_VS_SVC_F_SCHED3, "flag-3"),
        ],
    };
    names
        .iter()
        .filter(|(bit, _)| *bit != 0 && f & bit != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

/// The virtual servers in `ipvsadm -Sn` format (`-A -t VIP:PORT -s rr [-p T] [-b F]`, then
/// `-a -t VIP:PORT -r RIP:PORT -m -w 1` per real server), in `ipvsadm`'s sort order.
pub fn ipvsadm_save(d: &IpvsDesired) -> String {
    let mut services: Vec<&DesiredService> = d.services.iter().collect();
    msort(
        &mut services,
        &|a: &&DesiredService, b: &&DesiredService| cmp_vs(&a.vs, &b.vs),
    );
    let mut out = String::new();
    for s in services {
        let vs = &s.vs;
        let svc = if vs.fwmark != 0 {
            match vs.address {
                IpAddr::V6(_) => format!("-f {} -6", vs.fwmark),
                IpAddr::V4(_) => format!("-f {}", vs.fwmark),
            }
        } else {
            let opt = match vs.protocol {
                IpvsProtocol::Tcp => "-t",
                IpvsProtocol::Udp => "-u",
                IpvsProtocol::Sctp => "--sctp-service",
                IpvsProtocol::Other(_) => "--xxx-service",
            };
            format!("{opt} {}", addr_port(&vs.address, vs.port))
        };
        out.push_str(&format!("-A {svc} -s {}", vs.scheduler));
        let flags = vs.flags.effective();
        if flags & IP_VS_SVC_F_PERSISTENT != 0 {
            out.push_str(&format!(" -p {}", vs.timeout));
            match vs.address {
                IpAddr::V4(_) if vs.netmask != u32::MAX => {
                    out.push_str(&format!(
                        " -M {}",
                        std::net::Ipv4Addr::from(u32::from_be(vs.netmask))
                    ));
                }
                IpAddr::V6(_) if vs.netmask != 128 => out.push_str(&format!(" -M {}", vs.netmask)),
                _ => {}
            }
        }
        if flags & crate::kernel::ipvs::codec::IP_VS_SVC_F_ONEPACKET != 0 {
            out.push_str(" -o");
        }
        if flags & (IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_SCHED3) != 0 {
            out.push_str(&format!(" -b {}", sched_flags(vs)));
        }
        out.push('\n');
        let mut dests: Vec<&RealServer> = s.dests.iter().collect();
        msort(&mut dests, &|a: &&RealServer, b: &&RealServer| cmp_rs(a, b));
        for rs in dests {
            let fwd = match rs.forward {
                ForwardMethod::Masq => "-m",
                ForwardMethod::Tunnel => "-i",
                ForwardMethod::Local | ForwardMethod::DirectRoute | ForwardMethod::Bypass => "-g",
            };
            out.push_str(&format!(
                "-a {svc} -r {} {fwd} -w {}\n",
                addr_port(&rs.address, rs.port),
                rs.weight
            ));
        }
    }
    out
}

/// The ipsets in `ipset save` format.
pub fn ipset_save(d: &IpvsDesired) -> String {
    ipset::save(&d.ipsets)
}

/// The builtin-chain jumps IPVS mode ensures (upstream `iptablesJumpChain`).
pub fn ipvs_jump_rules() -> Vec<JumpRule> {
    rules::ipvs_jump_rules()
}

/// What the plan needs of the IPVS settings.
fn plan_options(cfg: &IpvsConfig) -> PlanOptions {
    PlanOptions {
        masquerade_all: cfg.masquerade_all,
        detects_local_pods: cfg.local_detector.is_implemented(),
        primary_node_ip: cfg.primary_node_ip,
    }
}
