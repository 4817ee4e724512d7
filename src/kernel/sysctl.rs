//! Reading and writing sysctls under `<root>/proc/sys`, and the conntrack settings kube-proxy
//! applies at startup (upstream `cmd/kube-proxy/app/conntrack.go`: values are only ever
//! raised, never lowered).
//!
//! The root directory is configurable so the logic is testable against a temp dir tree.
//! `/proc/sys/net` is per network namespace: it reflects the namespace of the thread that
//! opens the file.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::KernelError;

/// Where nf_conntrack's hash table size is set (global, writable from the initial network
/// namespace only).
pub const HASHSIZE_PATH: &str = "sys/module/nf_conntrack/parameters/hashsize";
/// Online CPUs, as `0-3,8`.
const CPU_ONLINE_PATH: &str = "sys/devices/system/cpu/online";

/// Access to sysctls below a root directory (`/` on a real system).
#[derive(Debug, Clone)]
pub struct Sysctl {
    root: PathBuf,
}

impl Default for Sysctl {
    fn default() -> Self {
        Sysctl::new()
    }
}

/// The conntrack-related configuration (`KubeProxyConntrackConfiguration`). Zero means
/// "leave the kernel's value alone", as upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// `conntrack.maxPerCore`; 0 leaves nf_conntrack_max (and hashsize) alone.
    pub max_per_core: u64,
    /// `conntrack.min`: floor for nf_conntrack_max.
    pub min: u64,
    /// `conntrack.tcpEstablishedTimeout`.
    pub tcp_established_timeout: Duration,
    /// `conntrack.tcpCloseWaitTimeout`.
    pub tcp_close_wait_timeout: Duration,
    /// `conntrack.tcpBeLiberal`: raise nf_conntrack_tcp_be_liberal to 1.
    pub tcp_be_liberal: bool,
    /// `conntrack.udpTimeout`.
    pub udp_timeout: Duration,
    /// `conntrack.udpStreamTimeout`.
    pub udp_stream_timeout: Duration,
}

/// What happened to one setting.
#[derive(Debug)]
pub enum SettingOutcome {
    /// Already at least the wanted value.
    Unchanged {
        /// The kernel's value.
        current: i64,
    },
    /// Raised.
    Changed {
        /// The previous value.
        from: i64,
        /// The new value.
        to: i64,
    },
    /// Not writable here (read-only /proc or /sys, or a network namespace where the kernel
    /// refuses the write): a warning, not an error.
    NotWritable {
        /// The value that could not be written.
        wanted: i64,
        /// Why.
        error: KernelError,
    },
    /// Anything else.
    Failed(KernelError),
}

/// One line of the conntrack setup report.
#[derive(Debug)]
pub struct SettingReport {
    /// The sysctl name (`net/netfilter/nf_conntrack_max`) or the sysfs path for hashsize.
    pub name: String,
    /// What happened.
    pub outcome: SettingOutcome,
}

impl SettingReport {
    /// Whether this is a hard failure (not a warning).
    pub fn is_error(&self) -> bool {
        matches!(self.outcome, SettingOutcome::Failed(_))
    }
}

/// nf_conntrack_max as upstream computes it: max(maxPerCore × CPUs, min), or 0 ("leave
/// alone") when maxPerCore is 0.
pub fn conntrack_max(max_per_core: u64, min: u64, cpus: usize) -> u64 {
    if max_per_core == 0 {
        return 0;
    }
    max_per_core.saturating_mul(cpus as u64).max(min)
}

/// Whether a write error means "this is not writable from here" rather than a real failure.
fn is_not_writable(e: &io::Error) -> bool {
    const EOPNOTSUPP: i32 = 95;
    matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
    ) || e.raw_os_error() == Some(EOPNOTSUPP)
}

/// Parses a CPU list like `0-3,8,10-11` into a count.
fn count_cpu_list(s: &str) -> Option<usize> {
    let mut n = 0;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

impl Sysctl {
    /// Sysctls of the running system (root `/`).
    pub fn new() -> Self {
        Sysctl::with_root("/")
    }

    /// Sysctls below `root` (`root/proc/sys/...`, `root/sys/...`).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Sysctl { root: root.into() }
    }

    /// The file for sysctl `name`, given as `net/ipv4/ip_forward` or `net.ipv4.ip_forward`
    /// (the dotted form cannot name keys that contain dots, such as VLAN interfaces).
    pub fn path(&self, name: &str) -> PathBuf {
        let rel = if name.contains('/') {
            name.trim_start_matches('/').to_string()
        } else {
            name.replace('.', "/")
        };
        self.root.join("proc/sys").join(rel)
    }

    fn read_path(&self, path: &Path) -> Result<String, KernelError> {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|source| KernelError::Sysctl {
                op: "read",
                path: path.to_path_buf(),
                source,
            })
    }

    /// Sets this process's `oom_score_adj` (upstream's `--oom-score-adj`).
    pub fn set_oom_score_adj(&self, value: i32) -> Result<(), KernelError> {
        self.write_path(
            &self.root.join("proc/self/oom_score_adj"),
            &value.to_string(),
        )
    }

    fn write_path(&self, path: &Path, value: &str) -> Result<(), KernelError> {
        // No create: a sysctl that does not exist is an error, not a new file.
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| f.write_all(format!("{value}\n").as_bytes()))
            .map_err(|source| KernelError::Sysctl {
                op: "write",
                path: path.to_path_buf(),
                source,
            })
    }

    fn read_int_path(&self, path: &Path) -> Result<i64, KernelError> {
        let text = self.read_path(path)?;
        text.parse().map_err(|_| KernelError::Invalid {
            what: "integer sysctl value",
            value: format!("{}: {text}", path.display()),
        })
    }

    /// The value of sysctl `name`, trimmed.
    pub fn read(&self, name: &str) -> Result<String, KernelError> {
        self.read_path(&self.path(name))
    }

    /// The value of sysctl `name` as an integer.
    pub fn read_int(&self, name: &str) -> Result<i64, KernelError> {
        self.read_int_path(&self.path(name))
    }

    /// Writes `value` to sysctl `name` (which must exist).
    pub fn write(&self, name: &str, value: &str) -> Result<(), KernelError> {
        self.write_path(&self.path(name), value)
    }

    /// Raises sysctl `name` to `value` if it is lower. Returns whether it was written.
    pub fn ensure_at_least(&self, name: &str, value: i64) -> Result<bool, KernelError> {
        let path = self.path(name);
        match self.ensure_at_least_path(&path, value) {
            SettingOutcome::Unchanged { .. } => Ok(false),
            SettingOutcome::Changed { .. } => Ok(true),
            SettingOutcome::NotWritable { error, .. } | SettingOutcome::Failed(error) => Err(error),
        }
    }

    fn ensure_at_least_path(&self, path: &Path, value: i64) -> SettingOutcome {
        let current = match self.read_int_path(path) {
            Ok(v) => v,
            Err(e) => return SettingOutcome::Failed(e),
        };
        if current >= value {
            return SettingOutcome::Unchanged { current };
        }
        match self.write_path(path, &value.to_string()) {
            Ok(()) => SettingOutcome::Changed {
                from: current,
                to: value,
            },
            Err(error) => classify_write_error(value, error),
        }
    }

    /// Number of CPUs of the machine (`sys/devices/system/cpu/online`, as upstream counts
    /// them, ignoring affinity and cgroup limits), falling back to the available parallelism.
    pub fn num_cpus(&self) -> usize {
        std::fs::read_to_string(self.root.join(CPU_ONLINE_PATH))
            .ok()
            .and_then(|s| count_cpu_list(&s))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Applies `settings` like upstream kube-proxy: nf_conntrack_max = max(maxPerCore × CPUs,
    /// min) and hashsize = max/4 (each only if it raises the value; hashsize is skipped when
    /// nf_conntrack_max could not be set), then the TCP established / close-wait timeouts,
    /// be_liberal and the UDP timeouts, each only if set and only if it raises the value.
    /// Settings left at zero produce no report line.
    pub fn apply_conntrack_settings(
        &self,
        settings: &ConntrackSettings,
        cpus: usize,
    ) -> Vec<SettingReport> {
        let mut reports = Vec::new();
        let raise = |reports: &mut Vec<SettingReport>, name: &str, value: i64| {
            let outcome = self.ensure_at_least_path(&self.path(name), value);
            let ok = matches!(
                outcome,
                SettingOutcome::Unchanged { .. } | SettingOutcome::Changed { .. }
            );
            reports.push(SettingReport {
                name: name.to_string(),
                outcome,
            });
            ok
        };

        let max = conntrack_max(settings.max_per_core, settings.min, cpus);
        if max > 0 {
            let max = i64::try_from(max).unwrap_or(i64::MAX);
            if raise(&mut reports, "net/netfilter/nf_conntrack_max", max) {
                let path = self.root.join(HASHSIZE_PATH);
                let outcome = self.ensure_at_least_path(&path, max / 4);
                reports.push(SettingReport {
                    name: HASHSIZE_PATH.to_string(),
                    outcome,
                });
            }
        }
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        for (name, d) in [
            (
                "net/netfilter/nf_conntrack_tcp_timeout_established",
                settings.tcp_established_timeout,
            ),
            (
                "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
                settings.tcp_close_wait_timeout,
            ),
        ] {
            if secs(d) > 0 {
                raise(&mut reports, name, secs(d));
            }
        }
        if settings.tcp_be_liberal {
            raise(&mut reports, "net/netfilter/nf_conntrack_tcp_be_liberal", 1);
        }
        for (name, d) in [
            (
                "net/netfilter/nf_conntrack_udp_timeout",
                settings.udp_timeout,
            ),
            (
                "net/netfilter/nf_conntrack_udp_timeout_stream",
                settings.udp_stream_timeout,
            ),
        ] {
            if secs(d) > 0 {
                raise(&mut reports, name, secs(d));
            }
        }
        reports
    }
}

fn classify_write_error(wanted: i64, error: KernelError) -> SettingOutcome {
    match &error {
        KernelError::Sysctl { source, .. } if is_not_writable(source) => {
            SettingOutcome::NotWritable { wanted, error }
        }
        _ => SettingOutcome::Failed(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::NetNs;

    const NF: &str = "proc/sys/net/netfilter";

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (rel, content) in files {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{content}\n")).unwrap();
        }
        dir
    }

    fn file(dir: &tempfile::TempDir, rel: &str) -> String {
        std::fs::read_to_string(dir.path().join(rel))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn read_write_and_names() {
        let dir = tree(&[("proc/sys/net/ipv4/ip_forward", "0")]);
        let s = Sysctl::with_root(dir.path());
        assert_eq!(s.read("net/ipv4/ip_forward").unwrap(), "0");
        assert_eq!(s.read_int("net.ipv4.ip_forward").unwrap(), 0);
        s.write("net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(file(&dir, "proc/sys/net/ipv4/ip_forward"), "1");
        // Missing sysctls are errors naming the path; write does not create them.
        let err = s.write("net/ipv4/no_such", "1").unwrap_err();
        assert!(err.to_string().contains("net/ipv4/no_such"), "{err}");
        assert!(!dir.path().join("proc/sys/net/ipv4/no_such").exists());
        assert!(s.read("net/ipv4/no_such").is_err());
    }

    #[test]
    fn ensure_at_least_only_raises() {
        let dir = tree(&[(&format!("{NF}/x"), "100")]);
        let s = Sysctl::with_root(dir.path());
        assert!(!s.ensure_at_least("net/netfilter/x", 50).unwrap());
        assert_eq!(file(&dir, &format!("{NF}/x")), "100");
        assert!(!s.ensure_at_least("net/netfilter/x", 100).unwrap());
        assert!(s.ensure_at_least("net/netfilter/x", 150).unwrap());
        assert_eq!(file(&dir, &format!("{NF}/x")), "150");
        // Garbage content is an error, not "0".
        std::fs::write(dir.path().join(NF).join("x"), "abc\n").unwrap();
        assert!(s.ensure_at_least("net/netfilter/x", 1).is_err());
    }

    #[test]
    fn conntrack_max_formula() {
        assert_eq!(conntrack_max(32768, 131072, 2), 131072);
        assert_eq!(conntrack_max(32768, 131072, 8), 262144);
        assert_eq!(
            conntrack_max(0, 131072, 8),
            0,
            "maxPerCore 0 leaves it alone"
        );
        assert_eq!(conntrack_max(u64::MAX, 0, 2), u64::MAX);
    }

    #[test]
    fn cpu_count() {
        assert_eq!(count_cpu_list("0-3,8,10-11\n"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        let dir = tree(&[(CPU_ONLINE_PATH, "0-5")]);
        assert_eq!(Sysctl::with_root(dir.path()).num_cpus(), 6);
    }

    fn full_tree(max: &str, hash: &str) -> tempfile::TempDir {
        tree(&[
            (&format!("{NF}/nf_conntrack_max"), max),
            (HASHSIZE_PATH, hash),
            (
                &format!("{NF}/nf_conntrack_tcp_timeout_established"),
                "432000",
            ),
            (&format!("{NF}/nf_conntrack_tcp_timeout_close_wait"), "60"),
            (&format!("{NF}/nf_conntrack_tcp_be_liberal"), "0"),
            (&format!("{NF}/nf_conntrack_udp_timeout"), "30"),
            (&format!("{NF}/nf_conntrack_udp_timeout_stream"), "120"),
        ])
    }

    fn defaults() -> ConntrackSettings {
        ConntrackSettings {
            max_per_core: 32768,
            min: 131072,
            tcp_established_timeout: Duration::from_secs(86400),
            tcp_close_wait_timeout: Duration::from_secs(3600),
            tcp_be_liberal: false,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }

    #[test]
    fn conntrack_settings_raise_only() {
        let dir = full_tree("65536", "16384");
        let s = Sysctl::with_root(dir.path());
        let settings = ConntrackSettings {
            tcp_be_liberal: true,
            udp_timeout: Duration::from_secs(10),
            udp_stream_timeout: Duration::from_secs(300),
            ..defaults()
        };
        let reports = s.apply_conntrack_settings(&settings, 8);
        let names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "net/netfilter/nf_conntrack_max",
                HASHSIZE_PATH,
                "net/netfilter/nf_conntrack_tcp_timeout_established",
                "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
                "net/netfilter/nf_conntrack_tcp_be_liberal",
                "net/netfilter/nf_conntrack_udp_timeout",
                "net/netfilter/nf_conntrack_udp_timeout_stream",
            ]
        );
        assert!(reports.iter().all(|r| !r.is_error()), "{reports:?}");
        // 8 CPUs × 32768 = 262144 > min; hashsize = 65536.
        assert_eq!(file(&dir, &format!("{NF}/nf_conntrack_max")), "262144");
        assert_eq!(file(&dir, HASHSIZE_PATH), "65536");
        // 24h < 5 days already set: unchanged. Close-wait raised 60 → 3600.
        assert_eq!(
            file(&dir, &format!("{NF}/nf_conntrack_tcp_timeout_established")),
            "432000"
        );
        assert!(matches!(
            reports[2].outcome,
            SettingOutcome::Unchanged { current: 432000 }
        ));
        assert_eq!(
            file(&dir, &format!("{NF}/nf_conntrack_tcp_timeout_close_wait")),
            "3600"
        );
        assert!(matches!(
            reports[3].outcome,
            SettingOutcome::Changed { from: 60, to: 3600 }
        ));
        assert_eq!(
            file(&dir, &format!("{NF}/nf_conntrack_tcp_be_liberal")),
            "1"
        );
        // UDP 10 s would lower 30 s: left alone; stream 300 > 120: raised.
        assert_eq!(file(&dir, &format!("{NF}/nf_conntrack_udp_timeout")), "30");
        assert_eq!(
            file(&dir, &format!("{NF}/nf_conntrack_udp_timeout_stream")),
            "300"
        );
    }

    #[test]
    fn conntrack_settings_leave_large_values_and_zeroes_alone() {
        let dir = full_tree("1048576", "262144");
        let s = Sysctl::with_root(dir.path());
        let reports = s.apply_conntrack_settings(&defaults(), 2);
        // Max already above 131072; hashsize already above max/4: neither written.
        assert_eq!(file(&dir, &format!("{NF}/nf_conntrack_max")), "1048576");
        assert_eq!(file(&dir, HASHSIZE_PATH), "262144");
        assert!(matches!(
            reports[1].outcome,
            SettingOutcome::Unchanged { current: 262144 }
        ));
        // be_liberal false and zero UDP timeouts: not touched, not reported.
        assert_eq!(reports.len(), 4, "{reports:?}");
        assert_eq!(
            file(&dir, &format!("{NF}/nf_conntrack_tcp_be_liberal")),
            "0"
        );

        let none = s.apply_conntrack_settings(&ConntrackSettings::default(), 2);
        assert!(none.is_empty(), "{none:?}");
    }

    #[test]
    fn hashsize_skipped_when_max_fails() {
        // nf_conntrack_max missing (module not loaded): an error, and no hashsize write.
        let dir = tree(&[(HASHSIZE_PATH, "1024")]);
        let s = Sysctl::with_root(dir.path());
        let reports = s.apply_conntrack_settings(
            &ConntrackSettings {
                max_per_core: 32768,
                min: 0,
                ..Default::default()
            },
            2,
        );
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(reports[0].is_error());
        assert_eq!(file(&dir, HASHSIZE_PATH), "1024");
    }

    #[test]
    fn write_error_classification() {
        let e = |err: io::Error| {
            classify_write_error(
                1,
                KernelError::Sysctl {
                    op: "write",
                    path: "/x".into(),
                    source: err,
                },
            )
        };
        for readonly in [
            io::Error::from(io::ErrorKind::PermissionDenied),
            io::Error::from(io::ErrorKind::ReadOnlyFilesystem),
            io::Error::from_raw_os_error(95),
        ] {
            assert!(matches!(e(readonly), SettingOutcome::NotWritable { .. }));
        }
        assert!(matches!(
            e(io::Error::from(io::ErrorKind::NotFound)),
            SettingOutcome::Failed(_)
        ));
    }

    /// In a non-initial network namespace the kernel makes nf_conntrack_max read-only while
    /// the TCP timeouts are per-namespace and writable: a warning for the former, a real
    /// change for the latter, and the host's values untouched.
    #[test]
    fn kernel_conntrack_settings_in_a_netns() {
        let ns = NetNs::new();
        // A rule needing conntrack makes sure the netfilter sysctls exist in the namespace.
        ns.exec(
            "iptables-nft",
            &[
                "-A",
                "OUTPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-j",
                "ACCEPT",
            ],
        );
        let host = Sysctl::new();
        let est = "net/netfilter/nf_conntrack_tcp_timeout_established";
        let host_before = host.read_int(est).unwrap();
        // Only one above the current value: harmless even on a kernel that would let the
        // namespace write the global nf_conntrack_max.
        let host_max = host.read_int("net/netfilter/nf_conntrack_max").unwrap();
        let (reports, after, liberal) = ns.run_inside(move || {
            let s = Sysctl::new();
            let before = s.read_int(est).unwrap();
            let settings = ConntrackSettings {
                max_per_core: (host_max + 1) as u64,
                min: 0,
                tcp_established_timeout: Duration::from_secs((before + 1000) as u64),
                tcp_be_liberal: true,
                ..Default::default()
            };
            let reports = s.apply_conntrack_settings(&settings, 1);
            let after = s.read_int(est).unwrap() - before;
            let liberal = s
                .read_int("net/netfilter/nf_conntrack_tcp_be_liberal")
                .unwrap();
            (reports, after, liberal)
        });
        let summary = format!("{reports:?}");
        assert_eq!(reports[0].name, "net/netfilter/nf_conntrack_max");
        assert!(
            matches!(reports[0].outcome, SettingOutcome::NotWritable { .. }),
            "{summary}"
        );
        // hashsize skipped after the max failed; then established, be_liberal.
        assert_eq!(reports.len(), 3, "{summary}");
        assert!(
            matches!(reports[1].outcome, SettingOutcome::Changed { .. }),
            "{summary}"
        );
        assert_eq!(after, 1000);
        assert_eq!(liberal, 1);
        assert_eq!(
            host.read_int(est).unwrap(),
            host_before,
            "host value changed"
        );
    }
}
