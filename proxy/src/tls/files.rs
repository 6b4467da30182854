//! Credentials from files on disk: a PEM certificate chain, its key and a trust bundle, re-read
//! whenever one of them changes.
//!
//! For hosts without a control plane (or with certificates from another issuer: cert-manager,
//! Vault, SPIRE's helper writing files). [`CertFiles::load`] reads and checks the three files once,
//! at start-up, where a bad set fails the start; [`watch`] then follows them
//! (`remora_control_api::watch`) and installs each new set that checks out. A set that does not (a half-written rename, a key
//! that does not match) is logged and counted, and the certificate in use keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use remora_control_api::watch::FileWatch;

use tracing::{info, warn};

use super::{Credentials, MeshTls, TlsError};
use crate::limits;

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

/// Reads a PEM file of at most `limits::MAX_PEM_FILE_BYTES`: a certificate chain or a key is a few
/// kilobytes, and a path that names something endless (`/dev/zero`) or that may never answer (a
/// pipe) must not hold a reload, so only a regular file (or a link to one, as Kubernetes mounts
/// secrets) is read.
pub(crate) fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let metadata = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    let limit = limits::MAX_PEM_FILE_BYTES;
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{}: larger than {limit} bytes", path.display()));
    }
    Ok(bytes)
}

impl CertFiles {
    /// Reads and checks them.
    pub fn load(&self) -> Result<Credentials, TlsError> {
        let read = |path: &PathBuf| read_pem(path).map_err(TlsError::Credentials);
        let (cert, key, ca) = (read(&self.cert)?, read(&self.key)?, read(&self.ca)?);
        Credentials::from_pem(&cert, &key, &ca)
    }
}

/// Follows `files` (reading them at least every `interval`) and installs each changed set into
/// `mesh`. Runs until dropped.
pub async fn watch(files: CertFiles, mesh: Arc<MeshTls>, interval: Duration) {
    let paths = vec![files.cert.clone(), files.key.clone(), files.ca.clone()];
    let mut watch = FileWatch::files(paths, interval).settle(limits::FILE_SETTLE_TIME);
    loop {
        watch.changed().await;
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
