//! This host's (or network namespace's) IP addresses, with interface names: over rtnetlink
//! (one address and one link dump, see [`super::link::local_addresses`]); `ip -j addr show`
//! (iproute2's JSON output) remains as the reference the netlink list is tested against.
//!
//! Every sync reads the list, as upstream. The daemon keeps it in an [`AddressCache`] that an
//! rtnetlink subscription refreshes ([`AddressCache::watch`]), so a sync costs no dump; a
//! change wakes a sync, so rules that follow the addresses (nodePortAddresses) follow them
//! without waiting for a Service change.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::time::Duration;

use super::KernelError;
use super::exec::Exec;

/// Scope of an address, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrScope {
    /// `global`: usable anywhere.
    Global,
    /// `site` (deprecated IPv6 site-local).
    Site,
    /// `link`: link-local (fe80::/10, 169.254/16).
    Link,
    /// `host`: loopback.
    Host,
    /// Any other (numeric) scope.
    Other,
}

impl AddrScope {
    fn parse(s: &str) -> Self {
        match s {
            "global" | "universe" => AddrScope::Global,
            "site" => AddrScope::Site,
            "link" => AddrScope::Link,
            "host" => AddrScope::Host,
            _ => AddrScope::Other,
        }
    }
}

/// One address configured on an interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalAddress {
    /// Interface name (`eth0`).
    pub interface: String,
    /// Interface index.
    pub ifindex: u32,
    /// The address (the local end for point-to-point links).
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Scope.
    pub scope: AddrScope,
}

/// A handle for listing addresses, optionally inside a network namespace.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    exec: Exec,
    cache: Option<AddressCache>,
}

/// The namespace's addresses as last listed, kept current by [`AddressCache::watch`]; empty
/// (so readers list for themselves) until the first listing and after the subscription
/// failed.
#[derive(Debug, Clone, Default)]
pub struct AddressCache {
    list: Arc<Mutex<Option<Vec<LocalAddress>>>>,
}

impl AddressCache {
    fn get(&self) -> Option<Vec<LocalAddress>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stores `list`; returns whether it differs from what was held.
    fn set(&self, list: Option<Vec<LocalAddress>>) -> bool {
        let mut held = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *held != list;
        *held = list;
        changed
    }

    /// Subscribes to the address changes of `netns` (`None`: this process's namespace), fills
    /// the cache, and returns the task that keeps it current: on every change message it lists
    /// again and calls `on_change` when the list differs. If the subscription fails the cache
    /// is emptied (readers dump for themselves, as before), `on_change` called, and the task
    /// subscribes again [`RESUBSCRIBE_AFTER`] later. The task runs until aborted.
    pub async fn watch(
        netns: Option<String>,
        on_change: impl Fn() + Send + 'static,
    ) -> Result<(AddressCache, tokio::task::JoinHandle<()>), KernelError> {
        let cache = AddressCache::default();
        let events = super::link::AddressEvents::subscribe(netns.as_deref()).await?;
        // Listed after subscribing: a change in between is announced, not lost.
        cache.set(Some(super::link::local_addresses(netns.as_deref()).await?));
        let task = tokio::spawn(cache.clone().follow(netns, events, on_change));
        Ok((cache, task))
    }

    async fn follow(
        self,
        netns: Option<String>,
        mut events: super::link::AddressEvents,
        on_change: impl Fn() + Send + 'static,
    ) {
        loop {
            if let Err(e) = events.next().await {
                tracing::warn!(error = %e, "address change subscription lost; listing addresses every sync until it is back");
                if self.set(None) {
                    on_change();
                }
                events = self.resubscribe(netns.as_deref()).await;
            }
            let list = super::link::local_addresses(netns.as_deref()).await;
            let list = list
                .inspect_err(|e| tracing::warn!(error = %e, "listing local addresses failed"))
                .ok();
            if self.set(list) {
                tracing::debug!("local addresses changed");
                on_change();
            }
        }
    }

    /// Subscribes again, retrying every [`RESUBSCRIBE_AFTER`].
    async fn resubscribe(&self, netns: Option<&str>) -> super::link::AddressEvents {
        loop {
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
            match super::link::AddressEvents::subscribe(netns).await {
                Ok(events) => return events,
                Err(e) => tracing::warn!(error = %e, "subscribing to address changes"),
            }
        }
    }
}

/// How long a failed address subscription waits before subscribing again.
pub const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(10);

impl Addresses {
    /// Addresses of this process's network namespace.
    pub fn new() -> Self {
        Addresses::default()
    }

    /// The same handle, running `ip` through `ip netns exec NAME`.
    pub fn with_netns(mut self, name: impl AsRef<str>) -> Self {
        self.exec = Exec::new(Some(name.as_ref()));
        self
    }

    /// The same handle, answering from `cache` while it holds a list (it must follow this
    /// handle's namespace).
    pub fn with_cache(mut self, cache: AddressCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// All IPv4 and IPv6 addresses on all interfaces (up or not), in interface order: from
    /// the cache when there is one, else over rtnetlink.
    pub async fn list(&self) -> Result<Vec<LocalAddress>, KernelError> {
        if let Some(list) = self.cache.as_ref().and_then(AddressCache::get) {
            return Ok(list);
        }
        super::link::local_addresses(self.exec.netns()).await
    }

    /// The same list from `ip -j addr show` (what [`Addresses::list`] must agree with).
    pub async fn list_with_ip(&self) -> Result<Vec<LocalAddress>, KernelError> {
        let args = ["-j", "addr", "show"].map(String::from).to_vec();
        let out = self.exec.run("ip", &args, None).await?;
        let command = out.command.clone();
        let text = out.into_stdout()?;
        parse_ip_addr_json(&text).map_err(|detail| KernelError::Parse { command, detail })
    }
}

/// Parses `ip -j addr show` output. Entries of other families are skipped; malformed
/// entries are an error.
pub fn parse_ip_addr_json(text: &str) -> Result<Vec<LocalAddress>, String> {
    let links: Vec<Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for link in &links {
        let ifname = link
            .get("ifname")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("link without ifname: {link}"))?;
        let ifindex = link
            .get("ifindex")
            .and_then(Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| format!("link {ifname} without ifindex"))?;
        let Some(infos) = link.get("addr_info").and_then(Value::as_array) else {
            continue;
        };
        for info in infos {
            match info.get("family").and_then(Value::as_str) {
                Some("inet") | Some("inet6") => {}
                _ => continue,
            }
            let addr: IpAddr = info
                .get("local")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad address on {ifname}: {info}"))?;
            let prefix_len = info
                .get("prefixlen")
                .and_then(Value::as_u64)
                .and_then(|p| u8::try_from(p).ok())
                .ok_or_else(|| format!("bad prefixlen on {ifname}: {info}"))?;
            let scope = info
                .get("scope")
                .and_then(Value::as_str)
                .map_or(AddrScope::Other, AddrScope::parse);
            out.push(LocalAddress {
                interface: ifname.to_string(),
                ifindex,
                addr,
                prefix_len,
                scope,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    /// The netlink list is what `ip -j addr show` lists, field for field: addresses of both
    /// families, point-to-point local ends, secondary addresses, scopes, links up or down.
    #[tokio::test]
    async fn netlink_list_matches_ip_addr_show() {
        let ns = crate::kernel::testutil::NetNs::new();
        for args in [
            &["addr", "add", "127.0.0.9/8", "dev", "lo"][..],
            &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            &["addr", "add", "10.7.0.1/24", "dev", "v0"],
            &["addr", "add", "10.7.0.2/24", "dev", "v0"],
            &["addr", "add", "10.8.0.1", "peer", "10.8.0.2", "dev", "v1"],
            &["addr", "add", "fd00::1/64", "dev", "v0", "nodad"],
            &[
                "addr",
                "add",
                "169.254.3.3/16",
                "dev",
                "v1",
                "scope",
                "link",
            ],
            &["link", "set", "v0", "up"],
        ] {
            ns.exec("ip", args);
        }
        let addrs = Addresses::new().with_netns(ns.name());
        let netlink = addrs.list().await.unwrap();
        let ip = addrs.list_with_ip().await.unwrap();
        assert!(netlink.len() >= 7, "{netlink:#?}");
        let p2p = netlink
            .iter()
            .find(|a| a.interface == "v1" && a.prefix_len == 32);
        assert_eq!(p2p.map(|a| a.addr), Some("10.8.0.1".parse().unwrap()));
        assert_eq!(netlink, ip);
    }

    use super::*;
    use crate::kernel::testutil::NetNs;

    /// Waits (at most 5 s) for `wakes` to count past `seen`; the count then.
    async fn next_wake(wakes: &tokio::sync::watch::Receiver<usize>, seen: usize) -> usize {
        let mut rx = wakes.clone();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|n| *n > seen)).await;
        *got.expect("no wake-up within 5 s")
            .expect("watch task gone")
    }

    /// The cache follows address changes in the namespace: each added or removed address is
    /// in the list the next reader gets (no dump of its own) and wakes the caller once.
    #[tokio::test]
    async fn kernel_cache_follows_address_events_and_wakes() {
        let ns = NetNs::new();
        ns.exec(
            "ip",
            &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        );
        let (tx, wakes) = tokio::sync::watch::channel(0usize);
        let (cache, task) = AddressCache::watch(Some(ns.name().to_string()), move || {
            tx.send_modify(|n| *n += 1)
        })
        .await
        .unwrap();
        let addrs = Addresses::new()
            .with_netns(ns.name())
            .with_cache(cache.clone());
        let has = |list: &[LocalAddress], ip: &str| list.iter().any(|a| a.addr.to_string() == ip);
        assert!(!has(&addrs.list().await.unwrap(), "10.9.0.1"));

        ns.exec("ip", &["addr", "add", "10.9.0.1/24", "dev", "v0"]);
        let n = next_wake(&wakes, 0).await;
        let cached = cache.get().expect("a list");
        assert!(has(&cached, "10.9.0.1"), "{cached:#?}");
        assert_eq!(addrs.list().await.unwrap(), cached);
        assert_eq!(
            cached,
            addrs.list_with_ip().await.unwrap(),
            "as `ip addr` lists"
        );

        ns.exec(
            "ip",
            &["-6", "addr", "add", "fd00:9::1/64", "dev", "v0", "nodad"],
        );
        let n = next_wake(&wakes, n).await;
        assert!(has(&cache.get().unwrap(), "fd00:9::1"));

        ns.exec("ip", &["addr", "del", "10.9.0.1/24", "dev", "v0"]);
        next_wake(&wakes, n).await;
        let cached = cache.get().unwrap();
        assert!(
            !has(&cached, "10.9.0.1") && has(&cached, "fd00:9::1"),
            "{cached:#?}"
        );
        task.abort();
    }

    const SAMPLE: &str = r#"[
      {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"addr_info":[
        {"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo"},
        {"family":"inet6","local":"::1","prefixlen":128,"scope":"host"}]},
      {"ifindex":2,"ifname":"ifb0","flags":["BROADCAST"],"addr_info":[]},
      {"ifindex":3,"ifname":"eth0","addr_info":[
        {"family":"inet","local":"192.168.1.10","prefixlen":24,"broadcast":"192.168.1.255","scope":"global"},
        {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]},
      {"ifindex":4,"ifname":"tun0","addr_info":[
        {"family":"inet","local":"10.8.0.1","address":"10.8.0.2","prefixlen":32,"scope":"global"}]},
      {"ifindex":5,"ifname":"weird"}
    ]"#;

    #[test]
    fn parse_sample() {
        let got = parse_ip_addr_json(SAMPLE).unwrap();
        let want = [
            ("lo", 1, "127.0.0.1", 8, AddrScope::Host),
            ("lo", 1, "::1", 128, AddrScope::Host),
            ("eth0", 3, "192.168.1.10", 24, AddrScope::Global),
            ("eth0", 3, "fe80::1", 64, AddrScope::Link),
            // Point-to-point: the local end, not the peer.
            ("tun0", 4, "10.8.0.1", 32, AddrScope::Global),
        ];
        let got: Vec<_> = got
            .iter()
            .map(|a| {
                (
                    a.interface.as_str(),
                    a.ifindex,
                    a.addr.to_string(),
                    a.prefix_len,
                    a.scope,
                )
            })
            .collect();
        let want: Vec<_> = want
            .iter()
            .map(|(i, n, a, p, s)| (*i, *n, a.to_string(), *p, *s))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse_ip_addr_json("not json").is_err());
        assert!(parse_ip_addr_json(r#"[{"ifindex":1}]"#).is_err());
        let bad = r#"[{"ifindex":1,"ifname":"x","addr_info":[{"family":"inet","local":"zz","prefixlen":8}]}]"#;
        assert!(parse_ip_addr_json(bad).unwrap_err().contains("bad address"));
    }

    #[tokio::test]
    async fn kernel_lists_namespace_addresses() {
        let a = NetNs::new();
        let b = NetNs::new();
        a.veth_to(&b, "kprsa0", "kprsb0", "10.78.0.1/24", "10.78.0.2/24");
        a.exec(
            "ip",
            &["addr", "add", "fd00:78::1/64", "dev", "kprsa0", "nodad"],
        );
        let addrs = Addresses::new().with_netns(a.name()).list().await.unwrap();
        let mut got: Vec<(String, String, u8)> = addrs
            .iter()
            .filter(|a| a.scope != AddrScope::Link)
            .map(|a| (a.interface.clone(), a.addr.to_string(), a.prefix_len))
            .collect();
        got.sort();
        let mut want = vec![
            ("kprsa0".to_string(), "10.78.0.1".to_string(), 24),
            ("kprsa0".to_string(), "fd00:78::1".to_string(), 64),
            ("lo".to_string(), "127.0.0.1".to_string(), 8),
            ("lo".to_string(), "::1".to_string(), 128),
        ];
        want.sort();
        assert_eq!(got, want, "{addrs:?}");
        let global = addrs
            .iter()
            .find(|a| a.addr.to_string() == "10.78.0.1")
            .unwrap();
        assert_eq!(global.scope, AddrScope::Global);
    }
}
