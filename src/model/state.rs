//! Cluster state store.
pub struct ClusterState;
