//! Operator visibility: the Prometheus endpoint counts calls, failures and reloads, `/healthz`
//! follows the broker connection, `warren status` shows per-handler counters, and guest log
//! lines carry the invocation's ids.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::faults::relay::Relay;
use crate::support::*;

const T: Duration = Duration::from_secs(10);

/// A daemon config serving `topic` from `module`, with metrics on a free port.
fn config(
    server: &str,
    url: &str,
    heartbeat: u16,
    topic: &str,
    module: &std::path::Path,
) -> String {
    format!(
        "[broker]\nurl = \"{url}\"\nexchange = \"{EXCHANGE}\"\nheartbeat = {heartbeat}\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 500\n\n\
         [server]\nname = \"{server}\"\nshutdown_timeout_secs = 10\n\n\
         [metrics]\naddress = \"127.0.0.1:0\"\n\n\
         [[handler]]\ntopic = \"{topic}\"\nmodule = \"{}\"\n",
        module.display()
    )
}

/// The address the daemon's metrics endpoint listens on, from its log.
fn metrics_address(daemon: &Daemon) -> SocketAddr {
    let line = daemon
        .wait_log("metrics listening", Duration::from_secs(10))
        .expect("the daemon logs its metrics address");
    let start = line.find("address=").expect("address field") + "address=".len();
    let addr: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    addr.parse().expect("a socket address")
}

/// GET `path`; returns the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Every sample of a scrape, keyed by `name{labels}` exactly as exposed.
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn sample(samples: &HashMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or_else(|| {
        let mut keys: Vec<_> = samples
            .keys()
            .filter(|k| k.starts_with("warren_"))
            .collect();
        keys.sort();
        panic!("no sample {key}; have:\n{keys:#?}")
    })
}

fn requests(topic: &str, method: &str, outcome: &str, class: &str) -> String {
    format!(
        "warren_requests_total{{topic=\"{topic}\",method=\"{method}\",outcome=\"{outcome}\",class=\"{class}\"}}"
    )
}

#[test]
fn metrics_count_calls_failures_and_reloads_and_status_shows_counters() {
    let server = unique("metrics");
    let topic = unique("metrics_echo");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let dir = tempfile::tempdir().expect("tempdir");
    let module = dir.path().join("handler.wasm");
    std::fs::copy(plugin("echo"), &module).expect("copy echo");
    let daemon = Daemon::start_config(
        &server,
        &config(&server, &broker_url(), 10, &topic, &module),
    );
    let addr = metrics_address(&daemon);

    let rpc = Rpc::connect();
    let target = any_server(&topic);
    for _ in 0..2 {
        assert_eq!(
            rpc.call(&target, "echo", r#"{"value": 7}"#, T)
                .expect("echo"),
            "7"
        );
    }
    let missing = remote_error(rpc.call(&target, "echo", "{}", T));
    assert_eq!(missing.class, "InvalidArgs");
    let unknown = remote_error(rpc.call(&target, "no_such_thing", "{}", T));
    assert_eq!(unknown.class, "NoSuchMethod");

    let m = scrape(addr);
    assert_eq!(sample(&m, &requests(&topic, "echo", "ok", "")), 2.0);
    assert_eq!(
        sample(&m, &requests(&topic, "echo", "error", "InvalidArgs")),
        1.0
    );
    // A method the module does not export is never a label of its own.
    assert_eq!(
        sample(&m, &requests(&topic, "-", "error", "NoSuchMethod")),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!(
                "warren_invocation_duration_seconds_count{{topic=\"{topic}\",method=\"echo\"}}"
            )
        ),
        3.0
    );
    // A reply is counted once the broker confirms it, which may be after the caller already
    // has it in hand; so this one counter is polled, not read once.
    let confirmed = "warren_replies_total{outcome=\"confirmed\"}";
    let replies = eventually(Duration::from_secs(5), || {
        let n = scrape(addr).get(confirmed).copied()?;
        (n >= 4.0).then_some(n)
    });
    assert!(
        replies.is_some(),
        "replies confirmed: {:?}",
        scrape(addr).get(confirmed)
    );
    assert_eq!(sample(&m, "warren_broker_connected"), 1.0);
    assert_eq!(
        sample(
            &m,
            &format!("warren_invocations_in_flight{{topic=\"{topic}\"}}")
        ),
        0.0
    );
    let info_v1: Vec<&String> = m
        .keys()
        .filter(|k| {
            k.starts_with(&format!(
                "warren_handler_info{{topic=\"{topic}\",version=\"1\""
            ))
        })
        .collect();
    assert_eq!(
        info_v1.len(),
        1,
        "one info series for version 1: {info_v1:?}"
    );

    // A good reload, then a broken one.
    let tmp = dir.path().join(".handler.wasm.tmp");
    std::fs::copy(plugin("calc"), &tmp).expect("copy calc");
    std::fs::rename(&tmp, &module).expect("swap in calc");
    daemon
        .wait_log("handler reloaded", Duration::from_secs(20))
        .expect("the new module is loaded");
    std::fs::write(&tmp, b"\0asm but not really").expect("write garbage");
    std::fs::rename(&tmp, &module).expect("swap in garbage");
    daemon
        .wait_log("reload failed", Duration::from_secs(20))
        .expect("the broken module is refused");
    assert_eq!(
        rpc.call(&target, "add", r#"{"a": 1, "b": 2}"#, T)
            .expect("add"),
        "3"
    );

    let m = scrape(addr);
    assert_eq!(
        sample(
            &m,
            &format!("warren_reloads_total{{topic=\"{topic}\",outcome=\"ok\"}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("warren_reloads_total{{topic=\"{topic}\",outcome=\"failed\"}}")
        ),
        1.0
    );
    let versions: Vec<&String> = m
        .keys()
        .filter(|k| k.starts_with(&format!("warren_handler_info{{topic=\"{topic}\"")))
        .collect();
    assert_eq!(
        versions.len(),
        1,
        "only the serving version is exposed: {versions:?}"
    );
    assert!(versions[0].contains("version=\"2\""), "{versions:?}");
    assert_eq!(sample(&m, &requests(&topic, "add", "ok", "")), 1.0);

    let status = warren_remote(&["status", "--server", &server]);
    status.assert_success();
    assert!(
        status.stdout.contains("requests:  3 ok, 2 failed"),
        "{}",
        status.stdout
    );
}

#[test]
fn healthz_follows_the_broker_connection() {
    let server = unique("health");
    let topic = unique("health_echo");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let upstream: SocketAddr = "127.0.0.1:5672".parse().expect("broker address");
    let relay = Relay::start(upstream);
    let daemon = Daemon::start_config(
        &server,
        &config(
            &server,
            &relay.url(&broker_url()),
            2,
            &topic,
            &plugin("echo"),
        ),
    );
    let addr = metrics_address(&daemon);
    assert_eq!(get(addr, "/healthz").0, 200);

    // A half-open connection: nothing flows, nothing is closed. Missed heartbeats (2 s) must
    // give it away.
    relay.stall();
    let down = eventually(Duration::from_secs(15), || {
        (get(addr, "/healthz").0 == 503).then_some(())
    });
    assert!(
        down.is_some(),
        "healthz never turned 503; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(sample(&scrape(addr), "warren_broker_connected"), 0.0);

    relay.restore();
    let up = eventually(Duration::from_secs(30), || {
        (get(addr, "/healthz").0 == 200).then_some(())
    });
    assert!(
        up.is_some(),
        "healthz never recovered; log:\n{}",
        daemon.log_text()
    );
    let m = scrape(addr);
    assert_eq!(sample(&m, "warren_broker_connected"), 1.0);
    assert!(sample(&m, "warren_broker_reconnects_total") >= 1.0);
    // And it serves again on the new connection.
    let rpc = Rpc::connect();
    let answered = eventually(Duration::from_secs(20), || {
        rpc.call(&any_server(&topic), "echo", r#"{"value": "back"}"#, T)
            .ok()
    });
    assert_eq!(answered.as_deref(), Some("\"back\""));
}

#[test]
fn guest_log_lines_carry_the_invocation_ids_in_json_logs() {
    let server = unique("jsonlog");
    let topic = unique("jsonlog_calc");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = Daemon::start_config_env(
        &server,
        &config(&server, &broker_url(), 10, &topic, &plugin("calc")),
        &[("WARREN_LOG_FORMAT", "json")],
    );
    let rpc = Rpc::connect();
    assert_eq!(
        rpc.call(&any_server(&topic), "fib", r#"{"n": 5}"#, T)
            .expect("fib"),
        "3"
    );
    let line = daemon
        .wait_log("streaming 5 Fibonacci numbers", Duration::from_secs(10))
        .expect("the guest's log line");
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(event["target"], "warren::guest");
    assert_eq!(event["fields"]["handler"], topic.as_str());
    let span = &event["span"];
    assert_eq!(span["name"], "delivery", "{line}");
    assert_eq!(span["topic"], topic.as_str());
    assert_eq!(span["method"], "fib");
    assert_eq!(span["version"], 1);
    let msg_id = span["msg_id"].as_str().expect("msg_id in the span");
    assert_eq!(msg_id.len(), 32, "{line}");
    assert!(span["unique_id"].is_string(), "{line}");
    // The daemon's own lines about that delivery carry the same ids.
    let replied = daemon
        .wait_log("\"message\":\"replied\"", Duration::from_secs(10))
        .expect("the reply's log line");
    assert!(replied.contains(msg_id), "{replied}");
}
