//! Live reload: routes change under load without a failed request, file edits apply by themselves,
//! a bad file (or a YAML alias bomb) is rejected with the field named while the old config serves
//! on, the admin server answers probes while a large reload runs, and listeners (and a listener's
//! additional addresses) come and go.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use remora_proxy::reload::{ReloadError, ReloadOutcome};
use remora_proxy::testing::{Client, HttpServer, TestProxy, eventually};
use tokio::net::TcpStream;

use crate::{cluster, listener, route_all};

fn routed_to(target: &str, a: &HttpServer, b: &HttpServer, extra_listeners: &str) -> String {
    format!(
        "resources:\n{}{}{}{}{}",
        cluster("a", "", &[a.address()]),
        cluster("b", "", &[b.address()]),
        route_all("main", target),
        listener("in", ""),
        extra_listeners,
    )
}

async fn served_by(address: std::net::SocketAddr) -> String {
    Client::http1(address).await.get("x", "/").await.header("x-served-by").to_owned()
}

/// Eight clients send requests on keep-alive connections while the route flips between two
/// clusters ten times: every request succeeds, and both clusters serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_change_under_load_without_a_failed_request() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let proxy = TestProxy::start(&routed_to("a", &a, &b, ""));
    let address = proxy.address("in");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut client = Client::http1(address).await;
            let mut seen = HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = client.get("x", "/").await;
                if reply.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                    seen.insert(reply.header("x-served-by").to_owned());
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            seen
        }));
    }
    for flip in 0..10 {
        let target = if flip % 2 == 0 { "b" } else { "a" };
        proxy.rewrite(&routed_to(target, &a, &b, ""));
        let outcome = proxy.reload().unwrap();
        assert!(matches!(outcome, ReloadOutcome::Applied(_) | ReloadOutcome::Unchanged(_)));
        eventually("the new route serves", Duration::from_secs(5), || async { served_by(address).await == target })
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = HashSet::new();
    for client in clients {
        seen.extend(client.await.unwrap());
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during reloads");
    assert!(ok.load(Ordering::Relaxed) > 100, "too little traffic to mean anything");
    assert_eq!(seen, HashSet::from(["a".to_owned(), "b".to_owned()]));
}

/// Editing the file is enough: the watcher applies it, and `/config_dump` shows the new version.
#[tokio::test]
async fn file_edits_apply_without_a_signal() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let proxy = TestProxy::start(&routed_to("a", &a, &b, ""));
    let address = proxy.address("in");
    assert_eq!(served_by(address).await, "a");
    let (_, before) = proxy.admin_get("/config_dump").await;
    proxy.rewrite(&routed_to("b", &a, &b, ""));
    eventually("the edit applies", Duration::from_secs(5), || async { served_by(address).await == "b" }).await;
    let (_, after) = proxy.admin_get("/config_dump").await;
    let version = |dump: &str| serde_json_version(dump);
    assert_ne!(version(&before), version(&after));
    assert!(after.contains(r#""result": "applied""#), "{after}");
}

fn serde_json_version(dump: &str) -> String {
    let start = dump.find(r#""version": ""#).unwrap() + 12;
    dump[start..start + 16].to_owned()
}

/// A file that fails validation is rejected with the resource and field named (in the reload's
/// error, `/config_dump` and the metrics), the old config keeps serving, and fixing the file
/// recovers.
#[tokio::test]
async fn a_bad_file_is_rejected_and_the_old_config_serves_on() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let proxy = TestProxy::start(&routed_to("a", &a, &b, ""));
    let address = proxy.address("in");
    let broken = routed_to("a", &a, &b, "")
        .replace("{kind: RouteTable, name: main", "{kind: RouteTable, name: main, destinatons: [x]");
    proxy.rewrite(&broken);
    eventually("the watcher rejects the file", Duration::from_secs(5), || async {
        proxy.admin_get("/config_dump").await.1.contains(r#""result": "rejected""#)
    })
    .await;
    let (_, dump) = proxy.admin_get("/config_dump").await;
    assert!(dump.contains(r#"route table \"main\": destinatons: unknown field `destinatons`"#), "{dump}");
    assert_eq!(served_by(address).await, "a");
    assert!(proxy.metric(r#"remora_config_reloads_total{result="rejected"}"#).await >= 1.0);

    let dangling = routed_to("nowhere", &a, &b, "");
    proxy.rewrite(&dangling);
    match proxy.reload() {
        Err(ReloadError::Load(error)) => {
            let text = error.to_string();
            assert!(
                text.contains(r#"route table "main": routes[0].backends[0].cluster: names cluster "nowhere""#),
                "{text}"
            );
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
    assert_eq!(served_by(address).await, "a");

    proxy.rewrite(&routed_to("b", &a, &b, ""));
    eventually("the fixed file applies", Duration::from_secs(5), || async { served_by(address).await == "b" }).await;
}

/// A file whose aliases would expand to 10^8 nodes (several GiB once built) from 140 kB is refused
/// before it is built, as are one nested 10,000 deep and one of 65 MiB: each reload fails naming
/// the limit, the old config serves on, and the next good edit applies.
#[tokio::test]
async fn an_alias_bomb_is_refused_and_the_old_config_serves_on() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let proxy = TestProxy::start(&routed_to("a", &a, &b, ""));
    let address = proxy.address("in");
    let bomb = format!("{}---\n{}", routed_to("b", &a, &b, ""), remora_control_api::testing::alias_bomb(10_000));
    proxy.rewrite(&bomb);
    match proxy.reload() {
        Err(ReloadError::Load(error)) => {
            assert!(error.to_string().contains("expands past its limit"), "{error}");
        }
        other => panic!("expected the bomb refused, got {other:?}"),
    }
    assert_eq!(served_by(address).await, "a");
    // So are nesting 10,000 deep and a file of 65 MiB (past the 64 MiB a config file may be).
    let deep = format!("{}---\nx: {}{}\n", routed_to("b", &a, &b, ""), "[".repeat(10_000), "]".repeat(10_000));
    let huge = format!("{}# {}\n", routed_to("b", &a, &b, ""), "x".repeat(65 << 20));
    for (case, text, expected) in [("deep", deep, "recursion limit"), ("huge", huge, "larger than the 64 MiB")] {
        proxy.rewrite(&text);
        match proxy.reload() {
            Err(ReloadError::Load(error)) => assert!(error.to_string().contains(expected), "{case}: {error}"),
            other => panic!("expected the {case} file refused, got {other:?}"),
        }
        assert_eq!(served_by(address).await, "a", "{case}");
    }
    proxy.rewrite(&routed_to("b", &a, &b, ""));
    eventually("the fixed file applies", Duration::from_secs(5), || async { served_by(address).await == "b" }).await;
}

/// While the watcher applies a large config (50,000 routes: seconds of compiling in a debug build),
/// the admin server answers every liveness probe within kubelet's default timeout of one second:
/// probes are not queued behind the reload, and the sidecar is not restarted for being busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_while_a_large_reload_runs() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let proxy = TestProxy::start(&routed_to("a", &a, &b, ""));
    let address = proxy.address("in");
    let mut routes: Vec<String> =
        (0..50_000).map(|i| format!("{{match: {{path: {{prefix: /r{i}/}}}}, backends: [{{cluster: a}}]}}")).collect();
    routes.push("{backends: [{cluster: b}]}".into());
    let large = format!(
        "resources:\n{}{}  - {{kind: RouteTable, name: main, routes: [{}]}}\n{}",
        cluster("a", "", &[a.address()]),
        cluster("b", "", &[b.address()]),
        routes.join(", "),
        listener("in", ""),
    );
    let started = std::time::Instant::now();
    proxy.rewrite(&large);
    let mut probes = Vec::new();
    while served_by(address).await != "b" {
        assert!(started.elapsed() < Duration::from_secs(120), "the large config never applied");
        let probe = std::time::Instant::now();
        let answered = tokio::time::timeout(Duration::from_secs(1), proxy.admin_get("/live")).await;
        assert!(matches!(answered, Ok((200, _))), "a probe went unanswered for a second during the reload");
        probes.push(probe.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reload = started.elapsed();
    assert!(
        probes.len() >= 5,
        "only {} probes during a reload of {reload:?}: too short to mean anything",
        probes.len()
    );
    eprintln!("{} probes during a reload of {reload:?}; slowest {:?}", probes.len(), probes.iter().max());
}

/// A reload can add a listener (bound and serving at once) and remove one (its port closes); a new
/// listener whose address is taken makes the whole reload fail, changing nothing.
#[tokio::test]
async fn listeners_come_and_go_with_the_config() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let proxy = TestProxy::start(&routed_to("a", &a, &b, ""));
    let first = proxy.address("in");

    proxy.rewrite(&routed_to("a", &a, &b, &listener("second", "")));
    proxy.reload().unwrap();
    let second = proxy.address("second");
    assert_eq!(served_by(second).await, "a");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let clash = format!("  - {{kind: Listener, name: third, address: \"{}\"}}\n", taken.local_addr().unwrap());
    proxy.rewrite(&routed_to("b", &a, &b, &clash));
    match proxy.reload() {
        Err(ReloadError::Bind(error)) => assert!(error.to_string().starts_with(r#"listener "third": bind"#), "{error}"),
        other => panic!("expected a bind error, got {other:?}"),
    }
    assert_eq!(served_by(first).await, "a", "a failed reload changed the routes");
    assert!(proxy.proxy().listener_address("third").is_none());

    let only_second = routed_to("a", &a, &b, &listener("second", "")).replace(&listener("in", ""), "");
    proxy.rewrite(&only_second);
    proxy.reload().unwrap();
    eventually("the removed listener stops accepting", Duration::from_secs(5), || async {
        TcpStream::connect(first).await.is_err()
    })
    .await;
    assert_eq!(served_by(second).await, "a");
}

/// A listener's additional address serves like its first one, counted under the same name; a reload
/// that adds or drops one keeps the sockets of the addresses that stay (a fixed port is not bound a
/// second time, so the reload cannot fail on it) and closes only the dropped one.
#[tokio::test]
async fn a_listeners_additional_addresses_come_and_go_and_the_others_stay_bound() {
    let a = HttpServer::start("a").await;
    let b = HttpServer::start("b").await;
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !ipv6 {
        eprintln!("skipping the IPv6 address: this host cannot bind [::1]");
    }
    let with = |fixed: std::net::SocketAddr, extra: &[String]| {
        routed_to("a", &a, &b, "").replace(
            &listener("in", ""),
            &format!(
                "  - {{kind: Listener, name: in, address: \"{fixed}\", additional_addresses: [{}]}}\n",
                extra.join(", ")
            ),
        )
    };
    // Fixed ports (taken from the OS, then freed) for the first two addresses, the first to be kept
    // across reloads. A test running beside this one may take a freed port before the proxy binds
    // it: then the ports are picked again.
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut picks = 0;
    let (proxy, fixed, second, extra) = loop {
        let (fixed, second) = (free_port(), free_port());
        let mut extra = vec![format!("\"{second}\"")];
        if ipv6 {
            extra.push("\"[::1]:0\"".into());
        }
        match TestProxy::try_start(&with(fixed, &extra)) {
            Ok(proxy) => break (proxy, fixed, second, extra),
            Err(error) if picks < 5 && error.to_string().contains("in use") => picks += 1,
            Err(error) => panic!("proxy did not start: {error}"),
        }
    };
    let bound: Vec<std::net::SocketAddr> = proxy.proxy().listener_addresses().into_iter().map(|(_, a)| a).collect();
    assert_eq!(bound.len(), extra.len() + 1, "{bound:?}");
    assert_eq!((bound[0], bound[1]), (fixed, second), "listed in order, the first address first");
    assert_eq!(proxy.address("in"), fixed);
    for address in &bound {
        assert_eq!(served_by(*address).await, "a", "{address}");
    }
    let counted = proxy.metric(r#"remora_listener_connections_total{listener="in",direction="outbound"} "#).await;
    assert_eq!(counted, bound.len() as f64, "one listener's connections, whichever socket");

    // Drop the second address: the first keeps its socket, even with a connection open on it.
    let mut open = Client::http1(fixed).await;
    proxy.rewrite(&with(fixed, &extra[1..]));
    proxy.reload().unwrap();
    eventually("the dropped address stops accepting", Duration::from_secs(5), || async {
        TcpStream::connect(second).await.is_err()
    })
    .await;
    assert_eq!(open.get("x", "/").await.header("x-served-by"), "a", "the kept socket's connection lives on");
    assert_eq!(served_by(fixed).await, "a");
    if ipv6 {
        assert_eq!(served_by(bound[2]).await, "a", "the IPv6 address is kept, port and all");
    }
    // And back: only the new address is bound.
    proxy.rewrite(&with(fixed, &extra));
    proxy.reload().unwrap();
    assert_eq!(served_by(second).await, "a");
}
