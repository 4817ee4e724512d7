//! Real bytes captured in a qemu guest (Debian kernel 6.1.0-56-amd64, `ipvsadm` v1.31 with
//! libnl-3) with `strace -e trace=sendmsg,recvmsg -xx`, reassembled into full netlink
//! messages (strace prints the header decoded; it was re-encoded verbatim). The IPVS family
//! id there was 0x20. Each request we emit for the same operation is compared with these.

use super::*;

const CAP_FAM: u16 = 0x20;

fn hex(s: &str) -> Vec<u8> {
    let digits: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

/// `ipvsadm -A -t 10.0.0.1:80 -s rr` (sendmsg).
const CAP_ADD_SERVICE: &str = "
    6800000020000500c16f026b9600001a01010000540001800600010002000000
    0600020006000000140003000a00000100000000000000000000000006000400
    0050000007000600727200000c00070000000000ffffffff0800080000000000
    08000900ffffffff
";

/// `ipvsadm -A -t 10.0.0.2:443 -s rr -p 10800` (sendmsg).
const CAP_ADD_PERSISTENT: &str = "
    6800000020000500c26f026b9b00c01901010000540001800600010002000000
    0600020006000000140003000a00000200000000000000000000000006000400
    01bb000007000600727200000c00070001000000ffffffff08000800302a0000
    08000900ffffffff
";

/// `ipvsadm -a -t 10.0.0.1:80 -r 10.1.0.5:8080 -m -w 1` (sendmsg).
const CAP_ADD_DEST: &str = "
    c800000020000500c76f026b9f00c01805010000540001800600010002000000
    0600020006000000140003000a00000100000000000000000000000006000400
    0050000005000600000000000c00070000000000ffffffff0800080000000000
    08000900ffffffff6000028006000b0002000000140001000a01000500000000
    0000000000000000060002001f90000008000300000000000800040001000000
    05000d000000000006000e000000000006000f00000000000800050000000000
    0800060000000000
";

/// `ipvsadm -e -t 10.0.0.1:80 -r 10.1.0.5:8080 -m -w 0` (sendmsg).
const CAP_EDIT_DEST: &str = "
    c800000020000500c96f026ba300002406010000540001800600010002000000
    0600020006000000140003000a00000100000000000000000000000006000400
    0050000005000600000000000c00070000000000ffffffff0800080000000000
    08000900ffffffff6000028006000b0002000000140001000a01000500000000
    0000000000000000060002001f90000008000300000000000800040000000000
    05000d000000000006000e000000000006000f00000000000800050000000000
    0800060000000000
";

/// `ipvsadm -d -t 10.0.0.1:80 -r 10.1.0.5:8080` (sendmsg; no -m, so ipvsadm's default -g).
const CAP_DEL_DEST: &str = "
    c800000020000500d06f026bab00c01a07010000540001800600010002000000
    0600020006000000140003000a00000100000000000000000000000006000400
    0050000005000600000000000c00070000000000ffffffff0800080000000000
    08000900ffffffff6000028006000b0002000000140001000a01000500000000
    0000000000000000060002001f90000008000300030000000800040001000000
    05000d000000000006000e000000000006000f00000000000800050000000000
    0800060000000000
";

/// `ipvsadm -D -t 10.0.0.1:80` (sendmsg).
const CAP_DEL_SERVICE: &str = "
    6800000020000500d86f026bb700402503010000540001800600010002000000
    0600020006000000140003000a00000100000000000000000000000006000400
    0050000005000600000000000c00070000000000ffffffff0800080000000000
    08000900ffffffff
";

/// `ipvsadm --set 900 120 300` (sendmsg).
const CAP_SET_TIMEOUTS: &str = "
    2c00000020000500d26f026baf0000260c010000080004008403000008000500
    78000000080006002c010000
";

/// `ipvsadm -Ln`: the services dump request (sendmsg).
const CAP_DUMP_SERVICES: &str = "
    1400000020000503cc6f026ba700802404010000
";

/// `ipvsadm -Ln`: the destinations dump request for 10.0.0.1:80 (sendmsg).
const CAP_DUMP_DESTS: &str = "
    4400000020000503cd6f026ba700403f08010000300001800600010002000000
    0600020006000000140003000a00000100000000000000000000000006000400
    00500000
";

/// The kernel's services dump datagram: two NEW_SERVICE messages (recvmsg).
const CAP_SERVICES_REPLY: &str = "
    4001000020000200cc6f026ba7008024010100002c0101000600010002000000
    0600020006000000140003000a00000100000000000000000000000006000400
    0050000007000600727200000c00070002000000ffffffff0800080000000000
    08000900ffffffff5c000a000800010000000000080002000000000008000300
    000000000c00040000000000000000000c000500000000000000000008000600
    0000000008000700000000000800080000000000080009000000000008000a00
    000000007c000c000c00010000000000000000000c0002000000000000000000
    0c00030000000000000000000c00040000000000000000000c00050000000000
    000000000c00060000000000000000000c00070000000000000000000c000800
    00000000000000000c00090000000000000000000c000a000000000000000000
    4001000020000200cc6f026ba7008024010100002c0101000600010002000000
    0600020006000000140003000a00000200000000000000000000000006000400
    01bb000007000600727200000c00070003000000ffffffff08000800302a0000
    08000900ffffffff5c000a000800010000000000080002000000000008000300
    000000000c00040000000000000000000c000500000000000000000008000600
    0000000008000700000000000800080000000000080009000000000008000a00
    000000007c000c000c00010000000000000000000c0002000000000000000000
    0c00030000000000000000000c00040000000000000000000c00050000000000
    000000000c00060000000000000000000c00070000000000000000000c000800
    00000000000000000c00090000000000000000000c000a000000000000000000
";

/// The kernel's destinations dump datagram for 10.0.0.1:80 (recvmsg).
const CAP_DESTS_REPLY: &str = "
    6401000020000200cd6f026ba700403f0501000050010200140001000a010005
    000000000000000000000000060002001f900000080003000000000008000400
    0000000005000d000000000006000e000000000006000f000000000008000500
    0000000008000600000000000800070000000000080008000000000008000900
    0000000006000b00020000005c000a0008000100000000000800020000000000
    08000300000000000c00040000000000000000000c0005000000000000000000
    0800060000000000080007000000000008000800000000000800090000000000
    08000a00000000007c000c000c00010000000000000000000c00020000000000
    000000000c00030000000000000000000c00040000000000000000000c000500
    00000000000000000c00060000000000000000000c0007000000000000000000
    0c00080000000000000000000c00090000000000000000000c000a0000000000
    00000000
";

/// The kernel's GET_INFO reply (recvmsg).
const CAP_INFO_REPLY: &str = "
    2400000020000000c16f026b960040ef0e010000080001000102010008000200
    00100000
";

/// The kernel's answer to a second `ipvsadm -A -t 10.0.0.1:80 -s rr`: NLMSG_ERROR -EEXIST
/// echoing the whole request (ipvsadm does not set NETLINK_CAP_ACK) (recvmsg).
const CAP_EEXIST_REPLY: &str = "
    7c00000002000000d76f026bb300c024efffffff6800000020000500d76f026b
    b300c02401010000540001800600010002000000060002000600000014000300
    0a00000100000000000000000000000006000400005000000700060072720000
    0c00070000000000ffffffff080008000000000008000900ffffffff
";

/// `genl_ctrl_resolve("IPVS")` as ipvsadm sends it (sendmsg).
const CAP_GET_FAMILY: &str = "
    2000000010000500c06f026b960080c403010000090002004950565300000000
";

fn one(bytes: &[u8]) -> NetlinkMessage {
    let mut msgs = parse(bytes, CAP_FAM).unwrap();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    msgs.remove(0)
}

/// Emits `payload` under the captured message's header; must equal the capture.
fn assert_same_bytes(capture: &str, payload: NetlinkPayload) {
    let cap = hex(capture);
    let got = one(&cap);
    // Our parser re-encodes ipvsadm's bytes exactly ...
    assert_eq!(got.emit().unwrap(), cap);
    // ... and what we would send for this operation is those bytes.
    let ours = NetlinkMessage {
        header: got.header,
        payload,
    };
    assert_eq!(ours.emit().unwrap(), cap);
}

fn svc_80() -> VirtualService {
    VirtualService::new("10.0.0.1".parse().unwrap(), Protocol::Tcp, 80, "rr")
}

fn svc_443_persistent() -> VirtualService {
    let mut s = VirtualService::new("10.0.0.2".parse().unwrap(), Protocol::Tcp, 443, "rr");
    s.flags = ServiceFlags::exactly(IP_VS_SVC_F_PERSISTENT);
    s.timeout = 10800;
    s
}

#[test]
fn service_requests_are_byte_identical_to_ipvsadm() {
    let ipvs = |m| NetlinkPayload::Ipvs(m);
    assert_same_bytes(CAP_ADD_SERVICE, ipvs(IpvsMessage::new_service(&svc_80())));
    assert_same_bytes(
        CAP_ADD_PERSISTENT,
        ipvs(IpvsMessage::new_service(&svc_443_persistent())),
    );
    // `ipvsadm -D` names no scheduler, so it sends an empty SCHED_NAME.
    let mut unscheduled = svc_80();
    unscheduled.scheduler = String::new();
    assert_same_bytes(
        CAP_DEL_SERVICE,
        ipvs(IpvsMessage::del_service(&unscheduled)),
    );
    assert_same_bytes(
        CAP_SET_TIMEOUTS,
        ipvs(IpvsMessage::set_config(Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300,
        })),
    );
    assert_same_bytes(CAP_DUMP_SERVICES, ipvs(IpvsMessage::dump_services()));
    assert_same_bytes(CAP_DUMP_DESTS, ipvs(IpvsMessage::dump_dests(&svc_80())));
    assert_same_bytes(
        CAP_GET_FAMILY,
        NetlinkPayload::Ctrl(CtrlMessage::get_family("IPVS")),
    );
    // ipvsadm also asks for an ack on dumps (0x305); we send REQUEST|DUMP (0x301) only.
    assert_eq!(one(&hex(CAP_DUMP_SERVICES)).header.flags, 0x305);
}

#[test]
fn ipvsadm_dest_requests_decode_and_differ_only_by_tunnel_attrs() {
    // ipvsadm sends the service of a destination command without a scheduler (an empty
    // SCHED_NAME), and always adds TUN_TYPE/TUN_PORT/TUN_FLAGS (3 x 8 bytes) to the
    // destination, which the kernel ignores for non-tunnel forwarding. We omit them.
    let mut svc = svc_80();
    svc.scheduler = String::new();
    let mut rs = RealServer::new("10.1.0.5".parse().unwrap(), 8080, 1);
    for (cap, want) in [
        (CAP_ADD_DEST, IpvsMessage::new_dest(&svc, &rs)),
        (CAP_EDIT_DEST, {
            rs.weight = 0;
            IpvsMessage::set_dest(&svc, &rs)
        }),
        (CAP_DEL_DEST, {
            rs.weight = 1;
            rs.forward = ForwardMethod::DirectRoute;
            IpvsMessage::del_dest(&svc, &rs)
        }),
    ] {
        let cap = hex(cap);
        let got = one(&cap);
        assert_eq!(got.payload, NetlinkPayload::Ipvs(want.clone()));
        let ours = NetlinkMessage {
            header: got.header,
            payload: NetlinkPayload::Ipvs(want),
        }
        .emit()
        .unwrap();
        assert_eq!(ours.len() + 24, cap.len());
        // Same bytes up to the destination's first tunnel attribute (after WEIGHT).
        let common = 16 + 4 + 84 + 4 + 8 + 20 + 8 + 8 + 8;
        // (the destination nest's own length, at 104..106, differs by those 24 bytes).
        assert_eq!(ours[20..104], cap[20..104]);
        assert_eq!(ours[106..common], cap[106..common]);
    }
}

#[test]
fn kernel_dump_replies_decode() {
    let msgs = parse(&hex(CAP_SERVICES_REPLY), CAP_FAM).unwrap();
    let services: Vec<_> = msgs
        .iter()
        .map(|m| match &m.payload {
            NetlinkPayload::Ipvs(i) if i.cmd == IpvsCmd::NewService => i.service.clone().unwrap(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let mut a = svc_80();
    a.flags.flags = IP_VS_SVC_F_HASHED;
    let mut b = svc_443_persistent();
    b.flags.flags |= IP_VS_SVC_F_HASHED;
    assert_eq!(services, vec![a, b]);
    assert!(msgs.iter().all(|m| m.header.flags == NLM_F_MULTI));

    let msgs = parse_with_hint(&hex(CAP_DESTS_REPLY), CAP_FAM, Some(AddressFamily::Inet)).unwrap();
    let NetlinkPayload::Ipvs(m) = &msgs[0].payload else {
        panic!("{msgs:?}")
    };
    assert_eq!(
        m.dest,
        Some(RealServer::new("10.1.0.5".parse().unwrap(), 8080, 0))
    );

    let info = one(&hex(CAP_INFO_REPLY));
    let NetlinkPayload::Ipvs(m) = &info.payload else {
        panic!("{info:?}")
    };
    assert_eq!(
        m.info,
        Some(IpvsInfo {
            version: 0x010201,
            conn_tab_size: 4096
        })
    );
}

#[test]
fn kernel_error_reply_decodes_and_round_trips() {
    let cap = hex(CAP_EEXIST_REPLY);
    let msg = one(&cap);
    let NetlinkPayload::Error(e) = &msg.payload else {
        panic!("{msg:?}")
    };
    assert_eq!(e.errno(), Some(17));
    assert_eq!(e.request.message_type, CAP_FAM);
    assert_eq!(e.request.sequence, msg.header.sequence);
    assert_eq!(msg.emit().unwrap(), cap);
}
