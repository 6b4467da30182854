//! Following files for changes: the one watcher behind everything in Remora that follows a file —
//! a proxy's config file and certificate files, the control plane's bootstrap tokens, and its
//! GitOps directory.
//!
//! A change is a change of a file's [`FileStamp`]: its modification and status-change times to the
//! nanosecond, size, inode and device, or whether it exists at all. Stamps are cheap to take (one
//! `stat`, never the content), and every way of changing a file moves one of them: a write (even
//! one that keeps the size, or restores the modification time), a truncation, a rename over the
//! file (editors' save-by-rename, Kubernetes ConfigMap updates, which swap a symlink), a `chmod`.
//!
//! A [`FileWatch`] follows a set of files, or a directory tree and the files a lister finds in it.
//! It hears of changes from the kernel at once (inotify on each file's directory, or on every
//! directory of the tree), and reads the stamps again every `poll` anyway, as a safety net and as
//! the only means where inotify is not available (some network file systems). A change is reported
//! once it has settled: the stamps must hold still for `settle` (a `git pull` or an editor writes
//! several files), for at most a second. [`FileWatch::changed`] compares against what the watch
//! last reported, and the first stamps are taken when the watch is made, so a change made between
//! making it and first awaiting it is still reported.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest a stream of changes can hold a report back.
const MAX_SETTLE: Duration = Duration::from_secs(1);

/// What identifies a file's state without reading it: `None` when it cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp(Option<Stat>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Stat {
    modified: (i64, i64),
    changed: (i64, i64),
    size: u64,
    inode: u64,
    device: u64,
}

impl FileStamp {
    /// Reads `path`'s metadata now, following symlinks.
    pub fn read(path: &Path) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp(std::fs::metadata(path).ok().map(|m| Stat {
            modified: (m.mtime(), m.mtime_nsec()),
            changed: (m.ctime(), m.ctime_nsec()),
            size: m.size(),
            inode: m.ino(),
            device: m.dev(),
        }))
    }

    /// Whether the file could be read.
    pub fn is_known(&self) -> bool {
        self.0.is_some()
    }
}

/// Finds the files of a followed tree under its root.
type Lister = Box<dyn Fn(&Path) -> Vec<PathBuf> + Send + Sync>;

/// What a watch follows.
enum Followed {
    /// These files.
    Files(Vec<PathBuf>),
    /// The files `list` finds under `root`, whichever they are at each look.
    Tree { root: PathBuf, list: Lister },
}

impl Followed {
    fn stamps(&self) -> Vec<(PathBuf, FileStamp)> {
        let files = match self {
            Followed::Files(files) => files.clone(),
            Followed::Tree { root, list } => list(root),
        };
        files
            .into_iter()
            .map(|path| {
                let stamp = FileStamp::read(&path);
                (path, stamp)
            })
            .collect()
    }
}

/// Follows files for changes: see the module documentation.
pub struct FileWatch {
    followed: Followed,
    last: Vec<(PathBuf, FileStamp)>,
    poll: Duration,
    /// The poll when there are no notifications.
    poll_alone: Duration,
    settle: Duration,
    /// Made on the first wait (it needs the runtime); `None` inside once inotify failed.
    notify: Option<Option<Notify>>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch").field("files", &self.last.len()).field("poll", &self.poll).finish()
    }
}

impl FileWatch {
    /// Follows `files`, reading them at least every `poll`; their stamps are taken now.
    pub fn files(files: Vec<PathBuf>, poll: Duration) -> FileWatch {
        FileWatch::new(Followed::Files(files), poll)
    }

    /// Follows the files `list` finds under `root` (and the tree's directories, for new files),
    /// reading them at least every `poll`; their stamps are taken now.
    pub fn tree(
        root: PathBuf,
        list: impl Fn(&Path) -> Vec<PathBuf> + Send + Sync + 'static,
        poll: Duration,
    ) -> FileWatch {
        FileWatch::new(Followed::Tree { root, list: Box::new(list) }, poll)
    }

    fn new(followed: Followed, poll: Duration) -> FileWatch {
        let last = followed.stamps();
        FileWatch { followed, last, poll, poll_alone: poll, settle: Duration::ZERO, notify: None }
    }

    /// Reads the files every `poll` instead when the kernel cannot notify changes (by default the
    /// same poll): a tree whose notifications come at once can afford a slow safety net.
    pub fn poll_without_notifications(mut self, poll: Duration) -> FileWatch {
        self.poll_alone = poll;
        self
    }

    /// Reports a change only once the stamps have held still for `settle`.
    pub fn settle(mut self, settle: Duration) -> FileWatch {
        self.settle = settle;
        self
    }

    /// Waits until a followed file has changed since the last report (or since the watch was made),
    /// and has settled. Must run inside a tokio runtime.
    pub async fn changed(&mut self) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let mut now = self.followed.stamps();
            if now != self.last {
                let started = tokio::time::Instant::now();
                while !self.settle.is_zero() && started.elapsed() < MAX_SETTLE {
                    tokio::time::sleep(self.settle).await;
                    let again = self.followed.stamps();
                    if again == now {
                        break;
                    }
                    now = again;
                }
                self.last = now;
                return;
            }
            let notify = self.notify.get_or_insert_with(|| match Notify::new(&self.followed) {
                Ok(notify) => Some(notify),
                Err(error) => {
                    tracing::warn!(%error, "no change notifications for followed files; polling them");
                    None
                }
            });
            match notify {
                Some(notify) => {
                    tokio::select! {
                        _ = tick.tick() => {}
                        result = notify.wait(&self.followed) => if let Err(error) = result {
                            tracing::warn!(%error, "change notifications failed; polling followed files");
                            self.notify = Some(None);
                            tick = tokio::time::interval(self.poll_alone);
                        }
                    }
                }
                None => {
                    if tick.period() != self.poll_alone {
                        tick = tokio::time::interval(self.poll_alone);
                        tick.tick().await;
                    }
                    tick.tick().await;
                }
            }
        }
    }
}

/// The directory holding `file` (`.` for a bare name).
fn directory_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// inotify watches on the directories that hold the followed files (a file's own watch would not
/// survive a rename over it), or on every directory of a followed tree.
struct Notify {
    fd: tokio::io::unix::AsyncFd<rustix::fd::OwnedFd>,
}

impl Notify {
    fn new(followed: &Followed) -> std::io::Result<Notify> {
        use rustix::fs::inotify::{CreateFlags, init};
        let fd = init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        // `AsyncFd::new` is deprecated because an arbitrary `AsRawFd` type could close or swap its
        // descriptor while registered; an `OwnedFd` moved into the AsyncFd cannot, which is exactly
        // what the safe-but-unsafe-marked `register` would demand of us.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(fd)?;
        let notify = Notify { fd };
        notify.watch(followed);
        Ok(notify)
    }

    /// Watches the directories `followed` needs; adding a watch twice is harmless.
    fn watch(&self, followed: &Followed) {
        use rustix::fs::inotify::{WatchFlags, add_watch};
        let flags = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MODIFY
            | WatchFlags::CLOSE_WRITE
            | WatchFlags::MOVE
            | WatchFlags::ATTRIB
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF;
        let mut pending: Vec<PathBuf> = match followed {
            Followed::Files(files) => files.iter().map(|file| directory_of(file)).collect(),
            Followed::Tree { root, .. } => vec![root.clone(), root.join(".git")],
        };
        let recursive = matches!(followed, Followed::Tree { .. });
        let mut seen = HashSet::new();
        while let Some(dir) = pending.pop() {
            if !dir.is_dir() || !seen.insert(std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone())) {
                continue;
            }
            let _ = add_watch(self.fd.get_ref(), &dir, flags);
            if !recursive || dir.file_name().is_some_and(|n| n == ".git") {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if !entry.file_name().to_string_lossy().starts_with('.') {
                        pending.push(entry.path());
                    }
                }
            }
        }
    }

    /// Waits for events, drains them, and watches any new directories.
    async fn wait(&mut self, followed: &Followed) -> std::io::Result<()> {
        let mut buffer = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut reader = rustix::fs::inotify::Reader::new(guard.get_inner(), &mut buffer);
            let mut any = false;
            loop {
                match reader.next() {
                    Ok(_) => any = true,
                    Err(rustix::io::Errno::AGAIN) => break,
                    Err(error) => return Err(error.into()),
                }
            }
            guard.clear_ready();
            if any {
                self.watch(followed);
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    async fn reported(watch: &mut FileWatch) -> bool {
        tokio::time::timeout(Duration::from_millis(900), watch.changed()).await.is_ok()
    }

    /// Every way of changing a file is a change: a rewrite of the same size with its modification
    /// time put back, a rename over it, its removal and return.
    #[tokio::test]
    async fn every_way_of_changing_a_file_is_reported_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        // A slow poll: only notifications can report within the test's limit.
        let mut watch = FileWatch::files(vec![path.clone()], Duration::from_secs(30));
        assert!(!reported(&mut watch).await, "nothing changed yet");

        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, "a: 2\n").unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(modified).unwrap();
        assert!(reported(&mut watch).await, "a same-size rewrite with its old modification time");

        let next = dir.path().join("config.yaml.tmp");
        std::fs::write(&next, "a: 3\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert!(reported(&mut watch).await, "a rename over the file");

        std::fs::remove_file(&path).unwrap();
        assert!(reported(&mut watch).await, "removed");
        std::fs::write(&path, "a: 4\n").unwrap();
        assert!(reported(&mut watch).await, "back");
        assert!(!reported(&mut watch).await, "and nothing since");
    }

    /// A change made after the watch was made and before it was first awaited is reported.
    #[tokio::test]
    async fn a_change_before_the_first_wait_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "x").unwrap();
        let mut watch = FileWatch::files(vec![path.clone()], Duration::from_secs(30));
        std::fs::write(&path, "xy").unwrap();
        assert!(reported(&mut watch).await);
    }

    fn files_under(root: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.path().is_dir() {
                    pending.push(entry.path());
                } else {
                    files.push(entry.path());
                }
            }
        }
        files.sort();
        files
    }

    /// A tree reports a file in a new directory, and then edits there: new directories are
    /// watched as they appear.
    #[tokio::test]
    async fn a_tree_reports_files_in_new_directories() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = FileWatch::tree(dir.path().to_path_buf(), files_under, Duration::from_secs(30));
        std::fs::create_dir(dir.path().join("shop")).unwrap();
        std::fs::write(dir.path().join("shop/a.yaml"), "a").unwrap();
        assert!(reported(&mut watch).await, "a file in a new directory");
        std::fs::write(dir.path().join("shop/a.yaml"), "ab").unwrap();
        assert!(reported(&mut watch).await, "an edit there");
    }

    /// A change is reported once the files hold still: here a writer adds a file every time the
    /// watch looks, five times, and the one report sees all five.
    #[tokio::test]
    async fn a_burst_of_writes_is_one_report_once_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let looks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = {
            let looks = looks.clone();
            move |root: &Path| {
                let look = looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if (1..=5).contains(&look) {
                    std::fs::write(root.join(format!("{look}.yaml")), "x").unwrap();
                }
                files_under(root)
            }
        };
        let mut watch = FileWatch::tree(dir.path().to_path_buf(), writer, Duration::from_millis(20))
            .settle(Duration::from_millis(5));
        assert!(reported(&mut watch).await);
        assert_eq!(watch.last.len(), 5, "one report, once the writes stopped");
        assert!(!reported(&mut watch).await);
    }
}
