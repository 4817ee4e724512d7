//! The HTTP servers on hyper: one small accept loop ([`spawn`]) shared by the metrics server,
//! the proxy health server and the per-service health check servers.
//!
//! Every server is an [`HttpServer`] handle: bound before it is returned (so a bind failure
//! is an error the caller decides about, upstream's `bindAddressHardFail`), serving on the
//! current Tokio runtime, and stopped (listener closed, open connections dropped) by
//! [`HttpServer::shutdown`] or by dropping the handle.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::task::{JoinHandle, JoinSet};

use super::error::ServerError;
use super::health::{HealthResponse, ProxyHealth};
use super::metrics::{self, Metrics};

/// A response body.
pub type Body = Full<Bytes>;

/// Answers a request given its path (query string excluded). Upstream's handlers ignore the
/// method and the body, and so do ours.
pub type Handler = Arc<dyn Fn(&str) -> Response<Body> + Send + Sync>;

/// The configz group kube-proxy registers its configuration under.
pub const CONFIGZ_GROUP: &str = "kubeproxy.config.k8s.io";

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// A running server. Dropping it stops the server too.
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// The address actually bound (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes the listener and drops open connections; returns once the
    /// port is free.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Binds `addr` for a server. `std`'s bind sets `SO_REUSEADDR`, as Go's listeners do.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    std::net::TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })
}

/// Binds `addr` accepting only its own family: an IPv6 address gets `IPV6_V6ONLY`, so `[::]`
/// does not also take IPv4 and the IPv4 listeners of the same port can coexist (each
/// family's health check servers cover exactly that family's node-port addresses).
pub fn bind_family_only(addr: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    if addr.is_ipv4() {
        return bind(addr);
    }
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind as nix_bind, listen,
        setsockopt, socket, sockopt,
    };
    let err = |e: nix::Error| ServerError::Bind {
        addr,
        source: std::io::Error::from(e),
    };
    let SocketAddr::V6(v6) = addr else {
        return bind(addr);
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(err)?;
    nix_bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn6::from(v6)).map_err(err)?;
    listen(&fd, Backlog::new(1024).map_err(err)?).map_err(err)?;
    Ok(std::net::TcpListener::from(fd))
}

/// Serves `handler` on `listener` on the current Tokio runtime.
pub fn spawn(listener: std::net::TcpListener, handler: Handler) -> Result<HttpServer, ServerError> {
    let rt = tokio::runtime::Handle::try_current()?;
    listener
        .set_nonblocking(true)
        .map_err(ServerError::Listener)?;
    let local_addr = listener.local_addr().map_err(ServerError::Listener)?;
    let _guard = rt.enter();
    let listener = tokio::net::TcpListener::from_std(listener).map_err(ServerError::Listener)?;
    let task = rt.spawn(accept_loop(listener, handler));
    Ok(HttpServer {
        local_addr,
        task: Some(task),
    })
}

async fn accept_loop(listener: tokio::net::TcpListener, handler: Handler) {
    // Connection tasks live in the set: when this task is aborted, the set is dropped and
    // every connection with it.
    let mut conns = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                backoff = Duration::from_millis(5);
                while conns.try_join_next().is_some() {}
                let handler = handler.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let resp = handler(req.uri().path());
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let result = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                });
            }
            Err(e) => {
                // Like Go's http.Server: temporary accept errors (EMFILE, ECONNABORTED) are
                // retried with a backoff of up to one second.
                tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A response with the given status, `Content-Type`, `X-Content-Type-Options: nosniff` and
/// body.
pub fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(CONTENT_TYPE, v);
    }
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// Go's `http.NotFound`.
pub fn not_found() -> Response<Body> {
    respond(404, TEXT_PLAIN, "404 page not found\n")
}

/// What the metrics server (`:10249`) serves.
#[derive(Debug, Clone)]
pub struct MetricsEndpoint {
    /// The `/proxyMode` body: `iptables`, `ipvs`, …
    pub proxy_mode: String,
    /// The registry behind `/metrics`.
    pub metrics: Metrics,
    /// The effective configuration; `/configz` serves it as
    /// `{"kubeproxy.config.k8s.io": <config>}`, as component-base's configz does.
    pub config: serde_json::Value,
}

impl MetricsEndpoint {
    /// The handler for `/proxyMode`, `/metrics`, `/healthz`, `/configz`; 404 otherwise.
    pub fn handler(self) -> Handler {
        let configz = serde_json::json!({ CONFIGZ_GROUP: self.config }).to_string();
        let configz = Bytes::from(configz);
        let mode = Bytes::from(self.proxy_mode);
        let metrics = self.metrics;
        Arc::new(move |path: &str| match path {
            "/proxyMode" => respond(200, TEXT_PLAIN, mode.clone()),
            "/metrics" => match metrics.encode() {
                // client_golang's process collector: process_* sorts after kubeproxy_*.
                Ok(text) => respond(200, metrics::CONTENT_TYPE, text + &super::process::encode()),
                Err(e) => respond(500, TEXT_PLAIN, format!("{e}\n")),
            },
            // component-base healthz with only the ping check.
            "/healthz" | "/healthz/ping" => respond(200, TEXT_PLAIN, "ok"),
            "/configz" => respond(200, JSON, configz.clone()),
            _ => not_found(),
        })
    }
}

/// Binds `addr` and serves the metrics endpoint on it.
pub fn serve_metrics(
    addr: SocketAddr,
    endpoint: MetricsEndpoint,
) -> Result<HttpServer, ServerError> {
    serve_metrics_on(bind(addr)?, endpoint)
}

/// Serves the metrics endpoint on an already bound listener.
pub fn serve_metrics_on(
    listener: std::net::TcpListener,
    endpoint: MetricsEndpoint,
) -> Result<HttpServer, ServerError> {
    spawn(listener, endpoint.handler())
}

/// The proxy health handler: `/healthz` and `/livez`; 404 otherwise.
pub fn healthz_handler(health: ProxyHealth) -> Handler {
    let json = |r: HealthResponse| respond(r.status, JSON, r.body);
    Arc::new(move |path: &str| match path {
        "/healthz" => json(health.healthz()),
        "/livez" => json(health.livez()),
        _ => not_found(),
    })
}

/// Binds `addr` and serves the proxy health endpoints on it.
pub fn serve_healthz(addr: SocketAddr, health: ProxyHealth) -> Result<HttpServer, ServerError> {
    serve_healthz_on(bind(addr)?, health)
}

/// Serves the proxy health endpoints on an already bound listener.
pub fn serve_healthz_on(
    listener: std::net::TcpListener,
    health: ProxyHealth,
) -> Result<HttpServer, ServerError> {
    spawn(listener, healthz_handler(health))
}

/// A tiny HTTP/1.1 client over raw TCP for the tests.
#[cfg(test)]
pub(crate) mod testclient {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A parsed response: status, headers (names lower-cased), body.
    #[derive(Debug)]
    pub(crate) struct Reply {
        pub status: u16,
        pub headers: BTreeMap<String, String>,
        pub body: String,
    }

    /// `GET path` with `Connection: close`; reads until the server closes.
    pub(crate) async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        let raw = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("end of headers");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(
            parts.next(),
            Some("HTTP/1.1"),
            "status line {status_line:?}"
        );
        let status = parts
            .next()
            .and_then(|c| c.parse().ok())
            .expect("status code");
        let headers: BTreeMap<String, String> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("header line");
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        if let Some(len) = headers.get("content-length") {
            assert_eq!(
                len.parse::<usize>().ok(),
                Some(body.len()),
                "content-length"
            );
        }
        Ok(Reply {
            status,
            headers,
            body: body.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testclient::get;
    use super::*;
    use crate::server::IpFamily;
    use crate::server::health::FakeClock;
    use std::time::UNIX_EPOCH;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[tokio::test]
    async fn metrics_server_endpoints() {
        let metrics = Metrics::new();
        metrics.inc_service_changes(4);
        let endpoint = MetricsEndpoint {
            proxy_mode: "iptables".into(),
            metrics: metrics.clone(),
            config: serde_json::json!({"mode": "iptables", "bindAddress": "0.0.0.0"}),
        };
        let server = serve_metrics(local(), endpoint).unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        let r = get(addr, "/proxyMode").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "iptables");
        assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");

        let r = get(addr, "/metrics").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert!(r.body.contains(
            "# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter\nkubeproxy_sync_proxy_rules_service_changes_total 4\n"
        ), "{}", r.body);
        // The registry is live, not a snapshot.
        metrics.inc_service_changes(1);
        let r = get(addr, "/metrics?x=1").await.unwrap();
        assert!(
            r.body
                .contains("kubeproxy_sync_proxy_rules_service_changes_total 5\n")
        );

        let r = get(addr, "/healthz").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");

        let r = get(addr, "/configz").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kubeproxy.config.k8s.io": {"mode": "iptables", "bindAddress": "0.0.0.0"}})
        );

        let r = get(addr, "/nope").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "404 page not found\n"));
        let r = get(addr, "/livez").await.unwrap();
        assert_eq!(r.status, 404, "/livez is only on the healthz port");

        server.shutdown().await;
        // Parallel tests bind ephemeral ports: the freed port may already be another test's
        // listener, so what must hold is that ours no longer answers.
        let after = tokio::time::timeout(Duration::from_secs(2), get(addr, "/configz")).await;
        assert!(
            !matches!(after, Ok(Ok(r)) if r.body.contains("kubeproxy.config.k8s.io")),
            "listener still open"
        );
    }

    #[tokio::test]
    async fn healthz_server_on_prebound_listener() {
        let clock = FakeClock::new(UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_200));
        let metrics = Metrics::new();
        let health = ProxyHealth::with_clock(
            std::time::Duration::from_secs(30),
            IpFamily::V4,
            Arc::new(clock.clone()),
        )
        .with_metrics(metrics.clone());
        let listener = std::net::TcpListener::bind(local()).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve_healthz_on(listener, health.clone()).unwrap();
        assert_eq!(server.local_addr(), addr);

        let r = get(addr, "/healthz").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        assert_eq!(
            r.body,
            r#"{"lastUpdated":"2024-03-01T00:00:00Z","currentTime":"2024-03-01T00:00:00Z","nodeEligible":true,"healthy":true}"#
        );

        health.set_node(true, true, false);
        let r = get(addr, "/healthz").await.unwrap();
        assert_eq!(r.status, 503);
        assert!(r.body.contains(r#""nodeEligible":false"#), "{}", r.body);
        let r = get(addr, "/livez").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(
            r.body,
            r#"{"lastUpdated":"2024-03-01T00:00:00Z","currentTime":"2024-03-01T00:00:00Z","healthy":true}"#
        );

        health.updated();
        health.queued_update();
        clock.advance(std::time::Duration::from_secs(60));
        let r = get(addr, "/livez").await.unwrap();
        assert_eq!(r.status, 503);

        let r = get(addr, "/metrics").await.unwrap();
        assert_eq!(r.status, 404);

        let text = metrics.encode().unwrap();
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_proxy_livez_total{code=\"503\"} 1\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bind_failure_is_an_error() {
        let taken = std::net::TcpListener::bind(local()).unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve_healthz(addr, ProxyHealth::new(std::time::Duration::from_secs(30)))
            .expect_err("port is taken");
        assert!(
            matches!(err, ServerError::Bind { addr: a, .. } if a == addr),
            "{err}"
        );
    }

    #[test]
    fn serving_without_runtime_is_an_error() {
        let listener = std::net::TcpListener::bind(local()).unwrap();
        let err = serve_healthz_on(
            listener,
            ProxyHealth::new(std::time::Duration::from_secs(1)),
        )
        .expect_err("no runtime");
        assert!(matches!(err, ServerError::NoRuntime(_)), "{err}");
    }
}
