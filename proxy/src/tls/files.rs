//! Credentials from files on disk: a PEM certificate chain, its key and a trust bundle, re-read
//! whenever one of them changes.
//!
//! For hosts without a control plane (or with certificates from another issuer: cert-manager,
//! Vault, SPIRE's helper writing files). [`CertFiles::load`] reads and checks the three files once,
//! at start-up, where a bad set fails the start; [`watch`] then polls their modification times and
//! sizes and installs each new set that checks out. A set that does not (a half-written rename, a key
//! that does not match) is logged and counted, and the certificate in use keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::{Credentials, MeshTls, TlsError};

/// The three files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM trust bundle.
    pub ca: PathBuf,
}

impl CertFiles {
    /// Reads and checks them.
    pub fn load(&self) -> Result<Credentials, TlsError> {
        let read =
            |path: &PathBuf| std::fs::read(path).map_err(|e| TlsError::Credentials(format!("{}: {e}", path.display())));
        let (cert, key, ca) = (read(&self.cert)?, read(&self.key)?, read(&self.ca)?);
        Credentials::from_pem(&cert, &key, &ca)
    }

    fn stamp(&self) -> [Option<(SystemTime, u64)>; 3] {
        [&self.cert, &self.key, &self.ca].map(|path| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.modified().ok()?, metadata.len()))
        })
    }
}

/// Polls `files` every `interval` and installs each changed set into `mesh`. Runs until dropped.
pub async fn watch(files: CertFiles, mesh: Arc<MeshTls>, interval: Duration) {
    let mut seen = files.stamp();
    loop {
        tokio::time::sleep(interval).await;
        let now = files.stamp();
        if now == seen {
            continue;
        }
        seen = now;
        match files.load().and_then(|credentials| {
            let identity = credentials.identity().clone();
            mesh.install(credentials).map(|()| identity)
        }) {
            Ok(identity) => {
                mesh.stats().renewal("ok");
                info!(%identity, cert = %files.cert.display(), "certificate files reloaded");
            }
            Err(error) => {
                mesh.stats().renewal("failed");
                warn!(%error, cert = %files.cert.display(), "certificate files rejected; the certificate in use keeps serving");
            }
        }
    }
}
