//! The `process_*` metrics client_golang's process collector adds to every Go component's
//! `/metrics` (upstream kube-proxy included), read from `/proc/self`. Dashboards for
//! kube-proxy (kubernetes-mixin's "Kubernetes / Proxy", vendor integrations) chart
//! `process_resident_memory_bytes` and `process_cpu_seconds_total` next to the sync latencies.
//!
//! Names, types and help texts are client_golang's; values follow prometheus/procfs: CPU time
//! in USER_HZ (100 per second), start time from `btime` in `/proc/stat`, an unlimited
//! rlimit as 2^64-1.

use std::fmt::Write as _;

use super::format::go_float;

/// procfs's `userHZ`: the kernel's clock ticks per second as seen in `/proc/*/stat`.
const USER_HZ: f64 = 100.0;

/// The fields of `/proc/self/stat` after the command name: index 0 is field 3 (`state`).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

fn field(fields: &[&str], n: usize) -> Option<f64> {
    // `n` is the 1-based field number of proc(5); fields[0] is field 3.
    fields.get(n.checked_sub(3)?)?.parse().ok()
}

/// Soft limit of `name` in `/proc/self/limits` (`unlimited` as 2^64-1, as procfs reports it).
fn soft_limit(limits: &str, name: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let soft = line[name.len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        Some(18_446_744_073_709_551_615.0)
    } else {
        soft.parse().ok()
    }
}

fn btime(proc_stat: &str) -> Option<f64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn rss_bytes(status: &str) -> Option<f64> {
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

/// Inputs of [`render`], as read from procfs.
#[derive(Debug, Default, Clone)]
pub struct ProcFiles {
    /// `/proc/self/stat`.
    pub stat: String,
    /// `/proc/self/status`.
    pub status: String,
    /// `/proc/self/limits`.
    pub limits: String,
    /// `/proc/stat`.
    pub proc_stat: String,
    /// Entries in `/proc/self/fd`.
    pub open_fds: Option<usize>,
}

impl ProcFiles {
    /// Reads this process's files; unreadable ones stay empty (their metrics are left out).
    pub fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        ProcFiles {
            stat: read("/proc/self/stat"),
            status: read("/proc/self/status"),
            limits: read("/proc/self/limits"),
            proc_stat: read("/proc/stat"),
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count()),
        }
    }
}

/// The process metrics in the Prometheus text format, families sorted by name. Metrics whose
/// source cannot be read are omitted, as client_golang does on error.
pub fn render(p: &ProcFiles) -> String {
    let fields = stat_fields(&p.stat);
    let cpu = match (field(&fields, 14), field(&fields, 15)) {
        (Some(u), Some(s)) => Some((u + s) / USER_HZ),
        _ => None,
    };
    let start = match (field(&fields, 22), btime(&p.proc_stat)) {
        (Some(ticks), Some(boot)) => Some(boot + ticks / USER_HZ),
        _ => None,
    };
    let families: [(&str, &str, &str, Option<f64>); 7] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            cpu,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            soft_limit(&p.limits, "Max open files"),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            p.open_fds.map(|n| n as f64),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss_bytes(&p.status),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            start,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            field(&fields, 23),
        ),
        (
            "process_virtual_memory_max_bytes",
            "gauge",
            "Maximum amount of virtual memory available in bytes.",
            soft_limit(&p.limits, "Max address space"),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in families {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                go_float(v)
            );
        }
    }
    out
}

/// [`render`] of this process.
pub fn encode() -> String {
    render(&ProcFiles::read())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_procfs() {
        let p = ProcFiles {
            stat: "1234 (kube proxy) S 1 1234 1234 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 \
                   3 0 5000 104857600 2560 18446744073709551615"
                .to_string(),
            status: "Name:\tkube-proxy-rs\nVmRSS:\t   10240 kB\n".to_string(),
            limits: "Limit                     Soft Limit           Hard Limit           Units\n\
                     Max open files            1024                 1048576              files\n\
                     Max address space         unlimited            unlimited            bytes\n"
                .to_string(),
            proc_stat: "cpu  1 2 3\nbtime 1700000000\n".to_string(),
            open_fds: Some(12),
        };
        let text = render(&p);
        for want in [
            "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\n",
            "process_max_fds 1024\n",
            "process_open_fds 12\n",
            "process_resident_memory_bytes 1.048576e+07\n",
            "process_start_time_seconds 1.70000005e+09\n",
            "process_virtual_memory_bytes 1.048576e+08\n",
            "process_virtual_memory_max_bytes 1.8446744073709552e+19\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn unreadable_files_leave_metrics_out() {
        assert_eq!(render(&ProcFiles::default()), "");
        let real = encode();
        assert!(real.contains("process_resident_memory_bytes "), "{real}");
        assert!(real.contains("process_cpu_seconds_total "), "{real}");
    }
}
