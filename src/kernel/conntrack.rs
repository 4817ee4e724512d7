//! Listing and deleting connection-tracking entries: over ctnetlink ([`super::ctnetlink`]),
//! or with the `conntrack` tool where ctnetlink is not available (no `nf_conntrack_netlink`).
//!
//! `conntrack -D` exits with status 1 and "0 flow entries have been deleted" when nothing
//! matched; that is success here (deleting is idempotent).

use std::net::IpAddr;

use super::KernelError;
use super::exec::{Exec, Output};
use crate::model::Protocol;

/// One conntrack entry: the original and the reply direction tuples.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Flow {
    /// Transport protocol.
    pub proto: Protocol,
    /// Original direction source address (the client).
    pub orig_src: IpAddr,
    /// Original direction destination (the address the client used, e.g. a ClusterIP).
    pub orig_dst: IpAddr,
    /// Original direction source port.
    pub orig_sport: u16,
    /// Original direction destination port.
    pub orig_dport: u16,
    /// Reply direction source (after DNAT: the endpoint).
    pub reply_src: IpAddr,
    /// Reply direction destination.
    pub reply_dst: IpAddr,
    /// Reply direction source port.
    pub reply_sport: u16,
    /// Reply direction destination port.
    pub reply_dport: u16,
    /// Conntrack zone (0: the default). Two entries may share their tuples in different
    /// zones, so a delete names the zone too: upstream sends each dumped entry back whole.
    pub zone: u16,
}

/// A handle on the `conntrack` tool, optionally inside a network namespace.
#[derive(Debug, Clone, Default)]
pub struct Conntrack {
    exec: Exec,
}

impl Conntrack {
    /// A handle in this process's network namespace.
    pub fn new() -> Self {
        Conntrack::default()
    }

    /// The same handle, running `conntrack` through `ip netns exec NAME`.
    pub fn with_netns(mut self, name: impl AsRef<str>) -> Self {
        self.exec = Exec::new(Some(name.as_ref()));
        self
    }

    fn netlink(&self) -> super::ctnetlink::CtNetlink {
        super::ctnetlink::CtNetlink::new(self.exec.netns())
    }

    /// All entries of `proto`, both families (`conntrack -L -p PROTO`).
    pub async fn list(&self, proto: Protocol) -> Result<Vec<Flow>, KernelError> {
        match self.netlink().list(proto).await {
            Ok(flows) => return Ok(flows),
            Err(e) => tool_fallback(&e),
        }
        self.list_with_tool(proto).await
    }

    /// [`Conntrack::list`] with the `conntrack` tool.
    pub async fn list_with_tool(&self, proto: Protocol) -> Result<Vec<Flow>, KernelError> {
        let args = vec![
            "-L".to_string(),
            "-p".to_string(),
            proto.lower().to_string(),
        ];
        let out = self.exec.run("conntrack", &args, None).await?;
        let text = out.into_stdout()?;
        Ok(parse_flows(&text)
            .into_iter()
            .filter(|f| f.proto == proto)
            .collect())
    }

    /// Deletes each of `flows` as listed (the entry with its original tuple: the kernel
    /// finds an entry by either tuple, and two entries never share one), over ctnetlink in as
    /// few sends as the batch size allows. Returns the number of entries deleted (one already
    /// gone counts 0).
    pub async fn delete_flows(&self, flows: &[Flow]) -> Result<u64, KernelError> {
        match self.netlink().delete(flows).await {
            Ok(n) => return Ok(n),
            Err(e) => tool_fallback(&e),
        }
        let mut deleted = 0;
        for flow in flows {
            deleted += self.delete_with_tool(flow).await?;
        }
        Ok(deleted)
    }

    /// Deletes exactly `flow` (all eight tuple fields must match: an entry with its original
    /// tuple but another reply stays). Returns the number of entries deleted (0 if it was
    /// already gone).
    pub async fn delete(&self, flow: &Flow) -> Result<u64, KernelError> {
        match self.netlink().list(flow.proto).await {
            Ok(listed) if listed.contains(flow) => {
                self.delete_flows(std::slice::from_ref(flow)).await
            }
            Ok(_) => Ok(0),
            Err(e) => {
                tool_fallback(&e);
                self.delete_with_tool(flow).await
            }
        }
    }

    /// Deletes exactly `flow` with the `conntrack` tool (all eight tuple fields and the zone
    /// must match).
    pub async fn delete_with_tool(&self, flow: &Flow) -> Result<u64, KernelError> {
        let mut args = base_args(flow.proto, flow.orig_dst);
        for (opt, val) in [
            ("--orig-src", flow.orig_src.to_string()),
            ("--orig-dst", flow.orig_dst.to_string()),
            ("--orig-port-src", flow.orig_sport.to_string()),
            ("--orig-port-dst", flow.orig_dport.to_string()),
            ("--reply-src", flow.reply_src.to_string()),
            ("--reply-dst", flow.reply_dst.to_string()),
            ("--reply-port-src", flow.reply_sport.to_string()),
            ("--reply-port-dst", flow.reply_dport.to_string()),
            ("--zone", flow.zone.to_string()),
        ] {
            args.push(opt.to_string());
            args.push(val);
        }
        self.run_delete(args).await
    }

    /// Deletes every `proto` entry whose original destination is `ip:port` (for instance
    /// all flows to a ClusterIP port). Returns the number deleted.
    pub async fn clear_for_dest(
        &self,
        proto: Protocol,
        ip: IpAddr,
        port: u16,
    ) -> Result<u64, KernelError> {
        let mut args = base_args(proto, ip);
        args.extend([
            "--orig-dst".to_string(),
            ip.to_string(),
            "--orig-port-dst".to_string(),
            port.to_string(),
        ]);
        self.run_delete(args).await
    }

    /// Deletes every `proto` entry to `orig_dst:orig_dport` that was DNATed to `endpoint`
    /// (reply source = endpoint), e.g. flows to a service port still pinned to an endpoint
    /// that went away. Returns the number deleted.
    pub async fn clear_for_nat(
        &self,
        proto: Protocol,
        orig_dst: IpAddr,
        orig_dport: u16,
        endpoint: IpAddr,
    ) -> Result<u64, KernelError> {
        let mut args = base_args(proto, orig_dst);
        args.extend([
            "--orig-dst".to_string(),
            orig_dst.to_string(),
            "--orig-port-dst".to_string(),
            orig_dport.to_string(),
            "--reply-src".to_string(),
            endpoint.to_string(),
        ]);
        self.run_delete(args).await
    }

    async fn run_delete(&self, args: Vec<String>) -> Result<u64, KernelError> {
        let out = self.exec.run("conntrack", &args, None).await?;
        deleted_count(out)
    }
}

/// Logs (once per process, at warning level) that ctnetlink failed and the tool is used.
fn tool_fallback(e: &KernelError) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(error = %e, "ctnetlink unavailable, using the conntrack tool");
    });
    tracing::debug!(error = %e, "ctnetlink failed, using the conntrack tool");
}

fn base_args(proto: Protocol, any_addr: IpAddr) -> Vec<String> {
    let family = if any_addr.is_ipv6() { "ipv6" } else { "ipv4" };
    ["-D", "-f", family, "-p", proto.lower()]
        .map(String::from)
        .to_vec()
}

/// Interprets a `conntrack -D` run: "N flow entries have been deleted" on stderr; exit 1
/// with N = 0 is success.
fn deleted_count(out: Output) -> Result<u64, KernelError> {
    let count = parse_deleted(&out.stderr);
    match (out.status, count) {
        (Some(0), Some(n)) => Ok(n),
        (Some(0), None) => Ok(0),
        (Some(1), Some(0)) => Ok(0),
        _ => Err(out.into_error()),
    }
}

fn parse_deleted(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let before = l.split(" flow entries have been deleted").next()?;
        if before.len() == l.len() {
            return None;
        }
        before.rsplit(' ').next()?.parse().ok()
    })
}

/// Parses `conntrack -L` output (default or `-o extended` format); lines that are not
/// TCP/UDP/SCTP entries with both tuples complete are skipped.
pub fn parse_flows(text: &str) -> Vec<Flow> {
    text.lines().filter_map(parse_flow_line).collect()
}

/// Parses one line such as
/// `udp 17 29 src=10.0.0.1 dst=10.96.0.10 sport=40000 dport=53 [UNREPLIED] src=10.244.1.5 dst=10.0.0.1 sport=53 dport=40000 mark=0 use=1`.
pub fn parse_flow_line(line: &str) -> Option<Flow> {
    let mut words = line.split_whitespace().peekable();
    // `-o extended` prefixes the layer-3 name and number.
    if matches!(words.peek(), Some(&"ipv4") | Some(&"ipv6")) {
        words.next();
        words.next();
    }
    let proto = match words.next()? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return None,
    };
    // Tuples: the first src/dst/sport/dport belong to the original direction, the second
    // set to the reply direction. Anything else but the zone (state, flags, mark...) is ignored.
    let (mut src, mut dst) = (Vec::new(), Vec::new());
    let (mut sport, mut dport) = (Vec::new(), Vec::new());
    let mut zone = 0;
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        match k {
            "src" => src.push(v.parse::<IpAddr>().ok()?),
            "dst" => dst.push(v.parse::<IpAddr>().ok()?),
            "sport" => sport.push(v.parse::<u16>().ok()?),
            "dport" => dport.push(v.parse::<u16>().ok()?),
            "zone" => zone = v.parse::<u16>().ok()?,
            _ => {}
        }
    }
    if [src.len(), dst.len(), sport.len(), dport.len()] != [2; 4] {
        return None;
    }
    Some(Flow {
        proto,
        orig_src: src[0],
        orig_dst: dst[0],
        orig_sport: sport[0],
        orig_dport: dport[0],
        reply_src: src[1],
        reply_dst: dst[1],
        reply_sport: sport[1],
        reply_dport: dport[1],
        zone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::NetNs;
    use crate::kernel::{IpFamily, Iptables, IptablesVariant, RulePosition, Table};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_udp_nat_line() {
        let f = parse_flow_line(
            "udp      17 29 src=10.0.0.1 dst=10.96.0.10 sport=40000 dport=53 [UNREPLIED] \
             src=10.244.1.5 dst=10.0.0.1 sport=5353 dport=40000 mark=0 use=1",
        )
        .unwrap();
        assert_eq!(
            f,
            Flow {
                proto: Protocol::Udp,
                orig_src: ip("10.0.0.1"),
                orig_dst: ip("10.96.0.10"),
                orig_sport: 40000,
                orig_dport: 53,
                reply_src: ip("10.244.1.5"),
                reply_dst: ip("10.0.0.1"),
                reply_sport: 5353,
                reply_dport: 40000,
                zone: 0,
            }
        );
    }

    #[test]
    fn parse_tcp_sctp_ipv6_and_extended() {
        let tcp = parse_flow_line(
            "tcp      6 99 ESTABLISHED src=10.1.1.1 dst=10.2.2.2 sport=1000 dport=2000 \
             src=10.2.2.2 dst=10.1.1.1 sport=2000 dport=1000 [ASSURED] mark=0 use=1",
        )
        .unwrap();
        assert_eq!(
            (tcp.proto, tcp.orig_dport, tcp.reply_sport),
            (Protocol::Tcp, 2000, 2000)
        );
        let sctp = parse_flow_line(
            "sctp     132 99 ESTABLISHED src=10.1.1.1 dst=10.2.2.2 sport=1000 dport=2000 \
             [UNREPLIED] src=10.2.2.3 dst=10.1.1.1 sport=2001 dport=1000 mark=0 use=1",
        )
        .unwrap();
        assert_eq!(sctp.proto, Protocol::Sctp);
        assert_eq!((sctp.reply_src, sctp.reply_sport), (ip("10.2.2.3"), 2001));
        let v6 = parse_flow_line(
            "ipv6     10 udp      17 29 src=fd00:99::1 dst=fd00:99::2 sport=53120 dport=53 \
             [UNREPLIED] src=fd00:99::2 dst=fd00:99::1 sport=53 dport=53120 mark=0 zone=3 use=1",
        )
        .unwrap();
        assert_eq!(v6.orig_src, ip("fd00:99::1"));
        assert_eq!((v6.reply_dport, v6.zone), (53120, 3));
    }

    #[test]
    fn parse_skips_non_port_protocols_and_garbage() {
        let text = "icmp     1 29 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=1 src=10.0.0.2 dst=10.0.0.1 type=0 code=0 id=1 mark=0 use=1\n\
                    udp      17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2\n\
                    udp      17 29 src=bogus dst=10.0.0.2 sport=1 dport=2 src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1\n\
                    conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.\n\
                    udp      17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2 src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1 mark=0 use=1\n";
        let flows = parse_flows(text);
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].orig_dport, 2);
    }

    #[test]
    fn deleted_counts() {
        let out = |status, stderr: &str| Output {
            command: "conntrack -D".into(),
            status: Some(status),
            stdout: String::new(),
            stderr: stderr.into(),
        };
        let ok = "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n";
        assert_eq!(deleted_count(out(0, ok)).unwrap(), 3);
        let none = "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n";
        assert_eq!(deleted_count(out(1, none)).unwrap(), 0);
        // Exit 1 for anything else is an error carrying stderr.
        let err = deleted_count(out(
            1,
            "conntrack v1.4.7: Operation failed: invalid parameters",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("invalid parameters"), "{err}");
        assert!(deleted_count(out(2, none)).is_err());
    }

    // ---- Kernel tests. ----

    /// Conntrack only tracks in a namespace once some rule needs it.
    async fn enable_tracking(ns: &NetNs) {
        let ipt = Iptables::new(IptablesVariant::Nft, IpFamily::V4).with_netns(ns.name());
        let rule: Vec<String> = ["-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"]
            .map(String::from)
            .to_vec();
        ipt.ensure_rule(RulePosition::Append, Table::Filter, "OUTPUT", &rule)
            .await
            .unwrap();
    }

    /// `conntrack -I` a UDP flow `client:cport -> vip:vport`, DNATed to `ep:eport`.
    fn insert_udp(
        ns: &NetNs,
        client: &str,
        cport: u16,
        vip: &str,
        vport: u16,
        ep: &str,
        eport: u16,
    ) {
        ns.exec(
            "conntrack",
            &[
                "-I",
                "-p",
                "udp",
                "-t",
                "120",
                "-s",
                client,
                "-d",
                vip,
                "--sport",
                &cport.to_string(),
                "--dport",
                &vport.to_string(),
                "-r",
                ep,
                "-q",
                client,
                "--reply-port-src",
                &eport.to_string(),
                "--reply-port-dst",
                &cport.to_string(),
            ],
        );
    }

    #[tokio::test]
    async fn kernel_list_and_delete_a_real_udp_flow() {
        let a = NetNs::new();
        let b = NetNs::new();
        a.veth_to(&b, "kprs0", "kprs1", "10.77.0.1/24", "10.77.0.2/24");
        enable_tracking(&a).await;
        let sport = a.run_inside(|| {
            let sock = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
            sock.send_to(b"hello", "10.77.0.2:5353").unwrap();
            sock.local_addr().unwrap().port()
        });

        let ct = Conntrack::new().with_netns(a.name());
        let flows = ct.list(Protocol::Udp).await.unwrap();
        let expected = Flow {
            proto: Protocol::Udp,
            orig_src: ip("10.77.0.1"),
            orig_dst: ip("10.77.0.2"),
            orig_sport: sport,
            orig_dport: 5353,
            reply_src: ip("10.77.0.2"),
            reply_dst: ip("10.77.0.1"),
            reply_sport: 5353,
            reply_dport: sport,
            zone: 0,
        };
        assert!(flows.contains(&expected), "{flows:?}");
        assert!(ct.list(Protocol::Tcp).await.unwrap().is_empty());
        // The host's table is a different one.
        assert!(
            !Conntrack::new()
                .list(Protocol::Udp)
                .await
                .unwrap()
                .contains(&expected)
        );

        // A flow that differs only in the reply source is not deleted.
        let other = Flow {
            reply_src: ip("10.77.0.9"),
            ..expected.clone()
        };
        assert_eq!(ct.delete(&other).await.unwrap(), 0);
        assert!(ct.list(Protocol::Udp).await.unwrap().contains(&expected));

        assert_eq!(ct.delete(&expected).await.unwrap(), 1);
        assert!(!ct.list(Protocol::Udp).await.unwrap().contains(&expected));
        assert_eq!(ct.delete(&expected).await.unwrap(), 0, "idempotent");
    }

    #[tokio::test]
    async fn kernel_clear_for_nat_and_dest_are_selective() {
        let ns = NetNs::new();
        let vip = "10.96.0.10";
        insert_udp(&ns, "10.0.0.1", 40001, vip, 53, "10.244.0.5", 5353);
        insert_udp(&ns, "10.0.0.1", 40002, vip, 53, "10.244.0.6", 5353);
        insert_udp(&ns, "10.0.0.1", 40003, vip, 54, "10.244.0.5", 5353);
        insert_udp(&ns, "10.0.0.1", 40004, "10.96.0.11", 53, "10.244.0.5", 5353);
        let ct = Conntrack::new().with_netns(ns.name());
        let sports = |flows: Vec<Flow>| {
            let mut v: Vec<u16> = flows.iter().map(|f| f.orig_sport).collect();
            v.sort();
            v
        };
        assert_eq!(
            sports(ct.list(Protocol::Udp).await.unwrap()),
            [40001, 40002, 40003, 40004]
        );

        // Only the flow to vip:53 pinned to 10.244.0.5.
        let n = ct
            .clear_for_nat(Protocol::Udp, ip(vip), 53, ip("10.244.0.5"))
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            sports(ct.list(Protocol::Udp).await.unwrap()),
            [40002, 40003, 40004]
        );
        // Wrong protocol: nothing.
        assert_eq!(
            ct.clear_for_dest(Protocol::Sctp, ip(vip), 53)
                .await
                .unwrap(),
            0
        );
        // Every flow to vip:53, whatever endpoint; not vip:54, not the other VIP.
        assert_eq!(
            ct.clear_for_dest(Protocol::Udp, ip(vip), 53).await.unwrap(),
            1
        );
        assert_eq!(
            sports(ct.list(Protocol::Udp).await.unwrap()),
            [40003, 40004]
        );
        assert_eq!(
            ct.clear_for_dest(Protocol::Udp, ip(vip), 53).await.unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn kernel_sctp_and_ipv6_flows() {
        let ns = NetNs::new();
        ns.exec(
            "conntrack",
            &[
                "-I",
                "-p",
                "sctp",
                "-t",
                "120",
                "--state",
                "ESTABLISHED",
                "--orig-vtag",
                "1",
                "--reply-vtag",
                "2",
                "-s",
                "10.0.0.1",
                "-d",
                "10.96.0.20",
                "--sport",
                "1000",
                "--dport",
                "9000",
                "-r",
                "10.244.0.7",
                "-q",
                "10.0.0.1",
                "--reply-port-src",
                "9001",
                "--reply-port-dst",
                "1000",
            ],
        );
        ns.exec(
            "conntrack",
            &[
                "-I",
                "-p",
                "udp",
                "-t",
                "120",
                "-s",
                "fd00::1",
                "-d",
                "fd00:96::a",
                "--sport",
                "1000",
                "--dport",
                "53",
                "-r",
                "fd00:244::5",
                "-q",
                "fd00::1",
                "--reply-port-src",
                "53",
                "--reply-port-dst",
                "1000",
            ],
        );
        let ct = Conntrack::new().with_netns(ns.name());
        let sctp = ct.list(Protocol::Sctp).await.unwrap();
        assert_eq!(sctp.len(), 1, "{sctp:?}");
        assert_eq!(
            (sctp[0].reply_src, sctp[0].reply_sport),
            (ip("10.244.0.7"), 9001)
        );
        assert_eq!(ct.delete(&sctp[0]).await.unwrap(), 1);
        assert!(ct.list(Protocol::Sctp).await.unwrap().is_empty());

        let udp = ct.list(Protocol::Udp).await.unwrap();
        assert_eq!(udp.len(), 1, "{udp:?}");
        assert_eq!(udp[0].orig_dst, ip("fd00:96::a"));
        let n = ct
            .clear_for_nat(Protocol::Udp, ip("fd00:96::a"), 53, ip("fd00:244::5"))
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert!(ct.list(Protocol::Udp).await.unwrap().is_empty());
    }
}
