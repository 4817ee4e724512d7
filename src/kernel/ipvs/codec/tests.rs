//! Golden-byte tests for the IPVS codec (little-endian hosts).
//!
//! How the goldens were derived: each byte below was written by hand from
//! `include/uapi/linux/ip_vs.h` (attribute ids), `netlink.h`/`genetlink.h` (headers), the
//! kernel's `ip_vs_genl_parse_service`/`_parse_dest` (what a request must carry) and
//! `ip_vs_genl_fill_service`/`_fill_dest`/`_fill_stats[64]` of Linux 6.1 (what a reply
//! carries, in which order), and libipvs's `ipvs_nl_fill_service_attr`/`_dest_attr`
//! (attribute order `ipvsadm` uses, 16-byte addresses). Every attribute is
//! `len(u16) type(u16) value`, padded to 4; `len` excludes the padding. Integers are
//! native-endian (little-endian here) except ports (big-endian `__be16`) and addresses.
//! The family id (0x0024), sequence numbers and port ids are arbitrary.
//!
//! Checked against a real kernel afterwards (see `captured_tests.rs`): `ipvsadm` 1.31's own
//! requests on Linux 6.1 are byte-identical to ours for add/delete service, persistent
//! service, both dump requests, set timeouts and the family lookup (after which nests got
//! `NLA_F_NESTED`, as libnl sets it); its destination requests differ only by tunnel
//! attributes we omit; and the kernel's dump replies have exactly the layout (sizes 320 and
//! 356, attribute order, no stats padding) of the hand-written reply goldens below.

use super::*;

const FAM: u16 = 0x0024;

/// Hex with whitespace and `//` comments ignored.
fn hex(s: &str) -> Vec<u8> {
    let digits: String = s
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| c.is_ascii_hexdigit()))
        .collect();
    assert!(digits.len().is_multiple_of(2), "odd hex digit count");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

fn svc_10_0_0_1_80_rr() -> VirtualService {
    VirtualService::new("10.0.0.1".parse().unwrap(), Protocol::Tcp, 80, "rr")
}

fn rs_10_1_0_5_8080(weight: i32) -> RealServer {
    RealServer::new("10.1.0.5".parse().unwrap(), 8080, weight)
}

/// `ipvsadm -A -t 10.0.0.1:80 -s rr`.
const ADD_SERVICE: &str = "
    68000000 2400 0500 01000000 00000000  // nlmsghdr: len 104, type FAM, REQUEST|ACK, seq 1, pid 0
    01 01 0000                            // genlmsghdr: IPVS_CMD_NEW_SERVICE, version 1
    5400 0180                             // IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED, len 84
      0600 0100 0200 0000                 //   SVC_ATTR_AF = AF_INET (u16 + 2 pad)
      0600 0200 0600 0000                 //   SVC_ATTR_PROTOCOL = IPPROTO_TCP
      1400 0300 0a000001 00000000 00000000 00000000 // SVC_ATTR_ADDR: union nf_inet_addr (16)
      0600 0400 0050 0000                 //   SVC_ATTR_PORT = 80, big-endian
      0700 0600 727200 00                 //   SVC_ATTR_SCHED_NAME = \"rr\\0\" + 1 pad
      0c00 0700 00000000 ffffffff         //   SVC_ATTR_FLAGS {flags 0, mask ~0}
      0800 0800 00000000                  //   SVC_ATTR_TIMEOUT = 0
      0800 0900 ffffffff                  //   SVC_ATTR_NETMASK = 255.255.255.255
";

#[test]
fn add_service_golden() {
    let svc = svc_10_0_0_1_80_rr();
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        IpvsMessage::new_service(&svc),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, hex(ADD_SERVICE));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

/// `ipvsadm -A -t 10.0.0.2:443 -s rr -p 10800` (ClientIP affinity, upstream default timeout).
const ADD_PERSISTENT_SERVICE: &str = "
    68000000 2400 0500 02000000 00000000  // len 104, seq 2
    01 01 0000                            // NEW_SERVICE
    5400 0180
      0600 0100 0200 0000                 // AF_INET
      0600 0200 0600 0000                 // TCP
      1400 0300 0a000002 00000000 00000000 00000000 // 10.0.0.2
      0600 0400 01bb 0000                 // port 443 big-endian
      0700 0600 727200 00                 // \"rr\"
      0c00 0700 01000000 ffffffff         // flags IP_VS_SVC_F_PERSISTENT, mask ~0
      0800 0800 302a0000                  // timeout 10800 = 0x2a30
      0800 0900 ffffffff                  // netmask
";

#[test]
fn add_persistent_service_golden() {
    let mut svc = VirtualService::new("10.0.0.2".parse().unwrap(), Protocol::Tcp, 443, "rr");
    svc.flags = ServiceFlags::exactly(IP_VS_SVC_F_PERSISTENT);
    svc.timeout = 10800;
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_ACK,
        2,
        IpvsMessage::new_service(&svc),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, hex(ADD_PERSISTENT_SERVICE));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

/// The service nest of 10.0.0.1:80 rr, shared by the destination requests below.
const SVC_NEST: &str = "
    5400 0180
      0600 0100 0200 0000
      0600 0200 0600 0000
      1400 0300 0a000001 00000000 00000000 00000000
      0600 0400 0050 0000
      0700 0600 727200 00
      0c00 0700 00000000 ffffffff
      0800 0800 00000000
      0800 0900 ffffffff
";

/// A destination request: nlmsghdr (len 176) + genl `cmd` + SVC_NEST + dest nest.
fn dest_request(cmd: &str, seq: &str, weight: &str) -> Vec<u8> {
    hex(&format!(
        "
        b0000000 2400 0500 {seq} 00000000   // len 176 = 16 + 4 + 84 + 72
        {cmd} 01 0000
        {SVC_NEST}
        4800 0280                             // IPVS_CMD_ATTR_DEST | NLA_F_NESTED, len 72
          0600 0b00 0200 0000                 //   DEST_ATTR_ADDR_FAMILY = AF_INET (first, as libipvs)
          1400 0100 0a010005 00000000 00000000 00000000 // DEST_ATTR_ADDR 10.1.0.5
          0600 0200 1f90 0000                 //   DEST_ATTR_PORT 8080 big-endian
          0800 0300 00000000                  //   DEST_ATTR_FWD_METHOD = IP_VS_CONN_F_MASQ
          0800 0400 {weight}                  //   DEST_ATTR_WEIGHT
          0800 0500 00000000                  //   DEST_ATTR_U_THRESH
          0800 0600 00000000                  //   DEST_ATTR_L_THRESH
        "
    ))
}

#[test]
fn add_dest_golden() {
    // ipvsadm -a -t 10.0.0.1:80 -r 10.1.0.5:8080 -m -w 1
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_ACK,
        3,
        IpvsMessage::new_dest(&svc_10_0_0_1_80_rr(), &rs_10_1_0_5_8080(1)),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, dest_request("05", "03000000", "01000000"));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

#[test]
fn edit_dest_weight_zero_golden() {
    // ipvsadm -e -t 10.0.0.1:80 -r 10.1.0.5:8080 -m -w 0 (graceful termination)
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_ACK,
        4,
        IpvsMessage::set_dest(&svc_10_0_0_1_80_rr(), &rs_10_1_0_5_8080(0)),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, dest_request("06", "04000000", "00000000"));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

#[test]
fn del_dest_golden() {
    // ipvsadm -d -t 10.0.0.1:80 -r 10.1.0.5:8080
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_ACK,
        5,
        IpvsMessage::del_dest(&svc_10_0_0_1_80_rr(), &rs_10_1_0_5_8080(0)),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, dest_request("07", "05000000", "00000000"));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

#[test]
fn del_service_golden() {
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_ACK,
        6,
        IpvsMessage::del_service(&svc_10_0_0_1_80_rr()),
    );
    let bytes = msg.emit().unwrap();
    let want = hex(&format!(
        "68000000 2400 0500 06000000 00000000  03 01 0000 {SVC_NEST}"
    ));
    assert_eq!(bytes, want);
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

/// `ipvsadm -Ln` first asks for all services: GET_SERVICE with NLM_F_DUMP and no attributes.
const DUMP_SERVICES: &str = "
    14000000 2400 0103 07000000 00000000  // len 20, flags REQUEST|DUMP (0x301), seq 7
    04 01 0000                            // IPVS_CMD_GET_SERVICE
";

#[test]
fn dump_services_request_golden() {
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_DUMP,
        7,
        IpvsMessage::dump_services(),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, hex(DUMP_SERVICES));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

/// Then, per service, GET_DEST with NLM_F_DUMP and only the identifying service attributes.
const DUMP_DESTS: &str = "
    44000000 2400 0103 08000000 00000000  // len 68
    08 01 0000                            // IPVS_CMD_GET_DEST
    3000 0180                             // SERVICE nest, len 48: AF, PROTOCOL, ADDR, PORT only
      0600 0100 0200 0000
      0600 0200 0600 0000
      1400 0300 0a000001 00000000 00000000 00000000
      0600 0400 0050 0000
";

#[test]
fn dump_dests_request_golden() {
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_DUMP,
        8,
        IpvsMessage::dump_dests(&svc_10_0_0_1_80_rr()),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, hex(DUMP_DESTS));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

/// `ipvsadm --set 900 120 300`.
const SET_TIMEOUTS: &str = "
    2c000000 2400 0500 09000000 00000000  // len 44
    0c 01 0000                            // IPVS_CMD_SET_CONFIG
    0800 0400 84030000                    // CMD_ATTR_TIMEOUT_TCP 900
    0800 0500 78000000                    // CMD_ATTR_TIMEOUT_TCP_FIN 120
    0800 0600 2c010000                    // CMD_ATTR_TIMEOUT_UDP 300
";

#[test]
fn set_timeouts_golden() {
    let t = Timeouts {
        tcp: 900,
        tcp_fin: 120,
        udp: 300,
    };
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_ACK,
        9,
        IpvsMessage::set_config(t),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, hex(SET_TIMEOUTS));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

#[test]
fn flush_and_get_info_golden() {
    let flush = NetlinkMessage::ipvs(FAM, NLM_F_REQUEST | NLM_F_ACK, 10, IpvsMessage::flush());
    assert_eq!(
        flush.emit().unwrap(),
        hex("14000000 2400 0500 0a000000 00000000 11 01 0000") // IPVS_CMD_FLUSH = 17
    );
    let info = NetlinkMessage::ipvs(FAM, NLM_F_REQUEST, 11, IpvsMessage::get_info());
    assert_eq!(
        info.emit().unwrap(),
        hex("14000000 2400 0100 0b000000 00000000 0f 01 0000") // IPVS_CMD_GET_INFO = 15
    );
}

/// `CTRL_CMD_GETFAMILY` for "IPVS", as `genl_ctrl_resolve` sends it.
const GET_FAMILY: &str = "
    20000000 1000 0500 01000000 00000000  // len 32, GENL_ID_CTRL, REQUEST|ACK
    03 01 0000                            // CTRL_CMD_GETFAMILY, version 1
    0900 0200 49505653 00 000000          // CTRL_ATTR_FAMILY_NAME \"IPVS\\0\" + 3 pad
";

#[test]
fn get_family_golden() {
    let msg = NetlinkMessage::ctrl(
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        CtrlMessage::get_family("IPVS"),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, hex(GET_FAMILY));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
}

#[test]
fn get_family_reply_parses() {
    // ctrl_fill_info order: FAMILY_NAME, FAMILY_ID, VERSION, HDRSIZE, MAXATTR, then OPS nest
    // (truncated here to one op) which we skip.
    let reply = hex("
        4c000000 1000 0000 01000000 00000000
        01 02 0000                            // CTRL_CMD_NEWFAMILY, version 2
        0900 0200 49505653 00 000000          // FAMILY_NAME \"IPVS\"
        0600 0100 2400 0000                   // FAMILY_ID 0x24
        0800 0300 01000000                    // VERSION 1
        0800 0400 00000000                    // HDRSIZE 0
        0800 0500 11000000                    // MAXATTR 17
        0c00 0600 0800 0100 01000000          // OPS (nested, ignored)
    ");
    let msgs = parse(&reply, 0).unwrap();
    assert_eq!(msgs.len(), 1);
    match &msgs[0].payload {
        NetlinkPayload::Ctrl(c) => {
            assert_eq!(c.cmd, CTRL_CMD_NEWFAMILY);
            assert_eq!(c.family_id, Some(0x24));
            assert_eq!(c.family_name.as_deref(), Some("IPVS"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A kernel dump of one service (Linux 6.1 `ip_vs_genl_fill_service`, x86-64: no
/// `IPVS_STATS_ATTR_PAD` because unaligned 64-bit access is efficient there).
const SERVICE_DUMP_REPLY: &str = "
    40010000 2400 0200 07000000 e8030000  // len 320, NLM_F_MULTI, seq 7, pid 1000
    01 01 0000                            // IPVS_CMD_NEW_SERVICE (the dump reply command)
    2c01 0100                             // SERVICE nest, len 300
      0600 0100 0200 0000                 // AF_INET
      0600 0200 0600 0000                 // TCP
      1400 0300 0a000001 00000000 00000000 00000000
      0600 0400 0050 0000                 // port 80
      0700 0600 727200 00                 // \"rr\"
      0c00 0700 02000000 ffffffff         // flags IP_VS_SVC_F_HASHED, mask ~0
      0800 0800 00000000                  // timeout 0
      0800 0900 ffffffff                  // netmask
      5c00 0a00                           // SVC_ATTR_STATS nest, len 92 (ignored)
        0800 0100 05000000                //   CONNS
        0800 0200 0a000000                //   INPKTS
        0800 0300 0b000000                //   OUTPKTS
        0c00 0400 e803000000000000        //   INBYTES (u64)
        0c00 0500 d007000000000000        //   OUTBYTES
        0800 0600 00000000                //   CPS
        0800 0700 00000000                //   INPPS
        0800 0800 00000000                //   OUTPPS
        0800 0900 00000000                //   INBPS
        0800 0a00 00000000                //   OUTBPS
      7c00 0c00                           // SVC_ATTR_STATS64 nest, len 124 (ignored)
        0c00 0100 0500000000000000
        0c00 0200 0a00000000000000
        0c00 0300 0b00000000000000
        0c00 0400 e803000000000000
        0c00 0500 d007000000000000
        0c00 0600 0000000000000000
        0c00 0700 0000000000000000
        0c00 0800 0000000000000000
        0c00 0900 0000000000000000
        0c00 0a00 0000000000000000
";

/// A kernel dump of one destination (Linux 6.1 `ip_vs_genl_fill_dest`), then NLMSG_DONE.
const DEST_DUMP_REPLY: &str = "
    64010000 2400 0200 08000000 e8030000  // len 356, NLM_F_MULTI, seq 8
    05 01 0000                            // IPVS_CMD_NEW_DEST
    5001 0200                             // DEST nest, len 336
      1400 0100 0a010005 00000000 00000000 00000000 // ADDR 10.1.0.5
      0600 0200 1f90 0000                 // PORT 8080
      0800 0300 00000000                  // FWD_METHOD masq
      0800 0400 01000000                  // WEIGHT 1
      0500 0d00 00 000000                 // TUN_TYPE (u8, ignored)
      0600 0e00 0000 0000                 // TUN_PORT (ignored)
      0600 0f00 0000 0000                 // TUN_FLAGS (ignored)
      0800 0500 00000000                  // U_THRESH
      0800 0600 00000000                  // L_THRESH
      0800 0700 03000000                  // ACTIVE_CONNS 3
      0800 0800 05000000                  // INACT_CONNS 5
      0800 0900 00000000                  // PERSIST_CONNS 0
      0600 0b00 0200 0000                 // ADDR_FAMILY AF_INET
      5c00 0a00                           // DEST_ATTR_STATS (ignored)
        0800 0100 05000000
        0800 0200 0a000000
        0800 0300 0b000000
        0c00 0400 e803000000000000
        0c00 0500 d007000000000000
        0800 0600 00000000
        0800 0700 00000000
        0800 0800 00000000
        0800 0900 00000000
        0800 0a00 00000000
      7c00 0c00                           // DEST_ATTR_STATS64 (ignored)
        0c00 0100 0500000000000000
        0c00 0200 0a00000000000000
        0c00 0300 0b00000000000000
        0c00 0400 e803000000000000
        0c00 0500 d007000000000000
        0c00 0600 0000000000000000
        0c00 0700 0000000000000000
        0c00 0800 0000000000000000
        0c00 0900 0000000000000000
        0c00 0a00 0000000000000000
    14000000 0300 0200 08000000 e8030000  // NLMSG_DONE, NLM_F_MULTI
    00000000                              // dump status 0
";

#[test]
fn parse_service_dump_reply() {
    let msgs = parse(&hex(SERVICE_DUMP_REPLY), FAM).unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].header.flags, NLM_F_MULTI);
    let NetlinkPayload::Ipvs(m) = &msgs[0].payload else {
        panic!("not ipvs: {:?}", msgs[0]);
    };
    assert_eq!(m.cmd, IpvsCmd::NewService);
    let mut want = svc_10_0_0_1_80_rr();
    want.flags = ServiceFlags {
        flags: IP_VS_SVC_F_HASHED,
        mask: u32::MAX,
    };
    assert_eq!(m.service.as_ref(), Some(&want));
    assert_eq!(want.flags.effective(), 0);
    // Stats are dropped, so re-encoding gives the request form of the same service.
    let back = parse(
        &NetlinkMessage::ipvs(FAM, 0, 7, m.clone()).emit().unwrap(),
        FAM,
    )
    .unwrap();
    assert_eq!(back[0].payload, NetlinkPayload::Ipvs(m.clone()));
}

#[test]
fn parse_dest_dump_reply_with_done() {
    let msgs = parse(&hex(DEST_DUMP_REPLY), FAM).unwrap();
    assert_eq!(msgs.len(), 2);
    let NetlinkPayload::Ipvs(m) = &msgs[0].payload else {
        panic!("not ipvs: {:?}", msgs[0]);
    };
    assert_eq!(m.cmd, IpvsCmd::NewDest);
    assert!(m.service.is_none());
    let mut want = rs_10_1_0_5_8080(1);
    want.active_conns = 3;
    want.inactive_conns = 5;
    assert_eq!(m.dest.as_ref(), Some(&want));
    assert_eq!(msgs[1].payload, NetlinkPayload::Done(0));
    assert_eq!(msgs[1].header.sequence, 8);
}

#[test]
fn dest_without_family_attr_uses_hint() {
    // Kernels before 3.18 send no IPVS_DEST_ATTR_ADDR_FAMILY.
    let reply = hex("
        34000000 2400 0200 08000000 00000000
        05 01 0000
        2000 0200
          1400 0100 20010db8 00000000 00000000 00000000 // 2001:db8:: (last 12 bytes zero)
          0600 0200 0050 0000
    ");
    let v6 = parse_with_hint(&reply, FAM, Some(AddressFamily::Inet6)).unwrap();
    let NetlinkPayload::Ipvs(m) = &v6[0].payload else {
        panic!()
    };
    let d = m.dest.as_ref().unwrap();
    assert_eq!(d.address, "2001:db8::".parse::<IpAddr>().unwrap());
    assert_eq!(d.address_family, None);
    let v4 = parse_with_hint(&reply, FAM, Some(AddressFamily::Inet)).unwrap();
    let NetlinkPayload::Ipvs(m) = &v4[0].payload else {
        panic!()
    };
    assert_eq!(
        m.dest.as_ref().unwrap().address,
        "32.1.13.184".parse::<IpAddr>().unwrap()
    );
}

/// The kernel's answer to adding a service that exists: NLMSG_ERROR with -EEXIST and (no
/// NETLINK_CAP_ACK, so no NLM_F_CAPPED) the whole request echoed.
fn eexist_reply() -> Vec<u8> {
    let mut b = hex("
        7c000000 0200 0000 01000000 e8030000  // len 124 = 16 + 4 + 104, NLMSG_ERROR, seq 1
        efffffff                              // error -17 (EEXIST)
    ");
    b.extend(hex(ADD_SERVICE)); // echoed request (pid 0 as we sent it)
    b
}

#[test]
fn parse_error_reply() {
    let bytes = eexist_reply();
    let msgs = parse(&bytes, FAM).unwrap();
    assert_eq!(msgs.len(), 1);
    let NetlinkPayload::Error(e) = &msgs[0].payload else {
        panic!("not an error: {:?}", msgs[0]);
    };
    assert_eq!(e.code, -17);
    assert_eq!(e.errno(), Some(17));
    assert_eq!(e.request.sequence, 1);
    assert_eq!(e.request.message_type, FAM);
    assert_eq!(e.request_length, 104);
    assert_eq!(e.request_payload.len(), 104 - 16);
    assert_eq!(e.ext_msg, None);
    // Byte-exact round trip.
    assert_eq!(msgs[0].emit().unwrap(), bytes);
}

#[test]
fn parse_capped_ack_with_ext_ack() {
    // A success ack is capped (header only). An error with ext-ack TLVs after the header.
    let ack = hex("
        24000000 0200 0001 05000000 00000000  // len 36, NLMSG_ERROR, NLM_F_CAPPED
        00000000                              // 0: ack
        b0000000 2400 0500 05000000 00000000  // echoed header of a 176-byte request
    ");
    let msgs = parse(&ack, FAM).unwrap();
    let NetlinkPayload::Error(e) = &msgs[0].payload else {
        panic!()
    };
    assert_eq!(e.errno(), None);
    assert_eq!(e.request_length, 176);
    assert!(e.request_payload.is_empty());
    assert_eq!(msgs[0].emit().unwrap(), ack);

    let err = hex("
        2c000000 0200 0003 06000000 00000000  // len 44, CAPPED|ACK_TLVS
        eaffffff                              // -22 EINVAL
        b0000000 2400 0500 06000000 00000000
        0800 0100 626164 00                   // NLMSGERR_ATTR_MSG \"bad\"
    ");
    let msgs = parse(&err, FAM).unwrap();
    let NetlinkPayload::Error(e) = &msgs[0].payload else {
        panic!()
    };
    assert_eq!(e.errno(), Some(22));
    assert_eq!(e.ext_msg.as_deref(), Some("bad"));
    assert_eq!(msgs[0].emit().unwrap(), err);
}

#[test]
fn multi_message_datagram_and_batch_emit() {
    // Several requests concatenated in one datagram (how IpvsClient batches).
    let svc = svc_10_0_0_1_80_rr();
    let reqs = [
        NetlinkMessage::ipvs(
            FAM,
            NLM_F_REQUEST | NLM_F_ACK,
            1,
            IpvsMessage::new_service(&svc),
        ),
        NetlinkMessage::ipvs(
            FAM,
            NLM_F_REQUEST | NLM_F_ACK,
            3,
            IpvsMessage::new_dest(&svc, &rs_10_1_0_5_8080(1)),
        ),
    ];
    let mut buf = Vec::new();
    for r in &reqs {
        r.emit_into(&mut buf).unwrap();
    }
    let mut want = hex(ADD_SERVICE);
    want.extend(dest_request("05", "03000000", "01000000"));
    assert_eq!(buf, want);
    assert_eq!(parse(&buf, FAM).unwrap(), reqs.to_vec());
}

#[test]
fn get_config_and_info_replies() {
    let cfg = hex("
        2c000000 2400 0000 09000000 00000000
        0c 01 0000                            // IPVS_CMD_SET_CONFIG (reply to GET_CONFIG)
        0800 0400 84030000
        0800 0500 78000000
        0800 0600 2c010000
    ");
    let msgs = parse(&cfg, FAM).unwrap();
    let NetlinkPayload::Ipvs(m) = &msgs[0].payload else {
        panic!()
    };
    assert_eq!(
        m.timeouts,
        Some(Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300
        })
    );
    let info = hex("
        24000000 2400 0000 0b000000 00000000
        0e 01 0000                            // IPVS_CMD_SET_INFO (reply to GET_INFO)
        0800 0100 01020100                    // INFO_ATTR_VERSION 0x010201 (ids reuse 1, 2)
        0800 0200 00100000                    // INFO_ATTR_CONN_TAB_SIZE 4096
    ");
    let msgs = parse(&info, FAM).unwrap();
    let NetlinkPayload::Ipvs(m) = &msgs[0].payload else {
        panic!()
    };
    assert_eq!(m.service, None);
    assert_eq!(
        m.info,
        Some(IpvsInfo {
            version: 0x010201,
            conn_tab_size: 4096
        })
    );
    assert_eq!(msgs[0].emit().unwrap(), info);
}

#[test]
fn ipv6_udp_and_fwmark_round_trip() {
    let mut v6 = VirtualService::new("fd00::10".parse().unwrap(), Protocol::Udp, 53, "mh");
    v6.flags = ServiceFlags::exactly(IP_VS_SVC_F_SCHED_SH_FALLBACK | IP_VS_SVC_F_SCHED_SH_PORT);
    let rs = RealServer::new("fd00:1::5".parse().unwrap(), 5353, 1);
    let fw = VirtualService::with_fwmark(AddressFamily::Inet, 0x4000, "wrr");
    let sctp = VirtualService::new("10.0.0.9".parse().unwrap(), Protocol::Sctp, 9, "lc");
    for m in [
        IpvsMessage::new_service(&v6),
        IpvsMessage::new_dest(&v6, &rs),
        IpvsMessage::dump_dests(&v6),
        IpvsMessage::new_service(&fw),
        IpvsMessage::dump_dests(&fw),
        IpvsMessage::set_service(&sctp),
    ] {
        let msg = NetlinkMessage::ipvs(FAM, NLM_F_REQUEST | NLM_F_ACK, 42, m);
        let bytes = msg.emit().unwrap();
        assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
    }
    // v6 address is the whole 16-byte attribute; netmask defaults to /128.
    let bytes = NetlinkMessage::ipvs(FAM, 0, 1, IpvsMessage::new_service(&v6))
        .emit()
        .unwrap();
    let needle = hex("1400 0300 fd000000 00000000 00000000 00000010");
    assert!(bytes.windows(needle.len()).any(|w| w == needle.as_slice()));
    assert_eq!(v6.netmask, 128);
    // fwmark services carry FWMARK instead of PROTOCOL/ADDR/PORT.
    let bytes = NetlinkMessage::ipvs(FAM, 0, 1, IpvsMessage::dump_dests(&fw))
        .emit()
        .unwrap();
    assert_eq!(
        bytes,
        hex("28000000 2400 0000 01000000 00000000 08 01 0000
             1400 0180 0600 0100 0200 0000 0800 0500 00400000")
    );
}

#[test]
fn rejects_malformed_input() {
    // Truncated header, attribute length past the end, missing AF, bad family.
    assert!(parse(&[0u8; 8], FAM).is_err());
    let mut bad = hex(ADD_SERVICE);
    bad[20] = 0xff; // SERVICE nest len 0x54 -> 0xff: beyond the message
    assert!(parse(&bad, FAM).is_err());
    let no_af = hex("
        20000000 2400 0000 01000000 00000000 01 01 0000
        0c00 0100 0600 0200 0600 0000
    ");
    assert_eq!(
        parse(&no_af, FAM).unwrap_err(),
        DecodeError::Missing("IPVS_SVC_ATTR_AF")
    );
    let svc = VirtualService {
        address: "::1".parse().unwrap(),
        ..svc_10_0_0_1_80_rr()
    };
    assert!(
        NetlinkMessage::ipvs(FAM, 0, 1, IpvsMessage::new_service(&svc))
            .emit()
            .is_err()
    );
    let long = VirtualService::new(
        "10.0.0.1".parse().unwrap(),
        Protocol::Tcp,
        1,
        "a-very-long-scheduler",
    );
    assert!(
        NetlinkMessage::ipvs(FAM, 0, 1, IpvsMessage::new_service(&long))
            .emit()
            .is_err()
    );
}

#[test]
fn nested_flag_is_optional_on_parse() {
    // We set NLA_F_NESTED (as ipvsadm does); the kernel's replies do not. Both parse.
    let mut b = hex(ADD_SERVICE);
    assert_eq!(b[22..24], (0x8000u16 | 1).to_ne_bytes());
    b[22..24].copy_from_slice(&1u16.to_ne_bytes());
    let msgs = parse(&b, FAM).unwrap();
    let NetlinkPayload::Ipvs(m) = &msgs[0].payload else {
        panic!()
    };
    assert_eq!(m.service.as_ref(), Some(&svc_10_0_0_1_80_rr()));
}

/// `ipvsadm -a -t [fd00:96::10]:80 -r [fd00:244::5]:8080 -m -w 1` on a ClientIP-affinity
/// service (`-p 10800`): AF_INET6 in both nests, the 16-byte addresses as they are, and the
/// IPv6 netmask as a prefix length (128), not the IPv4 all-ones mask.
const ADD_DEST_V6: &str = "
    b0000000 2400 0500 07000000 00000000  // len 176
    05 01 0000                            // NEW_DEST
    5400 0180                             // SERVICE nest, len 84
      0600 0100 0a00 0000                 //   SVC_ATTR_AF = AF_INET6 (10)
      0600 0200 0600 0000                 //   TCP
      1400 0300 fd000096 00000000 00000000 00000010 // fd00:96::10
      0600 0400 0050 0000                 //   port 80
      0700 0600 727200 00                 //   \"rr\"
      0c00 0700 01000000 ffffffff         //   IP_VS_SVC_F_PERSISTENT
      0800 0800 302a0000                  //   timeout 10800
      0800 0900 80000000                  //   NETMASK = 128 (prefix length)
    4800 0280                             // DEST nest, len 72
      0600 0b00 0a00 0000                 //   DEST_ATTR_ADDR_FAMILY = AF_INET6
      1400 0100 fd000244 00000000 00000000 00000005 // fd00:244::5
      0600 0200 1f90 0000                 //   port 8080
      0800 0300 00000000                  //   MASQ
      0800 0400 01000000                  //   weight 1
      0800 0500 00000000
      0800 0600 00000000
";

#[test]
fn ipv6_dest_of_a_persistent_service_golden() {
    let mut svc = VirtualService::new("fd00:96::10".parse().unwrap(), Protocol::Tcp, 80, "rr");
    svc.flags = ServiceFlags::exactly(IP_VS_SVC_F_PERSISTENT);
    svc.timeout = 10800;
    assert_eq!(svc.address_family, AddressFamily::Inet6);
    let rs = RealServer::new("fd00:244::5".parse().unwrap(), 8080, 1);
    assert_eq!(rs.address_family, Some(AddressFamily::Inet6));
    let msg = NetlinkMessage::ipvs(
        FAM,
        NLM_F_REQUEST | NLM_F_ACK,
        7,
        IpvsMessage::new_dest(&svc, &rs),
    );
    let bytes = msg.emit().unwrap();
    assert_eq!(bytes, hex(ADD_DEST_V6));
    assert_eq!(parse(&bytes, FAM).unwrap(), vec![msg]);
    // A kernel dump of the service decodes to the same key, so a sync finds it again.
    let key = svc.key();
    assert!(key.same_key(&svc));
    assert_eq!(
        key.address,
        "fd00:96::10".parse::<std::net::IpAddr>().unwrap()
    );
}

#[test]
fn add_flags_sets_header_flags_of_an_encoded_message() {
    let svc = VirtualService::new("10.0.0.1".parse().unwrap(), Protocol::Tcp, 80, "rr");
    let msg = NetlinkMessage::ipvs(30, NLM_F_REQUEST, 7, IpvsMessage::new_service(&svc));
    let mut buf = msg.emit().unwrap();
    add_flags(&mut buf, NLM_F_ACK);
    let back = parse(&buf, 30).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].header.flags, NLM_F_REQUEST | NLM_F_ACK);
    assert_eq!(back[0].header.sequence, 7);
    assert_eq!(back[0].payload, msg.payload);
    let mut short = [0u8; 4];
    add_flags(&mut short, NLM_F_ACK);
    assert_eq!(short, [0; 4]);
}
