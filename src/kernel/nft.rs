//! `nft` through its command-line tool: transactions fed on stdin (`nft -f -`, never through
//! a shell), `--check` runs, the version, and listings of the `kube-proxy` tables.

use super::KernelError;
use super::exec::Exec;

/// The name of kube-proxy's table in both families.
const TABLE: &str = "kube-proxy";

/// Handle on the `nft` binary.
#[derive(Debug, Clone, Default)]
pub struct Nft {
    exec: Exec,
    netns: Option<String>,
}

/// Chain and set names of a table (`nft -t list table`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableNames {
    /// Chains.
    pub chains: Vec<String>,
    /// Sets and maps.
    pub sets: Vec<String>,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `NFPROTO_IPV6` for `ip6`, else `NFPROTO_IPV4`.
fn nfproto(family: &str) -> u8 {
    if family == "ip6" { 10 } else { 2 }
}

/// Whether `nft` said the object does not exist.
fn is_not_found(e: &KernelError) -> bool {
    e.stderr()
        .is_some_and(|s| s.contains("No such file or directory"))
}

impl Nft {
    /// A handle running `nft` in the current network namespace.
    pub fn new() -> Self {
        Nft::default()
    }

    /// The same handle, running `nft` through `ip netns exec NAME`.
    pub fn with_netns(mut self, name: impl AsRef<str>) -> Self {
        self.exec = Exec::new(Some(name.as_ref()));
        self.netns = Some(name.as_ref().to_string());
        self
    }

    /// The number of rules in each of `chains` of `FAMILY kube-proxy` (`ip` or `ip6`), in
    /// order, `None` for a chain that does not exist: over netlink, at the cost of the
    /// chains (see [`super::nftnl`]), not of the table as `nft list chain` is.
    pub async fn rule_counts(
        &self,
        family: &str,
        chains: &[&str],
    ) -> Result<Vec<Option<usize>>, KernelError> {
        super::nftnl::NfTables::new(self.netns.as_deref())
            .rule_counts(nfproto(family), TABLE, chains)
            .await
    }

    /// Every chain of `FAMILY kube-proxy` with its number of rules, over netlink (empty
    /// when the table does not exist): what `nft -t list table` would show of it, without
    /// `nft` building its cache of the table.
    pub async fn table_rule_counts(
        &self,
        family: &str,
    ) -> Result<std::collections::BTreeMap<String, usize>, KernelError> {
        super::nftnl::NfTables::new(self.netns.as_deref())
            .table_rule_counts(nfproto(family), TABLE)
            .await
    }

    /// Runs one transaction (`nft -f -`): all of it or nothing.
    pub async fn run(&self, text: &str) -> Result<(), KernelError> {
        self.exec
            .run("nft", &args(&["-f", "-"]), Some(text.as_bytes()))
            .await?
            .into_stdout()
            .map(drop)
    }

    /// Checks a transaction without committing it (`nft --check -f -`).
    pub async fn check(&self, text: &str) -> Result<(), KernelError> {
        self.exec
            .run("nft", &args(&["--check", "-f", "-"]), Some(text.as_bytes()))
            .await?
            .into_stdout()
            .map(drop)
    }

    /// `nft --version` output.
    pub async fn version(&self) -> Result<String, KernelError> {
        self.exec
            .run("nft", &args(&["--version"]), None)
            .await?
            .into_stdout()
    }

    /// `nft list table FAMILY kube-proxy`; `None` when the table does not exist.
    pub async fn list_table(&self, family: &str) -> Result<Option<String>, KernelError> {
        self.list(&["list", "table", family, TABLE]).await
    }

    /// Chain and set names of `FAMILY kube-proxy` (terse listing, no elements); `None`
    /// when the table does not exist.
    pub async fn table_names(&self, family: &str) -> Result<Option<TableNames>, KernelError> {
        let text = self.list(&["-t", "list", "table", family, TABLE]).await?;
        Ok(text.map(|t| parse_names(&t)))
    }

    async fn list(&self, list: &[&str]) -> Result<Option<String>, KernelError> {
        match self.exec.run("nft", &args(list), None).await?.into_stdout() {
            Ok(s) => Ok(Some(s)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes `FAMILY kube-proxy`; `Ok(false)` when it did not exist.
    pub async fn delete_table(&self, family: &str) -> Result<bool, KernelError> {
        match self.run(&format!("delete table {family} {TABLE}\n")).await {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Names from `nft list table` output: `chain NAME {`, `set NAME {`, `map NAME {` lines.
pub fn parse_names(text: &str) -> TableNames {
    let mut names = TableNames::default();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (Some(kind), Some(name), Some("{")) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let name = name.trim_matches('"').to_string();
        match kind {
            "chain" => names.chains.push(name),
            "set" | "map" => names.sets.push(name),
            _ => {}
        }
    }
    names
}

/// Parses `nftables v1.0.6 (Lester Gooch #5)` into (major, minor, patch).
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_version_parse() {
        let listing = "table ip kube-proxy {\n\tcomment \"rules for kube-proxy\"\n\tset cluster-ips {\n\t\ttype ipv4_addr\n\t}\n\tmap service-ips {\n\t}\n\tchain service-ULMVA6XW-ns1/svc1/tcp/p80 {\n\t}\n\tchain filter-input {\n\t}\n}\n";
        let n = parse_names(listing);
        assert_eq!(
            n.chains,
            ["service-ULMVA6XW-ns1/svc1/tcp/p80", "filter-input"]
        );
        assert_eq!(n.sets, ["cluster-ips", "service-ips"]);
        assert_eq!(
            parse_version("nftables v1.0.6 (Lester Gooch #5)"),
            Some((1, 0, 6))
        );
        assert_eq!(parse_version("nftables v0.9.8 (E.D.S.)"), Some((0, 9, 8)));
        assert_eq!(parse_version("garbage"), None);
    }
}
