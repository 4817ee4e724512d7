//! Backends: render the model into kernel state (pure) and apply it (through `kernel`).

pub mod iptables;
