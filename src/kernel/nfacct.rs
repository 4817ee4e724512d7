//! Extended accounting counters (nfacct, `NETLINK_NETFILTER` subsystem `NFNL_SUBSYS_ACCT`), as
//! upstream's `pkg/proxy/util/nfacct` drives them: iptables mode creates two named counters at
//! start, its rules count packets into them with `-m nfacct --nfacct-name NAME`, and `/metrics`
//! reads them at every scrape.
//!
//! Own codec over a plain `netlink-sys` socket. The socket is non-blocking: the kernel handles a
//! netfilter request inside `sendmsg` and queues its answer before the call returns, so every
//! reply is already there when it is read, and a missing one is an error instead of a hang. This
//! keeps the client synchronous, so a scrape can read the counters in place.
//!
//! Counters belong to the network namespace the socket was opened in; a handle bound to a named
//! namespace opens its socket on a short-lived thread that entered `/run/netns/NAME`.

use std::io;

use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};

use super::KernelError;

/// Longest counter name the kernel accepts (`NFACCT_NAME_MAX` less the terminating NUL).
pub const MAX_NAME_LEN: usize = 31;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NFNL_SUBSYS_ACCT: u16 = 7;
const NFNL_MSG_ACCT_NEW: u16 = 0;
const NFNL_MSG_ACCT_GET: u16 = 1;
const NFACCT_NAME: u16 = 1;
const NFACCT_PKTS: u16 = 2;
const NFACCT_BYTES: u16 = 3;
const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
const EBUSY: i32 = 16;
/// The name upstream's probe asks for: it may or may not exist, either answer proves support.
const PROBE_NAME: &str = "IMayExist";

/// One accounting object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// Its name.
    pub name: String,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// A handle on the kernel's nfacct objects, optionally in a named network namespace.
#[derive(Debug, Clone, Default)]
pub struct Nfacct {
    netns: Option<String>,
}

fn err(op: &str, source: io::Error) -> KernelError {
    KernelError::Netlink {
        op: format!("nfacct: {op}"),
        source,
    }
}

impl Nfacct {
    /// A handle in this process's network namespace.
    pub fn new() -> Self {
        Nfacct::default()
    }

    /// The same handle, working in `/run/netns/NAME`.
    pub fn with_netns(mut self, name: impl AsRef<str>) -> Self {
        self.netns = Some(name.as_ref().to_string());
        self
    }

    /// Whether the kernel has nfacct (upstream `nfacct.New`): a GET answers with the object
    /// or `ENOENT`; anything else (no such subsystem, no permission) means no support.
    pub fn probe(&self) -> Result<(), KernelError> {
        self.get(PROBE_NAME).map(|_| ())
    }

    /// The counter called `name`, `None` if it does not exist.
    pub fn get(&self, name: &str) -> Result<Option<Counter>, KernelError> {
        let op = format!("getting {name}");
        let req =
            request(NFNL_MSG_ACCT_GET, NLM_F_REQUEST | NLM_F_ACK, name).map_err(|e| err(&op, e))?;
        match self.exchange(&req) {
            Ok(payloads) => payloads
                .first()
                .map(|p| decode_counter(p).map_err(|e| err(&op, e)))
                .transpose(),
            Err(Answer::Errno(ENOENT)) => Ok(None),
            Err(a) => Err(err(&op, a.into())),
        }
    }

    /// Creates the counter called `name` unless it exists (upstream `Ensure`).
    pub fn ensure(&self, name: &str) -> Result<(), KernelError> {
        if self.get(name)?.is_some() {
            return Ok(());
        }
        let op = format!("creating {name}");
        let req = request(
            NFNL_MSG_ACCT_NEW,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            name,
        )
        .map_err(|e| err(&op, e))?;
        match self.exchange(&req) {
            // Created meanwhile by someone else: the goal is reached.
            Ok(_) | Err(Answer::Errno(EBUSY | EEXIST)) => Ok(()),
            Err(a) => Err(err(&op, a.into())),
        }
    }

    /// Sends `req` and returns the payloads (after the netlink header) of the data messages
    /// answering it, up to its acknowledgement.
    fn exchange(&self, req: &[u8]) -> Result<Vec<Vec<u8>>, Answer> {
        let socket = self.open().map_err(Answer::Io)?;
        let n = socket
            .send_to(req, &SocketAddr::new(0, 0), 0)
            .map_err(Answer::Io)?;
        if n != req.len() {
            return Err(Answer::Io(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            )));
        }
        let mut payloads = Vec::new();
        // Bounded: a request is answered by at most one object and one acknowledgement.
        for _ in 0..8 {
            let (buf, _) = socket.recv_from_full().map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock => Answer::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not answer",
                )),
                _ => Answer::Io(e),
            })?;
            for (kind, payload) in split_messages(&buf).map_err(Answer::Io)? {
                match kind {
                    NLMSG_ERROR => return ack_result(payload).map(|()| payloads),
                    NLMSG_DONE => return Ok(payloads),
                    _ => payloads.push(payload.to_vec()),
                }
            }
        }
        Err(Answer::Io(io::Error::other("no acknowledgement")))
    }

    fn open(&self) -> io::Result<Socket> {
        let Some(ns) = &self.netns else {
            return open_socket();
        };
        let path = std::path::Path::new("/run/netns").join(ns);
        std::thread::Builder::new()
            .name("kprs-nfacct-netns".into())
            .spawn(move || {
                let fd = std::fs::File::open(&path)?;
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                // This thread, now in the other namespace, ends here.
                open_socket()
            })?
            .join()
            .map_err(|_| io::Error::other("the netns helper thread died"))?
    }
}

fn open_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.set_non_blocking(true)?;
    Ok(socket)
}

/// How the kernel answered a request that did not succeed.
#[derive(Debug)]
enum Answer {
    /// A negative acknowledgement: the positive errno.
    Errno(i32),
    /// The socket failed, or the answer made no sense.
    Io(io::Error),
}

impl From<Answer> for io::Error {
    fn from(a: Answer) -> io::Error {
        match a {
            Answer::Errno(e) => io::Error::from_raw_os_error(e),
            Answer::Io(e) => e,
        }
    }
}

/// One request: netlink header, `nfgenmsg` (AF_UNSPEC, version 0, res_id 0), `NFACCT_NAME`.
fn request(cmd: u16, flags: u16, name: &str) -> io::Result<Vec<u8>> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid nfacct name {name:?} (1 to {MAX_NAME_LEN} bytes)"),
        ));
    }
    let attr_len = 4 + name.len() + 1;
    let total = NLMSG_HDRLEN + NFGENMSG_LEN + align4(attr_len);
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&(total as u32).to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_ACCT << 8) | cmd).to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // sequence: one request per socket
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    b.extend_from_slice(&NFACCT_NAME.to_ne_bytes());
    b.extend_from_slice(name.as_bytes());
    b.resize(total, 0);
    Ok(b)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed nfacct answer: {what}"),
    )
}

/// The messages of one datagram as (type, payload after the 16-byte header).
fn split_messages(mut buf: &[u8]) -> io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            return Err(bad("truncated header"));
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(bad("message length"));
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        out.push((kind, &buf[NLMSG_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// An `NLMSG_ERROR` payload: errno 0 is the acknowledgement.
fn ack_result(payload: &[u8]) -> Result<(), Answer> {
    let code = payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| Answer::Io(bad("short error message")))?;
    match code {
        0 => Ok(()),
        c => Err(Answer::Errno(-c)),
    }
}

/// An `NFNL_MSG_ACCT_NEW` payload (`nfgenmsg`, then attributes) into a [`Counter`]; name,
/// packets and bytes must all be there (the packet and byte counts are big-endian).
fn decode_counter(payload: &[u8]) -> io::Result<Counter> {
    let mut attrs = payload
        .get(NFGENMSG_LEN..)
        .ok_or_else(|| bad("no nfgenmsg"))?;
    let (mut name, mut packets, mut bytes) = (None, None, None);
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return Err(bad("attribute length"));
        }
        let data = &attrs[4..len];
        let be64 = || -> io::Result<u64> {
            let arr: [u8; 8] = data.try_into().map_err(|_| bad("counter size"))?;
            Ok(u64::from_be_bytes(arr))
        };
        match kind {
            NFACCT_NAME => {
                let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                name = Some(String::from_utf8_lossy(&data[..end]).into_owned());
            }
            NFACCT_PKTS => packets = Some(be64()?),
            NFACCT_BYTES => bytes = Some(be64()?),
            _ => {}
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    match (name, packets, bytes) {
        (Some(name), Some(packets), Some(bytes)) => Ok(Counter {
            name,
            packets,
            bytes,
        }),
        _ => Err(bad("name, packets or bytes missing")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::NetNs;

    #[test]
    fn request_bytes() {
        let b = request(NFNL_MSG_ACCT_GET, NLM_F_REQUEST | NLM_F_ACK, "abc").unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes());
        want.extend_from_slice(&0x0701u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&1u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(b"abc\0");
        assert_eq!(b, want);
        // A 31-byte name fits; 32 bytes, empty or NUL-carrying names are refused.
        assert!(request(0, 0, &"x".repeat(31)).is_ok());
        assert!(request(0, 0, &"x".repeat(32)).is_err());
        assert!(request(0, 0, "").is_err());
        assert!(request(0, 0, "a\0b").is_err());
    }

    /// Upstream's decode example: `dummy-metric`, 123 packets, 54321 bytes, plus an attribute
    /// it does not know (`NFACCT_USE`).
    #[test]
    fn decode_counter_message() {
        let mut p = vec![0u8, 0, 0, 0];
        let attr = |p: &mut Vec<u8>, kind: u16, data: &[u8]| {
            p.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            p.extend_from_slice(&kind.to_ne_bytes());
            p.extend_from_slice(data);
            p.resize(align4(p.len()), 0);
        };
        attr(&mut p, NFACCT_NAME, b"dummy-metric\0");
        attr(&mut p, NFACCT_PKTS, &123u64.to_be_bytes());
        attr(&mut p, NFACCT_BYTES, &54321u64.to_be_bytes());
        attr(&mut p, 4, &1u32.to_be_bytes());
        assert_eq!(
            decode_counter(&p).unwrap(),
            Counter {
                name: "dummy-metric".into(),
                packets: 123,
                bytes: 54321
            }
        );
        // Without the byte count it is refused, as upstream's strict decode.
        let cut = &p[..p.len() - 8 - 12];
        assert!(decode_counter(cut).is_err());
    }

    #[test]
    fn split_and_acknowledgements() {
        let mut buf = Vec::new();
        let msg = |buf: &mut Vec<u8>, kind: u16, payload: &[u8]| {
            buf.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(payload);
        };
        msg(&mut buf, 0x0700, &[1, 2, 3, 4]);
        msg(&mut buf, NLMSG_ERROR, &(-2i32).to_ne_bytes());
        let m = split_messages(&buf).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], (0x0700, &[1u8, 2, 3, 4][..]));
        assert!(matches!(ack_result(m[1].1), Err(Answer::Errno(ENOENT))));
        assert!(ack_result(&0i32.to_ne_bytes()).is_ok());
        assert!(split_messages(&buf[..24]).is_err(), "truncated header");
        assert!(split_messages(&buf[..38]).is_err(), "truncated message");
    }

    #[test]
    fn kernel_probe_ensure_and_get_in_a_namespace() {
        let ns = NetNs::new();
        let acct = Nfacct::new().with_netns(ns.name());
        acct.probe().expect("nfacct supported");
        assert_eq!(acct.get("kprs_test_pkts").unwrap(), None);
        acct.ensure("kprs_test_pkts").unwrap();
        acct.ensure("kprs_test_pkts").unwrap();
        assert_eq!(
            acct.get("kprs_test_pkts").unwrap(),
            Some(Counter {
                name: "kprs_test_pkts".into(),
                packets: 0,
                bytes: 0
            })
        );
        // Counters are per namespace.
        let other = NetNs::new();
        assert_eq!(
            Nfacct::new()
                .with_netns(other.name())
                .get("kprs_test_pkts")
                .unwrap(),
            None
        );
        assert!(acct.get(&"x".repeat(32)).is_err());
    }
}
