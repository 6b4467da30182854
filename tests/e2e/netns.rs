//! Network namespaces for the root-only tests (`transparent`, `capture`): create, run commands in,
//! enter from a thread, and spawn the `remora` binary inside as the proxy's uid; plus the blocking
//! socket helpers those tests use from inside a namespace.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// The uid (and gid) the proxy runs as, which the capture rules exempt.
pub(crate) const PROXY_UID: &str = "1337";

/// Whether the test can make namespaces; if not, prints why it is skipped.
pub(crate) fn can_run(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("skipped {test}: it needs root (network namespaces, iptables); CI runs it as root");
    }
    root
}

/// A network namespace, deleted on drop.
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    /// A fresh namespace named after `tag` and this process, with its loopback up.
    pub(crate) fn create(tag: &str) -> Netns {
        let name = format!("remora-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.run("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// The same namespace, without deleting it on drop (for threads that use it).
    pub(crate) fn borrow(&self) -> std::mem::ManuallyDrop<Netns> {
        std::mem::ManuallyDrop::new(Netns { name: self.name.clone() })
    }

    /// Runs a command inside the namespace and returns its stdout; panics if it fails.
    pub(crate) fn run(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates live there.
    pub(crate) fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).unwrap();
            move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network)).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// Spawns `remora args` inside the namespace as uid and gid 1337, its stderr to `log`. uid 1337
    /// must be able to run the binary and read its files: the build directory may be private (a
    /// `mktemp -d` checkout is mode 700), so the binary is copied into `directory`, made readable.
    /// The process is killed when the handle drops, so a failed test leaves none behind.
    pub(crate) fn spawn_proxy(&self, directory: &Path, args: &[&str], log: &Path) -> Running {
        let binary = directory.join("remora");
        if !binary.exists() {
            std::fs::copy(env!("CARGO_BIN_EXE_remora"), &binary).unwrap();
            std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let child = Command::new("nsenter")
            .args([&format!("--net=/run/netns/{}", self.name), "-S", PROXY_UID, "-G", PROXY_UID])
            .arg(&binary)
            .args(args)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Running(child)
    }
}

/// A process started in a namespace; killed on drop.
pub(crate) struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Joins two namespaces with a veth pair, each end (named by its prefix and this process) up with
/// its address in a /24; the two ends' device names.
pub(crate) fn link(a: (&Netns, &str, &str), b: (&Netns, &str, &str)) -> [String; 2] {
    let suffix = std::process::id() % 100_000;
    let ends = [a, b].map(|(ns, prefix, ip)| (ns, format!("{prefix}{suffix}"), ip));
    run("ip", &["link", "add", &ends[0].1, "type", "veth", "peer", "name", &ends[1].1]);
    for (ns, device, ip) in &ends {
        run("ip", &["link", "set", device, "netns", &ns.name]);
        ns.run("ip", &["addr", "add", &format!("{ip}/24"), "dev", device]);
        ns.run("ip", &["link", "set", device, "up"]);
    }
    ends.map(|(_, device, _)| device)
}

/// Runs a command; its stdout, or a panic with its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Sends `request` to `address` and reads until the server closes.
pub(crate) fn exchange(address: SocketAddr, request: &[u8]) -> String {
    try_exchange(address, request).unwrap_or_else(|e| panic!("{address}: {e}"))
}

pub(crate) fn try_exchange(address: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    stream.shutdown(Shutdown::Write)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// Waits (from inside the namespace) until the admin server at `admin` answers `/ready` with 200.
pub(crate) fn wait_ready(admin: SocketAddr, log: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = || {
        try_exchange(admin, b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    };
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never became ready; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The admin server's `/metrics` text.
pub(crate) fn metrics(admin: SocketAddr) -> String {
    exchange(admin, b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
}

/// The value of the series that starts with `series` (name and labels, then a space), 0 if absent.
pub(crate) fn value(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(series)).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A private directory for one test's files.
pub(crate) fn temp_dir(tag: &str) -> PathBuf {
    remora_proxy::testing::proxy::temp_dir(tag)
}
