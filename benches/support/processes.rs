//! What the process-level benches share: free loopback ports, `remora` processes pinned to a CPU
//! and killed when dropped, their readiness, and the CPU time they spent (from `/proc`).
//!
//! Included by each bench with `#[path = "support/processes.rs"] mod processes;`; a bench uses what
//! it needs of it, hence `dead_code` allowed.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The number in environment variable `name`, or `default`.
pub(crate) fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_to_cpu(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// Four free loopback ports (bound, read back and released: a bench runs alone).
pub(crate) fn free_ports() -> [u16; 4] {
    let sockets: Vec<std::net::TcpListener> =
        (0..4).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let ports: Vec<u16> = sockets.iter().map(|s| s.local_addr().unwrap().port()).collect();
    [ports[0], ports[1], ports[2], ports[3]]
}

/// A child process killed when dropped.
pub(crate) struct Killed(pub(crate) Child);

impl Killed {
    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `remora proxy --config` on CPU 1 and waits for `port`.
pub(crate) fn spawn_proxy(dir: &Path, name: &str, config: &str, port: u16) -> Killed {
    spawn_proxy_with(dir, name, config, port, &[])
}

/// The same, with `extra` arguments.
pub(crate) fn spawn_proxy_with(dir: &Path, name: &str, config: &str, port: u16, extra: &[&str]) -> Killed {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let mut args = vec!["proxy", "--config", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    spawn_remora(1, &args, port)
}

/// Runs `remora args` pinned to `cpu` and waits for `port`.
pub(crate) fn spawn_remora(cpu: usize, args: &[&str], port: u16) -> Killed {
    let child = Command::new("taskset")
        .args(["-c", &cpu.to_string(), env!("CARGO_BIN_EXE_remora")])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("taskset and the remora binary");
    wait_port(port);
    Killed(child)
}

/// `GET path` from the admin server on `port`: the whole answer, empty if it could not be had.
pub(crate) fn admin_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut answer = String::new();
    if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes());
        let _ = stream.read_to_string(&mut answer);
    }
    answer
}

/// Waits until the admin server on `port` answers `/ready` with 200 (the control plane's first
/// configuration applied).
pub(crate) fn wait_ready(port: u16) {
    for _ in 0..400 {
        if admin_get(port, "/ready").starts_with("HTTP/1.1 200") {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the proxy with admin port {port} never became ready");
}

/// Waits until something accepts on loopback `port`.
pub(crate) fn wait_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("port {port} never opened");
}

/// User plus system CPU seconds of process `pid`, all its threads.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command name: state is field 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
pub(crate) fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().ok();
        out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
    })
}
