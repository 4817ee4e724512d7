//! `ipset` through its command-line tool: version, listing, `ipset save` parsing, and
//! `ipset restore -exist` fed on stdin (never through a shell).
//!
//! The pure part ([`plan_restore`]) turns "what the sets should hold" and "what `ipset save`
//! printed" into restore input that creates missing sets and adds/deletes only the entries
//! that differ. A set is never flushed: a set referenced by iptables rules keeps matching the
//! entries that stay while the others change, so traffic never sees an empty set.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use super::KernelError;
use super::exec::Exec;

/// `ipset` version (`ipset v7.17, protocol version: 7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpsetVersion(pub u32, pub u32);

impl IpsetVersion {
    /// Upstream's `MinIPSetCheckVersion` (6.0).
    pub const MIN: IpsetVersion = IpsetVersion(6, 0);

    /// Parses `ipset version` output.
    pub fn parse(text: &str) -> Option<Self> {
        let v = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('v'))?
            .trim_end_matches(',');
        let mut parts = v.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts
            .next()
            .map(|m| {
                m.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        Some(IpsetVersion(major, minor))
    }
}

impl fmt::Display for IpsetVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// One set as `ipset save` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SavedSet {
    /// Set name.
    pub name: String,
    /// Type, e.g. `hash:ip,port`.
    pub set_type: String,
    /// The rest of the `create` line (`family inet hashsize 1024 ...`).
    pub options: Vec<String>,
    /// Entries in canonical spelling ([`canonical_entry`]).
    pub entries: BTreeSet<String>,
}

/// A handle on the `ipset` tool, optionally inside a network namespace.
#[derive(Debug, Clone, Default)]
pub struct Ipset {
    exec: Exec,
}

impl Ipset {
    /// `ipset` of this process's network namespace.
    pub fn new() -> Self {
        Ipset::default()
    }

    /// The same handle, running `ipset` through `ip netns exec NAME`.
    pub fn with_netns(mut self, name: impl AsRef<str>) -> Self {
        self.exec = Exec::new(Some(name.as_ref()));
        self
    }

    async fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, KernelError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.exec.run("ipset", &args, stdin).await?.into_stdout()
    }

    /// `ipset version`.
    pub async fn version(&self) -> Result<IpsetVersion, KernelError> {
        let args = vec!["version".to_string()];
        let out = self.exec.run("ipset", &args, None).await?;
        let command = out.command.clone();
        let text = out.into_stdout()?;
        IpsetVersion::parse(&text).ok_or_else(|| KernelError::Parse {
            command,
            detail: format!("no version in {:?}", text.trim()),
        })
    }

    /// Names of all sets (`ipset list -n`).
    pub async fn list_names(&self) -> Result<Vec<String>, KernelError> {
        let text = self.run(&["list", "-n"], None).await?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// One set (`ipset save SET`); `None` if it does not exist.
    pub async fn save(&self, set: &str) -> Result<Option<SavedSet>, KernelError> {
        let args = vec!["save".to_string(), set.to_string()];
        let out = self.exec.run("ipset", &args, None).await?;
        if !out.success() && is_missing_set(&out.stderr) {
            return Ok(None);
        }
        let text = out.into_stdout()?;
        Ok(parse_save(&text).remove(set))
    }

    /// Every set (`ipset save`), by name.
    pub async fn save_all(&self) -> Result<BTreeMap<String, SavedSet>, KernelError> {
        Ok(parse_save(&self.run(&["save"], None).await?))
    }

    /// Feeds `input` to `ipset restore -exist` (creating an existing set of the same type,
    /// adding a present entry and deleting an absent one are then no-ops).
    pub async fn restore(&self, input: &str) -> Result<(), KernelError> {
        if input.trim().is_empty() {
            return Ok(());
        }
        let args = vec!["restore".to_string(), "-exist".to_string()];
        let out = self
            .exec
            .run("ipset", &args, Some(input.as_bytes()))
            .await?;
        if out.success() {
            return Ok(());
        }
        let line = restore_error_line(&out.stderr);
        Err(KernelError::Restore {
            input_line: line
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| input.lines().nth(i))
                .map(String::from),
            line,
            command: out.command,
            status: out.status,
            stderr: out.stderr,
        })
    }

    /// `ipset destroy SET`. Returns `false` if it did not exist. Fails while iptables rules
    /// still reference it.
    pub async fn destroy(&self, set: &str) -> Result<bool, KernelError> {
        let args = vec!["destroy".to_string(), set.to_string()];
        let out = self.exec.run("ipset", &args, None).await?;
        if out.success() {
            Ok(true)
        } else if is_missing_set(&out.stderr) {
            Ok(false)
        } else {
            Err(out.into_error())
        }
    }
}

fn is_missing_set(stderr: &str) -> bool {
    stderr.contains("does not exist")
}

/// `ipset restore` names the failing line as `Error in line N:`.
fn restore_error_line(stderr: &str) -> Option<usize> {
    let rest = stderr.split("in line ").nth(1)?;
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// Parses `ipset save` output into sets by name; entries are canonicalised.
pub fn parse_save(text: &str) -> BTreeMap<String, SavedSet> {
    let mut sets: BTreeMap<String, SavedSet> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("create") => {
                let (Some(name), Some(set_type)) = (words.next(), words.next()) else {
                    continue;
                };
                sets.insert(
                    name.to_string(),
                    SavedSet {
                        name: name.to_string(),
                        set_type: set_type.to_string(),
                        options: words.map(String::from).collect(),
                        entries: BTreeSet::new(),
                    },
                );
            }
            Some("add") => {
                let (Some(name), Some(entry)) = (words.next(), words.next()) else {
                    continue;
                };
                sets.entry(name.to_string())
                    .or_insert_with(|| SavedSet {
                        name: name.to_string(),
                        ..Default::default()
                    })
                    .entries
                    .insert(canonical_entry(entry));
            }
            _ => {}
        }
    }
    sets
}

/// An entry as the kernel stores it, so a desired entry and a saved one compare equal:
/// networks are masked to their prefix and host networks (`/32`, `/128`) lose the suffix,
/// protocol names are lower-case (`10.0.0.1,TCP:80,10.1.2.3/8` → `10.0.0.1,tcp:80,10.0.0.0/8`).
pub fn canonical_entry(entry: &str) -> String {
    entry
        .split(',')
        .map(canonical_part)
        .collect::<Vec<_>>()
        .join(",")
}

fn canonical_part(part: &str) -> String {
    if let Some((addr, len)) = part.split_once('/')
        && let (Ok(addr), Ok(len)) = (addr.parse::<IpAddr>(), len.parse::<u8>())
    {
        return match addr {
            IpAddr::V4(a) if len >= 32 => a.to_string(),
            IpAddr::V6(a) if len >= 128 => a.to_string(),
            IpAddr::V4(a) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(a) & mask))
            }
        };
    }
    if let Ok(addr) = part.parse::<IpAddr>() {
        return addr.to_string();
    }
    if let Some((proto, port)) = part.split_once(':')
        && port.parse::<u16>().is_ok()
    {
        return format!("{}:{port}", proto.to_ascii_lowercase());
    }
    part.to_string()
}

/// One set as a sync wants it.
#[derive(Debug, Clone, Copy)]
pub struct DesiredSet<'a> {
    /// Set name.
    pub name: &'a str,
    /// Type, e.g. `hash:ip,port`.
    pub set_type: &'a str,
    /// `create` options after the type (`family inet hashsize 1024 maxelem 65536`).
    pub create_options: &'a str,
    /// Entries, in any spelling [`canonical_entry`] understands.
    pub entries: &'a BTreeSet<String>,
}

/// What [`plan_restore`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestorePlan {
    /// Input for `ipset restore -exist` (empty when nothing changes).
    pub input: String,
    /// Sets created.
    pub created: Vec<String>,
    /// Sets that exist with another type: they must be destroyed (which fails while iptables
    /// references them) before `input` can create them.
    pub type_mismatch: Vec<String>,
    /// Entries added.
    pub added: usize,
    /// Entries deleted.
    pub deleted: usize,
}

impl RestorePlan {
    /// Whether anything changes.
    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }
}

/// Restore input bringing `current` (from [`parse_save`]) to `desired`: missing sets are
/// created, then missing entries added and extra entries deleted. Sets not in `desired` are
/// left alone.
pub fn plan_restore(
    desired: &[DesiredSet<'_>],
    current: &BTreeMap<String, SavedSet>,
) -> RestorePlan {
    let mut plan = RestorePlan::default();
    let empty = BTreeSet::new();
    for set in desired {
        let existing = current.get(set.name);
        let have = match existing {
            Some(s) if s.set_type == set.set_type => &s.entries,
            Some(_) => {
                plan.type_mismatch.push(set.name.to_string());
                &empty
            }
            None => &empty,
        };
        if existing.is_none_or(|s| s.set_type != set.set_type) {
            plan.input.push_str(&format!(
                "create {} {} {}\n",
                set.name, set.set_type, set.create_options
            ));
            plan.created.push(set.name.to_string());
        }
        let want: BTreeSet<String> = set.entries.iter().map(|e| canonical_entry(e)).collect();
        for e in want.difference(have) {
            plan.input.push_str(&format!("add {} {e}\n", set.name));
            plan.added += 1;
        }
        for e in have.difference(&want) {
            plan.input.push_str(&format!("del {} {e}\n", set.name));
            plan.deleted += 1;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::NetNs;

    fn set(entries: &[&str]) -> BTreeSet<String> {
        entries.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn version_parses_tool_output() {
        assert_eq!(
            IpsetVersion::parse("ipset v7.17, protocol version: 7\n"),
            Some(IpsetVersion(7, 17))
        );
        assert_eq!(
            IpsetVersion::parse("ipset v6.38, protocol version: 6"),
            Some(IpsetVersion(6, 38))
        );
        assert!(IpsetVersion(6, 38) >= IpsetVersion::MIN);
        assert!(IpsetVersion(5, 9) < IpsetVersion::MIN);
        assert_eq!(IpsetVersion::parse("garbage"), None);
    }

    #[test]
    fn entries_are_canonicalised_as_the_kernel_prints_them() {
        assert_eq!(
            canonical_entry("10.0.0.1,TCP:80,192.168.50.2/32"),
            "10.0.0.1,tcp:80,192.168.50.2"
        );
        assert_eq!(
            canonical_entry("10.0.0.1,udp:53,10.1.2.3/8"),
            "10.0.0.1,udp:53,10.0.0.0/8"
        );
        assert_eq!(canonical_entry("30080"), "30080");
        assert_eq!(canonical_entry("fd00::1/128"), "fd00::1");
        assert_eq!(canonical_entry("10.96.0.10,tcp:80"), "10.96.0.10,tcp:80");
    }

    #[test]
    fn parse_save_reads_sets_and_entries() {
        let text = "create T1 hash:ip,port,net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x08dea872\n\
                    add T1 10.0.0.1,tcp:80,192.168.50.2\n\
                    add T1 10.0.0.1,udp:53,10.0.0.0/8\n\
                    create T2 bitmap:port range 0-65535\n\
                    add T2 30080\n";
        let sets = parse_save(text);
        assert_eq!(sets.len(), 2);
        assert_eq!(sets["T1"].set_type, "hash:ip,port,net");
        assert_eq!(
            sets["T1"].entries,
            set(&["10.0.0.1,tcp:80,192.168.50.2", "10.0.0.1,udp:53,10.0.0.0/8"])
        );
        assert_eq!(sets["T2"].options, ["range", "0-65535"]);
        assert_eq!(sets["T2"].entries, set(&["30080"]));
    }

    #[test]
    fn plan_creates_missing_sets_and_diffs_entries_without_flushing() {
        let current = parse_save(
            "create A hash:ip,port family inet hashsize 1024 maxelem 65536\n\
             add A 10.96.0.1,tcp:443\nadd A 10.96.0.9,tcp:80\n\
             create C hash:ip family inet hashsize 1024 maxelem 65536\n",
        );
        let a = set(&["10.96.0.1,tcp:443", "10.96.0.10,tcp:80"]);
        let b = set(&["30080"]);
        let c = set(&[]);
        let desired = [
            DesiredSet {
                name: "A",
                set_type: "hash:ip,port",
                create_options: "family inet hashsize 1024 maxelem 65536",
                entries: &a,
            },
            DesiredSet {
                name: "B",
                set_type: "bitmap:port",
                create_options: "range 0-65535",
                entries: &b,
            },
            DesiredSet {
                name: "C",
                set_type: "hash:ip",
                create_options: "family inet hashsize 1024 maxelem 65536",
                entries: &c,
            },
        ];
        let plan = plan_restore(&desired, &current);
        assert_eq!(
            plan.input,
            "add A 10.96.0.10,tcp:80\ndel A 10.96.0.9,tcp:80\n\
             create B bitmap:port range 0-65535\nadd B 30080\n"
        );
        assert!(!plan.input.contains("flush"));
        assert_eq!(plan.created, ["B"]);
        assert_eq!((plan.added, plan.deleted), (2, 1));
        assert!(plan.type_mismatch.is_empty());

        // Type changed: recreate (the caller destroys first).
        let d = [DesiredSet {
            name: "C",
            set_type: "hash:ip,port",
            create_options: "family inet hashsize 1024 maxelem 65536",
            entries: &c,
        }];
        let plan = plan_restore(&d, &current);
        assert_eq!(plan.type_mismatch, ["C"]);
        assert_eq!(
            plan.input,
            "create C hash:ip,port family inet hashsize 1024 maxelem 65536\n"
        );
    }

    #[test]
    fn plan_of_an_up_to_date_state_is_empty() {
        let current = parse_save(
            "create N hash:ip,port,net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n\
             add N 203.0.113.10,tcp:80,192.168.50.2\n",
        );
        let n = set(&["203.0.113.10,tcp:80,192.168.50.2/32"]);
        let plan = plan_restore(
            &[DesiredSet {
                name: "N",
                set_type: "hash:ip,port,net",
                create_options: "family inet hashsize 1024 maxelem 65536",
                entries: &n,
            }],
            &current,
        );
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn restore_error_names_the_line() {
        assert_eq!(
            restore_error_line("ipset v7.17: Error in line 3: Syntax error: ..."),
            Some(3)
        );
        assert_eq!(restore_error_line("other"), None);
    }

    #[tokio::test]
    async fn kernel_sets_are_created_diffed_saved_and_destroyed() {
        let ns = NetNs::new();
        let ipset = Ipset::new().with_netns(ns.name());
        assert!(ipset.version().await.unwrap() >= IpsetVersion::MIN);
        assert!(ipset.list_names().await.unwrap().is_empty());

        let mut a = set(&["10.96.0.10,tcp:80", "10.96.0.11,udp:53"]);
        let b = set(&[
            "203.0.113.10,tcp:80,192.168.50.2/32",
            "203.0.113.10,tcp:80,10.1.2.3/8",
        ]);
        let desired = |a: &BTreeSet<String>| {
            vec![
                (
                    "KPRS-A".to_string(),
                    "hash:ip,port".to_string(),
                    "family inet hashsize 1024 maxelem 65536".to_string(),
                    a.clone(),
                ),
                (
                    "KPRS-B".to_string(),
                    "hash:ip,port,net".to_string(),
                    "family inet hashsize 1024 maxelem 65536".to_string(),
                    b.clone(),
                ),
            ]
        };
        async fn sync(
            ipset: &Ipset,
            d: &[(String, String, String, BTreeSet<String>)],
        ) -> RestorePlan {
            let desired: Vec<DesiredSet<'_>> = d
                .iter()
                .map(|(n, t, o, e)| DesiredSet {
                    name: n,
                    set_type: t,
                    create_options: o,
                    entries: e,
                })
                .collect();
            let plan = plan_restore(&desired, &ipset.save_all().await.unwrap());
            ipset.restore(&plan.input).await.unwrap();
            plan
        }

        let plan = sync(&ipset, &desired(&a)).await;
        assert_eq!(plan.created, ["KPRS-A", "KPRS-B"]);
        assert_eq!(plan.added, 4);
        let mut names = ipset.list_names().await.unwrap();
        names.sort();
        assert_eq!(names, ["KPRS-A", "KPRS-B"]);
        let saved_b = ipset.save("KPRS-B").await.unwrap().unwrap();
        assert_eq!(
            saved_b.entries,
            set(&[
                "203.0.113.10,tcp:80,192.168.50.2",
                "203.0.113.10,tcp:80,10.0.0.0/8"
            ])
        );

        // Identical desired state: nothing to do.
        let plan = sync(&ipset, &desired(&a)).await;
        assert!(plan.is_empty(), "{plan:?}");

        // One entry replaced: one add, one del, the other entry never left the set.
        a.remove("10.96.0.11,udp:53");
        a.insert("10.96.0.12,tcp:443".to_string());
        let plan = sync(&ipset, &desired(&a)).await;
        assert_eq!((plan.added, plan.deleted), (1, 1));
        assert_eq!(plan.created, Vec::<String>::new());
        let saved_a = ipset.save("KPRS-A").await.unwrap().unwrap();
        assert_eq!(saved_a.entries, a);

        assert!(ipset.save("KPRS-NONE").await.unwrap().is_none());
        assert!(ipset.destroy("KPRS-A").await.unwrap());
        assert!(!ipset.destroy("KPRS-A").await.unwrap());
        assert_eq!(ipset.list_names().await.unwrap(), ["KPRS-B"]);

        // A malformed input fails with the tool's words and the offending line.
        let err = ipset
            .restore("create KPRS-C hash:ip family inet\nadd KPRS-C not-an-ip\n")
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("not-an-ip"), "{msg}");
    }

    /// IPv6 sets (`family inet6`, as IPVS mode's `KUBE-6-*` sets): the entries a sync wants,
    /// in any spelling, compare equal to what `ipset save` prints back, so a second sync with
    /// the same entries changes nothing.
    #[tokio::test]
    async fn kernel_ipv6_sets_round_trip_without_spurious_changes() {
        let ns = NetNs::new();
        let ipset = Ipset::new().with_netns(ns.name());
        let ip_port = set(&["fd00:96::10,tcp:80", "FD00:96:0::0020,UDP:53"]);
        let ip_port_net = set(&[
            "2001:db8:1::4,tcp:443,fd00:7::5/128",
            "2001:db8:1::4,tcp:443,2001:db8:ff:1::/48",
        ]);
        let options = "family inet6 hashsize 1024 maxelem 65536";
        let desired = [
            DesiredSet {
                name: "KPRS-6-A",
                set_type: "hash:ip,port",
                create_options: options,
                entries: &ip_port,
            },
            DesiredSet {
                name: "KPRS-6-B",
                set_type: "hash:ip,port,net",
                create_options: options,
                entries: &ip_port_net,
            },
        ];
        let plan = plan_restore(&desired, &ipset.save_all().await.unwrap());
        assert_eq!(plan.created, ["KPRS-6-A", "KPRS-6-B"]);
        ipset.restore(&plan.input).await.unwrap();
        let saved = ipset.save_all().await.unwrap();
        assert!(
            saved["KPRS-6-A"].options.join(" ").contains("family inet6"),
            "{:?}",
            saved["KPRS-6-A"]
        );
        assert_eq!(
            saved["KPRS-6-A"].entries,
            set(&["fd00:96::10,tcp:80", "fd00:96::20,udp:53"])
        );
        assert_eq!(
            saved["KPRS-6-B"].entries,
            set(&[
                "2001:db8:1::4,tcp:443,fd00:7::5",
                "2001:db8:1::4,tcp:443,2001:db8:ff::/48"
            ])
        );
        let again = plan_restore(&desired, &saved);
        assert!(again.is_empty(), "{again:?}");
    }
}
