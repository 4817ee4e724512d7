//! Per-Service health check servers on `healthCheckNodePort` (KK:
//! `pkg/proxy/healthcheck/service_health.go`), for Services with
//! `externalTrafficPolicy: Local`.
//!
//! Each server answers any path: 200 iff the Service has local endpoints and the proxy is
//! healthy (the Node's eligibility is not considered, as upstream), 503 otherwise, so that
//! cloud load balancers only send traffic to nodes that can serve it locally.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hyper::header::HeaderValue;

use super::error::ServerError;
use super::format::go_quote;
use super::health::ProxyHealth;
use super::http::{self, Handler, HttpServer};
use crate::host::{NodeFacts, NodePortDestinations};
use crate::model::{Cidr, ServiceName};

const JSON: &str = "application/json";

type Counts = Arc<Mutex<BTreeMap<ServiceName, usize>>>;

struct Instance {
    port: u16,
    servers: Vec<HttpServer>,
}

/// The set of health check servers, one per Service (and per listen IP).
pub struct ServiceHealthServers {
    listen_ips: Mutex<Vec<IpAddr>>,
    /// The node-port prefixes `listen_ips` were chosen for (`None`: fixed addresses).
    followed: Mutex<Option<Followed>>,
    health: ProxyHealth,
    /// Local endpoint counts of the open services; shared with the handlers.
    counts: Counts,
    /// Owned here only, so that dropping `self` stops every server.
    instances: Mutex<BTreeMap<ServiceName, Instance>>,
    /// Serializes [`sync`](Self::sync) calls.
    sync_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ServiceHealthServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports: BTreeMap<String, u16> = lock(&self.instances)
            .iter()
            .map(|(k, v)| (k.to_string(), v.port))
            .collect();
        f.debug_struct("ServiceHealthServers")
            .field("listen_ips", &*lock(&self.listen_ips))
            .field("ports", &ports)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ServiceHealthServers {
    /// Servers listening on each of `listen_ips` (the node IPs matching nodePortAddresses), or
    /// on `0.0.0.0` when empty; `health` decides `serviceProxyHealthy`.
    pub fn new(listen_ips: Vec<IpAddr>, health: ProxyHealth) -> Self {
        let listen_ips = if listen_ips.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            listen_ips
        };
        Self::listening_on(listen_ips, health)
    }

    /// Servers on the node-port addresses of `facts` among the host's `local` addresses, as
    /// upstream: every address (`0.0.0.0`) when they match all, else exactly the matching
    /// local addresses (none when none match, e.g. `--nodeport-addresses primary` with a node
    /// IP that is not local).
    pub fn for_node_facts(facts: &[NodeFacts], local: &[IpAddr], health: ProxyHealth) -> Self {
        let servers = Self::listening_on(listen_ips_for(facts, local), health);
        *lock(&servers.followed) = Some(followed(facts));
        servers
    }

    fn listening_on(listen_ips: Vec<IpAddr>, health: ProxyHealth) -> Self {
        ServiceHealthServers {
            listen_ips: Mutex::new(listen_ips),
            followed: Mutex::new(None),
            health,
            counts: Arc::default(),
            instances: Mutex::default(),
            sync_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The addresses each health check server listens on.
    pub fn listen_ips(&self) -> Vec<IpAddr> {
        lock(&self.listen_ips).clone()
    }

    /// Whether the servers listen where `facts` (one per family) put node ports (always, for
    /// fixed addresses).
    pub fn follows(&self, facts: &[NodeFacts]) -> bool {
        lock(&self.followed)
            .as_ref()
            .is_none_or(|cidrs| *cidrs == followed(facts))
    }

    /// Moves the servers to the addresses `facts` selects among `local` (the node IP
    /// changed): every open server is closed, and the next [`sync`](Self::sync) opens them
    /// on the new addresses. Upstream restarts instead.
    pub async fn follow(&self, facts: &[NodeFacts], local: &[IpAddr]) {
        let _serial = self.sync_lock.lock().await;
        *lock(&self.followed) = Some(followed(facts));
        let ips = listen_ips_for(facts, local);
        if *lock(&self.listen_ips) == ips {
            return;
        }
        tracing::info!(addresses = ?ips, "node-port addresses changed, moving the health check servers");
        *lock(&self.listen_ips) = ips;
        let closing: Vec<HttpServer> = {
            let mut instances = lock(&self.instances);
            lock(&self.counts).clear();
            std::mem::take(&mut *instances)
                .into_values()
                .flat_map(|i| i.servers)
                .collect()
        };
        for server in closing {
            server.shutdown().await;
        }
    }

    /// Makes `services` (name → healthCheckNodePort) the open set: closes the servers of
    /// services gone or whose port changed (their ports are free when this returns), opens
    /// the new ones (with 0 local endpoints until [`set_local_endpoints`]), leaves the rest
    /// alone. A service that fails to open is reported, left out and retried on the next
    /// call. Needs a Tokio runtime.
    ///
    /// [`set_local_endpoints`]: Self::set_local_endpoints
    pub async fn sync(
        &self,
        services: BTreeMap<ServiceName, u16>,
    ) -> Vec<(ServiceName, ServerError)> {
        let _serial = self.sync_lock.lock().await;
        let mut closing = Vec::new();
        {
            let mut instances = lock(&self.instances);
            let mut counts = lock(&self.counts);
            instances.retain(|name, inst| {
                if services.get(name) == Some(&inst.port) {
                    return true;
                }
                tracing::debug!(service = %name, port = inst.port, "closing healthcheck");
                counts.remove(name);
                closing.append(&mut inst.servers);
                false
            });
        }
        for server in closing {
            server.shutdown().await;
        }

        let mut errors = Vec::new();
        for (name, port) in services {
            if lock(&self.instances).contains_key(&name) {
                continue;
            }
            tracing::debug!(service = %name, port, "opening healthcheck");
            // Counted before serving, so the first request already finds the service.
            lock(&self.counts).insert(name.clone(), 0);
            match self.open(&name, port) {
                Ok(servers) => {
                    lock(&self.instances).insert(name, Instance { port, servers });
                }
                Err(e) => {
                    tracing::error!(service = %name, port, error = %e, "failed to start healthcheck");
                    lock(&self.counts).remove(&name);
                    errors.push((name, e));
                }
            }
        }
        errors
    }

    /// Listens on every listen IP; on a failure the ones already open are dropped (closed).
    fn open(&self, name: &ServiceName, port: u16) -> Result<Vec<HttpServer>, ServerError> {
        let listen_ips = self.listen_ips();
        let mut servers = Vec::with_capacity(listen_ips.len());
        for ip in &listen_ips {
            let listener = http::bind_family_only(SocketAddr::new(*ip, port))?;
            servers.push(http::spawn(listener, self.handler(name.clone()))?);
        }
        Ok(servers)
    }

    fn handler(&self, name: ServiceName) -> Handler {
        let counts = self.counts.clone();
        let health = self.health.clone();
        Arc::new(move |_path: &str| {
            let Some(count) = lock(&counts).get(&name).copied() else {
                // Closed while this request was in flight.
                return http::respond(503, JSON, "");
            };
            let healthy = health.is_healthy();
            let status = if count != 0 && healthy { 200 } else { 503 };
            let mut resp = http::respond(status, JSON, body(&name, count, healthy));
            resp.headers_mut()
                .insert("x-load-balancing-endpoint-weight", HeaderValue::from(count));
            resp
        })
    }

    /// Sets the number of ready local endpoints per service; open services missing from
    /// `counts` get 0, entries for services not open are ignored.
    pub fn set_local_endpoints(&self, counts: BTreeMap<ServiceName, usize>) {
        let mut current = lock(&self.counts);
        for (name, n) in current.iter_mut() {
            *n = counts.get(name).copied().unwrap_or(0);
        }
    }

    /// The addresses a service's servers listen on (empty if it is not open).
    pub fn local_addrs(&self, name: &ServiceName) -> Vec<SocketAddr> {
        lock(&self.instances)
            .get(name)
            .map(|i| i.servers.iter().map(HttpServer::local_addr).collect())
            .unwrap_or_default()
    }

    /// The open services and their requested ports.
    pub fn services(&self) -> BTreeMap<ServiceName, u16> {
        lock(&self.instances)
            .iter()
            .map(|(k, v)| (k.clone(), v.port))
            .collect()
    }
}

/// Where health check servers listen for `facts`: `0.0.0.0` when node ports are on every
/// address, else the matching `local` addresses.
/// Per family, as upstream's per-proxier servers: every address of the family (`0.0.0.0`,
/// `[::]`) when its node-port addresses match all, else exactly its matching local addresses.
fn listen_ips_for(facts: &[NodeFacts], local: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for f in facts {
        match f.node_port_ips(local) {
            NodePortDestinations::AllLocal => out.push(f.family.unspecified()),
            NodePortDestinations::Ips(ips) => {
                if ips.is_empty() {
                    tracing::warn!(
                        family = %f.family,
                        "no local address matches the node-port addresses; health check node ports are not served for this family"
                    );
                }
                out.extend(ips);
            }
        }
    }
    out
}

/// What the listen addresses were chosen from: each family's node-port prefixes.
type Followed = Vec<(crate::model::IpFamily, Option<Vec<Cidr>>)>;

fn followed(facts: &[NodeFacts]) -> Followed {
    facts
        .iter()
        .map(|f| (f.family, f.node_port_cidrs.clone()))
        .collect()
}

/// Upstream's body: a dedented, tab-indented JSON document without a trailing newline.
fn body(name: &ServiceName, count: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        go_quote(&name.namespace),
        go_quote(&name.name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::IpFamily;
    use crate::server::health::FakeClock;
    use crate::server::http::testclient::get;
    use std::time::{Duration, UNIX_EPOCH};

    fn loopback() -> Vec<IpAddr> {
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn body_is_upstream_format() {
        assert_eq!(
            body(&ServiceName::new("ns", "svc"), 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"svc\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[tokio::test]
    async fn health_port_follows_endpoints_and_proxy_health() {
        let clock = FakeClock::new(UNIX_EPOCH + Duration::from_secs(1_709_251_200));
        let health = ProxyHealth::with_clock(
            Duration::from_secs(30),
            IpFamily::V4,
            Arc::new(clock.clone()),
        );
        health.updated();
        let servers = ServiceHealthServers::new(loopback(), health.clone());
        let svc = ServiceName::new("ns", "svc");
        let other = ServiceName::new("ns", "other");
        let errs = servers
            .sync(BTreeMap::from([(svc.clone(), 0), (other.clone(), 0)]))
            .await;
        assert!(errs.is_empty(), "{errs:?}");
        let addr = servers.local_addrs(&svc)[0];
        let other_addr = servers.local_addrs(&other)[0];

        // No local endpoints yet: 503, any path.
        let r = get(addr, "/some/path").await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "0");
        assert_eq!(r.body, body(&svc, 0, true));

        servers.set_local_endpoints(BTreeMap::from([
            (svc.clone(), 2),
            (ServiceName::new("ns", "unknown"), 5),
        ]));
        let r = get(addr, "/").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "2");
        assert_eq!(
            r.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"svc\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        // Each service answers for itself.
        let r = get(other_addr, "/").await.unwrap();
        assert_eq!(r.status, 503);
        assert!(r.body.contains("\"name\": \"other\""), "{}", r.body);
        assert!(
            servers
                .local_addrs(&ServiceName::new("ns", "unknown"))
                .is_empty()
        );

        // The Node's eligibility does not matter here, only the proxy's health.
        health.set_node(true, true, false);
        assert_eq!(get(addr, "/").await.unwrap().status, 200);
        health.queued_update();
        clock.advance(Duration::from_secs(60));
        let r = get(addr, "/").await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, body(&svc, 2, false));
        health.updated();
        assert_eq!(get(addr, "/").await.unwrap().status, 200);

        // A service missing from the counts drops to 0.
        servers.set_local_endpoints(BTreeMap::new());
        let r = get(addr, "/").await.unwrap();
        assert_eq!(
            (
                r.status,
                r.headers["x-load-balancing-endpoint-weight"].as_str()
            ),
            (503, "0")
        );

        // Removing the service closes its port by the time sync returns; the other stays.
        servers.set_local_endpoints(BTreeMap::from([(other.clone(), 1)]));
        let errs = servers.sync(BTreeMap::from([(other.clone(), 0)])).await;
        assert!(errs.is_empty());
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "removed service still listening"
        );
        assert_eq!(get(other_addr, "/").await.unwrap().status, 200);
        assert_eq!(servers.services(), BTreeMap::from([(other.clone(), 0)]));
    }

    #[tokio::test]
    async fn port_change_reopens_and_failed_bind_is_retried() {
        let health = ProxyHealth::new(Duration::from_secs(30));
        let servers = ServiceHealthServers::new(loopback(), health);
        let svc = ServiceName::new("ns", "svc");
        servers.sync(BTreeMap::from([(svc.clone(), 0)])).await;
        let old = servers.local_addrs(&svc)[0];
        servers.set_local_endpoints(BTreeMap::from([(svc.clone(), 3)]));

        let port = free_port();
        let errs = servers.sync(BTreeMap::from([(svc.clone(), port)])).await;
        assert!(errs.is_empty(), "{errs:?}");
        assert!(
            tokio::net::TcpStream::connect(old).await.is_err(),
            "old port still open"
        );
        let new = servers.local_addrs(&svc);
        assert_eq!(new, vec![SocketAddr::from(([127, 0, 0, 1], port))]);
        // A reopened service starts with no endpoints, as upstream's new hcInstance does.
        assert_eq!(get(new[0], "/").await.unwrap().status, 503);

        // Port taken by someone else: reported, not open, retried next time.
        let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = blocker.local_addr().unwrap().port();
        let errs = servers.sync(BTreeMap::from([(svc.clone(), taken)])).await;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, svc);
        assert!(matches!(errs[0].1, ServerError::Bind { .. }));
        assert!(servers.services().is_empty());
        assert!(tokio::net::TcpStream::connect(new[0]).await.is_err());
        drop(blocker);
        let errs = servers.sync(BTreeMap::from([(svc.clone(), taken)])).await;
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            get(SocketAddr::from(([127, 0, 0, 1], taken)), "/x")
                .await
                .unwrap()
                .status,
            503
        );
    }

    #[tokio::test]
    async fn dropping_the_set_closes_every_port() {
        let servers =
            ServiceHealthServers::new(loopback(), ProxyHealth::new(Duration::from_secs(30)));
        let svc = ServiceName::new("ns", "svc");
        servers.sync(BTreeMap::from([(svc.clone(), 0)])).await;
        let addr = servers.local_addrs(&svc)[0];
        assert_eq!(get(addr, "/").await.unwrap().status, 503);
        drop(servers);
        // Abort is asynchronous on drop: give the runtime a moment.
        let mut closed = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "servers outlived their owner");
    }

    #[tokio::test]
    async fn servers_listen_on_the_node_port_addresses_and_follow_a_node_ip_change() {
        let facts = |ip: &str| NodeFacts {
            node_port_cidrs: Some(vec![format!("{ip}/32").parse().unwrap()]),
            ..NodeFacts::default()
        };
        let local: Vec<IpAddr> = ["127.0.0.1", "127.0.0.2", "fd00::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let first = facts("127.0.0.1");
        let servers = ServiceHealthServers::for_node_facts(
            std::slice::from_ref(&first),
            &local,
            ProxyHealth::new(Duration::from_secs(30)),
        );
        assert_eq!(
            servers.listen_ips(),
            ["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        let svc = ServiceName::new("ns", "svc");
        let port = free_port();
        assert!(
            servers
                .sync(BTreeMap::from([(svc.clone(), port)]))
                .await
                .is_empty()
        );
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
        assert_eq!(get(at("127.0.0.1"), "/").await.unwrap().status, 503);
        assert!(
            get(at("127.0.0.2"), "/").await.is_err(),
            "not a node-port address"
        );
        assert!(servers.follows(std::slice::from_ref(&first)));

        // The primary node IP moved: the servers move with it at the next sync.
        let second = facts("127.0.0.2");
        assert!(!servers.follows(std::slice::from_ref(&second)));
        servers.follow(std::slice::from_ref(&second), &local).await;
        assert!(servers.follows(std::slice::from_ref(&second)));
        assert!(
            servers
                .sync(BTreeMap::from([(svc.clone(), port)]))
                .await
                .is_empty()
        );
        assert_eq!(servers.local_addrs(&svc), [at("127.0.0.2")]);
        assert_eq!(get(at("127.0.0.2"), "/").await.unwrap().status, 503);
        assert!(
            get(at("127.0.0.1"), "/").await.is_err(),
            "old address closed"
        );

        // Every address: one wildcard listener; no match at all: none (as upstream).
        let all = ServiceHealthServers::for_node_facts(
            &[NodeFacts::default()],
            &local,
            ProxyHealth::new(Duration::from_secs(30)),
        );
        assert_eq!(all.listen_ips(), [IpAddr::V4(Ipv4Addr::UNSPECIFIED)]);
        let none = ServiceHealthServers::for_node_facts(
            &[facts("10.9.9.9")],
            &local,
            ProxyHealth::new(Duration::from_secs(30)),
        );
        assert!(none.listen_ips().is_empty());
    }
}
