//! Async IPVS client over a `NETLINK_GENERIC` socket (the only I/O of this module).
//!
//! Why async on tokio rather than blocking calls in `spawn_blocking`: `netlink-sys`'s
//! `TokioSocket` registers the non-blocking socket with the reactor, so every receive can be
//! bounded with `tokio::time::timeout` (a blocking netlink socket would need `SO_RCVTIMEO`,
//! which no safe API here sets), and a slow kernel never pins a blocking-pool thread.
//! Methods take `&mut self`: one client, one socket, one request stream at a time; wrap
//! it in a `tokio::sync::Mutex` to share it.
//!
//! Batching: [`IpvsClient::apply`] packs up to [`MAX_BATCH`] requests, each with its own
//! sequence number, into one datagram, and asks for an acknowledgement (`NLM_F_ACK`) of the
//! last one only. The kernel's `netlink_rcv_skb` runs every message of a datagram in order
//! and answers a request without `NLM_F_ACK` only when it fails (an error does not stop the
//! rest), so once the last request's answer arrives, every earlier request without an error
//! answer before it succeeded. A sync costs one round trip and one answer per batch instead
//! of one per operation (`ipvsadm -R`'s cost). Batches stay small enough that the answers of
//! a batch whose requests all fail still fit the default receive buffer (a lost answer would
//! make results unattributable). Dumps cannot be batched: a socket runs one dump at a time.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use netlink_sys::{
    AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_GENERIC,
};

use super::codec::{
    self, AddressFamily, CtrlMessage, DecodeError, IPVS_GENL_NAME, IpvsInfo, IpvsMessage,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    RealServer, Timeouts, VirtualService, add_flags,
};

/// Most requests sent in one datagram by [`IpvsClient::apply`].
pub const MAX_BATCH: usize = 128;
/// Most bytes of requests sent in one datagram by [`IpvsClient::apply`].
const MAX_BATCH_BYTES: usize = 32 * 1024;
/// Bytes received per datagram: above the 32 KiB the kernel caps a netlink datagram at
/// (dump batches; answers carry no echoed request, `NETLINK_CAP_ACK`), so none is cut.
const RECV_BUFFER: usize = 64 * 1024;
/// Default time to wait for each reply datagram.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

// === errors ===

/// A Linux errno, printed with its symbolic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted (not root / no `CAP_NET_ADMIN`).
    pub const EPERM: Self = Self(1);
    /// No such entry: destination or scheduler not found.
    pub const ENOENT: Self = Self(2);
    /// No such process: IPVS's "service not found".
    pub const ESRCH: Self = Self(3);
    /// Already exists.
    pub const EEXIST: Self = Self(17);
    /// Invalid argument.
    pub const EINVAL: Self = Self(22);
    /// Busy (e.g. a dump is already running on the socket).
    pub const EBUSY: Self = Self(16);

    /// Symbolic name, e.g. `EEXIST`.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            3 => "ESRCH",
            4 => "EINTR",
            5 => "EIO",
            11 => "EAGAIN",
            12 => "ENOMEM",
            13 => "EACCES",
            14 => "EFAULT",
            16 => "EBUSY",
            17 => "EEXIST",
            19 => "ENODEV",
            22 => "EINVAL",
            28 => "ENOSPC",
            34 => "ERANGE",
            71 => "EPROTO",
            90 => "EMSGSIZE",
            93 => "EPROTONOSUPPORT",
            95 => "EOPNOTSUPP",
            97 => "EAFNOSUPPORT",
            105 => "ENOBUFS",
            110 => "ETIMEDOUT",
            _ => "E?",
        }
    }

    /// What the errno means for IPVS requests.
    pub fn description(self) -> &'static str {
        match self.0 {
            1 => "operation not permitted (needs CAP_NET_ADMIN)",
            2 => "no such destination, or scheduler module not available",
            3 => "no such virtual service",
            16 => "busy",
            17 => "already exists",
            22 => "invalid argument",
            95 => "operation not supported",
            97 => "address family not supported (IPv6 IPVS disabled?)",
            105 => "no buffer space (netlink receive queue overrun)",
            _ => "kernel error",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name() == "E?" {
            write!(f, "errno {} ({})", self.0, self.description())
        } else {
            write!(f, "{} ({})", self.name(), self.description())
        }
    }
}

/// An IPVS client error. Cloneable so a batch can report one failure for several requests.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IpvsError {
    /// The kernel has no "IPVS" generic-netlink family.
    #[error("IPVS is not available in this kernel (is the ip_vs module loaded?)")]
    NotAvailable,
    /// The kernel rejected a request.
    #[error("{op}: {errno}{}", ext.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Kernel {
        /// What was asked, e.g. `add service TCP 10.0.0.1:80`.
        op: String,
        /// The errno.
        errno: Errno,
        /// The kernel's extended-ack message, if any.
        ext: Option<String>,
    },
    /// Socket error.
    #[error("netlink socket: {0}")]
    Io(#[source] Arc<io::Error>),
    /// A reply could not be decoded, or a request could not be encoded.
    #[error("IPVS netlink message: {0}")]
    Decode(#[from] DecodeError),
    /// No reply in time.
    #[error("timed out waiting for the kernel's reply to {0}")]
    Timeout(String),
    /// The kernel flagged the dump as interrupted (state changed meanwhile); retry.
    #[error("dump interrupted by a concurrent change: {0}")]
    DumpInterrupted(String),
    /// A reply of an unexpected shape.
    #[error("unexpected reply to {0}")]
    Unexpected(String),
}

impl From<io::Error> for IpvsError {
    fn from(e: io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

impl IpvsError {
    /// The kernel errno, if this is a kernel rejection.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the object already exists (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(Errno::EEXIST)
    }

    /// Whether the service (`ESRCH`) or destination (`ENOENT`) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(Errno::ESRCH | Errno::ENOENT))
    }
}

// === operations ===

/// One change, for [`IpvsClient::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsOp {
    /// `IPVS_CMD_NEW_SERVICE`.
    AddService(VirtualService),
    /// `IPVS_CMD_SET_SERVICE` (scheduler, flags, timeout, netmask).
    UpdateService(VirtualService),
    /// `IPVS_CMD_DEL_SERVICE` (and all its destinations).
    DeleteService(VirtualService),
    /// `IPVS_CMD_NEW_DEST`.
    AddDestination(VirtualService, RealServer),
    /// `IPVS_CMD_SET_DEST` (weight, forwarding, thresholds).
    UpdateDestination(VirtualService, RealServer),
    /// `IPVS_CMD_DEL_DEST`.
    DeleteDestination(VirtualService, RealServer),
    /// `IPVS_CMD_FLUSH`.
    Flush,
    /// `IPVS_CMD_SET_CONFIG` (0 leaves a timeout unchanged).
    SetTimeouts(Timeouts),
}

impl IpvsOp {
    /// The request message.
    pub fn to_message(&self) -> IpvsMessage {
        match self {
            Self::AddService(s) => IpvsMessage::new_service(s),
            Self::UpdateService(s) => IpvsMessage::set_service(s),
            Self::DeleteService(s) => IpvsMessage::del_service(s),
            Self::AddDestination(s, d) => IpvsMessage::new_dest(s, d),
            Self::UpdateDestination(s, d) => IpvsMessage::set_dest(s, d),
            Self::DeleteDestination(s, d) => IpvsMessage::del_dest(s, d),
            Self::Flush => IpvsMessage::flush(),
            Self::SetTimeouts(t) => IpvsMessage::set_config(*t),
        }
    }
}

impl fmt::Display for IpvsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AddService(s) => write!(f, "add service {s}"),
            Self::UpdateService(s) => write!(f, "update service {s}"),
            Self::DeleteService(s) => write!(f, "delete service {s}"),
            Self::AddDestination(s, d) => write!(f, "add destination {d} to {s}"),
            Self::UpdateDestination(s, d) => write!(f, "update destination {d} of {s}"),
            Self::DeleteDestination(s, d) => write!(f, "delete destination {d} of {s}"),
            Self::Flush => write!(f, "flush"),
            Self::SetTimeouts(t) => {
                write!(
                    f,
                    "set timeouts tcp={} tcpfin={} udp={}",
                    t.tcp, t.tcp_fin, t.udp
                )
            }
        }
    }
}

// === client ===

/// A connection to the kernel's IPVS over generic netlink.
pub struct IpvsClient {
    socket: TokioSocket,
    family: u16,
    seq: u32,
    timeout: Duration,
    /// Receive buffer ([`RECV_BUFFER`] bytes of capacity).
    rbuf: Vec<u8>,
}

impl fmt::Debug for IpvsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpvsClient")
            .field("family", &self.family)
            .field("seq", &self.seq)
            .finish()
    }
}

fn open_socket() -> Result<TokioSocket, IpvsError> {
    let mut socket = TokioSocket::new(NETLINK_GENERIC)?;
    socket.socket_mut().bind_auto()?;
    // Acks without the echoed request, and kernel error strings; both optional (older
    // kernels refuse the option, which only costs bytes or detail).
    let _ = socket.socket_ref().set_cap_ack(true);
    let _ = socket.socket_ref().set_ext_ack(true);
    Ok(socket)
}

impl IpvsClient {
    /// Opens a socket and resolves the "IPVS" family id. Fails with
    /// [`IpvsError::NotAvailable`] when the kernel has no IPVS (module not loaded).
    /// Must be called within a tokio runtime.
    pub async fn connect() -> Result<Self, IpvsError> {
        let mut client = Self {
            socket: open_socket()?,
            family: 0,
            seq: 0,
            timeout: DEFAULT_TIMEOUT,
            rbuf: Vec::with_capacity(RECV_BUFFER),
        };
        client.family = client.resolve_family().await?;
        tracing::debug!(
            family = client.family,
            "resolved IPVS generic netlink family"
        );
        Ok(client)
    }

    /// The resolved generic-netlink family id.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    /// Sets how long to wait for each reply datagram.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Checks that IPVS answers (and that we may talk to it): sends `GET_INFO`.
    pub async fn probe(&mut self) -> Result<(), IpvsError> {
        self.info().await.map(|_| ())
    }

    /// `IPVS_CMD_GET_INFO`: version and connection table size.
    pub async fn info(&mut self) -> Result<IpvsInfo, IpvsError> {
        let reply = self.get(IpvsMessage::get_info(), "get info").await?;
        reply
            .info
            .ok_or_else(|| IpvsError::Unexpected("get info".into()))
    }

    /// All virtual services (`GET_SERVICE` dump).
    pub async fn services(&mut self) -> Result<Vec<VirtualService>, IpvsError> {
        let msgs = self
            .dump(IpvsMessage::dump_services(), None, "list services")
            .await?;
        Ok(msgs.into_iter().filter_map(|m| m.service).collect())
    }

    /// The destinations of `svc` (`GET_DEST` dump); empty if the service does not exist.
    pub async fn destinations(
        &mut self,
        svc: &VirtualService,
    ) -> Result<Vec<RealServer>, IpvsError> {
        let what = format!("list destinations of {svc}");
        let msgs = self
            .dump(
                IpvsMessage::dump_dests(svc),
                Some(svc.address_family),
                &what,
            )
            .await?;
        Ok(msgs.into_iter().filter_map(|m| m.dest).collect())
    }

    /// Adds a virtual service.
    pub async fn add_service(&mut self, svc: &VirtualService) -> Result<(), IpvsError> {
        self.apply_one(IpvsOp::AddService(svc.clone())).await
    }

    /// Changes a virtual service's scheduler, flags, timeout and netmask.
    pub async fn update_service(&mut self, svc: &VirtualService) -> Result<(), IpvsError> {
        self.apply_one(IpvsOp::UpdateService(svc.clone())).await
    }

    /// Deletes a virtual service and its destinations.
    pub async fn delete_service(&mut self, svc: &VirtualService) -> Result<(), IpvsError> {
        self.apply_one(IpvsOp::DeleteService(svc.clone())).await
    }

    /// Adds a real server to `svc`.
    pub async fn add_destination(
        &mut self,
        svc: &VirtualService,
        dest: &RealServer,
    ) -> Result<(), IpvsError> {
        self.apply_one(IpvsOp::AddDestination(svc.clone(), dest.clone()))
            .await
    }

    /// Changes a real server's weight, forwarding method and thresholds.
    pub async fn update_destination(
        &mut self,
        svc: &VirtualService,
        dest: &RealServer,
    ) -> Result<(), IpvsError> {
        self.apply_one(IpvsOp::UpdateDestination(svc.clone(), dest.clone()))
            .await
    }

    /// Removes a real server from `svc`.
    pub async fn delete_destination(
        &mut self,
        svc: &VirtualService,
        dest: &RealServer,
    ) -> Result<(), IpvsError> {
        self.apply_one(IpvsOp::DeleteDestination(svc.clone(), dest.clone()))
            .await
    }

    /// Removes every virtual service.
    pub async fn flush(&mut self) -> Result<(), IpvsError> {
        self.apply_one(IpvsOp::Flush).await
    }

    /// Sets the TCP, TCP-FIN and UDP timeouts in seconds (0 leaves one unchanged).
    pub async fn set_timeouts(
        &mut self,
        tcp: u32,
        tcp_fin: u32,
        udp: u32,
    ) -> Result<(), IpvsError> {
        self.apply_one(IpvsOp::SetTimeouts(Timeouts { tcp, tcp_fin, udp }))
            .await
    }

    /// The TCP, TCP-FIN and UDP timeouts in seconds (`GET_CONFIG`).
    pub async fn get_timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        let reply = self.get(IpvsMessage::get_config(), "get timeouts").await?;
        Ok(reply.timeouts.unwrap_or_default())
    }

    /// Sends `ops` in batches of up to [`MAX_BATCH`] per datagram and returns one result per
    /// op, in order. Ops run in order; a failed op does not stop the others.
    pub async fn apply(&mut self, ops: &[IpvsOp]) -> Vec<Result<(), IpvsError>> {
        let mut results: Vec<Option<Result<(), IpvsError>>> = vec![None; ops.len()];
        let mut buf = Vec::with_capacity(MAX_BATCH_BYTES + 1024);
        let mut pending: Vec<(u32, usize)> = Vec::with_capacity(MAX_BATCH);
        let mut start = 0;
        while start < ops.len() {
            // Build one datagram; only its last request asks for an ack.
            buf.clear();
            pending.clear();
            let mut last_start = 0;
            let mut end = start;
            while end < ops.len() && pending.len() < MAX_BATCH && buf.len() < MAX_BATCH_BYTES {
                let seq = self.next_seq();
                let msg =
                    NetlinkMessage::ipvs(self.family, NLM_F_REQUEST, seq, ops[end].to_message());
                let at = buf.len();
                match msg.emit_into(&mut buf) {
                    Ok(()) => {
                        pending.push((seq, end));
                        last_start = at;
                    }
                    Err(e) => {
                        buf.truncate(at);
                        results[end] = Some(Err(e.into()));
                    }
                }
                end += 1;
            }
            if !pending.is_empty() {
                add_flags(&mut buf[last_start..], NLM_F_ACK);
                let sent = std::mem::take(&mut buf);
                let outcome = self
                    .send_and_collect_acks(&sent, &mut pending, ops, &mut results)
                    .await;
                buf = sent;
                if let Err(e) = outcome {
                    // Socket-level failure: unanswered ops share the error; start afresh.
                    for (_, idx) in pending.drain(..) {
                        results[idx] = Some(Err(e.clone()));
                    }
                    self.reset();
                }
            }
            start = end;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(IpvsError::Unexpected("batch".into()))))
            .collect()
    }

    // === internals ===

    async fn apply_one(&mut self, op: IpvsOp) -> Result<(), IpvsError> {
        self.apply(std::slice::from_ref(&op))
            .await
            .pop()
            .unwrap_or_else(|| Err(IpvsError::Unexpected(op.to_string())))
    }

    /// Sends one datagram of requests (`pending`: sequence number and op index, the last
    /// one acked) and records each result: an error answer fails its op; the last op's
    /// answer ends the batch, and every op not answered before it succeeded. Returns `Err`
    /// on socket failure or timeout, leaving the unanswered entries in `pending`.
    async fn send_and_collect_acks(
        &mut self,
        buf: &[u8],
        pending: &mut Vec<(u32, usize)>,
        ops: &[IpvsOp],
        results: &mut [Option<Result<(), IpvsError>>],
    ) -> Result<(), IpvsError> {
        let Some(&(last_seq, last_idx)) = pending.last() else {
            return Ok(());
        };
        self.send(buf).await?;
        loop {
            let what = ops[last_idx].to_string();
            for m in self.recv(None, &what).await? {
                let NetlinkPayload::Error(e) = &m.payload else {
                    continue;
                };
                let seq = m.header.sequence;
                let Some(pos) = pending.iter().position(|(s, _)| *s == seq) else {
                    continue; // stale
                };
                let (_, idx) = pending.remove(pos);
                results[idx] = Some(match e.errno() {
                    None => Ok(()),
                    Some(errno) => Err(IpvsError::Kernel {
                        op: ops[idx].to_string(),
                        errno: Errno(errno),
                        ext: e.ext_msg.clone(),
                    }),
                });
                if seq == last_seq {
                    // Everything before it ran without an error answer.
                    for (_, idx) in pending.drain(..) {
                        results[idx] = Some(Ok(()));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// A `doit` request with a single reply message (`GET_INFO`, `GET_CONFIG`).
    async fn get(&mut self, msg: IpvsMessage, what: &str) -> Result<IpvsMessage, IpvsError> {
        let res = self.get_inner(msg, what).await;
        if matches!(
            res,
            Err(IpvsError::Timeout(_) | IpvsError::Io(_) | IpvsError::Decode(_))
        ) {
            self.reset();
        }
        res
    }

    async fn get_inner(&mut self, msg: IpvsMessage, what: &str) -> Result<IpvsMessage, IpvsError> {
        let seq = self.next_seq();
        let req = NetlinkMessage::ipvs(self.family, NLM_F_REQUEST, seq, msg).emit()?;
        self.send(&req).await?;
        loop {
            for m in self.recv(None, what).await? {
                if m.header.sequence != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Ipvs(reply) => return Ok(reply),
                    NetlinkPayload::Error(e) => return Err(kernel_error(what, &e)),
                    _ => return Err(IpvsError::Unexpected(what.into())),
                }
            }
        }
    }

    /// A dump request; collects the IPVS messages up to `NLMSG_DONE`.
    async fn dump(
        &mut self,
        msg: IpvsMessage,
        hint: Option<AddressFamily>,
        what: &str,
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        let res = self.dump_inner(msg, hint, what).await;
        if res.is_err() {
            // A half-read dump keeps running on this socket; start afresh.
            self.reset();
        }
        res
    }

    async fn dump_inner(
        &mut self,
        msg: IpvsMessage,
        hint: Option<AddressFamily>,
        what: &str,
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        let seq = self.next_seq();
        let req = NetlinkMessage::ipvs(self.family, NLM_F_REQUEST | NLM_F_DUMP, seq, msg).emit()?;
        self.send(&req).await?;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            for m in self.recv(hint, what).await? {
                if m.header.sequence != seq {
                    continue;
                }
                interrupted |= m.header.flags & NLM_F_DUMP_INTR != 0;
                match m.payload {
                    NetlinkPayload::Ipvs(reply) => out.push(reply),
                    NetlinkPayload::Done(code) if code < 0 => {
                        return Err(IpvsError::Kernel {
                            op: what.into(),
                            errno: Errno(code.saturating_neg()),
                            ext: None,
                        });
                    }
                    NetlinkPayload::Done(_) => {
                        if interrupted {
                            return Err(IpvsError::DumpInterrupted(what.into()));
                        }
                        return Ok(out);
                    }
                    NetlinkPayload::Error(e) if e.code != 0 => {
                        return Err(kernel_error(what, &e));
                    }
                    _ => {}
                }
            }
        }
    }

    async fn resolve_family(&mut self) -> Result<u16, IpvsError> {
        let seq = self.next_seq();
        let req = NetlinkMessage::ctrl(NLM_F_REQUEST, seq, CtrlMessage::get_family(IPVS_GENL_NAME))
            .emit()?;
        self.send(&req).await?;
        let what = "resolve the IPVS generic netlink family";
        loop {
            for m in self.recv(None, what).await? {
                if m.header.sequence != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Ctrl(CtrlMessage {
                        family_id: Some(id),
                        ..
                    }) => return Ok(id),
                    NetlinkPayload::Error(e) if e.errno() == Some(Errno::ENOENT.0) => {
                        return Err(IpvsError::NotAvailable);
                    }
                    NetlinkPayload::Error(e) => return Err(kernel_error(what, &e)),
                    _ => return Err(IpvsError::Unexpected(what.into())),
                }
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Replaces the socket, dropping anything still queued (half-read dumps, late acks).
    fn reset(&mut self) {
        match open_socket() {
            Ok(s) => self.socket = s,
            Err(e) => tracing::warn!(error = %e, "reopening the IPVS netlink socket failed"),
        }
    }

    async fn send(&self, buf: &[u8]) -> Result<(), IpvsError> {
        let n = self.socket.send_to(buf, &SocketAddr::new(0, 0)).await?;
        if n != buf.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short netlink send").into());
        }
        Ok(())
    }

    /// Receives one datagram from the kernel and decodes it, into a buffer kept between
    /// calls: one `recvfrom` per datagram (no peek for its size), and a buffer this large
    /// also lets the kernel fill dump datagrams up to its 32 KiB cap instead of one page.
    async fn recv(
        &mut self,
        hint: Option<AddressFamily>,
        what: &str,
    ) -> Result<Vec<NetlinkMessage>, IpvsError> {
        loop {
            self.rbuf.clear();
            let from = tokio::time::timeout(self.timeout, self.socket.recv_from(&mut self.rbuf))
                .await
                .map_err(|_| IpvsError::Timeout(what.into()))??;
            if from.port_number() != 0 {
                continue; // not from the kernel
            }
            return Ok(codec::parse_with_hint(&self.rbuf, self.family, hint)?);
        }
    }
}

fn kernel_error(what: &str, e: &codec::ErrorMessage) -> IpvsError {
    match e.errno() {
        Some(errno) => IpvsError::Kernel {
            op: what.into(),
            errno: Errno(errno),
            ext: e.ext_msg.clone(),
        },
        None => IpvsError::Unexpected(what.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_and_display() {
        assert_eq!(Errno::EEXIST.name(), "EEXIST");
        assert_eq!(Errno(3).to_string(), "ESRCH (no such virtual service)");
        assert_eq!(Errno(9999).to_string(), "errno 9999 (kernel error)");
        let e = IpvsError::Kernel {
            op: "add service TCP 10.0.0.1:80".into(),
            errno: Errno::EEXIST,
            ext: None,
        };
        assert_eq!(
            e.to_string(),
            "add service TCP 10.0.0.1:80: EEXIST (already exists)"
        );
        assert!(e.is_exists());
        assert!(!e.is_not_found());
        assert_eq!(
            IpvsError::NotAvailable.to_string(),
            "IPVS is not available in this kernel (is the ip_vs module loaded?)"
        );
    }

    #[test]
    fn op_messages_and_display() {
        let svc = VirtualService::new("10.0.0.1".parse().unwrap(), codec::Protocol::Tcp, 80, "rr");
        let rs = RealServer::new("10.1.0.5".parse().unwrap(), 8080, 1);
        let op = IpvsOp::UpdateDestination(svc.clone(), rs.clone());
        assert_eq!(op.to_message(), IpvsMessage::set_dest(&svc, &rs));
        assert_eq!(
            op.to_string(),
            "update destination 10.1.0.5:8080 of TCP 10.0.0.1:80"
        );
    }

    /// On this host (no IPVS in the kernel) connect must fail with the clear message, or
    /// succeed where IPVS exists; it must never hang or panic.
    #[tokio::test]
    async fn connect_reports_absence_clearly() {
        match IpvsClient::connect().await {
            Ok(c) => assert_ne!(c.family_id(), 0),
            Err(e @ IpvsError::NotAvailable) => eprintln!("as expected without IPVS: {e}"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
