//! A proxy running in-process from a YAML file in its own temporary directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::app::{Proxy, StartError, StartOptions};
use crate::bootstrap::ConfigSource;
use crate::reload::{ReloadError, ReloadOutcome};

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A running proxy and its config file.
pub struct TestProxy {
    proxy: Option<Proxy>,
    directory: PathBuf,
    config: PathBuf,
}

/// A fresh directory under the system's temporary directory, removed by the caller.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
    let directory = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    directory
}

impl TestProxy {
    /// Writes `yaml` to a file and starts a proxy from it; panics if it does not start. Give listeners
    /// port 0 and the bootstrap `admin_address: 127.0.0.1:0` (added when the YAML has no bootstrap).
    pub fn start(yaml: &str) -> TestProxy {
        TestProxy::try_start(yaml).unwrap_or_else(|e| panic!("proxy did not start: {e}"))
    }

    /// Like [`TestProxy::start`], but returns the start-up error.
    pub fn try_start(yaml: &str) -> Result<TestProxy, StartError> {
        let directory = temp_dir("remora-test");
        let config = directory.join("config.yaml");
        std::fs::write(&config, with_test_bootstrap(yaml)).unwrap();
        let started = Proxy::start(ConfigSource::File(config.clone()));
        match started {
            Ok(proxy) => Ok(TestProxy { proxy: Some(proxy), directory, config }),
            Err(error) => {
                let _ = std::fs::remove_dir_all(&directory);
                Err(error)
            }
        }
    }

    /// Starts a proxy taking its resources from the control plane at `url` as node `node_id`, with
    /// `yaml` as its file (static resources; may be empty; a test bootstrap is added unless it has
    /// its own). Returns before it is ready: see
    /// [`TestProxy::wait_ready`].
    pub fn start_controlled(yaml: &str, url: &str, node_id: &str) -> TestProxy {
        let directory = temp_dir("remora-test");
        let config = directory.join("config.yaml");
        let text = if yaml.contains("bootstrap:") {
            yaml.to_owned()
        } else {
            format!(
                "bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 2s\n  initial_fetch_timeout: 20s\n---\n{yaml}"
            )
        };
        std::fs::write(&config, text).unwrap();
        let options = StartOptions {
            control_plane: Some(url.to_owned()),
            node_id: Some(node_id.to_owned()),
            ..StartOptions::default()
        };
        let proxy = Proxy::start_with(ConfigSource::File(config.clone()), options)
            .unwrap_or_else(|e| panic!("proxy did not start: {e}"));
        TestProxy { proxy: Some(proxy), directory, config }
    }

    /// Waits (up to 10 s) until `/ready` would answer 200.
    pub async fn wait_ready(&self) {
        crate::testing::eventually("the proxy is ready", std::time::Duration::from_secs(10), || async {
            self.proxy().is_ready()
        })
        .await;
    }

    /// `/config_dump`, parsed.
    pub async fn config_dump(&self) -> serde_json::Value {
        let (status, text) = self.admin_get("/config_dump").await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The proxy.
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().unwrap()
    }

    /// The bound address of listener `name`.
    pub fn address(&self, name: &str) -> SocketAddr {
        self.proxy().listener_address(name).unwrap_or_else(|| panic!("no listener {name:?}"))
    }

    /// The admin server's address.
    pub fn admin(&self) -> SocketAddr {
        self.proxy().admin_address()
    }

    /// The config file.
    pub fn config_path(&self) -> &PathBuf {
        &self.config
    }

    /// Replaces the config file atomically (write, then rename), as a deploy tool would. The file
    /// watcher picks it up; call [`TestProxy::reload`] to apply it at once instead.
    pub fn rewrite(&self, yaml: &str) {
        let staging = self.directory.join("config.yaml.new");
        std::fs::write(&staging, with_test_bootstrap(yaml)).unwrap();
        std::fs::rename(&staging, &self.config).unwrap();
    }

    /// Re-reads the config file now.
    pub fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        self.proxy().reload()
    }

    /// Fetches an admin path, returning status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let mut client = crate::testing::Client::http1(self.admin()).await;
        let reply = client.get("admin", path).await;
        (reply.status.as_u16(), reply.text())
    }

    /// The value of the metric line that starts with `series` (name and labels), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        drop(self.proxy.take());
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// Adds a bootstrap with an ephemeral admin port and one worker unless the YAML sets its own.
fn with_test_bootstrap(yaml: &str) -> String {
    if yaml.contains("bootstrap:") {
        yaml.to_owned()
    } else {
        format!("bootstrap:\n  admin_address: 127.0.0.1:0\n  workers: 1\n  drain_time: 2s\n---\n{yaml}")
    }
}
