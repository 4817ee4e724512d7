//! HTTP servers: metrics, healthz, per-service health checks.
//!
//! Mirrors upstream kube-proxy's `:10249` metrics server (`/metrics`, `/proxyMode`, `/healthz`,
//! `/configz`), the `:10256` proxy health server (`/healthz`, `/livez`, KK:
//! `pkg/proxy/healthcheck/proxy_health.go`) and the per-Service `healthCheckNodePort` servers
//! (KK: `pkg/proxy/healthcheck/service_health.go`).
//!
//! [`metrics`] and [`health`] are plain state the sync loop updates; [`http`] and
//! [`service_health`] put that state on the network with hyper.

mod error;
pub mod events;
mod format;
pub mod health;
pub mod http;
pub mod metrics;
pub mod process;
pub mod reporter;
pub mod service_health;

pub use error::ServerError;
pub use health::{Clock, FakeClock, HealthResponse, ProxyHealth, SystemClock};
pub use http::{
    HttpServer, MetricsEndpoint, serve_healthz, serve_healthz_on, serve_metrics, serve_metrics_on,
};
pub use metrics::Metrics;
pub use service_health::ServiceHealthServers;

use std::fmt;

/// An IP family, spelled as upstream's `v1.IPFamily` (the `ip_family` metric label value and
/// the key of the `/healthz` `status` map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum IpFamily {
    /// `IPv4`.
    #[default]
    V4,
    /// `IPv6`.
    V6,
}

impl IpFamily {
    /// Upstream's spelling: `IPv4` or `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
