//! The benches' cluster: N ClusterIP Services (`10.96.x.y:80`), each with one EndpointSlice
//! of endpoints on another node. Shared by `sync`, `nftables` and `ipvs`.

use kube_proxy_rs::model::ClusterState;
use serde_json::json;

/// `n` services with `per_service` endpoints each, changes taken.
pub fn build_state(n: usize, per_service: usize) -> ClusterState {
    let mut st = ClusterState::new("node1");
    for i in 0..n {
        let (hi, lo) = (i / 250, i % 250);
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"namespace": "bench", "name": format!("svc{i}")},
            "spec": {"clusterIP": format!("10.96.{hi}.{lo}"), "ports": [{"name": "p80", "port": 80}]}
        }))
        .unwrap();
        st.apply_service(&svc);
        st.apply_slice(&slice_of(i, per_service, 0));
    }
    st.take_changes();
    st
}

/// Service `i`'s EndpointSlice: `per_service` endpoints, numbered from `first`.
pub fn slice_of(
    i: usize,
    per_service: usize,
    first: usize,
) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let (hi, lo) = (i / 250, i % 250);
    let eps: Vec<_> = (first..first + per_service)
        .map(|e| {
            let ip = if per_service <= 5 {
                format!("10.{}.{hi}.{lo}", 100 + e)
            } else {
                format!("10.{}.{}.{}", 100 + e / 250, i % 250, e % 250)
            };
            json!({"addresses": [ip], "nodeName": "node2"})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc{i}-1"),
                     "labels": {"kubernetes.io/service-name": format!("svc{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "p80", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .unwrap()
}
