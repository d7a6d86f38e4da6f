//! Issue 5, "survive broker faults, crashes and floods without losing a message": the daemon
//! against forced connection cuts, broker restarts, a half-open connection, `kill -9` with work
//! in flight, poison messages, a flood, a slow consumer and a caller that went away.
//!
//! Every test publishes uniquely numbered requests to the `receipt` plugin with publisher
//! confirms (straight to the broker: the faults are between the daemon and the broker), and ends
//! with the Jepsen-style audit of `audit.rs`: nothing confirmed is lost, nothing unexpected runs,
//! duplicates (at-least-once) are reported; then the request queues must be empty with nothing
//! unacked. Faults go through an in-process TCP relay (`relay.rs`) or a private RabbitMQ node
//! (`broker.rs`); the shared broker is only ever read from with `rabbitmqctl list_queues`.
//!
//! `WARREN_TEST_ECHO_LOG=1` echoes the daemons' logs.

mod audit;
pub(crate) mod broker;
pub(crate) mod relay;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use crate::support::{
    Daemon, DeleteQueues, EXCHANGE, broker_url, eventually, handler, plugin, queue_counts, unique,
};
use audit::{Answer, Ledger, Msg, Publisher, Receipts};
use broker::PrivateBroker;
use relay::Relay;

/// Heartbeat of the daemons under test, seconds: short, so a dead peer is noticed quickly.
const HEARTBEAT: u64 = 2;
/// How long a daemon may take to get work flowing again after a fault.
const RESUME: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Plumbing

/// The shared test broker's address, for a relay in front of it.
fn shared_broker_addr() -> SocketAddr {
    let url = url::Url::parse(&broker_url()).expect("broker URL");
    let host = url.host_str().unwrap_or("127.0.0.1");
    (host, url.port().unwrap_or(5672))
        .to_socket_addrs()
        .expect("resolve the broker")
        .next()
        .expect("the broker has an address")
}

/// A whole daemon config: broker `url` with a short heartbeat and quick reconnects, server
/// `server`, a metrics endpoint on a free port, and `handlers`.
fn config(
    url: &str,
    server: &str,
    broker_extra: &str,
    server_extra: &str,
    handlers: &str,
) -> String {
    config_on(url, EXCHANGE, server, broker_extra, server_extra, handlers)
}

/// As [`config`], with control exchange `exchange`.
fn config_on(
    url: &str,
    exchange: &str,
    server: &str,
    broker_extra: &str,
    server_extra: &str,
    handlers: &str,
) -> String {
    format!(
        "[broker]\nurl = \"{url}\"\nexchange = \"{exchange}\"\nheartbeat = {HEARTBEAT}\n\
         reconnect_initial_ms = 50\nreconnect_max_ms = 1000\n{broker_extra}\n\n\
         [server]\nname = \"{server}\"\nshutdown_timeout_secs = 10\nwatch = false\n{server_extra}\n\n\
         [metrics]\naddress = \"127.0.0.1:0\"\n\n{handlers}\n"
    )
}

/// The `receipt` plugin on `topic`, writing to `receipts`.
fn receipt_handler(topic: &str, receipts: &Receipts, extra: &str) -> String {
    handler(
        topic,
        &plugin("receipt"),
        &format!("{}\n{extra}", receipts.grant()),
    )
}

/// Daemon `server` on the broker at `url`, serving the `receipt` plugin on `topic`, with
/// `server_extra` in its `[server]` table.
fn start_receipt_daemon(
    url: &str,
    server: &str,
    topic: &str,
    receipts: &Receipts,
    server_extra: &str,
) -> Daemon {
    Daemon::start_config(
        server,
        &config(
            url,
            server,
            "",
            server_extra,
            &receipt_handler(topic, receipts, ""),
        ),
    )
}

/// The last lines of a daemon's log, for failure messages.
fn tail(daemon: &Daemon) -> String {
    let text = daemon.log_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The metrics endpoint's address, from the daemon's `metrics listening address=…` line.
fn metrics_addr(daemon: &Daemon) -> SocketAddr {
    let line = daemon
        .wait_log("metrics listening", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no 'metrics listening' line; log:\n{}", tail(daemon)));
    let at = line
        .find("address=")
        .unwrap_or_else(|| panic!("no address= in {line:?}"));
    let value: String = line[at + "address=".len()..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    value
        .parse()
        .unwrap_or_else(|e| panic!("address {value:?} in {line:?}: {e}"))
}

/// `GET path` over HTTP/1.0: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Some((status, body))
}

/// Poll `/healthz` until it answers `status` (at most `limit`); returns how long that took.
fn wait_health(addr: SocketAddr, status: u16, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    eventually(limit, || {
        (http_get(addr, "/healthz").map(|(s, _)| s) == Some(status)).then_some(start.elapsed())
    })
}

/// Wait until each of `queues` reports nothing ready and nothing unacked (per `counts`).
fn assert_drained(
    counts: impl Fn(&str) -> Option<(u64, u64)>,
    queues: &[String],
    limit: Duration,
    context: &dyn Fn() -> String,
) {
    for queue in queues {
        let mut last = None;
        let drained = eventually(limit, || {
            last = counts(queue);
            matches!(last, Some((0, 0))).then_some(())
        });
        assert!(
            drained.is_some(),
            "queue {queue} is not drained: (ready, unacked) = {last:?}\n{}",
            context()
        );
    }
}

/// Every confirmed call got an answer with its id as the result (waits at most `limit`).
fn assert_calls_answered(publisher: &Publisher, ledger: &Ledger, limit: Duration) {
    let calls: Vec<u64> = ledger
        .calls
        .intersection(&ledger.must_handle())
        .copied()
        .collect();
    let mut missing = Vec::new();
    eventually(limit, || {
        let answers = publisher.answers();
        missing = calls
            .iter()
            .filter(|id| {
                !answers
                    .get(id)
                    .is_some_and(|a| a.contains(&Answer::Ok(id.to_string())))
            })
            .copied()
            .collect();
        missing.is_empty().then_some(())
    });
    assert!(
        missing.is_empty(),
        "{} of {} confirmed calls never got their result: {:?}",
        missing.len(),
        calls.len(),
        &missing[..missing.len().min(20)]
    );
}

/// Run `f` with a channel on a fresh connection to `url`.
fn with_channel<T>(url: &str, f: impl AsyncFnOnce(&lapin::Channel) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("connect to the broker");
        let channel = conn.create_channel().await.expect("channel");
        let out = f(&channel).await;
        let _ = conn.close(200, "bye".into()).await;
        out
    })
}

/// A header value as text.
fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// A message taken from a queue: routing key, headers as text, body.
#[derive(Debug)]
struct Taken {
    routing_key: String,
    headers: std::collections::BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Taken {
    /// The `id` in the request's args.
    fn id(&self) -> Option<u64> {
        let request = warren::wire::decode_request(&self.body).ok()?;
        let args: serde_json::Value = serde_json::from_str(request.args.get()).ok()?;
        args["id"].as_u64()
    }
}

/// Take (and ack) every message in `queue`.
fn take_all(url: &str, queue: &str) -> Vec<Taken> {
    with_channel(url, async |channel| {
        let mut taken = Vec::new();
        while let Ok(Some(msg)) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
        {
            let d = msg.delivery;
            let headers = d
                .properties
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), header_text(v)))
                        .collect()
                })
                .unwrap_or_default();
            taken.push(Taken {
                routing_key: d.routing_key.as_str().to_owned(),
                headers,
                body: d.data,
            });
        }
        taken
    })
}

/// Deletes an exchange and the queue of the same name (a dead-letter exchange and its queue, or
/// a test's own control exchange) on the shared broker when dropped.
struct DeleteDeadLetters(String);

impl Drop for DeleteDeadLetters {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::panic::catch_unwind(move || {
            with_channel(&broker_url(), async |channel| {
                let _ = channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = channel
                    .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            })
        });
    }
}

/// The request queues of `topic` on `server`.
fn rpc_queues(topic: &str, server: &str) -> Vec<String> {
    vec![topic.to_owned(), format!("{topic}.{server}")]
}

fn far(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

// ---------------------------------------------------------------------------------------------
// The infrastructure itself

#[test]
fn private_broker_keeps_durable_messages_across_an_app_restart() {
    let broker = PrivateBroker::start();
    let queue = unique("ft_private");
    with_channel(&broker.url(), async |channel| {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"kept",
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(matches!(confirm, lapin::Confirmation::Ack(None)));
    });
    assert_eq!(broker.queue_counts(&queue), Some((1, 0)));
    let down = broker.restart_app();
    assert_eq!(
        broker.queue_counts(&queue),
        Some((1, 0)),
        "the persistent message survived stop_app/start_app ({down:?})"
    );
    let taken = take_all(&broker.url(), &queue);
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].body, b"kept");
}

// ---------------------------------------------------------------------------------------------
// Faults

#[test]
fn fifty_connection_cuts_under_load_lose_nothing() {
    let started = Instant::now();
    let topic = unique("ft_cuts");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let relay = Relay::start(shared_broker_addr());
    let receipts = Receipts::new();
    let daemon = start_receipt_daemon(&relay.url(&broker_url()), &server, &topic, &receipts, "");
    let mut publisher = Publisher::new(&broker_url(), EXCHANGE, &topic);
    let deadline = far(300);
    let per_round = 40;
    let mut cut_connections = 0;
    for round in 0..50u64 {
        let first = round * per_round;
        // Every 4th a call; a little spinning so that some of the round is in flight at the cut.
        publisher.publish(Msg::batch(first, per_round, 4, 10), 64, deadline);
        // Work flows: the daemon is connected and consuming (again, after the last cut).
        let resumed = eventually(RESUME, || {
            let counts = receipts.counts();
            (first..first + per_round)
                .any(|id| counts.contains_key(&id))
                .then_some(())
        });
        assert!(
            resumed.is_some(),
            "round {round}: nothing of it was handled within {RESUME:?}; log:\n{}",
            tail(&daemon)
        );
        let cut = relay.cut();
        assert!(
            cut > 0,
            "round {round}: the daemon had no connection to cut"
        );
        cut_connections += cut;
    }
    let ledger = publisher.ledger.clone();
    let report = receipts.wait_audit(
        &ledger,
        Duration::from_secs(120),
        Duration::from_millis(100),
    );
    eprintln!(
        "50 cuts ({cut_connections} connections): {report}; {} daemon reconnects logged; {:?}",
        daemon.count_log("broker connection lost"),
        started.elapsed()
    );
    report.assert_clean(&tail(&daemon));
    assert_eq!(report.confirmed, 2000);
    assert_calls_answered(&publisher, &ledger, Duration::from_secs(30));
    assert!(
        daemon.count_log("broker connection lost") >= 50,
        "every cut is noticed and logged; log:\n{}",
        tail(&daemon)
    );
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(30),
        &|| tail(&daemon),
    );
}

#[test]
fn client_call_in_flight_at_a_cut_fails_and_the_next_call_reconnects() {
    use warren::client::{Client, Target};
    let topic = unique("ft_client");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let receipts = Receipts::new();
    // The daemon connects directly; only the client goes through the relay.
    let daemon = start_receipt_daemon(&broker_url(), &server, &topic, &receipts, "");
    let relay = Relay::start(shared_broker_addr());
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let client = Arc::new(
        rt.block_on(Client::connect(&relay.url(&broker_url()), EXCHANGE))
            .expect("client connects through the relay"),
    );
    let target = Target::topic(&topic);
    let args = |id: u64, spin: u64| {
        serde_json::value::RawValue::from_string(format!(r#"{{"id": {id}, "spin_ms": {spin}}}"#))
            .expect("JSON")
    };
    let context = serde_json::Map::new();
    let first_queue = rt.block_on(client.reply_queue()).expect("reply queue");
    let ok = rt.block_on(client.call(
        &target,
        "record",
        &args(1, 0),
        &context,
        Duration::from_secs(10),
    ));
    assert_eq!(ok.expect("a call before the cut").get(), "1");

    // A call that spins 3 s; the cut comes while it runs.
    let in_flight = {
        let client = Arc::clone(&client);
        let target = target.clone();
        let handle = rt.handle().clone();
        let a = args(2, 3000);
        std::thread::spawn(move || {
            let start = Instant::now();
            let outcome = handle.block_on(client.call(
                &target,
                "record",
                &a,
                &serde_json::Map::new(),
                Duration::from_secs(30),
            ));
            (outcome.map(|r| r.get().to_owned()), start.elapsed())
        })
    };
    let taken = daemon.wait_log("receipt 2 spinning", Duration::from_secs(10));
    assert!(
        taken.is_some(),
        "the daemon never took the spinning call; log:\n{}",
        tail(&daemon)
    );
    assert!(relay.cut() > 0, "the client had a connection to cut");
    let (outcome, took) = in_flight.join().expect("caller thread");
    assert!(
        outcome.is_err(),
        "a call in flight at the cut fails, got {outcome:?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "it fails promptly, not at its 30 s timeout: {took:?} ({outcome:?})"
    );
    let ok = rt.block_on(client.call(
        &target,
        "record",
        &args(3, 0),
        &context,
        Duration::from_secs(10),
    ));
    assert_eq!(
        ok.expect("the next call reconnects").get(),
        "3",
        "log:\n{}",
        tail(&daemon)
    );
    let second_queue = rt.block_on(client.reply_queue()).expect("reply queue");
    assert_ne!(
        first_queue, second_queue,
        "a fresh reply queue after the reconnect"
    );
    // The request itself was not lost: it ran (its reply had nowhere to go).
    let mut ledger = Ledger::default();
    ledger.attempted.extend([1, 2, 3]);
    ledger.confirmed.extend([1, 2, 3]);
    let report = receipts.wait_audit(&ledger, Duration::from_secs(20), Duration::from_millis(50));
    report.assert_clean(&tail(&daemon));
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(20),
        &|| tail(&daemon),
    );
    if let Ok(client) = Arc::try_unwrap(client) {
        rt.block_on(client.close());
    }
}

#[test]
fn five_broker_restarts_under_load_lose_nothing() {
    let started = Instant::now();
    let mut broker = PrivateBroker::start();
    let topic = unique("ft_restart");
    let server = unique("d");
    let receipts = Receipts::new();
    // Quorum (durable) queues and persistent messages: what survives a broker restart.
    let daemon = Daemon::start_config(
        &server,
        &config(
            &broker.url(),
            &server,
            "quorum = true",
            "",
            &receipt_handler(&topic, &receipts, ""),
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let (url, topic, stop) = (broker.url(), topic.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut publisher = Publisher::new(&url, EXCHANGE, &topic);
            let deadline = far(600);
            let mut next = 0;
            while !stop.load(Ordering::SeqCst) {
                publisher.publish(Msg::batch(next, 25, 0, 5), 25, deadline);
                next += 25;
                // Pacing, not synchronisation: about 250 requests a second, so the load is
                // steady rather than a backlog the size of the test's run time.
                std::thread::sleep(Duration::from_millis(100));
            }
            publisher.ledger.clone()
        })
    };
    let mut downtimes = Vec::new();
    for i in 0..5 {
        let before = receipts.lines();
        let flowing = eventually(Duration::from_secs(60), || {
            (receipts.lines() >= before + 50).then_some(())
        });
        assert!(
            flowing.is_some(),
            "before restart {i}: nothing handled within 60 s; log:\n{}\nbroker:\n{}",
            tail(&daemon),
            broker.log_tail()
        );
        // Four application restarts, then one of the whole node.
        downtimes.push(if i < 4 {
            broker.restart_app()
        } else {
            broker.restart_node()
        });
    }
    let before = receipts.lines();
    let flowing = eventually(Duration::from_secs(60), || {
        (receipts.lines() >= before + 50).then_some(())
    });
    assert!(
        flowing.is_some(),
        "after the last restart: nothing handled within 60 s; log:\n{}",
        tail(&daemon)
    );
    stop.store(true, Ordering::SeqCst);
    let ledger = publishing.join().expect("publisher thread");
    let report = receipts.wait_audit(
        &ledger,
        Duration::from_secs(120),
        Duration::from_millis(200),
    );
    eprintln!(
        "5 restarts (down {downtimes:?}): {report}; publisher reconnects {}; daemon logged {} \
         losses; {:?}",
        ledger.reconnects,
        daemon.count_log("broker connection lost"),
        started.elapsed()
    );
    report.assert_clean(&tail(&daemon));
    assert!(
        daemon.count_log("broker connection lost") >= 5,
        "log:\n{}",
        tail(&daemon)
    );
    assert_drained(
        |q| broker.queue_counts(q),
        &rpc_queues(&topic, &server),
        Duration::from_secs(30),
        &|| tail(&daemon),
    );
}

#[test]
fn half_open_connection_is_detected_within_two_heartbeats_and_recovers() {
    let topic = unique("ft_halfopen");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let relay = Relay::start(shared_broker_addr());
    let receipts = Receipts::new();
    let daemon = start_receipt_daemon(&relay.url(&broker_url()), &server, &topic, &receipts, "");
    let metrics = metrics_addr(&daemon);
    assert!(
        wait_health(metrics, 200, Duration::from_secs(10)).is_some(),
        "/healthz is 200 while connected: {:?}",
        http_get(metrics, "/healthz")
    );
    let mut publisher = Publisher::new(&broker_url(), EXCHANGE, &topic);
    publisher.publish(Msg::batch(0, 20, 4, 0), 20, far(60));
    let flowing = eventually(Duration::from_secs(20), || {
        (receipts.distinct() == 20).then_some(())
    });
    assert!(flowing.is_some(), "log:\n{}", tail(&daemon));
    assert_calls_answered(
        &publisher,
        &publisher.ledger.clone(),
        Duration::from_secs(20),
    );

    // The connection goes silent while a call is in flight: its reply and ack are stuck
    // behind the dead peer, and the caller must still get its answer in the end.
    publisher.publish(vec![Msg::call(100, 1000)], 1, far(30));
    assert!(
        daemon
            .wait_log("receipt 100 spinning", Duration::from_secs(10))
            .is_some(),
        "log:\n{}",
        tail(&daemon)
    );
    let lost_before = daemon.count_log("broker connection lost");
    relay.stall();
    let stalled = Instant::now();
    // lapin declares the peer dead after 2 heartbeats of silence, checked every half heartbeat.
    let limit = Duration::from_secs(2 * HEARTBEAT) + Duration::from_secs(2);
    let detected = eventually(limit + Duration::from_secs(10), || {
        (daemon.count_log("broker connection lost") > lost_before).then(|| stalled.elapsed())
    });
    let detected = detected.unwrap_or_else(|| {
        panic!(
            "the half-open connection was never noticed; log:\n{}",
            tail(&daemon)
        )
    });
    assert!(
        detected <= limit,
        "noticed after {detected:?}, more than two heartbeats ({HEARTBEAT} s) and slack"
    );
    let unhealthy = wait_health(metrics, 503, Duration::from_secs(5));
    assert!(
        unhealthy.is_some(),
        "/healthz turns 503 while the broker is unreachable: {:?}",
        http_get(metrics, "/healthz")
    );
    // Work published meanwhile waits in the broker.
    publisher.publish(Msg::batch(20, 20, 4, 0), 20, far(60));

    relay.restore();
    let healthy = wait_health(metrics, 200, Duration::from_secs(30));
    assert!(
        healthy.is_some(),
        "/healthz back to 200 after restore; log:\n{}",
        tail(&daemon)
    );
    let ledger = publisher.ledger.clone();
    let report = receipts.wait_audit(&ledger, Duration::from_secs(30), Duration::from_millis(50));
    eprintln!("half-open: noticed after {detected:?}, healthy {healthy:?} after restore; {report}");
    report.assert_clean(&tail(&daemon));
    assert_calls_answered(&publisher, &ledger, Duration::from_secs(20));
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(20),
        &|| tail(&daemon),
    );
}

#[test]
fn kill_9_with_work_in_flight_then_restart_handles_every_request() {
    let topic = unique("ft_kill");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let receipts = Receipts::new();
    let text = config(
        &broker_url(),
        &server,
        "",
        "",
        &receipt_handler(&topic, &receipts, ""),
    );
    let mut first = Daemon::start_config(&server, &text);
    let mut publisher = Publisher::new(&broker_url(), EXCHANGE, &topic);
    // 60 requests of 300 ms each, 16 at a time: a couple of seconds of work.
    publisher.publish(Msg::batch(0, 60, 5, 300), 60, far(60));
    let started = eventually(Duration::from_secs(20), || {
        (receipts.lines() >= 5).then_some(())
    });
    assert!(started.is_some(), "log:\n{}", tail(&first));
    first.kill_hard();
    let handled_before = receipts.distinct();
    assert!(
        handled_before < 60,
        "the kill came too late: all {handled_before} were done"
    );
    // Nothing is unacked any more: the broker took back what the dead daemon held.
    let mut returned = None;
    eventually(Duration::from_secs(10), || {
        returned = queue_counts(&topic);
        matches!(returned, Some((ready, 0)) if ready > 0).then_some(())
    });
    assert!(
        matches!(returned, Some((ready, 0)) if ready > 0),
        "the killed daemon's unacked requests are back in the queue: {returned:?}"
    );

    let second = Daemon::start_config(&server, &text);
    let ledger = publisher.ledger.clone();
    let report = receipts.wait_audit(&ledger, Duration::from_secs(60), Duration::from_millis(50));
    eprintln!("kill -9: {handled_before} handled before the kill, {returned:?} returned; {report}");
    report.assert_clean(&tail(&second));
    assert_calls_answered(&publisher, &ledger, Duration::from_secs(20));
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(20),
        &|| tail(&second),
    );
}

#[test]
fn a_crashing_cast_is_dead_lettered_with_a_reason_and_the_good_ones_are_handled() {
    let topic = unique("ft_poison");
    let server = unique("d");
    let dlx = unique("ft_dlx");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let _dead = DeleteDeadLetters(dlx.clone());
    let receipts = Receipts::new();
    let daemon = start_receipt_daemon(
        &broker_url(),
        &server,
        &topic,
        &receipts,
        &format!("max_deliveries = 3\ndead_letter_exchange = \"{dlx}\""),
    );
    let mut publisher = Publisher::new(&broker_url(), EXCHANGE, &topic);
    let mut msgs = Msg::batch(0, 100, 10, 0);
    let poison = |id, call| Msg {
        id,
        call,
        spin_ms: 0,
        method: "poison",
    };
    // Three crashing casts and one crashing call among the good ones.
    msgs.insert(10, poison(1000, false));
    msgs.insert(50, poison(1001, false));
    msgs.insert(90, poison(1002, false));
    msgs.insert(70, poison(2000, true));
    publisher.publish(msgs, 32, far(60));
    let ledger = publisher.ledger.clone();
    let report = receipts.wait_audit(&ledger, Duration::from_secs(30), Duration::from_millis(50));
    report.assert_clean(&tail(&daemon));
    assert_calls_answered(&publisher, &ledger, Duration::from_secs(20));
    // The crashing call is answered with the failure, not dead-lettered.
    let answers = publisher.answers();
    let got = eventually(Duration::from_secs(20), || {
        publisher.answers().get(&2000).cloned()
    });
    assert_eq!(
        got,
        Some(vec![Answer::Failed("GuestTrap".into())]),
        "{answers:?}"
    );
    // Exactly the crashed casts are in the dead-letter queue, with why.
    eventually(Duration::from_secs(20), || {
        (queue_counts(&dlx) == Some((3, 0))).then_some(())
    });
    let dead = take_all(&broker_url(), &dlx);
    let mut ids: Vec<u64> = dead.iter().filter_map(Taken::id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [1000, 1001, 1002], "{dead:?}\nlog:\n{}", tail(&daemon));
    for msg in &dead {
        assert_eq!(msg.routing_key, topic, "{msg:?}");
        assert_eq!(msg.headers.get("x-warren-topic"), Some(&topic), "{msg:?}");
        assert_eq!(
            msg.headers.get("x-warren-class").map(String::as_str),
            Some("GuestTrap"),
            "{msg:?}"
        );
        assert!(
            msg.headers
                .get("x-warren-reason")
                .is_some_and(|r| !r.is_empty()),
            "{msg:?}"
        );
        assert!(msg.headers.contains_key("x-warren-deliveries"), "{msg:?}");
    }
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(20),
        &|| tail(&daemon),
    );
}

#[test]
fn a_request_that_keeps_killing_the_daemon_is_dead_lettered_after_max_deliveries() {
    const MAX_DELIVERIES: u32 = 3;
    let topic = unique("ft_crashloop");
    let server = unique("d");
    let dlx = unique("ft_dlx");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let _dead = DeleteDeadLetters(dlx.clone());
    let receipts = Receipts::new();
    // Quorum queues count deliveries across daemon processes (x-delivery-count). They are
    // durable, and so is the control exchange then: a fresh one, as the shared broker's
    // `openstack` exchange is not durable.
    let exchange = unique("ft_x");
    let _exchange = DeleteDeadLetters(exchange.clone());
    let text = config_on(
        &broker_url(),
        &exchange,
        &server,
        "quorum = true",
        &format!(
            "max_deliveries = {MAX_DELIVERIES}\ndead_letter_exchange = \"{dlx}\"\nconcurrency = 1\nprefetch = 1"
        ),
        &receipt_handler(&topic, &receipts, "timeout_ms = 120000"),
    );
    let mut daemon = Daemon::start_config(&server, &text);
    let mut publisher = Publisher::new(&broker_url(), &exchange, &topic);
    // Spins for a minute: every daemon that takes it is killed while it runs, as often as
    // `max_deliveries` allows. The delivery after that must be dead-lettered, not run. No
    // daemon is killed after the last allowed crash: one killed while dead-lettering (after
    // the dead-letter was confirmed, before the ack) would leave the request both in the
    // dead-letter queue and on its topic, to be dead-lettered twice.
    publisher.publish(vec![Msg::cast(7, 60_000)], 1, far(30));
    for kills in 0..MAX_DELIVERIES {
        let state = eventually(Duration::from_secs(30), || {
            if queue_counts(&dlx).is_some_and(|(ready, _)| ready > 0) {
                Some("dead-lettered")
            } else {
                (queue_counts(&topic) == Some((0, 1))).then_some("running")
            }
        });
        assert_eq!(
            state,
            Some("running"),
            "delivery {} of at most {MAX_DELIVERIES}, after {kills} crashes; log:\n{}",
            kills + 1,
            tail(&daemon)
        );
        daemon.kill_hard();
        // Back on the queue before the next daemon starts, so the next "running" is that
        // daemon's delivery, not this one's before the broker saw the connection drop.
        let requeued = eventually(Duration::from_secs(30), || {
            (queue_counts(&topic) == Some((1, 0))).then_some(())
        });
        assert!(requeued.is_some(), "not requeued after crash {}", kills + 1);
        daemon = Daemon::start_config(&server, &text);
    }
    let dead_lettered = eventually(Duration::from_secs(30), || {
        queue_counts(&dlx).filter(|(ready, _)| *ready > 0)
    });
    assert!(
        dead_lettered.is_some(),
        "not dead-lettered after {MAX_DELIVERIES} crashes; log:\n{}",
        tail(&daemon)
    );
    let dead = take_all(&broker_url(), &dlx);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id(), Some(7));
    let reason = dead[0]
        .headers
        .get("x-warren-reason")
        .cloned()
        .unwrap_or_default();
    assert!(!reason.is_empty(), "{dead:?}");
    let deliveries: u64 = dead[0]
        .headers
        .get("x-warren-deliveries")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        deliveries,
        u64::from(MAX_DELIVERIES) + 1,
        "the delivery after the last allowed crash: {dead:?}"
    );
    assert!(
        receipts.counts().is_empty(),
        "the poison request never completed"
    );
    // The daemon that dead-lettered it still serves.
    publisher.publish(vec![Msg::call(8, 0)], 1, far(30));
    let mut ledger = publisher.ledger.clone();
    // 7 was dead-lettered, not lost, and must never have completed.
    ledger.poison.insert(7);
    let report = receipts.wait_audit(&ledger, Duration::from_secs(20), Duration::from_millis(50));
    assert_calls_answered(&publisher, &ledger, Duration::from_secs(20));
    report.assert_clean(&tail(&daemon));
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(20),
        &|| tail(&daemon),
    );
}

#[test]
fn flood_of_100k_casts_from_4_publishers_is_handled_in_bounded_memory() {
    const PUBLISHERS: u64 = 4;
    const PER: u64 = 25_000;
    let topic = unique("ft_flood");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let receipts = Receipts::new();
    let daemon = start_receipt_daemon(&broker_url(), &server, &topic, &receipts, "");
    // Warm up (module instances, pools, buffers) before taking the baseline.
    let mut warm = Publisher::new(&broker_url(), EXCHANGE, &topic);
    let warm_ids = 1_000_000..1_002_000u64;
    warm.publish(
        warm_ids.clone().map(|id| Msg::cast(id, 0)).collect(),
        256,
        far(120),
    );
    let warmed = eventually(Duration::from_secs(120), || {
        (receipts.lines() >= 2000).then_some(())
    });
    assert!(warmed.is_some(), "log:\n{}", tail(&daemon));
    let baseline = daemon.rss_kib().expect("daemon RSS");

    let done = Arc::new(AtomicBool::new(false));
    let pid = daemon.pid();
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(Ordering::SeqCst) {
                let rss = crate::support::rss_kib_of(pid).unwrap_or(0);
                peak = peak.max(rss);
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let start = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let topic = topic.clone();
            std::thread::spawn(move || {
                let mut publisher = Publisher::new(&broker_url(), EXCHANGE, &topic);
                let msgs = (p * PER..(p + 1) * PER)
                    .map(|id| Msg::cast(id, 0))
                    .collect();
                publisher.publish(msgs, 256, far(900));
                publisher.ledger.clone()
            })
        })
        .collect();
    let mut ledger = warm.ledger.clone();
    for p in publishers {
        ledger.merge(p.join().expect("publisher thread"));
    }
    let published = start.elapsed();
    let report = receipts.wait_audit(
        &ledger,
        Duration::from_secs(900),
        Duration::from_millis(500),
    );
    let handled = start.elapsed();
    done.store(true, Ordering::SeqCst);
    let peak = sampler.join().expect("sampler");
    let rate = (PUBLISHERS * PER) as f64 / handled.as_secs_f64();
    eprintln!(
        "flood: published in {published:?}, all handled in {handled:?} ({rate:.0}/s); RSS \
         {baseline} KiB at the start, peak {peak} KiB; {report}"
    );
    report.assert_clean(&tail(&daemon));
    assert_eq!(report.confirmed as u64, PUBLISHERS * PER + 2000);
    assert!(
        peak < baseline + 64 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB during the flood"
    );
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(30),
        &|| tail(&daemon),
    );
}

#[test]
fn slow_consumer_never_holds_more_than_prefetch_unacked() {
    const PREFETCH: u64 = 4;
    let topic = unique("ft_slow");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let receipts = Receipts::new();
    let daemon = start_receipt_daemon(
        &broker_url(),
        &server,
        &topic,
        &receipts,
        &format!("prefetch = {PREFETCH}\nconcurrency = 16"),
    );
    let mut publisher = Publisher::new(&broker_url(), EXCHANGE, &topic);
    // 10 x prefetch requests of 2 s each: 20 s of work at 4 at a time, long enough for several
    // `rabbitmqctl list_queues` samples even on a loaded machine (one can take seconds).
    let total = 10 * PREFETCH;
    publisher.publish(Msg::batch(0, total, 0, 2000), total as usize, far(60));
    let mut samples = Vec::new();
    let finished = eventually(Duration::from_secs(90), || {
        if let Some(counts) = queue_counts(&topic) {
            samples.push(counts);
        }
        (receipts.distinct() as u64 == total).then_some(())
    });
    assert!(finished.is_some(), "log:\n{}", tail(&daemon));
    eprintln!("slow consumer: (ready, unacked) samples {samples:?}");
    let max_unacked = samples.iter().map(|s| s.1).max().unwrap_or(0);
    assert!(
        max_unacked <= PREFETCH,
        "unacked exceeded prefetch {PREFETCH}: {samples:?}"
    );
    assert!(
        samples
            .iter()
            .any(|&(ready, unacked)| ready > 0 && unacked > 0),
        "no sample caught the broker holding messages back while the daemon was busy: {samples:?}"
    );
    let report = receipts.wait_audit(
        &publisher.ledger,
        Duration::from_secs(5),
        Duration::from_millis(50),
    );
    report.assert_clean(&tail(&daemon));
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(20),
        &|| tail(&daemon),
    );
}

#[test]
fn reply_to_a_caller_that_went_away_is_dropped_logged_and_the_request_acked() {
    let topic = unique("ft_gone");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let receipts = Receipts::new();
    let daemon = start_receipt_daemon(&broker_url(), &server, &topic, &receipts, "");
    // The caller publishes a call that takes 1.5 s, then goes away with its (exclusive) reply
    // queue before the answer.
    let mut caller = Publisher::new(&broker_url(), EXCHANGE, &topic);
    caller.publish(vec![Msg::call(1, 1500)], 1, far(30));
    let reply_queue = caller.reply_queue().to_owned();
    caller.close();
    let dropped = daemon.wait_log("reply dropped", Duration::from_secs(20));
    assert!(
        dropped.is_some(),
        "the daemon logs the reply it could not deliver; log:\n{}",
        tail(&daemon)
    );
    assert_eq!(receipts.counts().get(&1), Some(&1), "the call ran once");
    assert!(
        queue_counts(&reply_queue).is_none(),
        "the reply queue is gone"
    );
    assert_drained(
        queue_counts,
        &rpc_queues(&topic, &server),
        Duration::from_secs(20),
        &|| tail(&daemon),
    );
    // And it keeps serving.
    let mut next = Publisher::new(&broker_url(), EXCHANGE, &topic);
    next.publish(vec![Msg::call(2, 0)], 1, far(30));
    assert_calls_answered(&next, &next.ledger.clone(), Duration::from_secs(20));
    assert_eq!(daemon.count_log("panicked"), 0, "log:\n{}", tail(&daemon));
}

/// A consumer the broker cancels (its queue was deleted) is declared again and resumed, on the
/// same connection.
#[test]
fn a_queue_deleted_under_the_daemon_is_declared_again_and_consumed() {
    let topic = unique("ft_deleted");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = Daemon::start(&server, &handler(&topic, &plugin("echo"), ""));
    let rpc = crate::support::Rpc::connect();
    let target = crate::support::any_server(&topic);
    let limit = Duration::from_secs(10);
    assert_eq!(
        rpc.call(&target, "echo", r#"{"value": 1}"#, limit)
            .expect("echo"),
        "1"
    );
    with_channel(&broker_url(), async |ch| {
        ch.queue_delete(topic.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the topic queue")
    });
    daemon
        .wait_log("cancelled by the broker", Duration::from_secs(10))
        .expect("the daemon notices the cancelled consumer");
    // Until the queue is back a call is unroutable; then it is answered.
    let answered = eventually(Duration::from_secs(20), || {
        rpc.call(&target, "echo", r#"{"value": 2}"#, limit).ok()
    });
    assert_eq!(answered.as_deref(), Some("2"), "{}", daemon.log_text());
    assert_eq!(daemon.count_log("broker connection lost"), 0);
}
