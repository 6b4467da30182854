//! `remora`: the one binary, for the sidecar proxy and its tools. This file only parses the command
//! line, sets up logging and dispatches; the work lives in the `remora-proxy` and
//! `remora-control-api` crates.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use remora_proxy::ConfigSource;
use remora_proxy::demo::DemoOptions;
use tracing_subscriber::EnvFilter;

/// Remora: a service-mesh sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "remora", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar proxy.
    ///
    /// With no --config it runs on built-in defaults: a transparent outbound listener on
    /// 127.0.0.1:15001 and inbound listener on 0.0.0.0:15006, passing traffic through to its original
    /// destination, and the admin server on 127.0.0.1:15000. The config file is watched: edits apply
    /// live (so does SIGHUP); a file that fails validation is rejected and the old config keeps
    /// serving. SIGTERM drains and exits.
    Proxy {
        /// YAML config file (bootstrap and resources).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run a local demo mesh: two sample services behind a proxy on built-in defaults, a burst of
    /// traffic and its summary, then serve until Ctrl-C.
    Demo {
        /// The proxy's outbound listener.
        #[arg(long, default_value = "127.0.0.1:15001", value_name = "ADDR")]
        listen: SocketAddr,
        /// The proxy's admin server.
        #[arg(long, default_value = "127.0.0.1:15000", value_name = "ADDR")]
        admin: SocketAddr,
        /// Requests in the opening burst.
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    /// Check a config file without running it: exits 0 if valid, else prints every problem, each
    /// naming its resource and field, and exits 1.
    Validate {
        /// YAML config file.
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Proxy { config } => {
            let source = config.map_or_else(ConfigSource::defaults, ConfigSource::File);
            remora_proxy::run(source)
        }
        Command::Demo { listen, admin, requests } => {
            remora_proxy::demo::run(DemoOptions { listen, admin, requests, ..DemoOptions::default() })
        }
        Command::Validate { config } => remora_proxy::bootstrap::load(&ConfigSource::File(config.clone()))
            .map(|loaded| {
                println!(
                    "{}: valid ({} resources, version {})",
                    config.display(),
                    loaded.resources.len(),
                    loaded.version
                )
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
