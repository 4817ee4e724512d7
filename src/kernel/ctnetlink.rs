//! Listing and deleting conntrack entries over ctnetlink (`NETLINK_NETFILTER`, subsystem
//! `NFNL_SUBSYS_CTNETLINK`), the interface the `conntrack` tool itself uses: no process per
//! listing or deletion.
//!
//! The codec is the small part of `linux/netfilter/nfnetlink_conntrack.h` the stale-flow
//! cleanup needs: an `IPCTNL_MSG_CT_GET` dump per address family, filtered in the kernel by
//! protocol (`CTA_FILTER`, Linux 5.9+; older kernels ignore it and the protocol is checked
//! here as well), and `IPCTNL_MSG_CT_DELETE` by original tuple, many to one `send`.

use std::io;
use std::net::IpAddr;

use netlink_sys::{AsyncSocketExt, TokioSocket};

use super::KernelError;
use super::conntrack::Flow;
use super::nfnl::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attr, attrs, error_code,
    message, messages, nested,
};
use crate::model::Protocol;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
/// `CTA_FILTER_FLAG(CTA_PROTO_NUM)`: match the original tuple's protocol only.
const FILTER_FLAG_PROTO_NUM: u32 = 1 << 3;

const ENOENT: i32 = 2;

/// Deletions per `send`: their acks (an error ack echoes its request, about 100 bytes) stay
/// far below the socket's default receive buffer.
pub const DELETES_PER_SEND: usize = 256;

/// A ctnetlink handle, optionally inside a network namespace (`/run/netns/NAME`). Each call
/// opens its own socket (a system call, next to the dump or the deletions).
#[derive(Debug, Clone, Default)]
pub struct CtNetlink {
    netns: Option<String>,
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn protocol_of(n: u8) -> Option<Protocol> {
    match n {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

fn net_error(op: &str, source: io::Error) -> KernelError {
    KernelError::Netlink {
        op: format!("ctnetlink: {op}"),
        source,
    }
}

impl CtNetlink {
    /// A handle in `netns` (`None`: this process's namespace).
    pub fn new(netns: Option<&str>) -> Self {
        CtNetlink {
            netns: netns.map(str::to_string),
        }
    }

    async fn socket(&self, op: &str) -> Result<TokioSocket, KernelError> {
        super::nfnl::open(self.netns.as_deref())
            .await
            .map_err(|e| net_error(op, e))
    }

    /// Every `proto` entry of both address families.
    pub async fn list(&self, proto: Protocol) -> Result<Vec<Flow>, KernelError> {
        let op = format!("listing {} flows", proto.lower());
        let socket = self.socket(&op).await?;
        let mut flows = Vec::new();
        for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
            socket
                .send(&dump_request(seq, family, proto))
                .await
                .map_err(|e| net_error(&op, e))?;
            loop {
                let (datagram, _) = socket
                    .recv_from_full()
                    .await
                    .map_err(|e| net_error(&op, e))?;
                match parse_dump(&datagram, proto, &mut flows) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(errno) => return Err(net_error(&op, io::Error::from_raw_os_error(errno))),
                }
            }
        }
        Ok(flows)
    }

    /// Deletes each flow by its original tuple; returns how many were deleted (one already
    /// gone counts 0). Other refusals are an error after every deletion was tried.
    pub async fn delete(&self, flows: &[Flow]) -> Result<u64, KernelError> {
        let op = "deleting flows";
        if flows.is_empty() {
            return Ok(0);
        }
        let socket = self.socket(op).await?;
        let mut deleted = 0;
        let mut first_error = None;
        for chunk in flows.chunks(DELETES_PER_SEND) {
            let mut buf = Vec::with_capacity(chunk.len() * 96);
            for (seq, flow) in (1u32..).zip(chunk) {
                delete_request(&mut buf, seq, flow);
            }
            socket.send(&buf).await.map_err(|e| net_error(op, e))?;
            let mut acks = Vec::with_capacity(chunk.len());
            while acks.len() < chunk.len() {
                let (datagram, _) = socket
                    .recv_from_full()
                    .await
                    .map_err(|e| net_error(op, e))?;
                acks.extend(parse_acks(&datagram));
            }
            for errno in acks {
                match errno {
                    0 => deleted += 1,
                    ENOENT => {}
                    e => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        match first_error {
            Some(errno) => Err(net_error(op, io::Error::from_raw_os_error(errno))),
            None => Ok(deleted),
        }
    }
}

/// A dump of `family`'s `proto` entries.
fn dump_request(seq: u32, family: u8, proto: Protocol) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    message(
        &mut buf,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        |b| {
            nested(b, CTA_TUPLE_ORIG, |b| {
                nested(b, CTA_TUPLE_PROTO, |b| {
                    attr(b, CTA_PROTO_NUM, &[proto_number(proto)])
                })
            });
            nested(b, CTA_FILTER, |b| {
                attr(
                    b,
                    CTA_FILTER_ORIG_FLAGS,
                    &FILTER_FLAG_PROTO_NUM.to_ne_bytes(),
                );
                attr(b, CTA_FILTER_REPLY_FLAGS, &0u32.to_ne_bytes());
            });
        },
    );
    buf
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Appends the deletion of `flow` by its original tuple and zone, acknowledged.
fn delete_request(buf: &mut Vec<u8>, seq: u32, flow: &Flow) {
    let (family, src, dst) = match flow.orig_src {
        IpAddr::V4(_) => (AF_INET, CTA_IP_V4_SRC, CTA_IP_V4_DST),
        IpAddr::V6(_) => (AF_INET6, CTA_IP_V6_SRC, CTA_IP_V6_DST),
    };
    message(
        buf,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
        |b| {
            nested(b, CTA_TUPLE_ORIG, |b| {
                nested(b, CTA_TUPLE_IP, |b| {
                    attr(b, src, &ip_bytes(&flow.orig_src));
                    attr(b, dst, &ip_bytes(&flow.orig_dst));
                });
                nested(b, CTA_TUPLE_PROTO, |b| {
                    attr(b, CTA_PROTO_NUM, &[proto_number(flow.proto)]);
                    attr(b, CTA_PROTO_SRC_PORT, &flow.orig_sport.to_be_bytes());
                    attr(b, CTA_PROTO_DST_PORT, &flow.orig_dport.to_be_bytes());
                });
            });
            // Without it the kernel looks in zone 0 only.
            if flow.zone != 0 {
                attr(b, CTA_ZONE, &flow.zone.to_be_bytes());
            }
        },
    );
}

/// Adds the `proto` entries of one dump datagram to `out`; `Ok(true)` once the dump is done,
/// `Err(errno)` if the kernel refused it.
fn parse_dump(datagram: &[u8], proto: Protocol, out: &mut Vec<Flow>) -> Result<bool, i32> {
    for (kind, body) in messages(datagram) {
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => match error_code(body) {
                0 => {}
                errno => return Err(errno),
            },
            k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                if let Some(flow) = body.get(4..).and_then(parse_flow)
                    && flow.proto == proto
                {
                    out.push(flow);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// The errno of each ack in a datagram.
fn parse_acks(datagram: &[u8]) -> Vec<i32> {
    messages(datagram)
        .filter(|(kind, _)| *kind == NLMSG_ERROR)
        .map(|(_, body)| error_code(body))
        .collect()
}

/// One tuple: (protocol number, source, destination, source port, destination port).
fn parse_tuple(buf: &[u8]) -> Option<(u8, IpAddr, IpAddr, u16, u16)> {
    let (mut src, mut dst, mut num, mut sport, mut dport) = (None, None, None, None, None);
    for (kind, payload) in attrs(buf) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, p) in attrs(payload) {
                    let ip = match p.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(p).ok()?),
                        16 => IpAddr::from(<[u8; 16]>::try_from(p).ok()?),
                        _ => continue,
                    };
                    match k {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, p) in attrs(payload) {
                    match (k, p) {
                        (CTA_PROTO_NUM, [n, ..]) => num = Some(*n),
                        (CTA_PROTO_SRC_PORT, [a, b, ..]) => {
                            sport = Some(u16::from_be_bytes([*a, *b]))
                        }
                        (CTA_PROTO_DST_PORT, [a, b, ..]) => {
                            dport = Some(u16::from_be_bytes([*a, *b]))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((num?, src?, dst?, sport?, dport?))
}

/// A dumped entry (attributes after `nfgenmsg`); `None` without both port tuples.
fn parse_flow(buf: &[u8]) -> Option<Flow> {
    let (mut orig, mut reply, mut zone) = (None, None, 0);
    for (kind, payload) in attrs(buf) {
        match (kind, payload) {
            (CTA_TUPLE_ORIG, _) => orig = parse_tuple(payload),
            (CTA_TUPLE_REPLY, _) => reply = parse_tuple(payload),
            (CTA_ZONE, [hi, lo, ..]) => zone = u16::from_be_bytes([*hi, *lo]),
            _ => {}
        }
    }
    let (num, orig_src, orig_dst, orig_sport, orig_dport) = orig?;
    let (_, reply_src, reply_dst, reply_sport, reply_dport) = reply?;
    Some(Flow {
        proto: protocol_of(num)?,
        orig_src,
        orig_dst,
        orig_sport,
        orig_dport,
        reply_src,
        reply_dst,
        reply_sport,
        reply_dport,
        zone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow {
            proto: Protocol::Udp,
            orig_src: "10.0.0.1".parse().unwrap(),
            orig_dst: "10.96.0.10".parse().unwrap(),
            orig_sport: 40000,
            orig_dport: 53,
            reply_src: "10.244.0.5".parse().unwrap(),
            reply_dst: "10.0.0.1".parse().unwrap(),
            reply_sport: 5353,
            reply_dport: 40000,
            zone: 0,
        }
    }

    /// A dump answer as the kernel writes it: the entry's two tuples, among other attributes
    /// (status, timeout), then `NLMSG_DONE`.
    #[test]
    fn parses_what_it_encodes_and_skips_other_protocols() {
        let f = flow();
        let tuple = |b: &mut Vec<u8>, src: &IpAddr, dst: &IpAddr, sp: u16, dp: u16, n: u8| {
            nested(b, CTA_TUPLE_IP, |b| {
                attr(b, CTA_IP_V4_SRC, &ip_bytes(src));
                attr(b, CTA_IP_V4_DST, &ip_bytes(dst));
            });
            nested(b, CTA_TUPLE_PROTO, |b| {
                attr(b, CTA_PROTO_NUM, &[n]);
                attr(b, CTA_PROTO_SRC_PORT, &sp.to_be_bytes());
                attr(b, CTA_PROTO_DST_PORT, &dp.to_be_bytes());
            });
        };
        let mut dg = Vec::new();
        for n in [17, 6] {
            message(
                &mut dg,
                (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
                0,
                1,
                AF_INET,
                |b| {
                    nested(b, CTA_TUPLE_ORIG, |b| {
                        tuple(b, &f.orig_src, &f.orig_dst, f.orig_sport, f.orig_dport, n)
                    });
                    nested(b, CTA_TUPLE_REPLY, |b| {
                        tuple(
                            b,
                            &f.reply_src,
                            &f.reply_dst,
                            f.reply_sport,
                            f.reply_dport,
                            n,
                        )
                    });
                    attr(b, 3, &0x18u32.to_be_bytes());
                },
            );
        }
        let mut out = Vec::new();
        assert_eq!(parse_dump(&dg, Protocol::Udp, &mut out), Ok(false));
        assert_eq!(out, std::slice::from_ref(&f));
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        assert_eq!(parse_dump(&done, Protocol::Udp, &mut out), Ok(true));
    }

    #[test]
    fn delete_requests_are_batched_and_well_formed() {
        let mut buf = Vec::new();
        delete_request(&mut buf, 1, &flow());
        let one = buf.len();
        delete_request(&mut buf, 2, &flow());
        assert_eq!(buf.len(), 2 * one);
        let msgs: Vec<_> = messages(&buf).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            msgs[0].0,
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        );
        // nfgenmsg family, then the original tuple alone.
        assert_eq!(msgs[0].1[0], AF_INET);
        let top: Vec<u16> = attrs(&msgs[0].1[4..]).map(|(k, _)| k).collect();
        assert_eq!(top, [CTA_TUPLE_ORIG]);
    }

    // ---- Kernel tests. ----

    use crate::kernel::testutil::NetNs;
    use crate::kernel::{Conntrack, IpFamily, Iptables, IptablesVariant, RulePosition, Table};

    /// `n` real UDP flows from `a` (10.78.0.1) to `b` (10.78.0.2:5353, v4) and as many to
    /// `fd78::2` (v6), each from its own source port; the source ports.
    async fn udp_flows(a: &NetNs, n: usize) -> Vec<u16> {
        for family in [IpFamily::V4, IpFamily::V6] {
            // Conntrack only tracks in a namespace once some rule needs it.
            let rule: Vec<String> = ["-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"]
                .map(String::from)
                .to_vec();
            Iptables::new(IptablesVariant::Nft, family)
                .with_netns(a.name())
                .ensure_rule(RulePosition::Append, Table::Filter, "OUTPUT", &rule)
                .await
                .unwrap();
        }
        a.run_inside(move || {
            // Every socket stays open until all have sent, so no two share a source port
            // (and a flow).
            let socks: Vec<(std::net::UdpSocket, &str)> = (0..n)
                .flat_map(|_| {
                    [
                        ("10.78.0.1:0", "10.78.0.2:5353"),
                        ("[fd78::1]:0", "[fd78::2]:5353"),
                    ]
                    .map(|(local, peer)| (std::net::UdpSocket::bind(local).unwrap(), peer))
                })
                .collect();
            for (sock, peer) in &socks {
                sock.send_to(b"x", peer).unwrap();
            }
            socks
                .iter()
                .map(|(sock, _)| sock.local_addr().unwrap().port())
                .collect()
        })
    }

    fn sorted(mut v: Vec<Flow>) -> Vec<Flow> {
        v.sort_by_key(|f| (f.orig_src, f.orig_sport));
        v
    }

    /// Against real flows of both families: the dump lists what `conntrack -L` lists (and
    /// only the asked protocol), and one batched delete of more flows than one send holds
    /// removes exactly those, each counted once.
    #[tokio::test]
    async fn kernel_dump_matches_the_tool_and_batched_deletes_remove_exactly_the_flows() {
        let a = NetNs::new();
        let b = NetNs::new();
        a.veth_to(&b, "kprs0", "kprs1", "10.78.0.1/24", "10.78.0.2/24");
        for (ns, ifname, addr) in [(&a, "kprs0", "fd78::1/64"), (&b, "kprs1", "fd78::2/64")] {
            ns.exec("ip", &["addr", "add", addr, "dev", ifname, "nodad"]);
        }
        let n = DELETES_PER_SEND / 2 + 20;
        let sports = udp_flows(&a, n).await;
        let nl = CtNetlink::new(Some(a.name()));
        let tool = Conntrack::new().with_netns(a.name());

        let listed = sorted(nl.list(Protocol::Udp).await.unwrap());
        assert_eq!(listed.len(), 2 * n);
        assert!(listed.iter().all(|f| sports.contains(&f.orig_sport)));
        assert!(
            listed
                .iter()
                .any(|f| f.orig_dst == "fd78::2".parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            listed,
            sorted(tool.list_with_tool(Protocol::Udp).await.unwrap())
        );
        assert!(nl.list(Protocol::Tcp).await.unwrap().is_empty());
        assert!(nl.list(Protocol::Sctp).await.unwrap().is_empty());

        // All but one, in one call (more than one send's worth).
        let (keep, gone) = listed.split_first().unwrap();
        assert!(gone.len() > DELETES_PER_SEND);
        assert_eq!(nl.delete(gone).await.unwrap(), gone.len() as u64);
        assert_eq!(
            tool.list_with_tool(Protocol::Udp).await.unwrap(),
            std::slice::from_ref(keep)
        );
        assert_eq!(
            nl.delete(gone).await.unwrap(),
            0,
            "already gone: nothing, no error"
        );
    }

    /// Two entries with the same tuples in zones 0 and 7 (a `CT --zone` rule added between
    /// two sends from one socket): the dump tells them apart by zone, as the tool does, and a
    /// delete (netlink or the tool) removes exactly the entry of the zone it names.
    #[tokio::test]
    async fn entries_in_other_zones_are_listed_and_deleted_by_zone() {
        let a = NetNs::new();
        let b = NetNs::new();
        a.veth_to(&b, "kprs0", "kprs1", "10.79.0.1/24", "10.79.0.2/24");
        let ipt = Iptables::new(IptablesVariant::Nft, IpFamily::V4).with_netns(a.name());
        let rule = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        ipt.ensure_rule(
            RulePosition::Append,
            Table::Filter,
            "OUTPUT",
            &rule(&["-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"]),
        )
        .await
        .unwrap();
        let sock = a.run_inside(|| {
            let sock = std::net::UdpSocket::bind("10.79.0.1:0").unwrap();
            sock.send_to(b"x", "10.79.0.2:5353").unwrap();
            sock
        });
        ipt.ensure_rule(
            RulePosition::Append,
            Table::Raw,
            "OUTPUT",
            &rule(&["-p", "udp", "--dport", "5353", "-j", "CT", "--zone", "7"]),
        )
        .await
        .unwrap();
        sock.send_to(b"x", "10.79.0.2:5353").unwrap();

        let nl = CtNetlink::new(Some(a.name()));
        let tool = Conntrack::new().with_netns(a.name());
        let mut listed = nl.list(Protocol::Udp).await.unwrap();
        listed.sort_by_key(|f| f.zone);
        assert_eq!(
            listed.iter().map(|f| f.zone).collect::<Vec<_>>(),
            [0, 7],
            "{listed:?}"
        );
        assert_eq!(
            listed[0],
            Flow {
                zone: 0,
                ..listed[1].clone()
            }
        );
        let mut by_tool = tool.list_with_tool(Protocol::Udp).await.unwrap();
        by_tool.sort_by_key(|f| f.zone);
        assert_eq!(listed, by_tool);

        assert_eq!(nl.delete(&listed[1..]).await.unwrap(), 1);
        assert_eq!(nl.list(Protocol::Udp).await.unwrap(), &listed[..1]);
        assert_eq!(nl.delete(&listed[1..]).await.unwrap(), 0, "already gone");
        // The tool's fallback delete names the zone as well.
        sock.send_to(b"x", "10.79.0.2:5353").unwrap();
        assert_eq!(nl.list(Protocol::Udp).await.unwrap().len(), 2);
        assert_eq!(tool.delete_with_tool(&listed[1]).await.unwrap(), 1);
        assert_eq!(nl.list(Protocol::Udp).await.unwrap(), &listed[..1]);
        assert_eq!(tool.delete_with_tool(&listed[0]).await.unwrap(), 1);
        assert!(nl.list(Protocol::Udp).await.unwrap().is_empty());
    }
}
