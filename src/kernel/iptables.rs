//! `iptables-restore`, `iptables-save` and single `iptables` commands, for the legacy and
//! the nft back end, IPv4 or IPv6.
//!
//! Semantics follow upstream `pkg/util/iptables`: restores use `--noflush --counters` and
//! wait for the xtables lock (`-w 5`, on iptables-restore ≥ 1.6.2); single commands use
//! `-w 5`; `ensure_rule` checks with `-C` before inserting; "already there" and "not there"
//! are answered from exit status 1 (iptables' "operation failed"), anything else is an error.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tokio::sync::OnceCell;

use super::exec::{Exec, Output};
use super::{IpFamily, KernelError};

/// Environment variable forcing the back end: `legacy` or `nft`.
pub const MODE_ENV: &str = "KUBE_PROXY_RS_IPTABLES_MODE";

/// Which iptables back end to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IptablesVariant {
    /// `iptables-legacy*` (x_tables in the kernel).
    Legacy,
    /// `iptables-nft*` (nf_tables in the kernel).
    Nft,
}

impl IptablesVariant {
    /// `legacy` or `nft`, as in the binary names.
    pub fn as_str(&self) -> &'static str {
        match self {
            IptablesVariant::Legacy => "legacy",
            IptablesVariant::Nft => "nft",
        }
    }
}

impl fmt::Display for IptablesVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IptablesVariant {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "legacy" => Ok(IptablesVariant::Legacy),
            "nft" => Ok(IptablesVariant::Nft),
            other => Err(KernelError::Invalid {
                what: "iptables mode (expected legacy or nft)",
                value: other.to_string(),
            }),
        }
    }
}

/// A netfilter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// `filter`.
    Filter,
    /// `nat`.
    Nat,
    /// `mangle`.
    Mangle,
    /// `raw`.
    Raw,
}

impl Table {
    /// The table called `name`; anything else is `filter`, the table iptables uses without
    /// `-t`.
    pub fn from_name(name: &str) -> Table {
        match name {
            "nat" => Table::Nat,
            "mangle" => Table::Mangle,
            "raw" => Table::Raw,
            _ => Table::Filter,
        }
    }

    /// The table name as given to `-t`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
            Table::Raw => "raw",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where `ensure_rule` puts a missing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulePosition {
    /// `-I CHAIN` (first).
    Prepend,
    /// `-A CHAIN` (last).
    Append,
}

/// An iptables version `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IptablesVersion(pub u32, pub u32, pub u32);

impl IptablesVersion {
    /// `--random-fully` for MASQUERADE appeared in 1.6.2.
    pub const RANDOM_FULLY: IptablesVersion = IptablesVersion(1, 6, 2);
    /// `iptables-restore -w SECONDS` appeared in 1.6.2.
    pub const RESTORE_WAIT: IptablesVersion = IptablesVersion(1, 6, 2);
    /// `iptables -w SECONDS` appeared in 1.4.22.
    pub const WAIT_SECONDS: IptablesVersion = IptablesVersion(1, 4, 22);
    /// `iptables -w` appeared in 1.4.20.
    pub const WAIT: IptablesVersion = IptablesVersion(1, 4, 20);

    /// Finds the first `vX.Y[.Z]` in `iptables --version` output
    /// (`iptables v1.8.9 (nf_tables)`).
    pub fn parse(text: &str) -> Option<Self> {
        text.split_whitespace().find_map(|word| {
            let v = word.strip_prefix('v')?;
            let mut parts = v.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            let patch = match parts.next() {
                Some(p) => p.parse().ok()?,
                None => 0,
            };
            Some(IptablesVersion(major, minor, patch))
        })
    }
}

impl fmt::Display for IptablesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// A handle on one iptables back end and family, optionally inside a network namespace.
/// Cheap to clone; clones share the cached version probe.
#[derive(Debug, Clone)]
pub struct Iptables {
    variant: IptablesVariant,
    family: IpFamily,
    exec: Exec,
    version: Arc<OnceCell<IptablesVersion>>,
}

impl Iptables {
    /// A handle on `variant` for `family`, in this process's network namespace.
    pub fn new(variant: IptablesVariant, family: IpFamily) -> Self {
        Iptables {
            variant,
            family,
            exec: Exec::default(),
            version: Arc::new(OnceCell::new()),
        }
    }

    /// The same handle, running every tool through `ip netns exec NAME`.
    pub fn with_netns(mut self, name: impl AsRef<str>) -> Self {
        self.exec = Exec::new(Some(name.as_ref()));
        self
    }

    /// The back end.
    pub fn variant(&self) -> IptablesVariant {
        self.variant
    }

    /// The IP family.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// The network namespace, if any.
    pub fn netns(&self) -> Option<&str> {
        self.exec.netns()
    }

    fn binary(&self, suffix: &str) -> String {
        let base = match self.family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        format!("{base}-{}{suffix}", self.variant.as_str())
    }

    /// `iptables --version`, probed once and cached.
    pub async fn version(&self) -> Result<IptablesVersion, KernelError> {
        self.version
            .get_or_try_init(|| async {
                let out = self
                    .exec
                    .run(&self.binary(""), &["--version".to_string()], None)
                    .await?;
                let command = out.command.clone();
                let text = out.into_stdout()?;
                IptablesVersion::parse(&text).ok_or_else(|| KernelError::Parse {
                    command,
                    detail: format!("no version in {:?}", text.trim()),
                })
            })
            .await
            .copied()
    }

    /// Whether MASQUERADE `--random-fully` is available (iptables ≥ 1.6.2). False if the
    /// version cannot be probed.
    pub async fn supports_random_fully(&self) -> bool {
        match self.version().await {
            Ok(v) => v >= IptablesVersion::RANDOM_FULLY,
            Err(e) => {
                tracing::warn!(error = %e, "cannot probe iptables version; assuming no --random-fully");
                false
            }
        }
    }

    /// Lock-wait flags for single `iptables` commands. An unknown version is assumed modern.
    async fn wait_flags(&self) -> Vec<String> {
        let v = self.version().await.ok();
        match v {
            Some(v) if v < IptablesVersion::WAIT => vec![],
            Some(v) if v < IptablesVersion::WAIT_SECONDS => vec!["-w".into()],
            _ => vec!["-w".into(), "5".into()],
        }
    }

    /// Lock-wait flags for `iptables-restore` (older ones have none).
    async fn restore_wait_flags(&self) -> Vec<String> {
        match self.version().await.ok() {
            Some(v) if v < IptablesVersion::RESTORE_WAIT => vec![],
            _ => vec!["-w".into(), "5".into()],
        }
    }

    /// Feeds `input` to `iptables-restore -w 5 --noflush --counters`. Tables and chains not
    /// named in the input are left alone. On failure the error carries the tool's stderr and,
    /// when the tool names a line, that line of `input`.
    pub async fn restore(&self, input: &str) -> Result<(), KernelError> {
        let mut args = self.restore_wait_flags().await;
        args.push("--noflush".into());
        args.push("--counters".into());
        let out = self
            .exec
            .run(&self.binary("-restore"), &args, Some(input.as_bytes()))
            .await?;
        if out.success() {
            return Ok(());
        }
        let line = restore_error_line(&out.stderr);
        let input_line = line
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| input.lines().nth(i))
            .map(str::to_string);
        Err(KernelError::Restore {
            command: out.command,
            status: out.status,
            stderr: out.stderr,
            line,
            input_line,
        })
    }

    /// `iptables-save -t TABLE`.
    pub async fn save(&self, table: Table) -> Result<String, KernelError> {
        let args = vec!["-t".to_string(), table.as_str().to_string()];
        self.exec
            .run(&self.binary("-save"), &args, None)
            .await?
            .into_stdout()
    }

    /// Runs `iptables -w 5 -t TABLE OP CHAIN ARGS...`.
    async fn run_op(
        &self,
        table: Table,
        op: &str,
        chain: &str,
        rule: &[String],
    ) -> Result<Output, KernelError> {
        let mut args = self.wait_flags().await;
        args.extend(["-t", table.as_str(), op, chain].map(String::from));
        args.extend_from_slice(rule);
        self.exec.run(&self.binary(""), &args, None).await
    }

    /// Whether `chain` exists in `table` (`iptables -S CHAIN`).
    pub async fn chain_exists(&self, table: Table, chain: &str) -> Result<bool, KernelError> {
        let out = self.run_op(table, "-S", chain, &[]).await?;
        match out.status {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(out.into_error()),
        }
    }

    /// Creates `chain` in `table` unless it exists. Returns whether it already existed.
    pub async fn ensure_chain(&self, table: Table, chain: &str) -> Result<bool, KernelError> {
        let out = self.run_op(table, "-N", chain, &[]).await?;
        match out.status {
            Some(0) => Ok(false),
            // Exit 1 is "operation failed"; make sure it failed because the chain is there.
            Some(1) if self.chain_exists(table, chain).await? => Ok(true),
            _ => Err(out.into_error()),
        }
    }

    /// Whether the rule `args` is in `chain` (`iptables -C`). A missing chain, or a jump to a
    /// missing chain, means no.
    pub async fn rule_exists(
        &self,
        table: Table,
        chain: &str,
        args: &[String],
    ) -> Result<bool, KernelError> {
        let out = self.run_op(table, "-C", chain, args).await?;
        match out.status {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            // iptables answers a jump to a missing chain with exit 2 ("Couldn't load target
            // `X'", "Chain 'X' does not exist"), like a malformed rule: tell them apart.
            Some(2)
                if self
                    .jumps_to_missing_chain(table, args, &out.stderr)
                    .await? =>
            {
                Ok(false)
            }
            _ => Err(out.into_error()),
        }
    }

    /// Whether `rule` jumps (`-j`) to a chain that `stderr` names and `table` lacks.
    async fn jumps_to_missing_chain(
        &self,
        table: Table,
        rule: &[String],
        stderr: &str,
    ) -> Result<bool, KernelError> {
        let Some(target) = rule.iter().skip_while(|a| *a != "-j").nth(1) else {
            return Ok(false);
        };
        if !stderr.contains(target.as_str()) {
            return Ok(false);
        }
        Ok(!self.chain_exists(table, target).await?)
    }

    /// Adds the rule `args` to `chain` (first or last) unless an identical rule is there.
    /// Returns whether it already existed.
    pub async fn ensure_rule(
        &self,
        position: RulePosition,
        table: Table,
        chain: &str,
        args: &[String],
    ) -> Result<bool, KernelError> {
        if self.rule_exists(table, chain, args).await? {
            return Ok(true);
        }
        let op = match position {
            RulePosition::Prepend => "-I",
            RulePosition::Append => "-A",
        };
        let out = self.run_op(table, op, chain, args).await?;
        if out.success() {
            Ok(false)
        } else {
            Err(out.into_error())
        }
    }

    /// Deletes the rule `args` from `chain`; a missing rule (or chain) is not an error.
    pub async fn delete_rule(
        &self,
        table: Table,
        chain: &str,
        args: &[String],
    ) -> Result<(), KernelError> {
        if !self.rule_exists(table, chain, args).await? {
            return Ok(());
        }
        let out = self.run_op(table, "-D", chain, args).await?;
        if out.success() {
            Ok(())
        } else {
            Err(out.into_error())
        }
    }

    /// Flushes and deletes `chain`; a missing chain is not an error. Fails if other rules
    /// still jump to it.
    pub async fn flush_and_delete_chain(
        &self,
        table: Table,
        chain: &str,
    ) -> Result<(), KernelError> {
        if !self.chain_exists(table, chain).await? {
            return Ok(());
        }
        for op in ["-F", "-X"] {
            let out = self.run_op(table, op, chain, &[]).await?;
            if !out.success() {
                return Err(out.into_error());
            }
        }
        Ok(())
    }
}

/// The 1-based input line an `iptables-restore` error names: `Error occurred at line: 4`,
/// `COMMIT expected at line 4`, `line 4 failed`.
pub fn restore_error_line(stderr: &str) -> Option<usize> {
    let mut rest = stderr;
    while let Some(pos) = rest.find("line") {
        rest = &rest[pos + "line".len()..];
        let tail = rest.trim_start_matches(':').trim_start();
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    None
}

/// Chains kubelet (≥ 1.17) creates in the back end it uses.
fn has_kubelet_chains(save: &str) -> bool {
    save.lines()
        .any(|l| l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY"))
}

fn rule_count(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with('-')).count()
}

/// The iptables-wrapper decision from `iptables-save` output (IPv4 and IPv6 concatenated)
/// of both back ends: kubelet's hint chains first (nft checked first), otherwise the back
/// end with more rules; a tie (for instance none at all) chooses nft.
pub fn choose_variant(legacy_save: &str, nft_save: &str) -> IptablesVariant {
    if has_kubelet_chains(nft_save) {
        return IptablesVariant::Nft;
    }
    let legacy_wins =
        has_kubelet_chains(legacy_save) || rule_count(legacy_save) > rule_count(nft_save);
    if legacy_wins {
        IptablesVariant::Legacy
    } else {
        IptablesVariant::Nft
    }
}

/// Parses the value of [`MODE_ENV`]: unset or empty means "detect".
pub fn variant_override(value: Option<&str>) -> Result<Option<IptablesVariant>, KernelError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some),
    }
}

/// Chooses the back end the way kubernetes-sigs/iptables-wrappers does, unless
/// [`MODE_ENV`] forces one. Tool failures while probing count as "no rules" (best effort);
/// an invalid override is an error.
pub async fn detect_variant(netns: Option<&str>) -> Result<IptablesVariant, KernelError> {
    let forced = std::env::var(MODE_ENV).ok();
    if let Some(v) = variant_override(forced.as_deref())? {
        tracing::info!(mode = %v, "iptables back end forced by {MODE_ENV}");
        return Ok(v);
    }
    let v = probe_variant(netns).await;
    tracing::info!(mode = %v, "detected iptables back end");
    Ok(v)
}

/// [`detect_variant`] without the override: looks at the rules of both back ends.
pub async fn probe_variant(netns: Option<&str>) -> IptablesVariant {
    let exec = Exec::new(netns);
    let mut saves = Vec::new();
    // Legacy: no `-t mangle`, which would make the kernel create that table.
    for prog in [
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-nft-save",
        "ip6tables-nft-save",
    ] {
        let text = match exec.run(prog, &[], None).await {
            Ok(out) if out.success() => out.stdout,
            Ok(out) => {
                tracing::debug!(error = %out.into_error(), "probe failed");
                String::new()
            }
            Err(e) => {
                tracing::debug!(error = %e, "probe failed");
                String::new()
            }
        };
        saves.push(text);
    }
    let legacy = format!("{}{}", saves[0], saves[1]);
    let nft = format!("{}{}", saves[2], saves[3]);
    choose_variant(&legacy, &nft)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::NetNs;

    fn s(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn version_parse() {
        assert_eq!(
            IptablesVersion::parse("iptables v1.8.9 (nf_tables)\n"),
            Some(IptablesVersion(1, 8, 9))
        );
        assert_eq!(
            IptablesVersion::parse("iptables v1.6 (legacy)"),
            Some(IptablesVersion(1, 6, 0))
        );
        assert_eq!(IptablesVersion::parse("iptables version unknown"), None);
        assert!(IptablesVersion(1, 6, 1) < IptablesVersion::RANDOM_FULLY);
        assert!(IptablesVersion(1, 10, 0) > IptablesVersion::RANDOM_FULLY);
    }

    #[test]
    fn restore_error_line_forms() {
        let legacy = "iptables-restore v1.8.9 (legacy): Couldn't load match `bogus':No such \
                      file or directory\n\nError occurred at line: 4\nTry `iptables-restore -h'";
        assert_eq!(restore_error_line(legacy), Some(4));
        assert_eq!(
            restore_error_line("iptables-restore: COMMIT expected at line 12\n"),
            Some(12)
        );
        assert_eq!(
            restore_error_line("iptables-restore: line 7 failed\n"),
            Some(7)
        );
        assert_eq!(
            restore_error_line("some pipeline error without number"),
            None
        );
    }

    #[test]
    fn choose_variant_follows_the_wrapper() {
        let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        let many = "*filter\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\n-A OUTPUT -j ACCEPT\nCOMMIT\n";
        let one = "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n";
        // Hints win over rule counts, nft checked first.
        assert_eq!(choose_variant(many, hint), IptablesVariant::Nft);
        assert_eq!(choose_variant(canary, many), IptablesVariant::Legacy);
        assert_eq!(choose_variant(hint, hint), IptablesVariant::Nft);
        // Otherwise more rules wins; ties (including nothing at all) choose nft.
        assert_eq!(choose_variant(many, one), IptablesVariant::Legacy);
        assert_eq!(choose_variant(one, many), IptablesVariant::Nft);
        assert_eq!(choose_variant(one, one), IptablesVariant::Nft);
        assert_eq!(choose_variant("", ""), IptablesVariant::Nft);
        // Comments and chain declarations are not rules.
        let warn = "# Warning: iptables-legacy tables present\n:FOO - [0:0]\n";
        assert_eq!(choose_variant(one, warn), IptablesVariant::Legacy);
    }

    #[test]
    fn override_parsing() {
        assert_eq!(variant_override(None).unwrap(), None);
        assert_eq!(variant_override(Some("")).unwrap(), None);
        assert_eq!(
            variant_override(Some("legacy")).unwrap(),
            Some(IptablesVariant::Legacy)
        );
        assert_eq!(
            variant_override(Some("nft")).unwrap(),
            Some(IptablesVariant::Nft)
        );
        let err = variant_override(Some("nftables")).unwrap_err();
        assert!(err.to_string().contains("nftables"), "{err}");
    }

    #[test]
    fn binary_names() {
        let ipt = Iptables::new(IptablesVariant::Legacy, IpFamily::V6);
        assert_eq!(ipt.binary("-restore"), "ip6tables-legacy-restore");
        let ipt = Iptables::new(IptablesVariant::Nft, IpFamily::V4);
        assert_eq!(ipt.binary(""), "iptables-nft");
    }

    // ---- Kernel tests: real iptables in a throwaway network namespace. ----

    const VARIANTS: [IptablesVariant; 2] = [IptablesVariant::Legacy, IptablesVariant::Nft];

    /// `-A` lines of `chain` in iptables-save output.
    fn rules_of(save: &str, chain: &str) -> Vec<String> {
        let prefix = format!("-A {chain} ");
        save.lines()
            .filter(|l| l.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    fn declares(save: &str, chain: &str) -> bool {
        save.lines().any(|l| l.starts_with(&format!(":{chain} ")))
    }

    #[tokio::test]
    async fn kernel_version_probe_and_random_fully() {
        let ns = NetNs::new();
        for v in VARIANTS {
            let ipt = Iptables::new(v, IpFamily::V4).with_netns(ns.name());
            let version = ipt.version().await.unwrap();
            // The installed iptables (1.8.x) must be recognised as modern.
            assert!(version >= IptablesVersion(1, 8, 0), "{v}: {version}");
            assert!(ipt.supports_random_fully().await, "{v}");
        }
    }

    #[tokio::test]
    async fn kernel_restore_noflush_and_broken_input() {
        let ns = NetNs::new();
        for v in VARIANTS {
            let ipt = Iptables::new(v, IpFamily::V4).with_netns(ns.name());
            let first = "*nat\n:KPRS-A - [0:0]\n\
                         -A KPRS-A -d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.0.1:8080\n\
                         COMMIT\n";
            ipt.restore(first).await.unwrap();
            let save = ipt.save(Table::Nat).await.unwrap();
            assert!(declares(&save, "KPRS-A"), "{v}: {save}");
            assert_eq!(
                rules_of(&save, "KPRS-A"),
                [
                    "-A KPRS-A -d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.0.1:8080"
                ],
                "{v}"
            );

            // --noflush: a restore naming only KPRS-B leaves KPRS-A and its rule alone.
            let second = "*nat\n:KPRS-B - [0:0]\n-A KPRS-B -j KPRS-A\nCOMMIT\n";
            ipt.restore(second).await.unwrap();
            let save = ipt.save(Table::Nat).await.unwrap();
            assert_eq!(rules_of(&save, "KPRS-A").len(), 1, "{v}: {save}");
            assert_eq!(rules_of(&save, "KPRS-B"), ["-A KPRS-B -j KPRS-A"], "{v}");

            // A broken restore (line 4 names an unknown match) fails with the tool's stderr
            // and that line, and changes nothing: the whole transaction is rejected.
            let broken = "*nat\n:KPRS-A - [0:0]\n:KPRS-C - [0:0]\n\
                          -A KPRS-C -m kprs-bogus -j ACCEPT\nCOMMIT\n";
            let err = ipt.restore(broken).await.unwrap_err();
            match &err {
                KernelError::Restore {
                    stderr,
                    line,
                    input_line,
                    ..
                } => {
                    assert!(stderr.contains("kprs-bogus"), "{v}: {stderr}");
                    assert_eq!(*line, Some(4), "{v}: {stderr}");
                    assert_eq!(
                        input_line.as_deref(),
                        Some("-A KPRS-C -m kprs-bogus -j ACCEPT"),
                        "{v}"
                    );
                }
                other => panic!("{v}: unexpected error {other:?}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("iptables-{v}-restore")) && msg.contains("--noflush"),
                "{v}: {msg}"
            );
            let after = ipt.save(Table::Nat).await.unwrap();
            assert_eq!(
                rules_of(&after, "KPRS-A").len(),
                1,
                "{v}: flushed by failed restore"
            );
            assert!(!declares(&after, "KPRS-C"), "{v}: partial restore applied");
        }
    }

    #[tokio::test]
    async fn kernel_counters_are_restored() {
        // --counters: the [pkts:bytes] given in the input end up in the kernel.
        let ns = NetNs::new();
        for v in VARIANTS {
            let ipt = Iptables::new(v, IpFamily::V4).with_netns(ns.name());
            let input = "*filter\n:KPRS-CNT - [0:0]\n[7:700] -A KPRS-CNT -j RETURN\nCOMMIT\n";
            ipt.restore(input).await.unwrap();
            let out = ns.exec(&format!("iptables-{v}-save"), &["-c", "-t", "filter"]);
            assert!(
                out.lines().any(|l| l == "[7:700] -A KPRS-CNT -j RETURN"),
                "{v}: {out}"
            );
        }
    }

    #[tokio::test]
    async fn kernel_chain_and_rule_helpers() {
        let ns = NetNs::new();
        for v in VARIANTS {
            let ipt = Iptables::new(v, IpFamily::V4).with_netns(ns.name());
            assert!(
                !ipt.chain_exists(Table::Filter, "KPRS-X").await.unwrap(),
                "{v}"
            );
            assert!(
                !ipt.ensure_chain(Table::Filter, "KPRS-X").await.unwrap(),
                "{v}"
            );
            assert!(
                ipt.chain_exists(Table::Filter, "KPRS-X").await.unwrap(),
                "{v}"
            );
            assert!(
                ipt.ensure_chain(Table::Filter, "KPRS-X").await.unwrap(),
                "{v}"
            );

            let jump = s(&[
                "-m",
                "comment",
                "--comment",
                "kprs test jump",
                "-j",
                "KPRS-X",
            ]);
            assert!(
                !ipt.ensure_rule(RulePosition::Append, Table::Filter, "INPUT", &jump)
                    .await
                    .unwrap(),
                "{v}"
            );
            assert!(
                ipt.ensure_rule(RulePosition::Append, Table::Filter, "INPUT", &jump)
                    .await
                    .unwrap(),
                "{v}: second ensure must report existing"
            );
            let accept = s(&["-s", "192.0.2.1/32", "-j", "ACCEPT"]);
            ipt.ensure_rule(RulePosition::Prepend, Table::Filter, "INPUT", &accept)
                .await
                .unwrap();
            let save = ipt.save(Table::Filter).await.unwrap();
            assert_eq!(
                rules_of(&save, "INPUT"),
                [
                    "-A INPUT -s 192.0.2.1/32 -j ACCEPT",
                    "-A INPUT -m comment --comment \"kprs test jump\" -j KPRS-X",
                ],
                "{v}: jump once, prepended rule first"
            );

            // A chain still referenced cannot be deleted.
            assert!(
                ipt.flush_and_delete_chain(Table::Filter, "KPRS-X")
                    .await
                    .is_err(),
                "{v}"
            );
            ipt.delete_rule(Table::Filter, "INPUT", &jump)
                .await
                .unwrap();
            ipt.delete_rule(Table::Filter, "INPUT", &jump)
                .await
                .unwrap();
            ipt.delete_rule(Table::Filter, "KPRS-NO-SUCH-CHAIN", &jump)
                .await
                .unwrap();
            let save = ipt.save(Table::Filter).await.unwrap();
            assert_eq!(
                rules_of(&save, "INPUT"),
                ["-A INPUT -s 192.0.2.1/32 -j ACCEPT"],
                "{v}"
            );
            ipt.flush_and_delete_chain(Table::Filter, "KPRS-X")
                .await
                .unwrap();
            assert!(
                !ipt.chain_exists(Table::Filter, "KPRS-X").await.unwrap(),
                "{v}"
            );
            ipt.flush_and_delete_chain(Table::Filter, "KPRS-X")
                .await
                .unwrap();
            // A jump to a chain that is gone is a missing rule (iptables exits 2 naming the
            // target, not 1), as `--cleanup` meets it for the other mode's jumps.
            assert!(
                !ipt.rule_exists(Table::Filter, "INPUT", &jump)
                    .await
                    .unwrap(),
                "{v}"
            );
            ipt.delete_rule(Table::Filter, "INPUT", &jump)
                .await
                .unwrap();

            // A malformed rule is an error, not "missing".
            let bad = s(&["-m", "kprs-bogus", "-j", "ACCEPT"]);
            let err = ipt
                .ensure_rule(RulePosition::Append, Table::Filter, "INPUT", &bad)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("kprs-bogus"), "{v}: {err}");
            ipt.delete_rule(Table::Filter, "INPUT", &accept)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn kernel_ipv6_handle_uses_ip6tables() {
        let ns = NetNs::new();
        for v in VARIANTS {
            let ipt = Iptables::new(v, IpFamily::V6).with_netns(ns.name());
            ipt.restore("*filter\n:KPRS-V6 - [0:0]\n-A KPRS-V6 -s fd00::1/128 -j RETURN\nCOMMIT\n")
                .await
                .unwrap();
            let save = ipt.save(Table::Filter).await.unwrap();
            assert_eq!(
                rules_of(&save, "KPRS-V6"),
                ["-A KPRS-V6 -s fd00::1/128 -j RETURN"]
            );
            let v4 = Iptables::new(v, IpFamily::V4).with_netns(ns.name());
            assert!(
                !v4.chain_exists(Table::Filter, "KPRS-V6").await.unwrap(),
                "{v}"
            );
        }
    }

    #[tokio::test]
    async fn kernel_detect_variant() {
        let ns = NetNs::new();
        assert_eq!(probe_variant(Some(ns.name())).await, IptablesVariant::Nft);
        let legacy = Iptables::new(IptablesVariant::Legacy, IpFamily::V4).with_netns(ns.name());
        legacy
            .restore("*filter\n:KPRS-L - [0:0]\n-A KPRS-L -j RETURN\n-A KPRS-L -j ACCEPT\nCOMMIT\n")
            .await
            .unwrap();
        assert_eq!(
            probe_variant(Some(ns.name())).await,
            IptablesVariant::Legacy,
            "more legacy rules"
        );
        let nft = Iptables::new(IptablesVariant::Nft, IpFamily::V4).with_netns(ns.name());
        nft.restore("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")
            .await
            .unwrap();
        assert_eq!(
            probe_variant(Some(ns.name())).await,
            IptablesVariant::Nft,
            "kubelet hint in nft wins over rule count"
        );
    }
}
