//! `remora`: the one binary, for the sidecar proxy, its control plane and their tools. This file only
//! parses the command line, sets up logging and dispatches; the work lives in the `remora-proxy`,
//! `remora-control-plane` and `remora-control-api` crates, and `remora demo` in [`demo`].

mod demo;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Parser, Subcommand};
use demo::DemoOptions;
use remora_control_plane::ca::kubernetes::DEFAULT_AUDIENCE;
use remora_control_plane::inject::{InjectConfig, Injector};
use remora_control_plane::plane::{
    self, CaConfig, CaRoot, ControlConfig, InjectorConfig, InjectorTls, KubernetesApi, KubernetesObjects,
};
use remora_control_plane::sources::registry::{self, Registered};
use remora_proxy::capture::{self, Capture};
use remora_proxy::{ConfigSource, StartOptions};

/// Remora: a service-mesh sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "remora", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar proxy.
    ///
    /// With no --config it runs on built-in defaults: a transparent outbound listener on
    /// 127.0.0.1:15001 and inbound listener on 0.0.0.0:15006, passing traffic through to its original
    /// destination, and the admin server on 127.0.0.1:15000. The config file is watched: edits apply
    /// live (so does SIGHUP); a file that fails validation is rejected and the old config keeps
    /// serving. SIGTERM drains and exits.
    ///
    /// With --control it also takes resources from a control plane (`remora control`), on top of the
    /// --config file's (or the built-in defaults'), and becomes ready once the control plane's first
    /// configuration has arrived.
    Proxy {
        /// YAML config file (bootstrap and resources).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// The control plane to take resources from, e.g. http://127.0.0.1:15010 (overrides the
        /// bootstrap's control_plane).
        #[arg(long, value_name = "URL")]
        control: Option<String>,
        /// This proxy's name to the control plane (overrides the bootstrap's node_id; default: the
        /// host name).
        #[arg(long, value_name = "ID")]
        node_id: Option<String>,
        /// This proxy's workload identity, spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/ACCOUNT, to be
        /// issued by the control plane's CA (overrides the bootstrap's identity.spiffe_id). Needs
        /// --token-file.
        #[arg(long, value_name = "SPIFFE-ID", conflicts_with = "tls_cert")]
        identity: Option<String>,
        /// File holding the token that authenticates this proxy to the CA.
        #[arg(long, value_name = "FILE")]
        token_file: Option<String>,
        /// PEM certificate chain to use instead of the CA (with --tls-key and --tls-ca); the files
        /// are watched and reloaded on change.
        #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
        tls_cert: Option<String>,
        /// PEM private key of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<String>,
        /// PEM trust bundle: the roots peer sidecars' certificates must chain to.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_ca: Option<String>,
        /// PEM roots an https:// control plane's certificate must chain to (the CA's ca.crt).
        /// Without it, the PEM text of the environment variable REMORA_CONTROL_CA, if set.
        #[arg(long, value_name = "FILE")]
        control_ca: Option<String>,
        /// The admin server's address (overrides the bootstrap's admin_address), e.g. 0.0.0.0:15000
        /// for kubelet probes and Prometheus in a pod.
        #[arg(long, value_name = "ADDR")]
        admin: Option<String>,
    },
    /// Run the control plane: serve the resources of a directory of YAML files (and endpoints
    /// registered in etcd) to every connected proxy over Delta ADS, pushing each change live.
    #[command(group(ArgGroup::new("ca_auth").args(["ca_tokens", "ca_kubernetes"]).multiple(true)))]
    #[command(group(ArgGroup::new("kubernetes_users").args(["ca_kubernetes", "injector_webhook", "kubernetes_endpoints", "kubernetes_mesh"]).multiple(true)))]
    Control {
        /// Directory of resource files (the proxy's --config format, resources only), watched. A git
        /// work tree is versioned by its checked-out commit.
        #[arg(long, value_name = "DIR")]
        config_dir: Option<PathBuf>,
        /// Address for gRPC (Delta ADS) and the operator endpoints (/metrics, /config_dump, /ready).
        #[arg(long, default_value = "127.0.0.1:15010", value_name = "ADDR")]
        listen: SocketAddr,
        /// etcd to read registered endpoints from, e.g. http://127.0.0.1:2379.
        #[arg(long, value_name = "URL")]
        etcd: Option<String>,
        /// Key prefix of the registry in etcd.
        #[arg(long, default_value = registry::DEFAULT_PREFIX, value_name = "PREFIX")]
        etcd_prefix: String,
        /// Run the certificate authority, its root in this directory (ca.crt, ca.key; generated
        /// there on first start). Needs --ca-tokens.
        #[arg(long, value_name = "DIR", conflicts_with = "ca_cert", requires = "ca_auth")]
        ca_dir: Option<PathBuf>,
        /// Run the certificate authority with this PEM root certificate (with --ca-key), or a chain:
        /// the signing intermediate first, then its issuers up to the self-signed root.
        #[arg(long, value_name = "FILE", requires_all = ["ca_key", "ca_auth"])]
        ca_cert: Option<PathBuf>,
        /// The PEM private key of --ca-cert.
        #[arg(long, value_name = "FILE", requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Bootstrap tokens: one per line, `TOKEN SPIFFE-ID-PATTERN...`, the identities each token
        /// may be issued. Re-read when it changes (a broken file is refused, the old tokens stay).
        #[arg(long, value_name = "FILE")]
        ca_tokens: Option<PathBuf>,
        /// Accept Kubernetes service-account tokens too, checked with the API server's TokenReview:
        /// account NS/SA may be issued spiffe://TRUST-DOMAIN/ns/NS/sa/SA. In a pod the API server and
        /// credentials come from the environment; outside one, give --kubernetes-api and the rest.
        #[arg(long)]
        ca_kubernetes: bool,
        /// The audience service-account tokens must be issued for.
        #[arg(long, default_value = DEFAULT_AUDIENCE, value_name = "AUDIENCE", requires = "ca_kubernetes")]
        token_audience: String,
        /// Fill clusters that name a `kubernetes_service` with its pods, from the API server's
        /// EndpointSlices (listed, then watched): ready pods take traffic, terminating ones drain,
        /// and each carries its service account's identity for `tls: mesh` to check.
        #[arg(long)]
        kubernetes_endpoints: bool,
        /// Mesh every Service of the cluster with nothing written (the Services, EndpointSlices,
        /// Pods and Namespaces watched through the API server; see docs/mesh.md); implies
        /// --kubernetes-endpoints.
        #[arg(long)]
        kubernetes_mesh: bool,
        /// The API server, https://HOST[:PORT], instead of the in-cluster one (for --ca-kubernetes,
        /// --injector-webhook, --kubernetes-endpoints and --kubernetes-mesh).
        #[arg(long, value_name = "URL", requires_all = ["kubernetes_users", "kubernetes_ca", "kubernetes_token"])]
        kubernetes_api: Option<String>,
        /// PEM roots of --kubernetes-api's certificate.
        #[arg(long, value_name = "FILE", requires = "kubernetes_api")]
        kubernetes_ca: Option<PathBuf>,
        /// The control plane's own bearer token for --kubernetes-api.
        #[arg(long, value_name = "FILE", requires = "kubernetes_api")]
        kubernetes_token: Option<PathBuf>,
        /// The trust domain the CA signs for, and of the identities pods' service accounts give their
        /// endpoints (from --kubernetes-endpoints, and in the automatic mesh).
        #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
        trust_domain: String,
        /// The cluster's DNS domain: the automatic mesh routes NAME.NAMESPACE.svc.DOMAIN.
        #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
        cluster_domain: String,
        /// The automatic mesh's opaque TCP between meshed pods rides HBONE to this port of each pod
        /// (the sidecars' HBONE listener); 0: a TLS connection per TCP connection instead.
        #[arg(long, default_value_t = 15008, value_name = "PORT")]
        hbone_port: u16,
        /// The automatic mesh's opaque TCP between meshed pods rides QUIC first (HBONE's tunnels on
        /// HTTP/3) to this UDP port of each pod (the sidecars' hbone_quic listener, 15008), falling
        /// back to HBONE where UDP does not get through; 0 (the default): no QUIC.
        #[arg(long, default_value_t = 0, value_name = "PORT")]
        quic_port: u16,
        /// The longest certificate lifetime the CA signs, in seconds.
        #[arg(long, default_value_t = 30 * 24 * 3600, value_name = "SECONDS")]
        max_cert_ttl: u64,
        /// Serve the port over TLS, with a certificate from the CA for this name (a DNS name or an
        /// IP address the proxies dial; repeat for several). Needs the CA. Proxies then use an
        /// https:// URL and --control-ca with the CA's root.
        #[arg(long = "tls-name", value_name = "NAME", requires = "ca_auth")]
        tls_names: Vec<String>,
        /// Trust these roots too (PEM), beside the CA's own: the trust bundle every certificate comes
        /// with carries them, for a root rotation (see docs/security.md).
        #[arg(long, value_name = "FILE", requires = "ca_auth")]
        ca_trust: Option<PathBuf>,
        /// Serve discovery streams only to proxies that authenticate with a token the CA accepts
        /// (the bootstrap or service-account token they ask for their certificate with); proxies
        /// without a CA identity are then refused. Needs the CA.
        #[arg(long, requires = "ca_auth")]
        xds_auth: bool,
        /// The lifetime of the certificates the CA issues the control plane itself (--tls-name,
        /// --injector-name), in seconds; each is renewed at half of it.
        #[arg(long, default_value_t = plane::DEFAULT_SERVING_CERT_TTL.as_secs(), value_name = "SECONDS",
              value_parser = clap::value_parser!(u64).range(2..))]
        serving_cert_ttl: u64,
        /// Serve the sidecar injector, a mutating admission webhook (POST /inject, AdmissionReview
        /// v1), on its own HTTPS port, with the certificate of --injector-cert and --injector-key,
        /// or one from the CA for the --injector-name names.
        #[arg(long)]
        injector: bool,
        /// The injector's address.
        #[arg(long, default_value = "127.0.0.1:15017", value_name = "ADDR")]
        injector_listen: SocketAddr,
        /// The injector's PEM certificate chain (for its Service's DNS name).
        #[arg(long, value_name = "FILE", requires_all = ["injector", "injector_key"], conflicts_with = "injector_names")]
        injector_cert: Option<PathBuf>,
        /// Serve the injector with a certificate from the CA for this DNS name (its Service's,
        /// e.g. remora-injector.remora-system.svc; repeat for several): the webhook's caBundle is
        /// then the CA's root.
        #[arg(long = "injector-name", value_name = "NAME", requires_all = ["injector", "ca_auth"])]
        injector_names: Vec<String>,
        /// Keep the caBundle of every webhook in this MutatingWebhookConfiguration equal to the CA
        /// root (checked at start and every minute, through the API server; needs --injector-name).
        #[arg(long, value_name = "NAME", requires = "injector_names")]
        injector_webhook: Option<String>,
        /// The injector's PEM private key.
        #[arg(long, value_name = "FILE", requires = "injector")]
        injector_key: Option<PathBuf>,
        /// What the injector injects (YAML, `remora inject --config`'s format; default: built-in).
        #[arg(long, value_name = "FILE", requires = "injector")]
        injector_config: Option<PathBuf>,
        /// Inject the proxy as a first container with a postStart wait, for Kubernetes before 1.29.
        #[arg(long, requires = "injector")]
        legacy_sidecar: bool,
    },
    /// Print Kubernetes manifests with the Remora sidecar injected into every pod template
    /// (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod; multi-document YAML and
    /// List). Workloads already injected, opted out (annotation remora.dev/inject: disabled) or on the
    /// host network are left alone; what was done to each is reported on stderr.
    Inject {
        /// The manifests, or `-` for stdin.
        #[arg(long = "filename", short = 'f', default_value = "-", value_name = "FILE")]
        file: String,
        /// Injector settings (image, control plane, identity, resources), YAML.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Inject the proxy as a first container with a postStart wait, for Kubernetes before 1.29,
        /// instead of a native sidecar.
        #[arg(long)]
        legacy_sidecar: bool,
    },
    /// Wait until the local proxy's /ready answers 200 (the legacy sidecar's postStart hook).
    WaitReady {
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15000", value_name = "ADDR")]
        admin: SocketAddr,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120, value_name = "SECONDS")]
        timeout: u64,
    },
    /// Register an endpoint of this workload in the etcd registry and keep it registered (a lease,
    /// refreshed) until SIGTERM or SIGINT, which deregister it. If this process dies, the endpoint
    /// leaves its cluster when the lease's TTL runs out.
    Register {
        /// etcd, e.g. http://127.0.0.1:2379.
        #[arg(long, value_name = "URL")]
        etcd: String,
        /// The cluster to join.
        #[arg(long)]
        cluster: String,
        /// This endpoint's ip:port.
        #[arg(long, value_name = "ADDR")]
        address: SocketAddr,
        /// Balancing weight (default 1).
        #[arg(long)]
        weight: Option<u32>,
        /// The region this endpoint runs in (for clusters that prefer their own locality).
        #[arg(long)]
        region: Option<String>,
        /// The zone this endpoint runs in.
        #[arg(long)]
        zone: Option<String>,
        /// The SPIFFE ID this endpoint's sidecar presents (mesh clusters check it).
        #[arg(long, value_name = "SPIFFE-ID")]
        identity: Option<String>,
        /// Lease TTL in seconds.
        #[arg(long, default_value_t = 10)]
        ttl: u64,
        /// On SIGTERM, mark the endpoint draining (proxies send it no new requests) and wait this
        /// many seconds before deregistering; 0 deregisters at once.
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        drain_time: u64,
        /// Key prefix of the registry in etcd.
        #[arg(long, default_value = registry::DEFAULT_PREFIX, value_name = "PREFIX")]
        etcd_prefix: String,
    },
    /// Run a local demo mesh: a control plane, a proxy it configures (built-in defaults plus routes to
    /// two sample services), a burst of traffic and its summary, a live route edit during traffic,
    /// then serve until Ctrl-C.
    Demo {
        /// The proxy's outbound listener.
        #[arg(long, default_value = "127.0.0.1:15001", value_name = "ADDR")]
        listen: SocketAddr,
        /// The proxy's admin server.
        #[arg(long, default_value = "127.0.0.1:15000", value_name = "ADDR")]
        admin: SocketAddr,
        /// The control plane's address.
        #[arg(long, default_value = "127.0.0.1:15010", value_name = "ADDR")]
        control: SocketAddr,
        /// Requests in the opening burst.
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    /// Install the iptables rules that send this network namespace's TCP through the sidecar (run by
    /// the pod's init container, as root with NET_ADMIN): outbound to --outbound-port, inbound to
    /// --inbound-port, except the proxy's own uid, loopback, the admin port and the exclusions.
    /// Rules installed before by Remora are replaced; the pod's other rules are left alone.
    Init {
        /// Print the iptables-restore scripts instead of installing them.
        #[arg(long)]
        dry_run: bool,
        /// Remove every rule and chain Remora installed, then exit.
        #[arg(long, conflicts_with = "dry_run")]
        cleanup: bool,
        /// The proxy's uid and gid, whose traffic is never captured.
        #[arg(long, default_value_t = capture::DEFAULT_PROXY_UID, value_name = "UID")]
        proxy_uid: u32,
        /// The proxy's outbound listener port.
        #[arg(long, default_value_t = 15001, value_name = "PORT")]
        outbound_port: u16,
        /// The proxy's inbound listener port.
        #[arg(long, default_value_t = 15006, value_name = "PORT")]
        inbound_port: u16,
        /// Inbound ports to capture, comma-separated, or `*` for all.
        #[arg(long, default_value = "*", value_name = "PORTS")]
        inbound_ports: String,
        /// Inbound ports never captured, comma-separated (the admin port 15000 always is).
        #[arg(long, default_value = "", value_name = "PORTS")]
        exclude_inbound_ports: String,
        /// Outbound destination ports never captured, comma-separated.
        #[arg(long, default_value = "", value_name = "PORTS")]
        exclude_outbound_ports: String,
        /// Outbound destinations to capture, comma-separated CIDRs, or `*` for all.
        #[arg(long, default_value = "*", value_name = "CIDRS")]
        include_outbound_cidrs: String,
        /// Outbound destinations never captured, comma-separated CIDRs.
        #[arg(long, default_value = "", value_name = "CIDRS")]
        exclude_outbound_cidrs: String,
        /// Install (or remove) the IPv6 rules too, whatever the pod's addresses (the proxy must
        /// listen on [::1]:15001 and [::]:15006, as its built-in defaults do where IPv6 is on).
        /// Without it or --no-ipv6: when the pod has a global IPv6 address.
        #[arg(long, conflicts_with = "no_ipv6")]
        ipv6: bool,
        /// Leave IPv6 alone, even in a pod with a global IPv6 address (its IPv6 TCP then bypasses
        /// the proxy).
        #[arg(long)]
        no_ipv6: bool,
        /// The iptables command to use: iptables, iptables-nft or iptables-legacy (ip6tables is
        /// named after it).
        #[arg(long, default_value = "iptables", value_name = "COMMAND")]
        iptables: String,
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
    remora_proxy::telemetry::logging::init();
    let result = match cli.command {
        Command::Proxy {
            config,
            control,
            node_id,
            identity,
            token_file,
            tls_cert,
            tls_key,
            tls_ca,
            control_ca,
            admin,
        } => {
            if let Some(error) = remora_proxy::memory::with_tuned_allocator() {
                tracing::warn!(%error, "cannot start again with glibc's thread cache tuned; running with its default");
            }
            let source = config.map_or_else(ConfigSource::defaults, ConfigSource::File);
            let tls_files = match (tls_cert, tls_key, tls_ca) {
                (Some(cert), Some(key), Some(ca)) => Some([cert, key, ca]),
                _ => None,
            };
            let options = StartOptions {
                control_plane: control,
                node_id,
                identity,
                token_file,
                tls_files,
                control_plane_ca_file: control_ca,
                admin_address: admin,
                control_plane_ca_pem: std::env::var("REMORA_CONTROL_CA").ok().filter(|pem| !pem.trim().is_empty()),
            };
            remora_proxy::run(source, options)
        }
        Command::Control {
            config_dir,
            listen,
            etcd,
            etcd_prefix,
            ca_dir,
            ca_cert,
            ca_key,
            ca_tokens,
            ca_kubernetes,
            kubernetes_endpoints,
            kubernetes_mesh,
            token_audience,
            kubernetes_api,
            cluster_domain,
            hbone_port,
            quic_port,
            kubernetes_ca,
            kubernetes_token,
            trust_domain,
            max_cert_ttl,
            tls_names,
            serving_cert_ttl,
            xds_auth,
            ca_trust,
            injector,
            injector_listen,
            injector_cert,
            injector_names,
            injector_webhook,
            injector_key,
            injector_config,
            legacy_sidecar,
        } => {
            let root = match (ca_dir, ca_cert, ca_key) {
                (Some(dir), _, _) => Some(CaRoot::Directory(dir)),
                (None, Some(cert), Some(key)) => Some(CaRoot::Files { cert, key }),
                _ => None,
            };
            let kubernetes = match (kubernetes_api, kubernetes_ca, kubernetes_token) {
                (Some(url), Some(ca_file), Some(token_file)) => {
                    Some(KubernetesApi::Explicit { url, ca_file, token_file })
                }
                _ if ca_kubernetes || kubernetes_endpoints || kubernetes_mesh || injector_webhook.is_some() => {
                    Some(KubernetesApi::InCluster)
                }
                _ => None,
            };
            let kubernetes_objects = (kubernetes_endpoints || kubernetes_mesh)
                .then_some(KubernetesObjects { automatic_mesh: kubernetes_mesh });
            let mesh = remora_control_plane::mesh::Settings {
                trust_domain: trust_domain.clone(),
                cluster_domain,
                hbone_port,
                quic_port,
            };
            let ca = root.map(|root| CaConfig {
                root,
                trust_domain,
                tokens: ca_tokens,
                token_audience: ca_kubernetes.then_some(token_audience),
                max_ttl: Duration::from_secs(max_cert_ttl),
                tls_names,
                authenticate_xds: xds_auth,
                extra_roots: ca_trust,
            });
            let tls = match (injector_cert, injector_key) {
                (Some(cert), Some(key)) => InjectorTls::Files { cert, key },
                _ => InjectorTls::Ca { names: injector_names },
            };
            let injector = match injector {
                false => None,
                true => match (&tls, load_inject_config(injector_config.as_deref())) {
                    (InjectorTls::Ca { names }, _) if names.is_empty() => {
                        return fail(anyhow::anyhow!(
                            "--injector needs a certificate: --injector-cert and --injector-key, or --injector-name"
                        ));
                    }
                    (_, Ok(settings)) => {
                        let injector = Injector::new(settings, legacy_sidecar);
                        Some(InjectorConfig { listen: injector_listen, tls, injector, webhook: injector_webhook })
                    }
                    (_, Err(error)) => return fail(error),
                },
            };
            let serving_cert_ttl = Duration::from_secs(serving_cert_ttl);
            plane::run(ControlConfig {
                listen,
                config_dir,
                etcd,
                etcd_prefix,
                ca,
                injector,
                kubernetes,
                kubernetes_objects,
                mesh,
                serving_cert_ttl,
            })
            .map_err(anyhow::Error::from)
        }
        Command::Inject { file, config, legacy_sidecar } => inject(&file, config.as_deref(), legacy_sidecar),
        Command::WaitReady { admin, timeout } => {
            remora_proxy::admin::wait_ready(admin, Duration::from_secs(timeout)).map_err(anyhow::Error::from)
        }
        Command::Register { etcd, cluster, address, weight, region, zone, identity, ttl, drain_time, etcd_prefix } => {
            let address = address.to_string();
            let endpoint = Registered { cluster, address, weight, region, zone, identity, health: None };
            let (ttl, drain) = (Duration::from_secs(ttl.max(1)), Duration::from_secs(drain_time));
            registry::run_register(&etcd, &etcd_prefix, &endpoint, ttl, drain).map_err(anyhow::Error::from)
        }
        Command::Demo { listen, admin, control, requests } => {
            demo::run(DemoOptions { listen, admin, control, requests, ..DemoOptions::default() })
        }
        Command::Init {
            dry_run,
            cleanup,
            proxy_uid,
            outbound_port,
            inbound_port,
            inbound_ports,
            exclude_inbound_ports,
            exclude_outbound_ports,
            include_outbound_cidrs,
            exclude_outbound_cidrs,
            ipv6,
            no_ipv6,
            iptables,
        } => {
            let ipv6 = ipv6 || (!no_ipv6 && capture::has_global_ipv6());
            if cleanup {
                capture::cleanup(&iptables, ipv6).map_err(anyhow::Error::from)
            } else {
                let parsed = (|| {
                    let mut excluded = capture::parse_ports(&exclude_inbound_ports)?;
                    excluded.extend([capture::ADMIN_PORT, capture::HBONE_PORT]);
                    Ok::<_, capture::ParseError>(Capture {
                        proxy_uid,
                        outbound_port,
                        inbound_port,
                        inbound_ports: capture::parse_port_set(&inbound_ports)?,
                        exclude_inbound_ports: excluded,
                        exclude_outbound_ports: capture::parse_ports(&exclude_outbound_ports)?,
                        include_outbound_cidrs: capture::parse_cidr_set(&include_outbound_cidrs)?,
                        exclude_outbound_cidrs: capture::parse_cidrs(&exclude_outbound_cidrs)?,
                        ipv6,
                    })
                })();
                match parsed {
                    Err(error) => Err(anyhow::Error::from(error)),
                    Ok(rules) if dry_run => {
                        for family in rules.families() {
                            println!(
                                "# {family}: {}-restore --noflush\n{}",
                                family.command(&iptables),
                                rules.rules(family)
                            );
                        }
                        Ok(())
                    }
                    Ok(rules) => rules.install(&iptables).map_err(anyhow::Error::from),
                }
            }
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
        Err(error) => fail(error),
    }
}

fn fail(error: anyhow::Error) -> ExitCode {
    eprintln!("error: {error:#}");
    ExitCode::FAILURE
}

fn load_inject_config(path: Option<&Path>) -> anyhow::Result<InjectConfig> {
    let Some(path) = path else { return Ok(InjectConfig::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    InjectConfig::from_yaml(&text).with_context(|| format!("{}", path.display()))
}

/// `remora inject`: manifests from `file` (or stdin) to stdout, a line per workload to stderr.
fn inject(file: &str, config: Option<&Path>, legacy: bool) -> anyhow::Result<()> {
    let injector = Injector::new(load_inject_config(config)?, legacy);
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).context("read stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| file.to_owned())?
    };
    let (out, reports) = injector.inject_manifests(&text).with_context(|| file.to_owned())?;
    std::io::stdout().write_all(out.as_bytes()).context("write stdout")?;
    for report in reports {
        eprintln!("{report}");
    }
    Ok(())
}
