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

pub use crate::model::IpFamily;
