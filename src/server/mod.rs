//! HTTP servers: metrics, healthz, per-service health checks.
