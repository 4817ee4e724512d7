//! A fake kube-apiserver over plain HTTP/1.1, good enough for kube-rs's real
//! `watcher` code path (list + watch, bookmarks, streaming lists, 410 Gone).
//!
//! Objects are plain `serde_json::Value`s kept in memory with one global,
//! monotonically increasing resourceVersion and an event log. The server runs
//! on its own thread with its own tokio runtime, so it works from sync and
//! async tests alike, and it can listen inside a network namespace.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::netns::Netns;

type Body = BoxBody<Bytes, io::Error>;

/// A served resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResInfo {
    pub plural: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

/// Resource types the fake server knows.
pub const RESOURCES: &[ResInfo] = &[
    ResInfo {
        plural: "services",
        api_version: "v1",
        kind: "Service",
        namespaced: true,
    },
    ResInfo {
        plural: "endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        namespaced: true,
    },
    ResInfo {
        plural: "nodes",
        api_version: "v1",
        kind: "Node",
        namespaced: false,
    },
    ResInfo {
        plural: "pods",
        api_version: "v1",
        kind: "Pod",
        namespaced: true,
    },
    ResInfo {
        plural: "namespaces",
        api_version: "v1",
        kind: "Namespace",
        namespaced: false,
    },
    ResInfo {
        plural: "servicecidrs",
        api_version: "networking.k8s.io/v1",
        kind: "ServiceCIDR",
        namespaced: false,
    },
    ResInfo {
        plural: "events",
        api_version: "v1",
        kind: "Event",
        namespaced: true,
    },
    ResInfo {
        plural: "events",
        api_version: "events.k8s.io/v1",
        kind: "Event",
        namespaced: true,
    },
];

/// Finds a resource by kind or plural (case-insensitive), optionally with apiVersion.
pub fn res_info(kind_or_plural: &str, api_version: Option<&str>) -> Option<&'static ResInfo> {
    RESOURCES.iter().find(|r| {
        (r.kind.eq_ignore_ascii_case(kind_or_plural)
            || r.plural.eq_ignore_ascii_case(kind_or_plural))
            && api_version.is_none_or(|v| v == r.api_version)
    })
}

type Key = (usize, String, String); // (index in RESOURCES, namespace, name)

fn rid(r: &ResInfo) -> usize {
    RESOURCES
        .iter()
        .position(|x| x == r)
        .expect("known resource")
}

fn key(r: &ResInfo, ns: &str, name: &str) -> Key {
    (
        rid(r),
        if r.namespaced {
            ns.to_string()
        } else {
            String::new()
        },
        name.to_string(),
    )
}

#[derive(Debug, Clone)]
struct LogEntry {
    rv: u64,
    res: &'static ResInfo,
    etype: &'static str,
    old: Option<Value>,
    new: Value,
}

#[derive(Debug)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<LogEntry>,
    /// While set, every request is answered with this status (503, 401, ...).
    failing: Option<u16>,
    down: bool,
    /// How long every list request waits before it is answered.
    list_delay: Duration,
    /// When set, the next watch event is sent half-written and its stream aborted.
    cut_mid_event: bool,
    requests: Vec<String>,
    bookmark_interval: Duration,
    open_watches: HashMap<usize, usize>,
    uid_counter: u64,
    /// Plurals answered with 404, as by a server too old to have them.
    hidden: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every change of the event log.
    changed: tokio::sync::watch::Sender<u64>,
    /// Bumped to cut all open watch streams.
    cut: tokio::sync::watch::Sender<u64>,
    addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
    fn cut_watches(&self) {
        self.cut.send_modify(|v| *v += 1);
    }
}

/// The fake API server. Stops (closing all connections) on Drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FakeApiServer({})", self.shared.addr)
    }
}

impl FakeApiServer {
    /// Starts on 127.0.0.1 (random port) in the test's own namespace.
    pub fn start() -> FakeApiServer {
        Self::start_in(None, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// Starts listening on `ip`:random-port inside `ns` (or the current
    /// namespace for `None`); e.g. `start_in(Some(&topo.node), 127.0.0.1)` so a
    /// binary running in the node namespace reaches it at 127.0.0.1.
    pub fn start_in(ns: Option<&Netns>, ip: IpAddr) -> FakeApiServer {
        let bind = || std::net::TcpListener::bind(SocketAddr::new(ip, 0));
        let listener = match ns {
            Some(ns) => ns.in_netns(bind),
            None => bind(),
        }
        .expect("bind fake API server");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                compacted: 0,
                objects: BTreeMap::new(),
                log: Vec::new(),
                failing: None,
                down: false,
                list_delay: Duration::ZERO,
                cut_mid_event: false,
                requests: Vec::new(),
                bookmark_interval: Duration::from_secs(2),
                open_watches: HashMap::new(),
                uid_counter: 0,
                hidden: Vec::new(),
            }),
            changed: tokio::sync::watch::channel(0).0,
            cut: tokio::sync::watch::channel(0).0,
            addr,
        });
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake API runtime");
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            acc = l.accept() => {
                                let Ok((stream, _)) = acc else { continue };
                                let sh = sh.clone();
                                tokio::spawn(async move {
                                    let svc = hyper::service::service_fn(move |req| {
                                        let sh = sh.clone();
                                        async move {
                                            if sh.lock().down {
                                                // Fails the connection: no response at all.
                                                return Err(io::Error::other("fake API server is down"));
                                            }
                                            Ok(handle(sh, req).await)
                                        }
                                    });
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                        .await;
                                });
                            }
                        }
                    }
                });
                // Dropping the runtime cancels every connection and watch task.
                drop(rt);
            })
            .expect("spawn fake API thread");
        FakeApiServer {
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://IP:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The one-service cluster the daemon-level tests start from: Node `node_name` (InternalIP
    /// `node_ip`, podCIDR 10.244.0.0/24), Service demo/web (10.96.0.10:80 -> 8080) and its
    /// slice `web-1` with one endpoint, 10.244.0.11, on that node.
    pub fn apply_demo_web(&self, node_name: &str, node_ip: &str) {
        self.apply(node(node_name, &[node_ip], Some("10.244.0.0/24")));
        self.apply(service(
            "demo",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP", 8080)],
        ));
        self.apply(endpoint_slice(
            "demo",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &["10.244.0.11"],
            Some(node_name),
        ));
    }

    /// Creates or updates an object (needs `kind` and `metadata.name`;
    /// namespaced kinds default to namespace "default"). Sets apiVersion if
    /// missing, `metadata.resourceVersion` (new global RV), `uid` and
    /// `creationTimestamp` (kept across updates), logs ADDED/MODIFIED and wakes
    /// watches. Returns the stored object.
    pub fn apply(&self, obj: Value) -> Value {
        let kind = obj["kind"]
            .as_str()
            .expect("object needs a kind")
            .to_string();
        let r = res_info(&kind, obj["apiVersion"].as_str())
            .unwrap_or_else(|| panic!("fake API server does not serve kind {kind}"));
        let out = self
            .shared
            .lock()
            .upsert(r, obj, Mode::Apply)
            .expect("apply");
        self.shared.notify();
        out
    }

    /// Deletes an object (`kind` may be a Kind or a plural; `ns` is ignored for
    /// cluster-scoped kinds). Logs DELETED with a new RV. Returns the deleted
    /// object, or None if it did not exist.
    pub fn delete(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let r = res_info(kind, None).unwrap_or_else(|| panic!("unknown kind {kind}"));
        let out = self.shared.lock().remove(r, ns, name);
        self.shared.notify();
        out
    }

    /// Current stored object.
    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let r = res_info(kind, None).unwrap_or_else(|| panic!("unknown kind {kind}"));
        self.shared.lock().objects.get(&key(r, ns, name)).cloned()
    }

    /// All stored objects of a kind.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let r = res_info(kind, None).unwrap_or_else(|| panic!("unknown kind {kind}"));
        let id = rid(r);
        self.shared
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == id)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Expires every resourceVersion handed out so far: bumps the RV and makes
    /// any later watch from an older RV get a 410 `ERROR` event (`Expired`),
    /// so the client must relist. Open watches keep streaming.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.rv += 1;
        st.compacted = st.rv;
    }

    /// Forgets the change log up to `rv` (as etcd's compaction does): watches from an older
    /// RV get 410 Gone. Only for open watches known to be past `rv` (a load test trimming
    /// what its watchers have long streamed), or they skip the forgotten events.
    pub fn trim_log(&self, rv: u64) {
        let mut st = self.shared.lock();
        st.log.retain(|e| e.rv > rv);
        st.compacted = st.compacted.max(rv);
    }

    /// Abruptly cuts every open watch stream (connection aborted mid-body).
    pub fn drop_watches(&self) {
        self.shared.cut_watches();
    }

    /// While true every request gets 503 ServiceUnavailable; turning it on also
    /// cuts all open watches. NB: kube-rs (default config) retries 503 itself
    /// (up to 15 times, exponential backoff from 5 ms), so a short 503 window
    /// is mostly invisible to its callers: requests just take longer.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.set_failing(unavailable.then_some(503));
    }

    /// While `Some(code)` every request is answered with that status and a `Status` body
    /// (e.g. 401 for a bad token, 503 for an overloaded server); turning it on also cuts all
    /// open watches. Requests are still logged.
    pub fn set_failing(&self, code: Option<u16>) {
        self.shared.lock().failing = code;
        if code.is_some() {
            self.shared.cut_watches();
        }
    }

    /// While true the server answers nothing: every request's connection is
    /// closed without a response (callers see transport errors, which kube-rs
    /// does not retry). Turning it on also cuts all open watches. Requests are
    /// not logged meanwhile.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
        if down {
            self.shared.cut_watches();
        }
    }

    /// While `hidden`, requests for `plural` get 404 as from a server without that resource
    /// (its objects are kept and served again once shown).
    pub fn set_hidden(&self, plural: &str, hidden: bool) {
        let mut st = self.shared.lock();
        st.hidden.retain(|p| p != plural);
        if hidden {
            st.hidden.push(plural.to_string());
        }
        drop(st);
        if hidden {
            self.shared.cut_watches();
        }
    }

    /// Every list request waits `d` before it is answered (a slow, overloaded server).
    pub fn set_list_delay(&self, d: Duration) {
        self.shared.lock().list_delay = d;
    }

    /// The next event on any watch is written only half (a JSON line cut in the middle),
    /// then that watch's connection is aborted.
    pub fn cut_next_event_mid_line(&self) {
        self.shared.lock().cut_mid_event = true;
    }

    /// Interval of BOOKMARK events on watches with allowWatchBookmarks=true (default 2 s).
    pub fn set_bookmark_interval(&self, d: Duration) {
        self.shared.lock().bookmark_interval = d;
    }

    /// Request log, one entry per request: `"METHOD /path?decoded-query"`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Events posted by clients (core v1 and events.k8s.io/v1).
    pub fn events(&self) -> Vec<Value> {
        self.shared
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| RESOURCES[k.0].kind == "Event")
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Number of currently open watch streams for a plural (e.g. "services").
    pub fn open_watches(&self, plural: &str) -> usize {
        self.shared
            .lock()
            .open_watches
            .iter()
            .filter(|(k, _)| RESOURCES[**k].plural == plural)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Waits (polling, bounded) until at least `n` watches on `plural` are open.
    pub fn wait_for_watches(&self, plural: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.open_watches(plural) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Writes `DIR/kubeconfig` (server `http://IP:PORT`, no TLS, dummy token).
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url()
        );
        std::fs::write(&path, yaml).expect("write kubeconfig");
        path
    }

    /// A kube client for this server (call inside a tokio runtime).
    pub fn client(&self) -> kube::Client {
        let cfg = kube::Config::new(self.url().parse().expect("url"));
        kube::Client::try_from(cfg).expect("kube client")
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Apply,
    Create,
    Update,
}

type ApiErr = (u16, &'static str, String);

impl State {
    fn upsert(&mut self, r: &'static ResInfo, mut obj: Value, mode: Mode) -> Result<Value, ApiErr> {
        if !obj.is_object() {
            return Err((400, "BadRequest", "object expected".into()));
        }
        obj["kind"] = json!(r.kind);
        obj["apiVersion"] = json!(r.api_version);
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let md = obj["metadata"].as_object_mut().unwrap();
        if md
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            match md.get("generateName").and_then(Value::as_str) {
                Some(g) => {
                    self.uid_counter += 1;
                    let name = format!("{g}{:05x}", self.uid_counter);
                    md.insert("name".into(), json!(name));
                }
                None => return Err((422, "Invalid", "metadata.name is required".into())),
            }
        }
        let name = md["name"].as_str().unwrap().to_string();
        let ns = if r.namespaced {
            let ns = md
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_string();
            md.insert("namespace".into(), json!(ns));
            ns
        } else {
            md.remove("namespace");
            String::new()
        };
        let k = key(r, &ns, &name);
        let old = self.objects.get(&k).cloned();
        match (mode, &old) {
            (Mode::Create, Some(_)) => {
                return Err((
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", r.plural),
                ));
            }
            (Mode::Update, None) => {
                return Err((
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", r.plural),
                ));
            }
            _ => {}
        }
        self.rv += 1;
        let uid = old
            .as_ref()
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
            .or_else(|| md.get("uid").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| {
                self.uid_counter += 1;
                format!("00000000-0000-4000-8000-{:012x}", self.uid_counter)
            });
        let created = old
            .as_ref()
            .and_then(|o| {
                o["metadata"]["creationTimestamp"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(now_rfc3339);
        md.insert("uid".into(), json!(uid));
        md.insert("creationTimestamp".into(), json!(created));
        md.insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.objects.insert(k, obj.clone());
        self.log.push(LogEntry {
            rv: self.rv,
            res: r,
            etype: if old.is_some() { "MODIFIED" } else { "ADDED" },
            old,
            new: obj.clone(),
        });
        Ok(obj)
    }

    fn remove(&mut self, r: &'static ResInfo, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self.objects.remove(&key(r, ns, name))?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.log.push(LogEntry {
            rv: self.rv,
            res: r,
            etype: "DELETED",
            old: Some(obj.clone()),
            new: obj.clone(),
        });
        Some(obj)
    }
}

// ---------------------------------------------------------------- selectors

#[derive(Debug, Clone)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    split_top(s)
        .into_iter()
        .map(|t| {
            let set = |op: &str| -> Option<(String, Vec<String>)> {
                let (k, rest) = t.split_once(op)?;
                let vals = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
                Some((
                    k.trim().to_string(),
                    vals.split(',').map(|v| v.trim().to_string()).collect(),
                ))
            };
            if let Some(k) = t.strip_prefix('!') {
                Ok(LabelReq::NotExists(k.trim().to_string()))
            } else if let Some((k, v)) = t.split_once("!=") {
                Ok(LabelReq::NotEq(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Ok(LabelReq::Eq(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = set(" notin ") {
                Ok(LabelReq::NotIn(k, v))
            } else if let Some((k, v)) = set(" in ") {
                Ok(LabelReq::In(k, v))
            } else if t.contains([' ', '(', ')', '<', '>']) {
                Err(format!("unable to parse requirement: {t:?}"))
            } else {
                Ok(LabelReq::Exists(t.clone()))
            }
        })
        .collect()
}

fn labels_match(reqs: &[LabelReq], obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    reqs.iter().all(|r| match r {
        LabelReq::Exists(k) => get(k).is_some(),
        LabelReq::NotExists(k) => get(k).is_none(),
        LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
        LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
        LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
    })
}

/// (path like "metadata.name", value, negated)
type FieldReq = (String, String, bool);

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, String> {
    split_top(s)
        .into_iter()
        .map(|t| {
            if let Some((k, v)) = t.split_once("!=") {
                Ok((k.trim().into(), v.trim().into(), true))
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Ok((k.trim().into(), v.trim().into(), false))
            } else {
                Err(format!("invalid field selector: {t:?}"))
            }
        })
        .collect()
}

fn fields_match(reqs: &[FieldReq], obj: &Value) -> bool {
    reqs.iter().all(|(path, want, neg)| {
        let mut v = obj;
        for p in path.split('.') {
            v = &v[p];
        }
        let got = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        (got == *want) != *neg
    })
}

#[derive(Debug, Clone, Default)]
struct Filter {
    ns: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.ns
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && labels_match(&self.labels, obj)
            && fields_match(&self.fields, obj)
    }
}

// ---------------------------------------------------------------- HTTP

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (pct_decode(k), pct_decode(v)),
            None => (pct_decode(p), String::new()),
        })
        .collect()
}

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(v.to_string()))
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
        .unwrap()
}

fn status_obj(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn err(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap(),
        &status_obj(code, reason, message),
    )
}

async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let qs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let logline = if qs.is_empty() {
        format!("{method} {path}")
    } else {
        format!("{method} {path}?{}", qs.join("&"))
    };
    let failing = {
        let mut st = sh.lock();
        st.requests.push(logline);
        st.failing
    };
    match failing {
        Some(503) => {
            return err(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            );
        }
        Some(401) => return err(401, "Unauthorized", "Unauthorized"),
        Some(code) => return err(code, "InternalError", "the fake API server is failing"),
        None => {}
    }
    let q: HashMap<String, String> = query.into_iter().collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return err(400, "BadRequest", &e.to_string()),
    };

    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => {
            return full(
                StatusCode::OK,
                &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake", "platform": "linux/amd64"}),
            );
        }
        ["healthz"] | ["livez"] | ["readyz"] => {
            return Response::new(
                Full::new(Bytes::from("ok"))
                    .map_err(|n: Infallible| match n {})
                    .boxed(),
            );
        }
        ["api"] => {
            return full(
                StatusCode::OK,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": sh.addr.to_string()}]}),
            );
        }
        ["apis"] => {
            let mut groups: Vec<&str> = RESOURCES
                .iter()
                .filter_map(|r| r.api_version.split_once('/').map(|(g, _)| g))
                .collect();
            groups.dedup();
            let groups: Vec<Value> = groups
                .iter()
                .map(|g| {
                    let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
                    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
                })
                .collect();
            return full(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            );
        }
        _ => {}
    }
    let (gv, rest): (String, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => {
            return err(
                404,
                "NotFound",
                &format!("the server could not find the requested resource: {path}"),
            );
        }
    };
    if rest.is_empty() {
        let resources: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.api_version == gv)
            .map(|r| json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": ["create","delete","get","list","patch","update","watch"]}))
            .collect();
        if resources.is_empty() {
            return err(404, "NotFound", &format!("no group version {gv}"));
        }
        return full(
            StatusCode::OK,
            &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        );
    }
    let (ns, plural, name): (Option<&str>, &str, Option<&str>) = match rest {
        ["namespaces", ns, plural] => (Some(ns), plural, None),
        ["namespaces", ns, plural, name] => (Some(ns), plural, Some(name)),
        [plural] => (None, plural, None),
        [plural, name] => (None, plural, Some(name)),
        _ => return err(404, "NotFound", &format!("unsupported path {path}")),
    };
    let hidden = sh.lock().hidden.iter().any(|p| p == plural);
    let Some(r) = RESOURCES
        .iter()
        .find(|r| r.api_version == gv && r.plural == plural && !hidden)
    else {
        return err(
            404,
            "NotFound",
            &format!("the server could not find the requested resource: {path}"),
        );
    };
    let mut filter = Filter {
        ns: ns.filter(|_| r.namespaced).map(str::to_string),
        ..Default::default()
    };
    if let Some(s) = q.get("labelSelector") {
        match parse_label_selector(s) {
            Ok(l) => filter.labels = l,
            Err(e) => return err(400, "BadRequest", &e),
        }
    }
    if let Some(s) = q.get("fieldSelector") {
        match parse_field_selector(s) {
            Ok(f) => filter.fields = f,
            Err(e) => return err(400, "BadRequest", &e),
        }
    }
    let ns_str = ns.unwrap_or("");

    match (&method, name) {
        (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            start_watch(sh, r, filter, &q)
        }
        (&Method::GET, None) => {
            let delay = sh.lock().list_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let st = sh.lock();
            let id = rid(r);
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, v)| k.0 == id && filter.matches(v))
                .map(|(_, v)| v.clone())
                .collect();
            full(
                StatusCode::OK,
                &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version,
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        (&Method::GET, Some(name)) => match sh.lock().objects.get(&key(r, ns_str, name)) {
            Some(o) => full(StatusCode::OK, o),
            None => err(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", r.plural),
            ),
        },
        (&Method::POST, None) | (&Method::PUT, Some(_)) => {
            let mut obj: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return err(400, "BadRequest", &e.to_string()),
            };
            if r.namespaced && obj["metadata"].is_object() {
                obj["metadata"]["namespace"] = json!(ns_str);
            }
            if let Some(n) = name {
                obj["metadata"]["name"] = json!(n);
            }
            let mode = if method == Method::POST {
                Mode::Create
            } else {
                Mode::Update
            };
            let res = sh.lock().upsert(r, obj, mode);
            match res {
                Ok(o) => {
                    sh.notify();
                    full(
                        if mode == Mode::Create {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        },
                        &o,
                    )
                }
                Err((c, reason, m)) => err(c, reason, &m),
            }
        }
        (&Method::PATCH, Some(name)) => {
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return err(400, "BadRequest", &e.to_string()),
            };
            let res = {
                let mut st = sh.lock();
                match st.objects.get(&key(r, ns_str, name)).cloned() {
                    Some(mut o) => {
                        merge_patch(&mut o, &patch);
                        st.upsert(r, o, Mode::Update)
                    }
                    None => Err((
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", r.plural),
                    )),
                }
            };
            match res {
                Ok(o) => {
                    sh.notify();
                    full(StatusCode::OK, &o)
                }
                Err((c, reason, m)) => err(c, reason, &m),
            }
        }
        (&Method::DELETE, Some(name)) => {
            let res = sh.lock().remove(r, ns_str, name);
            match res {
                Some(o) => {
                    sh.notify();
                    full(StatusCode::OK, &o)
                }
                None => err(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", r.plural),
                ),
            }
        }
        _ => err(
            405,
            "MethodNotAllowed",
            &format!("{method} not supported on {path}"),
        ),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn event_line(etype: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": etype, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(r: &ResInfo, rv: u64, initial_end: bool) -> Bytes {
    let mut md = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": r.kind, "apiVersion": r.api_version, "metadata": md}),
    )
}

/// Maps a logged change to what a watch with `filter` sees (like the real
/// server: an object leaving the selector is DELETED, entering it is ADDED).
fn visible(e: &LogEntry, filter: &Filter) -> Option<Bytes> {
    let old_m = e.old.as_ref().is_some_and(|o| filter.matches(o));
    let new_m = filter.matches(&e.new);
    let etype = match e.etype {
        "DELETED" => old_m.then_some("DELETED")?,
        _ => match (old_m, new_m) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            (true, false) => "DELETED",
            (false, false) => return None,
        },
    };
    Some(event_line(etype, &e.new))
}

struct WatchGuard {
    sh: Arc<Shared>,
    id: usize,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some(c) = self.sh.lock().open_watches.get_mut(&self.id) {
            *c = c.saturating_sub(1);
        }
    }
}

fn start_watch(
    sh: Arc<Shared>,
    r: &'static ResInfo,
    filter: Filter,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let rv_param = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let id = rid(r);

    let mut changed = sh.changed.subscribe();
    let mut cut = sh.cut.subscribe();
    changed.borrow_and_update();
    cut.borrow_and_update();

    let mut initial: Vec<Bytes> = Vec::new();
    let cursor;
    {
        let mut st = sh.lock();
        let current = |st: &State| -> Vec<Bytes> {
            st.objects
                .iter()
                .filter(|(k, v)| k.0 == id && filter.matches(v))
                .map(|(_, v)| event_line("ADDED", v))
                .collect()
        };
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            initial = current(&st);
            cursor = st.rv;
            if send_initial {
                initial.push(bookmark(r, st.rv, true));
            }
        } else {
            let Ok(rv) = rv_param.parse::<u64>() else {
                return err(
                    400,
                    "BadRequest",
                    &format!("invalid resource version {rv_param:?}"),
                );
            };
            if rv < st.compacted {
                let msg = format!("too old resource version: {rv} ({})", st.compacted);
                let line = event_line("ERROR", &status_obj(410, "Expired", &msg));
                return full_stream(vec![Ok(line)]);
            }
            cursor = rv;
        }
        *st.open_watches.entry(id).or_insert(0) += 1;
    }
    let guard = WatchGuard { sh: sh.clone(), id };

    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, io::Error>>();
    tokio::spawn(async move {
        let _guard = guard;
        let mut cursor = cursor;
        let end = tokio::time::Instant::now() + timeout;
        let interval = sh.lock().bookmark_interval;
        let mut next_bookmark = tokio::time::Instant::now() + interval;
        for line in initial {
            if tx.unbounded_send(Ok(Frame::data(line))).is_err() {
                return;
            }
        }
        loop {
            let lines: Vec<Bytes> = {
                let st = sh.lock();
                let start = st.log.partition_point(|e| e.rv <= cursor);
                let out = st.log[start..]
                    .iter()
                    .filter(|e| e.res == r)
                    .filter_map(|e| visible(e, &filter))
                    .collect();
                // Everything up to the current RV is in the log: we are caught up.
                cursor = cursor.max(st.rv);
                out
            };
            for line in lines {
                if std::mem::take(&mut sh.lock().cut_mid_event) {
                    let half = line.slice(..line.len() / 2);
                    let _ = tx.unbounded_send(Ok(Frame::data(half)));
                    let _ = tx.unbounded_send(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "watch cut mid-event",
                    )));
                    return;
                }
                if tx.unbounded_send(Ok(Frame::data(line))).is_err() {
                    return;
                }
            }
            tokio::select! {
                r = changed.changed() => { if r.is_err() { return; } }
                _ = cut.changed() => {
                    // Abort the connection: hyper drops it without the final chunk.
                    let _ = tx.unbounded_send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped")));
                    return;
                }
                _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                    next_bookmark = tokio::time::Instant::now() + interval;
                    if tx.unbounded_send(Ok(Frame::data(bookmark(r, cursor, false)))).is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(end) => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(rx)))
        .unwrap()
}

fn full_stream(frames: Vec<Result<Bytes, io::Error>>) -> Response<Body> {
    let s = futures::stream::iter(frames.into_iter().map(|f| f.map(Frame::data)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(s)))
        .unwrap()
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------- builders

/// A ClusterIP Service. `ports`: (name, port, protocol, targetPort).
pub fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, u16, &str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto, t)| json!({"name": n, "port": p, "protocol": proto, "targetPort": t}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ipFamilies": ["IPv4"], "ports": ports}
    })
}

/// An EndpointSlice for `service`, every endpoint ready/serving on `node`.
/// `ports`: (name, port, protocol).
pub fn endpoint_slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    addresses: &[&str],
    node: Option<&str>,
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    let eps: Vec<Value> = addresses
        .iter()
        .map(|a| {
            let mut e = json!({"addresses": [a],
                               "conditions": {"ready": true, "serving": true, "terminating": false}});
            if let Some(n) = node {
                e["nodeName"] = json!(n);
            }
            e
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4", "ports": ports, "endpoints": eps
    })
}

/// A Node with InternalIP addresses and an optional podCIDR.
pub fn node(name: &str, internal_ips: &[&str], pod_cidr: Option<&str>) -> Value {
    let addrs: Vec<Value> = internal_ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip}))
        .chain(std::iter::once(
            json!({"type": "Hostname", "address": name}),
        ))
        .collect();
    let mut n = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"addresses": addrs}
    });
    if let Some(c) = pod_cidr {
        n["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
    }
    n
}

/// Sets (or replaces) a label on an object.
pub fn with_label(mut obj: Value, k: &str, v: &str) -> Value {
    if !obj["metadata"]["labels"].is_object() {
        obj["metadata"]["labels"] = json!({});
    }
    obj["metadata"]["labels"][k] = json!(v);
    obj
}
