//! The GitOps source: a directory of YAML resource files, watched.
//!
//! [`load`] reads every `*.yaml` / `*.yml` file under the directory (recursively, skipping hidden
//! entries such as `.git`), in path order, with the same parser as a proxy's `--config` file, and
//! returns the whole set with a version: the commit checked out when the directory is a git work
//! tree (so proxies report which commit they run), otherwise a hash of the files' content. Beside
//! Remora's resources, the files may hold standard Kubernetes manifests (any document with an
//! `apiVersion`: Services, EndpointSlices, Pods, a `List` of them), which come back as JSON for the
//! automatic mesh, so a cluster-less host or a git commit of the cluster's YAML configures proxies
//! as the API server would. A file that does not parse, a `bootstrap:` section, or a resource or
//! object defined twice fails the whole load with a message naming the file (and the field); the
//! caller keeps serving the previous set.
//!
//! [`watch`] follows the tree with `remora_control_api::watch` (the kernel's notifications on every
//! directory of the tree, so an edit is seen at once, with a slow metadata poll as a safety net and
//! as the only means where notifications are not available, such as some network file systems):
//! the resource files and the git files that name the commit. After a change it waits for the
//! directory to settle (a `git pull` or an editor writes several files) before it loads and hands
//! the result on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use remora_control_api::config::{self, ConfigError, MixedFile};
use remora_control_api::resource::describe;
use remora_control_api::watch::{FileStamp, FileWatch};
use remora_control_api::{Kind, Resource};

/// How often the directory's metadata is read when the kernel cannot tell us of changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often it is read anyway, in case a notification was missed.
pub const SAFETY_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long the directory must stay unchanged before a change is loaded. Tools that write several
/// files (git checkouts, `kubectl cp`, editors' save-by-rename) finish well within it.
pub const SETTLE_TIME: Duration = Duration::from_millis(10);

/// Why a directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// A file or the directory could not be read.
    #[error("read {path}: {error}")]
    Read {
        /// What could not be read.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// A file is not a valid resource document.
    #[error(transparent)]
    Parse(#[from] ConfigError),
    /// A file has a bootstrap section, which belongs to a proxy's own config file.
    #[error("{0}: a bootstrap section belongs in a proxy's own --config file, not in the control plane's directory")]
    Bootstrap(String),
    /// Two files (or one) define the same resource.
    #[error("{subject} is defined in both {first} and {second}")]
    Duplicate {
        /// The resource.
        subject: String,
        /// Where it was seen first.
        first: String,
        /// Where it was seen again.
        second: String,
    },
}

/// One reading of the directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Every resource, in file order.
    pub resources: Vec<Resource>,
    /// The Kubernetes objects among them (documents with an `apiVersion`: Services, EndpointSlices,
    /// Pods...), as JSON, in file order; the automatic mesh is made of them.
    pub kubernetes: Vec<serde_json::Value>,
    /// The git commit checked out, or `content-<hash>` outside a git work tree.
    pub version: String,
    /// How many files were read.
    pub files: usize,
}

/// Reads every resource file under `root`.
pub fn load(root: &Path) -> Result<Snapshot, DirectoryError> {
    Loader::default().load(root)
}

/// Loads a directory again and again, re-parsing only the files whose metadata changed: a one-line
/// route edit next to a file of ten thousand endpoints costs the edit, not the endpoints.
#[derive(Debug, Default)]
pub struct Loader {
    parsed: HashMap<PathBuf, (FileStamp, String, MixedFile)>,
    /// Files the last load read and parsed (the others came from the cache).
    reparsed: usize,
}

impl Loader {
    /// Reads every resource file under `root` (see [`load`]).
    pub fn load(&mut self, root: &Path) -> Result<Snapshot, DirectoryError> {
        let files = resource_files(root)?;
        let mut resources = Vec::new();
        let mut kubernetes = Vec::new();
        let mut seen: BTreeMap<(Kind, String), String> = BTreeMap::new();
        let mut seen_objects: BTreeMap<String, String> = BTreeMap::new();
        let mut content = Vec::new();
        let mut parsed = HashMap::with_capacity(files.len());
        self.reparsed = 0;
        for path in &files {
            let origin = path.strip_prefix(root).unwrap_or(path).display().to_string();
            let stamp = FileStamp::read(path);
            let (text_hash, file) = match self.parsed.remove(path) {
                Some((old, hash, cached)) if old == stamp && stamp.is_known() => (hash, cached),
                _ => {
                    self.reparsed += 1;
                    let text = config::read_text(path)
                        .map_err(|error| DirectoryError::Read { path: path.display().to_string(), error })?;
                    let file = config::parse_mixed(&text, &origin)?;
                    if file.config.bootstrap.is_some() {
                        return Err(DirectoryError::Bootstrap(origin));
                    }
                    (remora_control_api::xds::version_of(text.as_bytes()), file)
                }
            };
            for object in &file.kubernetes {
                let subject = object_name(object);
                if let Some(first) = seen_objects.insert(subject.clone(), origin.clone()) {
                    return Err(DirectoryError::Duplicate { subject, first, second: origin });
                }
            }
            for resource in &file.config.resources {
                let key = (resource.kind(), resource.name().to_owned());
                if let Some(first) = seen.get(&key) {
                    return Err(DirectoryError::Duplicate {
                        subject: describe(key.0, &key.1),
                        first: first.clone(),
                        second: origin,
                    });
                }
                seen.insert(key, origin.clone());
            }
            resources.extend(file.config.resources.iter().cloned());
            kubernetes.extend(file.kubernetes.iter().cloned());
            content.extend_from_slice(origin.as_bytes());
            content.push(0);
            content.extend_from_slice(text_hash.as_bytes());
            parsed.insert(path.clone(), (stamp, text_hash, file));
        }
        self.parsed = parsed;
        let version =
            git_commit(root).unwrap_or_else(|| format!("content-{}", remora_control_api::xds::version_of(&content)));
        Ok(Snapshot { resources, kubernetes, version, files: files.len() })
    }

    /// How many files the last load read and parsed; the rest were unchanged and came from the
    /// cache.
    pub fn reparsed(&self) -> usize {
        self.reparsed
    }
}

/// A Kubernetes object as `kind NAMESPACE/NAME (apiVersion)`, for messages.
fn object_name(object: &serde_json::Value) -> String {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("?").to_owned();
    let metadata = &object["metadata"];
    let namespace = metadata["namespace"].as_str().unwrap_or("default");
    format!("{} {namespace}/{} ({})", text(&object["kind"]), text(&metadata["name"]), text(&object["apiVersion"]))
}

/// The resource files under `root`, sorted.
fn resource_files(root: &Path) -> Result<Vec<PathBuf>, DirectoryError> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    let mut visited = HashSet::new();
    while let Some(dir) = pending.pop() {
        let read = |error| DirectoryError::Read { path: dir.display().to_string(), error };
        // A symlink loop (Kubernetes ConfigMap mounts use symlinked directories) is walked once.
        if !visited.insert(std::fs::canonicalize(&dir).map_err(read)?) {
            continue;
        }
        for entry in std::fs::read_dir(&dir).map_err(read)? {
            let entry = entry.map_err(read)?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            // Follow symlinks: metadata, not symlink_metadata.
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            if meta.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The git directory of the work tree holding `root`, and the common directory that keeps its refs
/// (the same, but for a linked work tree).
fn git_dirs(root: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut dir = std::fs::canonicalize(root).ok()?;
    let git = loop {
        let candidate = dir.join(".git");
        if candidate.is_dir() {
            break candidate;
        }
        if candidate.is_file() {
            // A linked work tree or submodule: `gitdir: <path>`.
            let text = std::fs::read_to_string(&candidate).ok()?;
            let target = PathBuf::from(text.strip_prefix("gitdir:")?.trim());
            break if target.is_absolute() { target } else { dir.join(target) };
        }
        if !dir.pop() {
            return None;
        }
    };
    // Linked work trees keep their refs in the common directory.
    let common =
        std::fs::read_to_string(git.join("commondir")).map(|c| git.join(c.trim())).unwrap_or_else(|_| git.clone());
    Some((git, common))
}

/// The commit checked out in the git work tree holding `root`, read from `.git` without running git.
pub fn git_commit(root: &Path) -> Option<String> {
    let (git, common) = git_dirs(root)?;
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:") else {
        return is_commit(head).then(|| head.to_owned());
    };
    let reference = reference.trim();
    for base in [&git, &common] {
        if let Ok(text) = std::fs::read_to_string(base.join(reference)) {
            let commit = text.trim();
            if is_commit(commit) {
                return Some(commit.to_owned());
            }
        }
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed.lines().find_map(|line| {
        let (commit, name) = line.split_once(' ')?;
        (name == reference && is_commit(commit)).then(|| commit.to_owned())
    })
}

fn is_commit(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The files whose stamps say whether the directory changed: the resource files, and the git files
/// that name the commit checked out (a checkout that only moves HEAD changes the version).
fn watched_files(root: &Path) -> Vec<PathBuf> {
    let mut files = resource_files(root).unwrap_or_default();
    if let Some((git, common)) = git_dirs(root) {
        files.push(git.join("HEAD"));
        if let Ok(head) = std::fs::read_to_string(git.join("HEAD"))
            && let Some(reference) = head.trim().strip_prefix("ref:")
        {
            files.push(git.join(reference.trim()));
            files.push(common.join(reference.trim()));
        }
        files.push(common.join("packed-refs"));
    }
    files
}

/// Watches `root` and calls `on_change` with each new load result. The first call is made at once.
pub async fn watch(root: PathBuf, mut on_change: impl FnMut(Result<Snapshot, DirectoryError>)) {
    let mut loader = Loader::default();
    let mut watch = FileWatch::tree(root.clone(), watched_files, SAFETY_POLL_INTERVAL)
        .poll_without_notifications(POLL_INTERVAL)
        .settle(SETTLE_TIME);
    on_change(loader.load(&root));
    loop {
        watch.changed().await;
        on_change(loader.load(&root));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn loads_every_yaml_file_in_order_and_skips_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("shop")).unwrap();
        std::fs::create_dir_all(dir.path().join(".hidden")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), "kind: Cluster\nname: b\n").unwrap();
        std::fs::write(dir.path().join("shop/a.yml"), "kind: Cluster\nname: a\n").unwrap();
        std::fs::write(dir.path().join(".hidden/x.yaml"), "kind: Cluster\nname: x\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let snapshot = load(dir.path()).unwrap();
        let names: Vec<&str> = snapshot.resources.iter().map(|r| r.name()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(snapshot.files, 2);
        assert!(snapshot.version.starts_with("content-"), "{}", snapshot.version);
        let again = load(dir.path()).unwrap();
        assert_eq!(again.version, snapshot.version);
    }

    /// The loader parses again only the files that changed (by their stamps); the rest come from
    /// its cache, and any change — even a rewrite that keeps the size and puts the modification
    /// time back — is read.
    /// Kubernetes manifests (a `List` flattened) come back beside the resources, in file order; an
    /// object defined in two files is refused, naming both.
    #[test]
    fn kubernetes_manifests_load_beside_resources() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "kind: Cluster\nname: a\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: web-1, namespace: shop}}\n",
        )
        .unwrap();
        let snapshot = load(dir.path()).unwrap();
        assert_eq!(snapshot.resources.len(), 1);
        let kinds: Vec<&str> = snapshot.kubernetes.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(kinds, ["Service", "Pod"]);
        std::fs::write(
            dir.path().join("c.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n",
        )
        .unwrap();
        let error = load(dir.path()).unwrap_err().to_string();
        assert_eq!(error, "Service shop/web (v1) is defined in both a.yaml and c.yaml");
    }

    #[test]
    fn the_loader_reparses_only_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, "kind: Cluster\nname: a\n").unwrap();
        std::fs::write(dir.path().join("small.yaml"), "kind: Cluster\nname: b\n").unwrap();
        let mut loader = Loader::default();
        let first = loader.load(dir.path()).unwrap();
        assert_eq!(loader.reparsed(), 2);
        std::fs::write(dir.path().join("small.yaml"), "kind: Cluster\nname: c\n").unwrap();
        let second = loader.load(dir.path()).unwrap();
        assert_eq!(loader.reparsed(), 1, "only the edited file is parsed again");
        let names: Vec<&str> = second.resources.iter().map(|r| r.name()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_ne!(first.version, second.version);
        let modified = std::fs::metadata(&big).unwrap().modified().unwrap();
        std::fs::write(&big, "kind: Cluster\nname: z\n").unwrap();
        std::fs::File::options().write(true).open(&big).unwrap().set_modified(modified).unwrap();
        let third: Vec<String> =
            loader.load(dir.path()).unwrap().resources.iter().map(|r| r.name().to_owned()).collect();
        assert_eq!(third, ["z", "c"]);
        assert_eq!(loader.reparsed(), 1);
        assert_eq!(loader.load(dir.path()).unwrap().resources.len(), 2);
        assert_eq!(loader.reparsed(), 0, "nothing changed");
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "kind: Cluster\nname: a\n").unwrap();
        std::fs::write(dir.path().join("b.yaml"), "kind: Cluster\nname: a\n").unwrap();
        let error = load(dir.path()).unwrap_err().to_string();
        assert_eq!(error, "cluster \"a\" is defined in both a.yaml and b.yaml");
        std::fs::write(dir.path().join("b.yaml"), "kind: Cluster\nname: b\nbalancer: fastest\n").unwrap();
        let error = load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("b.yaml") && error.contains("balancer"), "{error}");
        std::fs::write(dir.path().join("b.yaml"), "bootstrap: {}\n").unwrap();
        assert!(matches!(load(dir.path()), Err(DirectoryError::Bootstrap(_))));
    }

    /// A file whose aliases would expand to 10^8 nodes is refused, naming the file, before it is
    /// built; the next good edit loads.
    #[test]
    fn an_alias_bomb_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "kind: Cluster\nname: a\n").unwrap();
        std::fs::write(dir.path().join("b.yaml"), remora_control_api::testing::alias_bomb(10_000)).unwrap();
        let error = load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("b.yaml") && error.contains("expands past its limit"), "{error}");
        std::fs::write(dir.path().join("b.yaml"), "kind: Cluster\nname: b\n").unwrap();
        assert_eq!(load(dir.path()).unwrap().resources.len(), 2);
    }

    #[tokio::test]
    async fn watch_reports_edits_new_files_deletions_and_new_directories_quickly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "kind: Cluster\nname: a\n").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch(dir.path().to_path_buf(), move |result| {
            let _ = tx.send(result.map(|s| s.resources.len()).map_err(|e| e.to_string()));
        }));
        let mut next = async || {
            tokio::time::timeout(Duration::from_millis(900), rx.recv()).await.expect("no reload within 900 ms").unwrap()
        };
        assert_eq!(next().await, Ok(1));
        std::fs::write(dir.path().join("b.yaml"), "kind: Cluster\nname: b\n").unwrap();
        assert_eq!(next().await, Ok(2));
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(next().await, Ok(1));
        std::fs::create_dir(dir.path().join("more")).unwrap();
        std::fs::write(dir.path().join("more/c.yaml"), "kind: Cluster\nname: c\n").unwrap();
        assert_eq!(next().await, Ok(2));
        std::fs::write(dir.path().join("more/c.yaml"), "kind: Cluster\nname: c\nbalancer: nope\n").unwrap();
        assert!(next().await.unwrap_err().contains("balancer"));
        watcher.abort();
    }

    #[test]
    fn a_git_work_tree_is_versioned_by_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let git = dir.path().join(".git");
        std::fs::create_dir_all(git.join("refs/heads")).unwrap();
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::write(git.join("packed-refs"), format!("# pack-refs\n{commit} refs/heads/main\n")).unwrap();
        std::fs::create_dir_all(dir.path().join("deploy")).unwrap();
        assert_eq!(git_commit(&dir.path().join("deploy")).as_deref(), Some(commit));
        let newer = "89abcdef0123456789abcdef0123456789abcdef";
        std::fs::write(git.join("refs/heads/main"), format!("{newer}\n")).unwrap();
        assert_eq!(load(dir.path()).unwrap().version, newer);
        std::fs::write(git.join("HEAD"), format!("{commit}\n")).unwrap();
        assert_eq!(git_commit(dir.path()).as_deref(), Some(commit));
    }
}
