//! kube-proxy-rs: a drop-in replacement for Kubernetes' kube-proxy.
//!
//! Layout follows the data flow: [`watch`] streams API objects into the pure [`model`];
//! [`sync`] decides when and what to program; [`backend`] renders the model into kernel
//! state (pure) and applies it through [`kernel`], the only module that touches the system;
//! [`server`] exposes metrics and health; [`config`] holds flags and the config file.
#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
pub mod daemon;
pub mod docgen;
pub mod explain;
pub mod host;
pub mod kernel;
pub mod kubeconfig;
pub mod model;
pub mod render;
pub mod server;
pub mod sync;
pub mod watch;
pub mod yamlguard;
