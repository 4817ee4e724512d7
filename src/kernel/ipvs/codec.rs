//! Pure codec for the kernel's "IPVS" generic-netlink family (version 1). No I/O.
//!
//! Wire layout (all integers native-endian unless noted; see `include/uapi/linux/ip_vs.h`,
//! `include/uapi/linux/netlink.h`, `include/uapi/linux/genetlink.h`):
//!
//! ```text
//! nlmsghdr  { u32 len; u16 type (= family id); u16 flags; u32 seq; u32 pid }   16 bytes
//! genlmsghdr{ u8 cmd; u8 version (=1); u16 reserved }                           4 bytes
//! nlattr*   { u16 len (4 + payload, unpadded); u16 type; payload; pad to 4 }
//! ```
//!
//! Choices, each checked against the kernel (`net/netfilter/ipvs/ip_vs_ctl.c`) and against
//! what `ipvsadm` (libipvs) sends:
//! - Nested attributes (`IPVS_CMD_ATTR_SERVICE`, `IPVS_CMD_ATTR_DEST`) are emitted *with*
//!   `NLA_F_NESTED`, as `ipvsadm` 1.31 (libnl-3) does (seen in a capture on Linux 6.1); the
//!   kernel's own replies (`nla_nest_start_noflag`) and moby/ipvs leave it off, and the IPVS
//!   ops are registered with `GENL_DONT_VALIDATE_STRICT`, so the kernel takes either. Parsing
//!   masks both `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` off the type.
//! - `IPVS_SVC_ATTR_ADDR` / `IPVS_DEST_ATTR_ADDR` are `NLA_BINARY` of at most
//!   `sizeof(union nf_inet_addr)` = 16 and copied with `nla_memcpy` (shorter is zero-filled),
//!   so 4 bytes (moby) and 16 bytes (libipvs, and every kernel reply) are both accepted. We
//!   emit the full 16-byte union (IPv4 in bytes 0..4, zeros after), like libipvs, and parse
//!   either length.
//! - Ports are `NLA_U16` attributes whose value is already in network byte order (`__be16`).
//! - `IPVS_SVC_ATTR_FLAGS` is `struct ip_vs_flags { u32 flags; u32 mask; }`; the kernel sets
//!   `new = (old & ~mask) | (flags & mask)`. Replies carry `mask = ~0`.
//! - `IPVS_SVC_ATTR_NETMASK` is a raw `__be32` for IPv4 (`0xffffffff` = /32, byte-order
//!   neutral) and a prefix length (1..=128) for IPv6; we carry the raw u32 as the kernel does.
//! - Attribute order follows libipvs: service `AF, PROTOCOL, ADDR, PORT | FWMARK, SCHED_NAME,
//!   FLAGS, TIMEOUT, NETMASK`; destination `ADDR_FAMILY, ADDR, PORT, FWD_METHOD, WEIGHT,
//!   U_THRESH, L_THRESH`.
//! - For `GET_SERVICE` and `GET_DEST` only the identifying service attributes are emitted
//!   (the kernel parses them with `full_entry = 0`), like `ipvsadm`'s `ipvs_get_dests`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// === netlink constants ===

/// `NLMSG_NOOP`.
pub const NLMSG_NOOP: u16 = 1;
/// `NLMSG_ERROR`: an error or (code 0) an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a multi-part (dump) reply.
pub const NLMSG_DONE: u16 = 3;
/// `NLMSG_OVERRUN`.
pub const NLMSG_OVERRUN: u16 = 4;

/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x01;
/// `NLM_F_MULTI`: part of a multi-part reply.
pub const NLM_F_MULTI: u16 = 0x02;
/// `NLM_F_ACK`: ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 0x04;
/// `NLM_F_DUMP_INTR`: the dump was interrupted and may be inconsistent.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// `NLM_F_CAPPED` (on `NLMSG_ERROR`): the echoed request is only its header.
pub const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` (on `NLMSG_ERROR`): extended-ack attributes follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;

const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Size of `struct genlmsghdr`.
pub const GENL_HDRLEN: usize = 4;

// === generic netlink controller ===

/// `GENL_ID_CTRL`: the controller family's fixed id.
pub const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_NEWFAMILY` (the reply to `GETFAMILY`).
pub const CTRL_CMD_NEWFAMILY: u8 = 1;
/// `CTRL_CMD_GETFAMILY`.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_VERSION: u8 = 1;

// === IPVS constants (include/uapi/linux/ip_vs.h) ===

/// `IPVS_GENL_NAME`.
pub const IPVS_GENL_NAME: &str = "IPVS";
/// `IPVS_GENL_VERSION`.
pub const IPVS_GENL_VERSION: u8 = 1;

/// `IP_VS_SVC_F_PERSISTENT`: persistent port (ClientIP affinity).
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service it reports.
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_SVC_F_ONEPACKET`: one-packet scheduling (UDP).
pub const IP_VS_SVC_F_ONEPACKET: u32 = 0x0004;
/// `IP_VS_SVC_F_SCHED1` (`IP_VS_SVC_F_SCHED_SH_FALLBACK`: `sh`/`mh` fall back to another real
/// server when the chosen one is unavailable).
pub const IP_VS_SVC_F_SCHED1: u32 = 0x0008;
/// `IP_VS_SVC_F_SCHED2` (`IP_VS_SVC_F_SCHED_SH_PORT`: hash the source port too). Upstream
/// kube-proxy and moby call this `FlagSourceHash` (0x10) and set it for `mh`.
pub const IP_VS_SVC_F_SCHED2: u32 = 0x0010;
/// `IP_VS_SVC_F_SCHED3`.
pub const IP_VS_SVC_F_SCHED3: u32 = 0x0020;
/// `IP_VS_SVC_F_SCHED_SH_FALLBACK`.
pub const IP_VS_SVC_F_SCHED_SH_FALLBACK: u32 = IP_VS_SVC_F_SCHED1;
/// `IP_VS_SVC_F_SCHED_SH_PORT`.
pub const IP_VS_SVC_F_SCHED_SH_PORT: u32 = IP_VS_SVC_F_SCHED2;

/// `IP_VS_CONN_F_FWD_MASK`.
pub const IP_VS_CONN_F_FWD_MASK: u32 = 0x0007;
/// `IP_VS_CONN_F_MASQ`: NAT, the only method kube-proxy uses.
pub const IP_VS_CONN_F_MASQ: u32 = 0x0000;
/// `IP_VS_CONN_F_LOCALNODE`.
pub const IP_VS_CONN_F_LOCALNODE: u32 = 0x0001;
/// `IP_VS_CONN_F_TUNNEL`.
pub const IP_VS_CONN_F_TUNNEL: u32 = 0x0002;
/// `IP_VS_CONN_F_DROUTE`.
pub const IP_VS_CONN_F_DROUTE: u32 = 0x0003;
/// `IP_VS_CONN_F_BYPASS`.
pub const IP_VS_CONN_F_BYPASS: u32 = 0x0004;

/// `IP_VS_SCHEDNAME_MAXLEN` (including the terminating NUL).
pub const IP_VS_SCHEDNAME_MAXLEN: usize = 16;

// Top-level attributes (IPVS_CMD_ATTR_*).
const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;
const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// Service attributes (IPVS_SVC_ATTR_*), nested in IPVS_CMD_ATTR_SERVICE.
const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_FWMARK: u16 = 5;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;
// 10 STATS, 11 PE_NAME, 12 STATS64: parsed and ignored.

// Destination attributes (IPVS_DEST_ATTR_*), nested in IPVS_CMD_ATTR_DEST.
const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
// 10 STATS, 12 STATS64, 13 TUN_TYPE, 14 TUN_PORT, 15 TUN_FLAGS: parsed and ignored.

// Attributes of the GET_INFO reply (IPVS_INFO_ATTR_*), top level.
const IPVS_INFO_ATTR_VERSION: u16 = 1;
const IPVS_INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

// === errors ===

/// A message that could not be decoded, or a value that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ended inside a header or attribute.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A length field is inconsistent with the data.
    #[error("invalid length {len} in {what}")]
    BadLength {
        /// What was being read.
        what: &'static str,
        /// The offending length.
        len: usize,
    },
    /// A required attribute is absent.
    #[error("missing attribute {0}")]
    Missing(&'static str),
    /// An attribute value is out of range.
    #[error("invalid value for {what}: {value}")]
    BadValue {
        /// The attribute.
        what: &'static str,
        /// The value, printed.
        value: String,
    },
    /// A command byte that is not an `IPVS_CMD_*`.
    #[error("unknown IPVS command {0}")]
    UnknownCommand(u8),
}

// === value types ===

/// Address family of a service or destination (`AF_INET` / `AF_INET6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressFamily {
    /// `AF_INET` (2).
    Inet,
    /// `AF_INET6` (10).
    Inet6,
}

impl AddressFamily {
    /// The family of `addr`.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::Inet,
            IpAddr::V6(_) => Self::Inet6,
        }
    }

    /// The kernel's numeric value.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Inet => AF_INET,
            Self::Inet6 => AF_INET6,
        }
    }

    /// From the kernel's numeric value.
    pub fn from_u16(v: u16) -> Result<Self, DecodeError> {
        match v {
            AF_INET => Ok(Self::Inet),
            AF_INET6 => Ok(Self::Inet6),
            other => Err(DecodeError::BadValue {
                what: "address family",
                value: other.to_string(),
            }),
        }
    }

    /// The unspecified address of this family (`0.0.0.0` / `::`).
    pub fn unspecified(self) -> IpAddr {
        match self {
            Self::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Self::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
}

/// Transport protocol of a virtual service (`IPVS_SVC_ATTR_PROTOCOL`, an IP protocol number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// `IPPROTO_TCP` (6).
    Tcp,
    /// `IPPROTO_UDP` (17).
    Udp,
    /// `IPPROTO_SCTP` (132).
    Sctp,
    /// Any other protocol number.
    Other(u16),
}

impl Protocol {
    /// The IP protocol number.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
            Self::Other(n) => n,
        }
    }

    /// From an IP protocol number.
    pub fn from_u16(n: u16) -> Self {
        match n {
            6 => Self::Tcp,
            17 => Self::Udp,
            132 => Self::Sctp,
            other => Self::Other(other),
        }
    }
}

/// `struct ip_vs_flags`: which service flag bits to set (`flags`) and which to touch (`mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceFlags {
    /// `IP_VS_SVC_F_*` bits.
    pub flags: u32,
    /// Bits of `flags` that apply; the kernel reports `!0`.
    pub mask: u32,
}

impl ServiceFlags {
    /// Set exactly `flags` (mask all ones), as libipvs and moby do.
    pub const fn exactly(flags: u32) -> Self {
        Self {
            flags,
            mask: u32::MAX,
        }
    }

    /// The bits in effect, ignoring the kernel-internal `IP_VS_SVC_F_HASHED`.
    pub const fn effective(self) -> u32 {
        self.flags & self.mask & !IP_VS_SVC_F_HASHED
    }
}

impl Default for ServiceFlags {
    fn default() -> Self {
        Self::exactly(0)
    }
}

/// Forwarding method of a real server (`IPVS_DEST_ATTR_FWD_METHOD`, `IP_VS_CONN_F_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ForwardMethod {
    /// `IP_VS_CONN_F_MASQ`: NAT (kube-proxy's only method).
    #[default]
    Masq,
    /// `IP_VS_CONN_F_LOCALNODE`.
    Local,
    /// `IP_VS_CONN_F_TUNNEL`.
    Tunnel,
    /// `IP_VS_CONN_F_DROUTE`.
    DirectRoute,
    /// `IP_VS_CONN_F_BYPASS`.
    Bypass,
}

impl ForwardMethod {
    /// The kernel's numeric value.
    pub fn as_u32(self) -> u32 {
        match self {
            Self::Masq => IP_VS_CONN_F_MASQ,
            Self::Local => IP_VS_CONN_F_LOCALNODE,
            Self::Tunnel => IP_VS_CONN_F_TUNNEL,
            Self::DirectRoute => IP_VS_CONN_F_DROUTE,
            Self::Bypass => IP_VS_CONN_F_BYPASS,
        }
    }

    /// From the kernel's value (masked with `IP_VS_CONN_F_FWD_MASK`, as the kernel does).
    pub fn from_u32(v: u32) -> Result<Self, DecodeError> {
        match v & IP_VS_CONN_F_FWD_MASK {
            IP_VS_CONN_F_MASQ => Ok(Self::Masq),
            IP_VS_CONN_F_LOCALNODE => Ok(Self::Local),
            IP_VS_CONN_F_TUNNEL => Ok(Self::Tunnel),
            IP_VS_CONN_F_DROUTE => Ok(Self::DirectRoute),
            IP_VS_CONN_F_BYPASS => Ok(Self::Bypass),
            other => Err(DecodeError::BadValue {
                what: "forwarding method",
                value: other.to_string(),
            }),
        }
    }
}

/// An IPVS virtual service (`IPVS_CMD_ATTR_SERVICE`).
///
/// A service is identified by (`address_family`, `protocol`, `address`, `port`) or, when
/// `fwmark != 0`, by (`address_family`, `fwmark`). For fwmark services the kernel neither
/// takes nor reports protocol/address/port; they decode as `Tcp` (what the kernel stores),
/// the unspecified address and port 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VirtualService {
    /// `IPVS_SVC_ATTR_AF`.
    pub address_family: AddressFamily,
    /// `IPVS_SVC_ATTR_PROTOCOL`.
    pub protocol: Protocol,
    /// `IPVS_SVC_ATTR_ADDR`.
    pub address: IpAddr,
    /// `IPVS_SVC_ATTR_PORT` (host order here; network order on the wire).
    pub port: u16,
    /// `IPVS_SVC_ATTR_FWMARK`; 0 for none.
    pub fwmark: u32,
    /// `IPVS_SVC_ATTR_SCHED_NAME`, e.g. `rr`, `wrr`, `lc`, `sh`, `mh`.
    pub scheduler: String,
    /// `IPVS_SVC_ATTR_FLAGS`.
    pub flags: ServiceFlags,
    /// `IPVS_SVC_ATTR_TIMEOUT`: persistence timeout in seconds.
    pub timeout: u32,
    /// `IPVS_SVC_ATTR_NETMASK`: raw `__be32` mask for IPv4, prefix length for IPv6.
    pub netmask: u32,
}

impl VirtualService {
    /// A service on `address:port/protocol` with `scheduler`, no flags, and the full netmask
    /// upstream uses (`0xffffffff` for IPv4, 128 for IPv6).
    pub fn new(address: IpAddr, protocol: Protocol, port: u16, scheduler: &str) -> Self {
        let address_family = AddressFamily::of(&address);
        Self {
            address_family,
            protocol,
            address,
            port,
            fwmark: 0,
            scheduler: scheduler.to_owned(),
            flags: ServiceFlags::default(),
            timeout: 0,
            netmask: match address_family {
                AddressFamily::Inet => u32::MAX,
                AddressFamily::Inet6 => 128,
            },
        }
    }

    /// A firewall-mark service.
    pub fn with_fwmark(address_family: AddressFamily, fwmark: u32, scheduler: &str) -> Self {
        let mut s = Self::new(address_family.unspecified(), Protocol::Tcp, 0, scheduler);
        s.fwmark = fwmark;
        s
    }

    /// Only the identifying fields, the rest defaulted: what `GET_SERVICE`/`GET_DEST`
    /// requests carry, and so what they decode to.
    pub fn key(&self) -> Self {
        Self {
            address_family: self.address_family,
            protocol: if self.fwmark != 0 {
                Protocol::Tcp
            } else {
                self.protocol
            },
            address: if self.fwmark != 0 {
                self.address_family.unspecified()
            } else {
                self.address
            },
            port: if self.fwmark != 0 { 0 } else { self.port },
            fwmark: self.fwmark,
            scheduler: String::new(),
            flags: ServiceFlags { flags: 0, mask: 0 },
            timeout: 0,
            netmask: 0,
        }
    }

    /// Whether `self` and `other` name the same kernel service.
    pub fn same_key(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl fmt::Display for VirtualService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fwmark != 0 {
            return write!(f, "FWM {} ({:?})", self.fwmark, self.address_family);
        }
        let proto = match self.protocol {
            Protocol::Tcp => "TCP".to_owned(),
            Protocol::Udp => "UDP".to_owned(),
            Protocol::Sctp => "SCTP".to_owned(),
            Protocol::Other(n) => format!("proto {n}"),
        };
        match self.address {
            IpAddr::V4(a) => write!(f, "{proto} {a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "{proto} [{a}]:{}", self.port),
        }
    }
}

/// An IPVS real server (`IPVS_CMD_ATTR_DEST`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RealServer {
    /// `IPVS_DEST_ATTR_ADDR`.
    pub address: IpAddr,
    /// `IPVS_DEST_ATTR_PORT` (host order here).
    pub port: u16,
    /// `IPVS_DEST_ATTR_WEIGHT` (0 = quiesced: no new connections).
    pub weight: i32,
    /// `IPVS_DEST_ATTR_FWD_METHOD`.
    pub forward: ForwardMethod,
    /// `IPVS_DEST_ATTR_U_THRESH` (0 = none).
    pub upper_threshold: u32,
    /// `IPVS_DEST_ATTR_L_THRESH` (0 = none).
    pub lower_threshold: u32,
    /// `IPVS_DEST_ATTR_ACTIVE_CONNS` (decoded only, never sent).
    pub active_conns: u32,
    /// `IPVS_DEST_ATTR_INACT_CONNS` (decoded only, never sent).
    pub inactive_conns: u32,
    /// `IPVS_DEST_ATTR_PERSIST_CONNS` (decoded only, never sent).
    pub persist_conns: u32,
    /// `IPVS_DEST_ATTR_ADDR_FAMILY` (kernel >= 3.18); sent when `Some`.
    pub address_family: Option<AddressFamily>,
}

impl RealServer {
    /// A NAT real server with `weight`, no thresholds, and its address family set.
    pub fn new(address: IpAddr, port: u16, weight: i32) -> Self {
        Self {
            address,
            port,
            weight,
            forward: ForwardMethod::Masq,
            upper_threshold: 0,
            lower_threshold: 0,
            active_conns: 0,
            inactive_conns: 0,
            persist_conns: 0,
            address_family: Some(AddressFamily::of(&address)),
        }
    }
}

impl fmt::Display for RealServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// Connection timeouts in seconds (`IPVS_CMD_ATTR_TIMEOUT_*`; `ipvsadm --set`). In a
/// `SET_CONFIG` request 0 leaves the value unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    /// Established TCP.
    pub tcp: u32,
    /// TCP after FIN.
    pub tcp_fin: u32,
    /// UDP.
    pub udp: u32,
}

/// The `GET_INFO` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpvsInfo {
    /// `IP_VS_VERSION_CODE`, e.g. `0x010201` for 1.2.1.
    pub version: u32,
    /// Size of the connection hash table.
    pub conn_tab_size: u32,
}

/// IPVS generic-netlink commands (`IPVS_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum IpvsCmd {
    NewService = 1,
    SetService = 2,
    DelService = 3,
    GetService = 4,
    NewDest = 5,
    SetDest = 6,
    DelDest = 7,
    GetDest = 8,
    NewDaemon = 9,
    DelDaemon = 10,
    GetDaemon = 11,
    SetConfig = 12,
    GetConfig = 13,
    SetInfo = 14,
    GetInfo = 15,
    Zero = 16,
    Flush = 17,
}

impl IpvsCmd {
    /// From the `genlmsghdr.cmd` byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        use IpvsCmd::*;
        Ok(match v {
            1 => NewService,
            2 => SetService,
            3 => DelService,
            4 => GetService,
            5 => NewDest,
            6 => SetDest,
            7 => DelDest,
            8 => GetDest,
            9 => NewDaemon,
            10 => DelDaemon,
            11 => GetDaemon,
            12 => SetConfig,
            13 => GetConfig,
            14 => SetInfo,
            15 => GetInfo,
            16 => Zero,
            17 => Flush,
            other => return Err(DecodeError::UnknownCommand(other)),
        })
    }
}

/// One IPVS generic-netlink message: a command and its top-level attributes.
///
/// Top-level attribute ids depend on the command: `SET_INFO`/`GET_INFO` use
/// `IPVS_INFO_ATTR_*` (which reuse ids 1 and 2), all others `IPVS_CMD_ATTR_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    /// `genlmsghdr.cmd`.
    pub cmd: IpvsCmd,
    /// `IPVS_CMD_ATTR_SERVICE`.
    pub service: Option<VirtualService>,
    /// `IPVS_CMD_ATTR_DEST`.
    pub dest: Option<RealServer>,
    /// `IPVS_CMD_ATTR_TIMEOUT_{TCP,TCP_FIN,UDP}` (emitted all three, decoded if any).
    pub timeouts: Option<Timeouts>,
    /// `IPVS_INFO_ATTR_*` (only for `SET_INFO`/`GET_INFO`).
    pub info: Option<IpvsInfo>,
}

impl IpvsMessage {
    /// A message with no attributes.
    pub fn bare(cmd: IpvsCmd) -> Self {
        Self {
            cmd,
            service: None,
            dest: None,
            timeouts: None,
            info: None,
        }
    }

    /// `IPVS_CMD_NEW_SERVICE`.
    pub fn new_service(svc: &VirtualService) -> Self {
        Self::with_service(IpvsCmd::NewService, svc)
    }

    /// `IPVS_CMD_SET_SERVICE`.
    pub fn set_service(svc: &VirtualService) -> Self {
        Self::with_service(IpvsCmd::SetService, svc)
    }

    /// `IPVS_CMD_DEL_SERVICE`.
    pub fn del_service(svc: &VirtualService) -> Self {
        Self::with_service(IpvsCmd::DelService, svc)
    }

    /// `IPVS_CMD_GET_SERVICE` with no attributes: send with `NLM_F_DUMP` to list services.
    pub fn dump_services() -> Self {
        Self::bare(IpvsCmd::GetService)
    }

    /// `IPVS_CMD_GET_DEST` for `svc`: send with `NLM_F_DUMP` to list its destinations.
    pub fn dump_dests(svc: &VirtualService) -> Self {
        Self::with_service(IpvsCmd::GetDest, &svc.key())
    }

    /// `IPVS_CMD_NEW_DEST`.
    pub fn new_dest(svc: &VirtualService, dest: &RealServer) -> Self {
        Self::with_dest(IpvsCmd::NewDest, svc, dest)
    }

    /// `IPVS_CMD_SET_DEST`.
    pub fn set_dest(svc: &VirtualService, dest: &RealServer) -> Self {
        Self::with_dest(IpvsCmd::SetDest, svc, dest)
    }

    /// `IPVS_CMD_DEL_DEST`.
    pub fn del_dest(svc: &VirtualService, dest: &RealServer) -> Self {
        Self::with_dest(IpvsCmd::DelDest, svc, dest)
    }

    /// `IPVS_CMD_FLUSH`: remove every service and destination.
    pub fn flush() -> Self {
        Self::bare(IpvsCmd::Flush)
    }

    /// `IPVS_CMD_GET_INFO`.
    pub fn get_info() -> Self {
        Self::bare(IpvsCmd::GetInfo)
    }

    /// `IPVS_CMD_GET_CONFIG`.
    pub fn get_config() -> Self {
        Self::bare(IpvsCmd::GetConfig)
    }

    /// `IPVS_CMD_SET_CONFIG`.
    pub fn set_config(t: Timeouts) -> Self {
        Self {
            timeouts: Some(t),
            ..Self::bare(IpvsCmd::SetConfig)
        }
    }

    fn with_service(cmd: IpvsCmd, svc: &VirtualService) -> Self {
        Self {
            service: Some(svc.clone()),
            ..Self::bare(cmd)
        }
    }

    fn with_dest(cmd: IpvsCmd, svc: &VirtualService, dest: &RealServer) -> Self {
        Self {
            service: Some(svc.clone()),
            dest: Some(dest.clone()),
            ..Self::bare(cmd)
        }
    }

    /// Whether service attributes are emitted key-only for this command.
    fn service_key_only(&self) -> bool {
        matches!(self.cmd, IpvsCmd::GetService | IpvsCmd::GetDest)
    }

    fn is_info(&self) -> bool {
        matches!(self.cmd, IpvsCmd::GetInfo | IpvsCmd::SetInfo)
    }

    /// Appends `genlmsghdr` and attributes.
    fn emit_genl(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        out.extend_from_slice(&[self.cmd as u8, IPVS_GENL_VERSION, 0, 0]);
        if let Some(svc) = &self.service {
            let nest = nest_start(out, IPVS_CMD_ATTR_SERVICE);
            emit_service(out, svc, self.service_key_only())?;
            nest_end(out, nest);
        }
        if let Some(dest) = &self.dest {
            let nest = nest_start(out, IPVS_CMD_ATTR_DEST);
            emit_dest(out, dest);
            nest_end(out, nest);
        }
        if let Some(t) = &self.timeouts {
            put_u32(out, IPVS_CMD_ATTR_TIMEOUT_TCP, t.tcp);
            put_u32(out, IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin);
            put_u32(out, IPVS_CMD_ATTR_TIMEOUT_UDP, t.udp);
        }
        if let Some(i) = &self.info {
            put_u32(out, IPVS_INFO_ATTR_VERSION, i.version);
            put_u32(out, IPVS_INFO_ATTR_CONN_TAB_SIZE, i.conn_tab_size);
        }
        Ok(())
    }

    /// Decodes `genlmsghdr` + attributes. `dest_af_hint` is used for a destination that
    /// carries no `IPVS_DEST_ATTR_ADDR_FAMILY` (kernels before 3.18) and no service.
    fn parse_genl(buf: &[u8], dest_af_hint: Option<AddressFamily>) -> Result<Self, DecodeError> {
        need(buf, GENL_HDRLEN, "genlmsghdr")?;
        let mut msg = Self::bare(IpvsCmd::from_u8(buf[0])?);
        let info = msg.is_info();
        let mut timeouts: Option<Timeouts> = None;
        let mut dest_raw: Option<&[u8]> = None;
        for attr in Attrs::new(&buf[GENL_HDRLEN..]) {
            let (ty, val) = attr?;
            if info {
                let i = msg.info.get_or_insert_with(IpvsInfo::default);
                match ty {
                    IPVS_INFO_ATTR_VERSION => i.version = get_u32(val, "info version")?,
                    IPVS_INFO_ATTR_CONN_TAB_SIZE => {
                        i.conn_tab_size = get_u32(val, "info conn_tab_size")?
                    }
                    _ => {}
                }
                continue;
            }
            match ty {
                IPVS_CMD_ATTR_SERVICE => msg.service = Some(parse_service(val)?),
                IPVS_CMD_ATTR_DEST => dest_raw = Some(val),
                IPVS_CMD_ATTR_TIMEOUT_TCP => {
                    timeouts.get_or_insert_with(Timeouts::default).tcp =
                        get_u32(val, "timeout tcp")?
                }
                IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => {
                    timeouts.get_or_insert_with(Timeouts::default).tcp_fin =
                        get_u32(val, "timeout tcpfin")?
                }
                IPVS_CMD_ATTR_TIMEOUT_UDP => {
                    timeouts.get_or_insert_with(Timeouts::default).udp =
                        get_u32(val, "timeout udp")?
                }
                _ => {}
            }
        }
        if let Some(raw) = dest_raw {
            let hint = msg
                .service
                .as_ref()
                .map(|s| s.address_family)
                .or(dest_af_hint);
            msg.dest = Some(parse_dest(raw, hint)?);
        }
        msg.timeouts = timeouts;
        Ok(msg)
    }
}

/// A generic-netlink controller message (family id resolution).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrlMessage {
    /// `CTRL_CMD_*`.
    pub cmd: u8,
    /// `CTRL_ATTR_FAMILY_NAME`.
    pub family_name: Option<String>,
    /// `CTRL_ATTR_FAMILY_ID`.
    pub family_id: Option<u16>,
}

impl CtrlMessage {
    /// `CTRL_CMD_GETFAMILY` for `name`.
    pub fn get_family(name: &str) -> Self {
        Self {
            cmd: CTRL_CMD_GETFAMILY,
            family_name: Some(name.to_owned()),
            family_id: None,
        }
    }

    fn emit_genl(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        out.extend_from_slice(&[self.cmd, CTRL_VERSION, 0, 0]);
        if let Some(name) = &self.family_name {
            put_string(out, CTRL_ATTR_FAMILY_NAME, name)?;
        }
        if let Some(id) = self.family_id {
            put_u16(out, CTRL_ATTR_FAMILY_ID, id);
        }
        Ok(())
    }

    fn parse_genl(buf: &[u8]) -> Result<Self, DecodeError> {
        need(buf, GENL_HDRLEN, "genlmsghdr")?;
        let mut msg = Self {
            cmd: buf[0],
            family_name: None,
            family_id: None,
        };
        for attr in Attrs::new(&buf[GENL_HDRLEN..]) {
            let (ty, val) = attr?;
            match ty {
                CTRL_ATTR_FAMILY_ID => msg.family_id = Some(get_u16(val, "family id")?),
                CTRL_ATTR_FAMILY_NAME => msg.family_name = Some(get_string(val, "family name")?),
                _ => {}
            }
        }
        Ok(msg)
    }
}

/// A `nlmsghdr` without its length (computed on emit, checked on parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetlinkHeader {
    /// `nlmsg_type`: a generic-netlink family id, or `NLMSG_*`.
    pub message_type: u16,
    /// `NLM_F_*`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub sequence: u32,
    /// `nlmsg_pid` (port id; 0 for the kernel, and in our requests).
    pub port: u32,
}

/// The body of an `NLMSG_ERROR` message: an error, or with `code == 0` an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    /// 0 for an ack, else a negated errno.
    pub code: i32,
    /// Length field of the echoed request header.
    pub request_length: u32,
    /// The echoed request header.
    pub request: NetlinkHeader,
    /// The echoed request payload (empty when `NLM_F_CAPPED`).
    pub request_payload: Vec<u8>,
    /// `NLMSGERR_ATTR_MSG` from extended acks, if any.
    pub ext_msg: Option<String>,
}

impl ErrorMessage {
    /// The positive errno, or `None` for an ack.
    pub fn errno(&self) -> Option<i32> {
        (self.code != 0).then(|| self.code.saturating_neg())
    }
}

/// What a netlink message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetlinkPayload {
    /// A message of the IPVS family.
    Ipvs(IpvsMessage),
    /// A message of the generic-netlink controller.
    Ctrl(CtrlMessage),
    /// `NLMSG_ERROR`: error or ack.
    Error(ErrorMessage),
    /// `NLMSG_DONE`, with the dump's final status (0 or a negated errno).
    Done(i32),
    /// `NLMSG_NOOP`.
    Noop,
    /// `NLMSG_OVERRUN`.
    Overrun,
    /// Any other message type, raw.
    Other(Vec<u8>),
}

/// One netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetlinkMessage {
    /// The header (its `message_type` must match the payload).
    pub header: NetlinkHeader,
    /// The payload.
    pub payload: NetlinkPayload,
}

impl NetlinkMessage {
    /// An IPVS request to family `family_id` with `flags` (e.g. `NLM_F_REQUEST | NLM_F_ACK`).
    pub fn ipvs(family_id: u16, flags: u16, sequence: u32, msg: IpvsMessage) -> Self {
        Self {
            header: NetlinkHeader {
                message_type: family_id,
                flags,
                sequence,
                port: 0,
            },
            payload: NetlinkPayload::Ipvs(msg),
        }
    }

    /// A controller request.
    pub fn ctrl(flags: u16, sequence: u32, msg: CtrlMessage) -> Self {
        Self {
            header: NetlinkHeader {
                message_type: GENL_ID_CTRL,
                flags,
                sequence,
                port: 0,
            },
            payload: NetlinkPayload::Ctrl(msg),
        }
    }

    /// Appends the encoded message (header, payload, padding to 4) to `out`.
    pub fn emit_into(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let start = out.len();
        out.extend_from_slice(&[0; NLMSG_HDRLEN]);
        match &self.payload {
            NetlinkPayload::Ipvs(m) => m.emit_genl(out)?,
            NetlinkPayload::Ctrl(m) => m.emit_genl(out)?,
            NetlinkPayload::Error(e) => {
                out.extend_from_slice(&e.code.to_ne_bytes());
                emit_header(out, e.request_length, &e.request);
                out.extend_from_slice(&e.request_payload);
                if let Some(msg) = &e.ext_msg {
                    put_string(out, NLMSGERR_ATTR_MSG, msg)?;
                }
            }
            NetlinkPayload::Done(code) => out.extend_from_slice(&code.to_ne_bytes()),
            NetlinkPayload::Noop | NetlinkPayload::Overrun => {}
            NetlinkPayload::Other(raw) => out.extend_from_slice(raw),
        }
        let len = out.len() - start;
        let len32 = u32::try_from(len).map_err(|_| DecodeError::BadLength {
            what: "nlmsghdr",
            len,
        })?;
        let mut hdr = Vec::with_capacity(NLMSG_HDRLEN);
        emit_header(&mut hdr, len32, &self.header);
        out[start..start + NLMSG_HDRLEN].copy_from_slice(&hdr);
        pad(out);
        Ok(())
    }

    /// The encoded message.
    pub fn emit(&self) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::with_capacity(128);
        self.emit_into(&mut out)?;
        Ok(out)
    }
}

/// ORs `flags` into the header of the encoded message at the start of `msg` (e.g. `NLM_F_ACK`
/// on the last request of a batch, once the batch is known to end there). `msg` shorter than
/// a header is left alone.
pub fn add_flags(msg: &mut [u8], flags: u16) {
    if let Some(field) = msg.get_mut(6..8) {
        let old = u16::from_ne_bytes([field[0], field[1]]);
        field.copy_from_slice(&(old | flags).to_ne_bytes());
    }
}

/// Decodes every netlink message in one received datagram. Messages whose type is
/// `ipvs_family` decode as [`NetlinkPayload::Ipvs`].
pub fn parse(buf: &[u8], ipvs_family: u16) -> Result<Vec<NetlinkMessage>, DecodeError> {
    parse_with_hint(buf, ipvs_family, None)
}

/// Like [`parse`]; `dest_af_hint` (the service's family) decodes destination addresses that
/// carry no `IPVS_DEST_ATTR_ADDR_FAMILY` (kernels before 3.18). Without a hint such an
/// address decodes as IPv4 if 4 bytes long, else IPv6.
pub fn parse_with_hint(
    buf: &[u8],
    ipvs_family: u16,
    dest_af_hint: Option<AddressFamily>,
) -> Result<Vec<NetlinkMessage>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        need(rest, NLMSG_HDRLEN, "nlmsghdr")?;
        let len = u32::from_ne_bytes(arr4(&rest[0..4])) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(DecodeError::BadLength {
                what: "nlmsghdr",
                len,
            });
        }
        let header = parse_header(rest);
        let body = &rest[NLMSG_HDRLEN..len];
        let payload = match header.message_type {
            NLMSG_NOOP => NetlinkPayload::Noop,
            NLMSG_OVERRUN => NetlinkPayload::Overrun,
            NLMSG_DONE => {
                // The kernel always sends an int; tolerate an empty DONE.
                if body.len() >= 4 {
                    NetlinkPayload::Done(i32::from_ne_bytes(arr4(&body[0..4])))
                } else {
                    NetlinkPayload::Done(0)
                }
            }
            NLMSG_ERROR => NetlinkPayload::Error(parse_error(body, header.flags)?),
            GENL_ID_CTRL => NetlinkPayload::Ctrl(CtrlMessage::parse_genl(body)?),
            t if t == ipvs_family => {
                NetlinkPayload::Ipvs(IpvsMessage::parse_genl(body, dest_af_hint)?)
            }
            _ => NetlinkPayload::Other(body.to_vec()),
        };
        out.push(NetlinkMessage { header, payload });
        let advance = align4(len).min(rest.len());
        rest = &rest[advance..];
    }
    Ok(out)
}

// === service / destination encoding ===

fn emit_service(
    out: &mut Vec<u8>,
    svc: &VirtualService,
    key_only: bool,
) -> Result<(), DecodeError> {
    if AddressFamily::of(&svc.address) != svc.address_family && svc.fwmark == 0 {
        return Err(DecodeError::BadValue {
            what: "service address (family mismatch)",
            value: svc.address.to_string(),
        });
    }
    put_u16(out, IPVS_SVC_ATTR_AF, svc.address_family.as_u16());
    if svc.fwmark != 0 {
        put_u32(out, IPVS_SVC_ATTR_FWMARK, svc.fwmark);
    } else {
        put_u16(out, IPVS_SVC_ATTR_PROTOCOL, svc.protocol.as_u16());
        put_attr(out, IPVS_SVC_ATTR_ADDR, &addr_bytes(&svc.address));
        put_attr(out, IPVS_SVC_ATTR_PORT, &svc.port.to_be_bytes());
    }
    if key_only {
        return Ok(());
    }
    if svc.scheduler.len() >= IP_VS_SCHEDNAME_MAXLEN {
        return Err(DecodeError::BadValue {
            what: "scheduler name (too long)",
            value: svc.scheduler.clone(),
        });
    }
    put_string(out, IPVS_SVC_ATTR_SCHED_NAME, &svc.scheduler)?;
    let mut flags = [0u8; 8];
    flags[0..4].copy_from_slice(&svc.flags.flags.to_ne_bytes());
    flags[4..8].copy_from_slice(&svc.flags.mask.to_ne_bytes());
    put_attr(out, IPVS_SVC_ATTR_FLAGS, &flags);
    put_u32(out, IPVS_SVC_ATTR_TIMEOUT, svc.timeout);
    put_u32(out, IPVS_SVC_ATTR_NETMASK, svc.netmask);
    Ok(())
}

fn parse_service(buf: &[u8]) -> Result<VirtualService, DecodeError> {
    let mut af = None;
    let mut protocol = None;
    let mut addr: Option<&[u8]> = None;
    let mut port = None;
    let mut fwmark = 0;
    let mut scheduler = String::new();
    let mut flags = ServiceFlags { flags: 0, mask: 0 };
    let mut timeout = 0;
    let mut netmask = 0;
    for attr in Attrs::new(buf) {
        let (ty, val) = attr?;
        match ty {
            IPVS_SVC_ATTR_AF => af = Some(AddressFamily::from_u16(get_u16(val, "service af")?)?),
            IPVS_SVC_ATTR_PROTOCOL => {
                protocol = Some(Protocol::from_u16(get_u16(val, "protocol")?))
            }
            IPVS_SVC_ATTR_ADDR => addr = Some(val),
            IPVS_SVC_ATTR_PORT => port = Some(get_be16(val, "service port")?),
            IPVS_SVC_ATTR_FWMARK => fwmark = get_u32(val, "fwmark")?,
            IPVS_SVC_ATTR_SCHED_NAME => scheduler = get_string(val, "scheduler")?,
            IPVS_SVC_ATTR_FLAGS => {
                need(val, 8, "service flags")?;
                flags = ServiceFlags {
                    flags: u32::from_ne_bytes(arr4(&val[0..4])),
                    mask: u32::from_ne_bytes(arr4(&val[4..8])),
                };
            }
            IPVS_SVC_ATTR_TIMEOUT => timeout = get_u32(val, "service timeout")?,
            IPVS_SVC_ATTR_NETMASK => netmask = get_u32(val, "netmask")?,
            _ => {} // STATS, STATS64, PE_NAME, and anything newer.
        }
    }
    let af = af.ok_or(DecodeError::Missing("IPVS_SVC_ATTR_AF"))?;
    let (protocol, address, port) = if fwmark != 0 {
        (
            protocol.unwrap_or(Protocol::Tcp),
            af.unspecified(),
            port.unwrap_or(0),
        )
    } else {
        let addr = addr.ok_or(DecodeError::Missing("IPVS_SVC_ATTR_ADDR"))?;
        (
            protocol.ok_or(DecodeError::Missing("IPVS_SVC_ATTR_PROTOCOL"))?,
            decode_addr(addr, af)?,
            port.ok_or(DecodeError::Missing("IPVS_SVC_ATTR_PORT"))?,
        )
    };
    Ok(VirtualService {
        address_family: af,
        protocol,
        address,
        port,
        fwmark,
        scheduler,
        flags,
        timeout,
        netmask,
    })
}

fn emit_dest(out: &mut Vec<u8>, d: &RealServer) {
    if let Some(af) = d.address_family {
        put_u16(out, IPVS_DEST_ATTR_ADDR_FAMILY, af.as_u16());
    }
    put_attr(out, IPVS_DEST_ATTR_ADDR, &addr_bytes(&d.address));
    put_attr(out, IPVS_DEST_ATTR_PORT, &d.port.to_be_bytes());
    put_u32(out, IPVS_DEST_ATTR_FWD_METHOD, d.forward.as_u32());
    put_u32(out, IPVS_DEST_ATTR_WEIGHT, d.weight as u32);
    put_u32(out, IPVS_DEST_ATTR_U_THRESH, d.upper_threshold);
    put_u32(out, IPVS_DEST_ATTR_L_THRESH, d.lower_threshold);
}

fn parse_dest(buf: &[u8], hint: Option<AddressFamily>) -> Result<RealServer, DecodeError> {
    let mut af = None;
    let mut addr: Option<&[u8]> = None;
    let mut d = RealServer::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, 0);
    let mut port = None;
    for attr in Attrs::new(buf) {
        let (ty, val) = attr?;
        match ty {
            IPVS_DEST_ATTR_ADDR => addr = Some(val),
            IPVS_DEST_ATTR_PORT => port = Some(get_be16(val, "dest port")?),
            IPVS_DEST_ATTR_FWD_METHOD => {
                d.forward = ForwardMethod::from_u32(get_u32(val, "fwd method")?)?
            }
            IPVS_DEST_ATTR_WEIGHT => d.weight = get_u32(val, "weight")? as i32,
            IPVS_DEST_ATTR_U_THRESH => d.upper_threshold = get_u32(val, "u_thresh")?,
            IPVS_DEST_ATTR_L_THRESH => d.lower_threshold = get_u32(val, "l_thresh")?,
            IPVS_DEST_ATTR_ACTIVE_CONNS => d.active_conns = get_u32(val, "active conns")?,
            IPVS_DEST_ATTR_INACT_CONNS => d.inactive_conns = get_u32(val, "inact conns")?,
            IPVS_DEST_ATTR_PERSIST_CONNS => d.persist_conns = get_u32(val, "persist conns")?,
            IPVS_DEST_ATTR_ADDR_FAMILY => {
                af = Some(AddressFamily::from_u16(get_u16(val, "dest af")?)?)
            }
            _ => {} // STATS, STATS64, TUN_*, and anything newer.
        }
    }
    let addr = addr.ok_or(DecodeError::Missing("IPVS_DEST_ATTR_ADDR"))?;
    let decode_af = af.or(hint).unwrap_or(if addr.len() == 4 {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    });
    d.address = decode_addr(addr, decode_af)?;
    d.port = port.ok_or(DecodeError::Missing("IPVS_DEST_ATTR_PORT"))?;
    d.address_family = af;
    Ok(d)
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4.
fn addr_bytes(a: &IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v4) => b[0..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => b = v6.octets(),
    }
    b
}

fn decode_addr(val: &[u8], af: AddressFamily) -> Result<IpAddr, DecodeError> {
    match af {
        AddressFamily::Inet => {
            need(val, 4, "IPv4 address")?;
            Ok(IpAddr::V4(Ipv4Addr::from(arr4(&val[0..4]))))
        }
        AddressFamily::Inet6 => {
            need(val, 16, "IPv6 address")?;
            let mut b = [0u8; 16];
            b.copy_from_slice(&val[0..16]);
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
    }
}

// === netlink primitives ===

fn emit_header(out: &mut Vec<u8>, len: u32, h: &NetlinkHeader) {
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&h.message_type.to_ne_bytes());
    out.extend_from_slice(&h.flags.to_ne_bytes());
    out.extend_from_slice(&h.sequence.to_ne_bytes());
    out.extend_from_slice(&h.port.to_ne_bytes());
}

/// `buf` must hold at least `NLMSG_HDRLEN` bytes.
fn parse_header(buf: &[u8]) -> NetlinkHeader {
    NetlinkHeader {
        message_type: u16::from_ne_bytes([buf[4], buf[5]]),
        flags: u16::from_ne_bytes([buf[6], buf[7]]),
        sequence: u32::from_ne_bytes(arr4(&buf[8..12])),
        port: u32::from_ne_bytes(arr4(&buf[12..16])),
    }
}

fn parse_error(body: &[u8], flags: u16) -> Result<ErrorMessage, DecodeError> {
    need(body, 4 + NLMSG_HDRLEN, "nlmsgerr")?;
    let code = i32::from_ne_bytes(arr4(&body[0..4]));
    let echoed = &body[4..];
    let request_length = u32::from_ne_bytes(arr4(&echoed[0..4]));
    let request = parse_header(echoed);
    // Without NLM_F_CAPPED the whole request is echoed; its length is in its header.
    let echo_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        (request_length as usize).clamp(NLMSG_HDRLEN, echoed.len())
    };
    let request_payload = echoed[NLMSG_HDRLEN..echo_len].to_vec();
    let mut ext_msg = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        let tlv_start = align4(echo_len).min(echoed.len());
        for attr in Attrs::new(&echoed[tlv_start..]) {
            let (ty, val) = attr?;
            if ty == NLMSGERR_ATTR_MSG {
                ext_msg = Some(get_string(val, "extack message")?);
            }
        }
    }
    Ok(ErrorMessage {
        code,
        request_length,
        request,
        request_payload,
        ext_msg,
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn pad(out: &mut Vec<u8>) {
    let target = align4(out.len());
    out.resize(target, 0);
}

fn put_attr(out: &mut Vec<u8>, ty: u16, val: &[u8]) {
    // Attribute payloads here are at most a few dozen bytes.
    let len = (4 + val.len()) as u16;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(val);
    pad(out);
}

fn put_u16(out: &mut Vec<u8>, ty: u16, v: u16) {
    put_attr(out, ty, &v.to_ne_bytes());
}

fn put_u32(out: &mut Vec<u8>, ty: u16, v: u32) {
    put_attr(out, ty, &v.to_ne_bytes());
}

fn put_string(out: &mut Vec<u8>, ty: u16, s: &str) -> Result<(), DecodeError> {
    if s.as_bytes().contains(&0) || s.len() > 1024 {
        return Err(DecodeError::BadValue {
            what: "string attribute",
            value: s.to_owned(),
        });
    }
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    put_attr(out, ty, &v);
    Ok(())
}

/// Starts a nested attribute (with `NLA_F_NESTED`, as libnl sets it); returns its offset
/// for [`nest_end`].
fn nest_start(out: &mut Vec<u8>, ty: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(out: &mut [u8], at: usize) {
    let len = (out.len() - at) as u16;
    out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn need(buf: &[u8], n: usize, what: &'static str) -> Result<(), DecodeError> {
    if buf.len() < n {
        Err(DecodeError::Truncated {
            what,
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// The caller guarantees `b.len() >= 4`.
fn arr4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

fn get_u16(val: &[u8], what: &'static str) -> Result<u16, DecodeError> {
    need(val, 2, what)?;
    Ok(u16::from_ne_bytes([val[0], val[1]]))
}

fn get_be16(val: &[u8], what: &'static str) -> Result<u16, DecodeError> {
    need(val, 2, what)?;
    Ok(u16::from_be_bytes([val[0], val[1]]))
}

fn get_u32(val: &[u8], what: &'static str) -> Result<u32, DecodeError> {
    need(val, 4, what)?;
    Ok(u32::from_ne_bytes(arr4(val)))
}

fn get_string(val: &[u8], what: &'static str) -> Result<String, DecodeError> {
    let end = val.iter().position(|&b| b == 0).unwrap_or(val.len());
    String::from_utf8(val[..end].to_vec()).map_err(|_| DecodeError::BadValue {
        what,
        value: String::from_utf8_lossy(&val[..end]).into_owned(),
    })
}

/// Iterator over `(type, payload)` of a run of netlink attributes.
struct Attrs<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Attrs<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self {
            rest: buf,
            failed: false,
        }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < 4 {
            self.failed = true;
            return Some(Err(DecodeError::Truncated {
                what: "nlattr",
                need: 4,
                have: self.rest.len(),
            }));
        }
        let len = u16::from_ne_bytes([self.rest[0], self.rest[1]]) as usize;
        let ty = u16::from_ne_bytes([self.rest[2], self.rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.rest.len() {
            self.failed = true;
            return Some(Err(DecodeError::BadLength {
                what: "nlattr",
                len,
            }));
        }
        let val = &self.rest[4..len];
        self.rest = &self.rest[align4(len).min(self.rest.len())..];
        Some(Ok((ty, val)))
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests;

#[cfg(all(test, target_endian = "little"))]
mod captured_tests;
