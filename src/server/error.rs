//! Errors of the HTTP servers.

use std::net::SocketAddr;

/// What can go wrong starting or running a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listening socket failed (address in use, not local, no permission). Upstream
    /// treats this as fatal only with `bindAddressHardFail`; the caller decides.
    #[error("failed to bind {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A pre-bound listener could not be handed to the async runtime.
    #[error("failed to set up listener: {0}")]
    Listener(#[source] std::io::Error),
    /// Serving needs a Tokio runtime, and none is running on this thread.
    #[error("no Tokio runtime to serve on: {0}")]
    NoRuntime(#[from] tokio::runtime::TryCurrentError),
    /// Encoding the metrics registry failed.
    #[error("failed to encode metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}
