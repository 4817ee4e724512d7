//! Echo servers running inside a namespace and bounded TCP/UDP clients.
//!
//! Protocol (TCP and UDP): a request `name` (or nothing, for TCP) is answered
//! with the server's name; a request `peer` is answered with
//! `"<name> from <peer-ip>"`, the source address the server saw (to check
//! source-IP preservation versus masquerade). TCP replies end with "\n" and
//! the server closes the connection.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns::Netns;

/// Upper bound on any echo server's lifetime.
const MAX_LIFETIME: Duration = Duration::from_secs(900);
/// How long a TCP server waits for a request line before answering anyway.
const TCP_REQUEST_WAIT: Duration = Duration::from_millis(500);

/// A TCP + UDP echo server on the same port inside a namespace; stopped on Drop.
#[derive(Debug)]
pub struct EchoServer {
    pub name: String,
    /// TCP listen address (UDP uses the same address).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Starts TCP and UDP echo servers answering `name`, bound to `bind` inside
    /// `ns` (e.g. `0.0.0.0:8080`; port 0 picks a free TCP port, reused for UDP).
    pub fn start(ns: &Netns, name: &str, bind: SocketAddr) -> EchoServer {
        Self::start_with(ns, name, bind, true, true)
    }

    /// TCP only.
    pub fn start_tcp(ns: &Netns, name: &str, bind: SocketAddr) -> EchoServer {
        Self::start_with(ns, name, bind, true, false)
    }

    /// UDP only.
    pub fn start_udp(ns: &Netns, name: &str, bind: SocketAddr) -> EchoServer {
        Self::start_with(ns, name, bind, false, true)
    }

    fn start_with(ns: &Netns, name: &str, bind: SocketAddr, tcp: bool, udp: bool) -> EchoServer {
        let (tl, us) = ns.in_netns(|| {
            let tl = tcp.then(|| TcpListener::bind(bind).expect("bind tcp echo"));
            let port = tl
                .as_ref()
                .map(|l| l.local_addr().unwrap().port())
                .unwrap_or(bind.port());
            let us = udp
                .then(|| UdpSocket::bind(SocketAddr::new(bind.ip(), port)).expect("bind udp echo"));
            (tl, us)
        });
        let addr = tl
            .as_ref()
            .map(|l| l.local_addr().unwrap())
            .or_else(|| us.as_ref().map(|u| u.local_addr().unwrap()))
            .expect("tcp or udp");
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        if let Some(l) = tl {
            let (stop, served, name) = (stop.clone(), served.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                tcp_loop(l, &name, &stop, &served)
            }));
        }
        if let Some(u) = us {
            let (stop, served, name) = (stop.clone(), served.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                udp_loop(u, &name, &stop, &served)
            }));
        }
        EchoServer {
            name: name.to_string(),
            addr,
            stop,
            served,
            threads,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Number of requests (TCP connections + UDP datagrams) answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn reply(name: &str, req: &[u8], peer: SocketAddr) -> String {
    if req.trim_ascii() == b"peer" {
        format!("{name} from {}", peer.ip())
    } else {
        name.to_string()
    }
}

fn tcp_loop(l: TcpListener, name: &str, stop: &AtomicBool, served: &Arc<AtomicU64>) {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + MAX_LIFETIME;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        match l.accept() {
            Ok((s, peer)) => {
                let (name, served) = (name.to_string(), served.clone());
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(TCP_REQUEST_WAIT));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                    let mut s = s;
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf).unwrap_or(0);
                    let r = reply(&name, &buf[..n], peer);
                    if s.write_all(format!("{r}\n").as_bytes()).is_ok() {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = s.shutdown(std::net::Shutdown::Both);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn udp_loop(u: UdpSocket, name: &str, stop: &AtomicBool, served: &AtomicU64) {
    u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let end = Instant::now() + MAX_LIFETIME;
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        if let Ok((n, peer)) = u.recv_from(&mut buf) {
            let r = reply(name, &buf[..n], peer);
            if u.send_to(r.as_bytes(), peer).is_ok() {
                served.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

fn norm(e: io::Error) -> io::Error {
    // Read timeouts surface as WouldBlock on Linux; report them as TimedOut.
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, e)
    } else {
        e
    }
}

fn tcp_exchange(ns: &Netns, addr: SocketAddr, timeout: Duration, req: &str) -> io::Result<String> {
    ns.in_netns(|| {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(10));
        s.set_read_timeout(Some(left))?;
        s.set_write_timeout(Some(left))?;
        s.write_all(req.as_bytes()).map_err(norm)?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(norm)?;
        if out.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed without a reply",
            ));
        }
        Ok(out.trim().to_string())
    })
}

/// Connects from inside `ns` to `addr` and returns the (trimmed) name the echo
/// server answered. Errors keep their kind: `ConnectionRefused` (RST / ICMP
/// port unreachable), `TimedOut` (no answer within `timeout`),
/// `HostUnreachable`/`NetworkUnreachable`, `UnexpectedEof` (closed, no reply).
pub fn tcp_request(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    tcp_exchange(ns, addr, timeout, "name\n")
}

/// Like `tcp_request`, but asks for the peer address: returns (name, source IP
/// the server saw).
pub fn tcp_request_peer(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<(String, IpAddr)> {
    parse_peer(&tcp_exchange(ns, addr, timeout, "peer\n")?)
}

fn parse_peer(s: &str) -> io::Result<(String, IpAddr)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad peer reply {s:?}"));
    let (name, ip) = s.split_once(" from ").ok_or_else(bad)?;
    Ok((name.to_string(), ip.trim().parse().map_err(|_| bad())?))
}

fn udp_exchange(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
    local_port: Option<u16>,
    req: &str,
) -> io::Result<String> {
    ns.in_netns(|| {
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), local_port.unwrap_or(0));
        let u = UdpSocket::bind(local)?;
        // Connected, so an ICMP port unreachable shows up as ConnectionRefused.
        u.connect(addr)?;
        u.set_read_timeout(Some(timeout))?;
        u.send(req.as_bytes())?;
        let mut buf = [0u8; 1500];
        let n = u.recv(&mut buf).map_err(norm)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })
}

/// Sends one datagram from inside `ns` (from `local_port` if given) to `addr`
/// and returns the reply. `ConnectionRefused` on ICMP port unreachable,
/// `TimedOut` if nothing arrives within `timeout`.
pub fn udp_request(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
    local_port: Option<u16>,
) -> io::Result<String> {
    udp_exchange(ns, addr, timeout, local_port, "name")
}

/// Like `udp_request` but returns (name, source IP the server saw).
pub fn udp_request_peer(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
    local_port: Option<u16>,
) -> io::Result<(String, IpAddr)> {
    parse_peer(&udp_exchange(ns, addr, timeout, local_port, "peer")?)
}

/// Makes `n` TCP requests and counts answers per name; failures are counted
/// under `"<error:KIND>"`.
pub fn tcp_distribution(
    ns: &Netns,
    addr: SocketAddr,
    n: usize,
    timeout: Duration,
) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let k = match tcp_request(ns, addr, timeout) {
            Ok(name) => name,
            Err(e) => format!("<error:{:?}>", e.kind()),
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// Retries `f` every `interval` until it returns `Ok` or `timeout` passes;
/// returns the last result. Use it to wait for rules to be programmed.
pub fn eventually<T, E>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let end = Instant::now() + timeout;
    loop {
        let r = f();
        if r.is_ok() || Instant::now() >= end {
            return r;
        }
        std::thread::sleep(interval);
    }
}
