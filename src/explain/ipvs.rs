//! `explain --mode ipvs`: which IPVS virtual server takes a new connection and which real
//! servers it may reach, read from the kernel's IPVS table (generic netlink) or a render.

use std::fmt::Write as _;

use super::{ExplainArgs, ExplainError, Packet};
use crate::kernel::ipvs::codec::{IP_VS_SVC_F_PERSISTENT, Protocol as IpvsProtocol};
use crate::kernel::ipvs::{IpvsClient, RealServer, VirtualService};
use crate::model::Protocol;

/// Virtual servers with their real servers, and where they came from.
#[derive(Debug, Clone)]
pub struct IpvsTable {
    /// Where the table came from, for the header.
    pub origin: String,
    /// Virtual servers and their real servers.
    pub services: Vec<(VirtualService, Vec<RealServer>)>,
}

fn ipvs_protocol(p: Protocol) -> IpvsProtocol {
    match p {
        Protocol::Tcp => IpvsProtocol::Tcp,
        Protocol::Udp => IpvsProtocol::Udp,
        Protocol::Sctp => IpvsProtocol::Sctp,
    }
}

/// Reads the kernel's IPVS table (only the matching virtual server's real servers).
pub async fn table_from_kernel(packet: &Packet) -> Result<IpvsTable, ExplainError> {
    let err = |e: crate::kernel::ipvs::IpvsError| ExplainError::Ipvs(e.to_string());
    let mut client = IpvsClient::connect().await.map_err(err)?;
    let mut services = Vec::new();
    for vs in client.services().await.map_err(err)? {
        let wanted = vs.fwmark == 0
            && vs.address == packet.destination
            && vs.port == packet.port
            && vs.protocol == ipvs_protocol(packet.protocol);
        let dests = if wanted {
            client.destinations(&vs).await.map_err(err)?
        } else {
            Vec::new()
        };
        services.push((vs, dests));
    }
    Ok(IpvsTable {
        origin: "the kernel's IPVS table".to_string(),
        services,
    })
}

/// The IPVS table `render --proxy-mode ipvs` would program for `args`.
pub fn table_from_render(
    args: &ExplainArgs,
    warnings: &mut Vec<String>,
) -> Result<IpvsTable, ExplainError> {
    let family = crate::model::IpFamily::of(&args.packet.destination);
    let model = crate::render::model(&args.render, args.explicit_hostname, family, warnings)?;
    let cfg = crate::backend::ipvs::render::ipvs_config(
        &args.render.options,
        &model.node,
        model.node.ips.clone(),
    );
    let desired = crate::backend::ipvs::render::render(&model, &cfg);
    let files: Vec<String> = args
        .render
        .objects
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    Ok(IpvsTable {
        origin: format!("render of {} (IPVS mode)", files.join(", ")),
        services: desired
            .services
            .into_iter()
            .map(|d| (d.vs, d.dests))
            .collect(),
    })
}

/// Explains `packet` against `table`.
pub fn explain(table: &IpvsTable, packet: &Packet) -> String {
    let mut out = String::new();
    let proto = packet.protocol.api();
    let from = packet
        .source
        .map(|s| format!("{s} -> "))
        .unwrap_or_default();
    let dst = super::endpoint_string(packet.destination, packet.port);
    let _ = writeln!(out, "Connection: {proto} {from}{dst}");
    let _ = writeln!(out, "Rules:      {}", table.origin);
    let _ = writeln!(out);
    let found = table.services.iter().find(|(vs, _)| {
        vs.fwmark == 0
            && vs.address == packet.destination
            && vs.port == packet.port
            && vs.protocol == ipvs_protocol(packet.protocol)
    });
    let Some((vs, dests)) = found else {
        let _ = writeln!(
            out,
            "Result: no IPVS virtual server for {proto} {dst}: IPVS does not load-balance this \
             connection (it is routed or delivered as addressed)"
        );
        return out;
    };
    let mut line = format!("Virtual server: {proto} {dst}  scheduler {}", vs.scheduler);
    if vs.flags.flags & IP_VS_SVC_F_PERSISTENT != 0 {
        let _ = write!(
            line,
            ", persistent for {} s (ClientIP session affinity)",
            vs.timeout
        );
    }
    let _ = writeln!(out, "{line}");
    let live: Vec<&RealServer> = dests.iter().filter(|d| d.weight > 0).collect();
    let total: i64 = live.iter().map(|d| i64::from(d.weight)).sum();
    let _ = writeln!(
        out,
        "Real servers ({}), share of new connections by weight:",
        dests.len()
    );
    for d in dests {
        let addr = super::endpoint_string(d.address, d.port);
        let conns = format!("active {}, inactive {}", d.active_conns, d.inactive_conns);
        if d.weight > 0 {
            let share = 100.0 * f64::from(d.weight) / total as f64;
            let _ = writeln!(
                out,
                "  {share:6.2}%  {addr}  weight {}  ({conns})",
                d.weight
            );
        } else {
            let _ = writeln!(
                out,
                "      --  {addr}  weight 0: draining, no new connections (graceful termination; {conns})"
            );
        }
    }
    let _ = writeln!(out);
    if live.is_empty() {
        let _ = writeln!(
            out,
            "Result: REJECTED: the virtual server has no real server with weight > 0, so IPVS \
             refuses new connections (the client gets an ICMP error: connection refused)"
        );
    } else {
        let _ = writeln!(
            out,
            "Result: NAT by IPVS to one of {} real servers, chosen by the {} scheduler \
             (masquerading is decided by the iptables nat rules on the KUBE-* ipsets)",
            live.len(),
            vs.scheduler
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(to: &str) -> ExplainArgs {
        let a: Vec<String> = [
            "--mode",
            "ipvs",
            "--to",
            to,
            "--objects",
            "examples/demo-cluster.yaml",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        super::super::parse_explain_args(&a, "node1").unwrap()
    }

    fn run(to: &str) -> String {
        let a = args(to);
        let t = table_from_render(&a, &mut Vec::new()).unwrap();
        explain(&t, &a.packet)
    }

    #[test]
    fn cluster_ip_shares_by_weight() {
        let out = run("10.96.0.10:80");
        assert!(
            out.contains("Virtual server: TCP 10.96.0.10:80  scheduler rr"),
            "{out}"
        );
        for ep in ["10.244.1.11:8080", "10.244.2.12:8080", "10.244.3.13:8080"] {
            assert!(out.contains(&format!(" 33.33%  {ep}  weight 1")), "{out}");
        }
        assert!(
            out.contains("NAT by IPVS to one of 3 real servers"),
            "{out}"
        );
    }

    #[test]
    fn affinity_no_endpoints_and_unknown_destinations() {
        let out = run("10.96.0.80:80");
        assert!(out.contains("persistent for 600 s"), "{out}");
        let out = run("10.96.0.130:80");
        assert!(
            out.contains("Real servers (0)") && out.contains("REJECTED"),
            "{out}"
        );
        let out = run("10.96.0.10:81");
        assert!(
            out.contains("no IPVS virtual server for TCP 10.96.0.10:81"),
            "{out}"
        );
        let out = run("10.96.0.53:53/udp");
        assert!(out.contains("Virtual server: UDP 10.96.0.53:53"), "{out}");
    }

    #[test]
    fn draining_real_servers_get_no_share() {
        let a = args("10.0.0.1:80");
        let mut vs = VirtualService::new("10.0.0.1".parse().unwrap(), IpvsProtocol::Tcp, 80, "wrr");
        vs.flags.flags = 0;
        let table = IpvsTable {
            origin: "test".into(),
            services: vec![(
                vs,
                vec![
                    RealServer::new("10.1.0.1".parse().unwrap(), 80, 3),
                    RealServer::new("10.1.0.2".parse().unwrap(), 80, 1),
                    RealServer::new("10.1.0.3".parse().unwrap(), 80, 0),
                ],
            )],
        };
        let out = explain(&table, &a.packet);
        assert!(out.contains(" 75.00%  10.1.0.1:80  weight 3"), "{out}");
        assert!(out.contains(" 25.00%  10.1.0.2:80  weight 1"), "{out}");
        assert!(out.contains("--  10.1.0.3:80  weight 0: draining"), "{out}");
        assert!(
            out.contains("one of 2 real servers, chosen by the wrr scheduler"),
            "{out}"
        );
    }
}
