//! Building the API client: from `--kubeconfig`/`--master`, else the default kubeconfig, else
//! the in-cluster configuration.
//!
//! No message built here quotes the kubeconfig. Its YAML parser's errors show the lines around
//! the error, and those hold tokens, passwords and keys: a parse error names only the line and
//! column.

use std::path::Path;

use kube::Client;
use kube::config::{Config, KubeConfigOptions, KubeconfigError};

/// Why no API client could be built. The messages never contain the kubeconfig's content.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig named on the command line cannot be used.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What is wrong with it, without its content.
        reason: String,
    },
    /// Neither the default kubeconfig nor the in-cluster configuration can be used.
    #[error("no API server configuration: kubeconfig: {kubeconfig}; in-cluster: {in_cluster}")]
    Infer {
        /// Why the default kubeconfig cannot be used.
        kubeconfig: String,
        /// Why the in-cluster configuration cannot be used.
        in_cluster: String,
    },
    /// `--master` is not a URL (not quoted: it may carry user:password@).
    #[error("--master is not a valid URL")]
    Master,
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Build(String),
}

/// The client configuration `--kubeconfig`/`--master` select; with neither, the default
/// kubeconfig (`$KUBECONFIG`, `~/.kube/config`), else the in-cluster configuration.
pub async fn config(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
) -> Result<Config, ClientError> {
    let master = master
        .map(|m| m.parse::<hyper::Uri>().map_err(|_| ClientError::Master))
        .transpose()?;
    let mut config = match (kubeconfig, &master) {
        (Some(path), _) => from_file(path).await?,
        (None, Some(master)) => Config::new(master.clone()),
        (None, None) => inferred().await?,
    };
    if let Some(master) = master {
        config.cluster_url = master;
    }
    Ok(config)
}

/// The client for `config`. Requests are not retried by the client: the watchers back off as
/// client-go's reflector does, and a client retrying every 503 up to 15 times on top of that
/// multiplies the load on an API server that is trying to recover.
pub fn client(mut config: Config) -> Result<Client, ClientError> {
    config.default_retry = false;
    Client::try_from(config).map_err(|e| ClientError::Build(e.to_string()))
}

async fn from_file(path: &Path) -> Result<Config, ClientError> {
    let err = |e: &KubeconfigError| ClientError::Kubeconfig {
        path: path.display().to_string(),
        reason: describe(e),
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(&e))
}

/// As kube's `Config::infer`, whose error quotes the kubeconfig's parse error whole.
async fn inferred() -> Result<Config, ClientError> {
    let mut config = match Config::from_kubeconfig(&KubeConfigOptions::default()).await {
        Ok(c) => c,
        Err(kubeconfig) => Config::incluster().map_err(|in_cluster| ClientError::Infer {
            kubeconfig: describe(&kubeconfig),
            in_cluster: in_cluster.to_string(),
        })?,
    };
    config.apply_debug_overrides();
    Ok(config)
}

/// `e` without the kubeconfig's content: the parser's message (a snippet of the file, or an
/// offending value) is replaced by where the error is. The other errors name paths, contexts
/// and formats, not values.
fn describe(e: &KubeconfigError) -> String {
    match e {
        KubeconfigError::Parse(p) => match p.location() {
            Some(at) => format!(
                "not a valid kubeconfig (YAML error at line {}, column {})",
                at.line(),
                at.column()
            ),
            None => "not a valid kubeconfig (YAML error)".to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "SECRET-a1b2c3d4e5";

    async fn load_error(yaml: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, yaml).unwrap();
        let e = config(Some(&path), None).await.unwrap_err();
        format!("{e} {e:?}")
    }

    #[tokio::test]
    async fn a_yaml_syntax_error_names_the_place_not_the_lines() {
        let text = load_error(&format!(
            "apiVersion: v1\nkind: Config\nusers:\n- name: u\n  user:\n    token: {SECRET}\n   bad: [\n"
        ))
        .await;
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("line 7"), "{text}");
    }

    #[tokio::test]
    async fn a_value_of_the_wrong_type_is_not_quoted() {
        // serde's "invalid type: string \"...\"" messages quote the value.
        let text = load_error(&format!("apiVersion: v1\nkind: Config\nusers: {SECRET}\n")).await;
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("line 3"), "{text}");
    }

    #[tokio::test]
    async fn a_master_url_with_credentials_is_not_quoted() {
        let e = config(None, Some(&format!("https://admin:{SECRET}@ host"))).await;
        let text = format!("{:?}", e.map(|_| ()));
        assert!(!text.contains(SECRET), "{text}");
    }
}
