//! The dummy interface IPVS mode binds service addresses to (`kube-ipvs0`), through the `ip`
//! tool with an argument vector.
//!
//! Why `ip` and not rtnetlink: the other wrappers here run tools the same way, so a
//! namespace-bound handle works uniformly through `ip netns exec`, no dependency is added,
//! and the cost (a fork/exec per change, one listing per sync) is negligible next to a sync.
//!
//! As upstream (`EnsureDummyDevice`), the link is created and left administratively down: the
//! kernel still installs the local routes of its addresses, which is all IPVS needs, and a
//! down link never answers ARP for them.

use std::net::IpAddr;

use super::KernelError;
use super::addrs::parse_ip_addr_json;
use super::exec::Exec;

/// Upstream's `defaultDummyDevice`.
pub const DUMMY_DEVICE: &str = "kube-ipvs0";

/// A handle on one dummy link, optionally inside a network namespace.
#[derive(Debug, Clone)]
pub struct DummyLink {
    exec: Exec,
    name: String,
}

impl Default for DummyLink {
    fn default() -> Self {
        DummyLink::new(DUMMY_DEVICE)
    }
}

fn host_prefix(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

impl DummyLink {
    /// The link `name` in this process's network namespace.
    pub fn new(name: &str) -> Self {
        DummyLink {
            exec: Exec::default(),
            name: name.to_string(),
        }
    }

    /// The same handle, running `ip` through `ip netns exec NS`.
    pub fn with_netns(mut self, ns: impl AsRef<str>) -> Self {
        self.exec = Exec::new(Some(ns.as_ref()));
        self
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn ip(&self, args: &[&str]) -> Result<super::exec::Output, KernelError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.exec.run("ip", &args, None).await
    }

    /// Whether the link exists.
    pub async fn exists(&self) -> Result<bool, KernelError> {
        let out = self.ip(&["-j", "link", "show", "dev", &self.name]).await?;
        if out.success() {
            return Ok(true);
        }
        if out.stderr.contains("does not exist") {
            return Ok(false);
        }
        Err(out.into_error())
    }

    /// Creates the dummy link unless it exists (left down, as upstream). Returns whether it
    /// was created.
    pub async fn ensure(&self) -> Result<bool, KernelError> {
        if self.exists().await? {
            return Ok(false);
        }
        let out = self
            .ip(&["link", "add", &self.name, "type", "dummy"])
            .await?;
        if out.success() {
            Ok(true)
        } else if out.stderr.contains("File exists") {
            // Created concurrently.
            Ok(false)
        } else {
            Err(out.into_error())
        }
    }

    /// Addresses on the link (both families); empty if the link does not exist.
    pub async fn addresses(&self) -> Result<Vec<IpAddr>, KernelError> {
        let out = self.ip(&["-j", "addr", "show", "dev", &self.name]).await?;
        if !out.success() && out.stderr.contains("does not exist") {
            return Ok(Vec::new());
        }
        let command = out.command.clone();
        let text = out.into_stdout()?;
        let list =
            parse_ip_addr_json(&text).map_err(|detail| KernelError::Parse { command, detail })?;
        Ok(list.into_iter().map(|a| a.addr).collect())
    }

    /// Binds `ip` (as a /32 or /128). Returns `false` if it was already bound.
    pub async fn add_address(&self, ip: IpAddr) -> Result<bool, KernelError> {
        let prefix = host_prefix(&ip);
        let mut args = vec!["addr", "add", &prefix, "dev", &self.name];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        let out = self.ip(&args).await?;
        if out.success() {
            Ok(true)
        } else if out.stderr.contains("File exists") {
            Ok(false)
        } else {
            Err(out.into_error())
        }
    }

    /// Unbinds `ip`. Returns `false` if it was not bound.
    pub async fn del_address(&self, ip: IpAddr) -> Result<bool, KernelError> {
        let prefix = host_prefix(&ip);
        let out = self
            .ip(&["addr", "del", &prefix, "dev", &self.name])
            .await?;
        if out.success() {
            Ok(true)
        } else if out.stderr.contains("Cannot assign requested address")
            || out.stderr.contains("does not exist")
        {
            Ok(false)
        } else {
            Err(out.into_error())
        }
    }

    /// Binds `add` and unbinds `del` in one `ip -force -batch -` run (one fork/exec however
    /// many addresses change: a first sync binds every service IP at once). Binding a bound
    /// address or unbinding an absent one fails only that line; the run goes on and reports
    /// the failures (callers re-list the addresses to see what took effect).
    pub async fn change_addresses(
        &self,
        add: &[IpAddr],
        del: &[IpAddr],
    ) -> Result<(), KernelError> {
        if add.is_empty() && del.is_empty() {
            return Ok(());
        }
        let mut input = String::new();
        for ip in add {
            input.push_str(&format!("addr add {} dev {}", host_prefix(ip), self.name));
            if ip.is_ipv6() {
                input.push_str(" nodad");
            }
            input.push('\n');
        }
        for ip in del {
            input.push_str(&format!("addr del {} dev {}\n", host_prefix(ip), self.name));
        }
        let args: Vec<String> = ["-force", "-batch", "-"].map(String::from).to_vec();
        let out = self.exec.run("ip", &args, Some(input.as_bytes())).await?;
        if out.success() {
            Ok(())
        } else {
            Err(out.into_error())
        }
    }

    /// Deletes the link (only `--cleanup` does this). Returns `false` if it did not exist.
    pub async fn delete(&self) -> Result<bool, KernelError> {
        let out = self.ip(&["link", "del", &self.name]).await?;
        if out.success() {
            Ok(true)
        } else if out.stderr.contains("Cannot find device") || out.stderr.contains("does not exist")
        {
            Ok(false)
        } else {
            Err(out.into_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::testutil::NetNs;

    /// Dummy links need the `dummy` module, which the host kernel of the project machines
    /// lacks: there this test checks only the tolerant paths (absent link) and fails loudly
    /// on anything else; the full path runs in the VM (tests/kernel_ipvs.rs).
    #[tokio::test]
    async fn kernel_absent_link_reads_as_empty_and_deletes_as_false() {
        let ns = NetNs::new();
        let link = DummyLink::new("kprs-dummy0").with_netns(ns.name());
        assert!(!link.exists().await.unwrap());
        assert!(link.addresses().await.unwrap().is_empty());
        assert!(!link.delete().await.unwrap());
    }
}
