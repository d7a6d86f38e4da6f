//! `warren serve` end to end against the real broker: every verb through the Rust client and
//! the CLI, routing with two daemons, failures, timeouts, hostile messages, shutdown, and a
//! nova Essex caller.

use std::time::{Duration, Instant};

use warren::client::CallError;

use crate::support::{
    Daemon, DeleteQueues, EXCHANGE, Rpc, any_server, eventually, handler, interop_script,
    on_server, plugin, publish_raw, queue_counts, remote_error, serve_plugin, serve_wat, spin_wat,
    unique, warren_remote, whoami_wat,
};

const CALL: Duration = Duration::from_secs(10);
const SEEN: Duration = Duration::from_secs(10);

#[test]
fn call_echo_returns_42_via_library_and_cli() {
    let topic = unique("it_echo");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let _daemon = serve_plugin(&server, &topic, "echo");

    let rpc = Rpc::connect();
    let result = rpc.call(&any_server(&topic), "echo", r#"{"value": 42}"#, CALL);
    assert_eq!(result.expect("echo answers"), "42");

    let out = warren_remote(&[
        "call",
        &topic,
        "echo",
        r#"{"value": 42}"#,
        "--timeout",
        "10",
    ]);
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "42"), "{out:?}");
}

#[test]
fn cast_runs_the_handler_via_library_and_cli() {
    let topic = unique("it_cast");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = serve_wat(&server, &topic, &whoami_wat("W"), "");

    let rpc = Rpc::connect();
    rpc.cast(&any_server(&topic), "note", r#"{"via": "library"}"#);
    assert!(
        daemon
            .wait_log(r#"W got {"via": "library"}"#, SEEN)
            .is_some(),
        "the cast never reached the handler; log:\n{}",
        daemon.log_text()
    );

    warren_remote(&["cast", &topic, "note", r#"{"via": "cli"}"#]).assert_success();
    assert!(
        daemon.wait_log(r#"W got {"via": "cli"}"#, SEEN).is_some(),
        "the CLI cast never reached the handler; log:\n{}",
        daemon.log_text()
    );
}

#[test]
fn multicall_streams_fib_in_order_and_call_returns_the_last() {
    let topic = unique("it_fib");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let _daemon = serve_plugin(&server, &topic, "calc");
    let target = any_server(&topic);

    let rpc = Rpc::connect();
    let items: Vec<String> = rpc
        .multicall(&target, "fib", r#"{"n": 5}"#, CALL)
        .into_iter()
        .map(|item| item.expect("every item is a result"))
        .collect();
    assert_eq!(items, ["0", "1", "1", "2", "3"]);

    let out = warren_remote(&["multicall", &topic, "fib", r#"{"n": 5}"#, "--timeout", "10"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "0\n1\n1\n2\n3"),
        "{out:?}"
    );

    let last = rpc.call(&target, "fib", r#"{"n": 5}"#, CALL);
    assert_eq!(last.expect("fib answers a call"), "3");
}

#[test]
fn fanout_cast_reaches_every_daemon_of_the_topic() {
    let topic = unique("it_fanout");
    let (a, b) = (unique("A"), unique("B"));
    let _cleanup = DeleteQueues::rpc(&topic, &[&a, &b]);
    let daemons = [a, b].map(|name| serve_wat(&name, &topic, &whoami_wat(&name), ""));

    let rpc = Rpc::connect();
    rpc.fanout(&topic, "note", r#"{"via": "library"}"#);
    warren_remote(&["fanout", &topic, "note", r#"{"via": "cli"}"#]).assert_success();

    for daemon in &daemons {
        let who = &daemon.server;
        for via in ["library", "cli"] {
            let line = format!(r#"{who} got {{"via": "{via}"}}"#);
            assert!(
                daemon.wait_log(&line, SEEN).is_some(),
                "daemon {who} missed the {via} fanout; log:\n{}",
                daemon.log_text()
            );
        }
    }
}

#[test]
fn server_targeted_calls_reach_only_that_server() {
    let topic = unique("it_target");
    let (a, b) = (unique("A"), unique("B"));
    let _cleanup = DeleteQueues::rpc(&topic, &[&a, &b]);
    let _daemons = [&a, &b].map(|name| serve_wat(name, &topic, &whoami_wat(name), ""));

    let rpc = Rpc::connect();
    for server in [&a, &b] {
        let answers: Vec<String> = (0..10)
            .map(|_| {
                rpc.call(&on_server(&topic, server), "whoami", "{}", CALL)
                    .expect("whoami answers")
            })
            .collect();
        assert_eq!(
            answers,
            vec![format!("\"{server}\""); 10],
            "server={server}"
        );
    }
    let out = warren_remote(&["call", &topic, "whoami", "--server", &b, "--timeout", "10"]);
    assert_eq!(
        (out.code, &out.stdout),
        (Some(0), &format!("\"{b}\"")),
        "{out:?}"
    );
}

#[test]
fn failures_and_unknown_methods_are_remote_errors() {
    let topic = unique("it_errors");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let _daemon = serve_plugin(&server, &topic, "calc");
    let target = any_server(&topic);

    let rpc = Rpc::connect();
    // Args that are not an object are answered, not dropped (the caller would wait forever).
    let err = remote_error(rpc.call(&target, "add", "[1, 2]", CALL));
    assert_eq!(err.class, "InvalidArgs", "{err:?}");
    let err = remote_error(rpc.call(&target, "div", r#"{"a": 1, "b": 0}"#, CALL));
    assert_eq!(err.class, "ZeroDivisionError", "{err:?}");
    assert_eq!(
        err.kwargs.get("data"),
        Some(&serde_json::json!({"a": 1, "b": 0})),
        "{err:?}"
    );
    let err = remote_error(rpc.call(&target, "no_such_method", "{}", CALL));
    assert_eq!(err.class, "NoSuchMethod", "{err:?}");

    for (method, args, class) in [
        ("div", r#"{"a": 1, "b": 0}"#, "ZeroDivisionError"),
        ("no_such_method", "{}", "NoSuchMethod"),
    ] {
        let out = warren_remote(&["call", &topic, method, args, "--timeout", "10"]);
        assert_eq!((out.code, out.stdout.as_str()), (Some(1), ""), "{out:?}");
        assert!(out.stderr.contains(class), "{out:?}");
    }
}

#[test]
fn handler_timeout_is_a_remote_timeout_error() {
    let topic = unique("it_htimeout");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let _daemon = serve_wat(&server, &topic, &spin_wat(), "timeout_ms = 300");

    let rpc = Rpc::connect();
    let start = Instant::now();
    let err = remote_error(rpc.call(&any_server(&topic), "spin", "{}", CALL));
    assert_eq!(err.class, "Timeout", "{err:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "stopped before its limit: {:?}",
        start.elapsed()
    );
}

#[test]
fn client_timeout_returns_timeout_and_the_daemon_keeps_serving() {
    let topic = unique("it_ctimeout");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = serve_wat(&server, &topic, &spin_wat(), "timeout_ms = 5000");
    let target = any_server(&topic);

    let rpc = Rpc::connect();
    let start = Instant::now();
    let outcome = rpc.call(&target, "spin", "{}", Duration::from_millis(500));
    assert!(
        matches!(outcome, Err(CallError::Timeout { .. })),
        "{outcome:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the client waited {:?}",
        start.elapsed()
    );
    // The spinner still holds an invocation; the same topic answers meanwhile.
    assert!(daemon.wait_log("spinning", SEEN).is_some());
    let echoed = rpc.call(&target, "echo_args", r#"{"value": 42}"#, CALL);
    assert_eq!(
        echoed.expect("the daemon still answers"),
        r#"{"value": 42}"#
    );
}

/// Guests run on the daemon's async workers and give the thread back at every epoch tick, so
/// more spinning guests than there are worker threads must not stop other requests: the echo
/// is answered while every spinner is still running (none has reached its time limit).
#[test]
fn spinning_guests_outnumbering_the_worker_threads_do_not_stall_other_requests() {
    let topic = unique("it_yield");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = serve_wat(&server, &topic, &spin_wat(), "timeout_ms = 8000");
    let target = any_server(&topic);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners = 2 * workers + 1;

    let rpc = Rpc::connect();
    for _ in 0..spinners {
        rpc.cast(&target, "spin", "{}");
    }
    assert!(
        eventually(SEEN, || (daemon.count_log("spinning") >= spinners)
            .then_some(()))
        .is_some(),
        "{spinners} spinners did not all start:\n{}",
        daemon.log_text()
    );
    let echoed = rpc.call(&target, "echo_args", r#"{"value": 7}"#, CALL);
    assert_eq!(echoed.expect("answered"), r#"{"value": 7}"#);
    assert_eq!(
        daemon.count_log("cast handler failed"),
        0,
        "the echo waited for a spinner to time out:\n{}",
        daemon.log_text()
    );
}

#[test]
fn undecodable_messages_are_rejected_logged_and_not_left_in_the_queue() {
    let topic = unique("it_garbage");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let cap = 32 * 1024;
    let daemon = Daemon::start_with(
        &server,
        &handler(&topic, &plugin("echo"), ""),
        &format!("max_message_bytes = {cap}"),
    );

    let garbage = b"\xff\xfe not JSON at all \x00".to_vec();
    let array = br#"[{"method": "echo", "args": {"value": 1}}]"#.to_vec();
    let deep = format!(
        r#"{{"method": "echo", "args": {{"value": {}{}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    )
    .into_bytes();
    let long_method =
        format!(r#"{{"method": "{}", "args": {{}}}}"#, "m".repeat(10_000)).into_bytes();
    // A reply address naming another queue (here the topic's own): answering it would let any
    // publisher inject messages into arbitrary queues through the daemon.
    let hostile_reply_q = format!(
        r#"{{"method": "echo", "args": {{"value": 1}}, "_msg_id": "m1", "_reply_q": "{topic}"}}"#
    )
    .into_bytes();
    let echo = br#"{"method": "echo", "args": {"value": 1}}"#.to_vec();
    let oversized = format!(
        r#"{{"method": "echo", "args": {{"value": "{}"}}}}"#,
        "x".repeat(cap + 1)
    )
    .into_bytes();
    let json = "application/json";
    publish_raw(
        EXCHANGE,
        &topic,
        &[
            (&garbage, json),
            (&array, json),
            (&deep, json),
            (&long_method, json),
            (&hostile_reply_q, json),
            (&echo, "text/plain"),
            (&oversized, json),
        ],
    );

    // Each rejection names its reason; the size tells the five undecodable ones apart.
    let mut expected: Vec<String> = [&garbage, &array, &deep, &long_method, &hostile_reply_q]
        .iter()
        .map(|body| format!("undecodable message rejected&size={}", body.len()))
        .collect();
    expected.push("non-JSON content type&text/plain".into());
    expected.push(format!("size cap&size={}", oversized.len()));
    for needles in &expected {
        assert!(
            daemon.wait_log(needles, SEEN).is_some(),
            "no log line with {needles}; log:\n{}",
            daemon.log_text()
        );
    }

    let rpc = Rpc::connect();
    let result = rpc.call(&any_server(&topic), "echo", r#"{"value": 42}"#, CALL);
    assert_eq!(result.expect("the daemon still answers"), "42");
    // Rejected without requeue: nothing waits in the queue and nothing is held unacked.
    let settled = eventually(SEEN, || {
        (queue_counts(&topic) == Some((0, 0))).then_some(())
    });
    assert!(
        settled.is_some(),
        "queue {topic} is not empty (ready, unacked): {:?}",
        queue_counts(&topic)
    );
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "CallError is the library's own error type"
)]
fn sigterm_lets_the_in_flight_call_reply_before_exit() {
    let topic = unique("it_shutdown");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let mut daemon = serve_wat(&server, &topic, &spin_wat(), "timeout_ms = 1500");

    let caller = {
        let topic = topic.clone();
        std::thread::spawn(move || {
            let rpc = Rpc::connect();
            rpc.call(&any_server(&topic), "spin", "{}", CALL)
        })
    };
    assert!(
        daemon.wait_log("spinning", SEEN).is_some(),
        "the call never started; log:\n{}",
        daemon.log_text()
    );
    let clean_exit = daemon.terminate();
    let log = daemon.log_text();
    assert!(
        clean_exit,
        "the daemon did not exit successfully; log:\n{log}"
    );

    let err = remote_error(caller.join().expect("caller thread"));
    assert_eq!(err.class, "Timeout", "{err:?}");
    let replied = daemon.log_index("replied reply_to");
    let stopped = daemon.log_index("warren::server: stopped");
    assert!(
        replied.is_some() && stopped.is_some() && replied < stopped,
        "the reply must go out before the daemon stops; log:\n{log}"
    );
}

#[test]
fn nova_essex_caller_gets_results_streams_and_failures() {
    let echo_topic = unique("it_essex_echo");
    let calc_topic = unique("it_essex_calc");
    let server = unique("d");
    let _cleanup = (
        DeleteQueues::rpc(&echo_topic, &[&server]),
        DeleteQueues::rpc(&calc_topic, &[&server]),
    );
    let handlers = format!(
        "{}{}",
        handler(&echo_topic, &plugin("echo"), ""),
        handler(&calc_topic, &plugin("calc"), "")
    );
    let _daemon = Daemon::start(&server, &handlers);

    let essex = |topic: &str, method: &str, args: &str, extra: &[&str]| {
        let mut argv = vec![
            "--exchange",
            EXCHANGE,
            "--timeout",
            "20",
            topic,
            method,
            args,
        ];
        argv.extend_from_slice(extra);
        interop_script("nova_essex_client.py", &argv)
    };
    // Run the three callers side by side; each prints its summary last.
    let call = essex(&echo_topic, "echo", r#"{"value": 42}"#, &[]);
    let multi = essex(&calc_topic, "fib", r#"{"n": 4}"#, &["--multicall"]);
    let fail = essex(&calc_topic, "div", r#"{"a": 1, "b": 0}"#, &[]);
    let limit = Duration::from_secs(60);

    let out = call.finish(limit);
    out.assert_success();
    let summary = out.last_json();
    assert_eq!(summary["result"], 42, "{out:?}");
    assert_eq!(summary["ended"], true, "{out:?}");
    assert_eq!(summary["failure"], serde_json::Value::Null, "{out:?}");

    let out = multi.finish(limit);
    let summary = out.last_json();
    assert_eq!(
        summary["results"],
        serde_json::json!([0, 1, 1, 2]),
        "{out:?}"
    );
    assert_eq!(summary["ended"], true, "{out:?}");
    let yields = out
        .json_lines()
        .iter()
        .filter(|l| l.get("yield").is_some())
        .count();
    assert_eq!(yields, 4, "{out:?}");

    let out = fail.finish(limit);
    let summary = out.last_json();
    let failure = summary["failure"]
        .as_array()
        .unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(
        failure.len(),
        3,
        "Essex failures are [class, message, traceback]: {out:?}"
    );
    assert_eq!(failure[0], "ZeroDivisionError", "{out:?}");
    assert_eq!(summary["ended"], true, "{out:?}");
}

#[test]
fn the_broker_validated_user_reaches_the_handler_and_cannot_be_spoofed() {
    let topic = unique("it_user");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let _daemon = serve_plugin(&server, &topic, "echo");
    let rpc = Rpc::connect();
    // The client sends its login user as `user_id`; a `_context_amqp_user_id` claim is replaced.
    let ctx = rpc
        .call_with_context(
            &any_server(&topic),
            "context",
            "{}",
            r#"{"amqp_user_id": "admin", "x": 1}"#,
            CALL,
        )
        .expect("context");
    let ctx: serde_json::Value = serde_json::from_str(&ctx).expect("json");
    assert_eq!(ctx["amqp_user_id"], "guest", "{ctx}");
    assert_eq!(ctx["x"], 1, "other context fields pass through");
}

#[test]
fn call_monitor_heartbeats_flow_while_a_long_call_runs() {
    // An oslo caller with call_monitor_timeout=2 sends `_timeout: 2` and expects a heartbeat
    // (result null, ending false) every second while the method runs, then the real reply.
    use warren::amqp::{Connection, PublishOptions, QueueSpec};
    use warren::wire::{OutgoingRequest, decode_reply, encode_request, new_id};

    let topic = unique("it_hbeat");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let _daemon = serve_wat(&server, &topic, &spin_wat(), "timeout_ms = 2500");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let (heartbeats, last) = rt.block_on(async {
        let conn = Connection::open(&crate::support::broker_url(), "it-heartbeat", 10)
            .await
            .expect("connect");
        let channel = conn.channel().await.expect("channel");
        let reply_q = format!("reply_{}", new_id());
        let spec = QueueSpec {
            exclusive: true,
            auto_delete: true,
            ..QueueSpec::default()
        };
        channel
            .declare_queue(&reply_q, &spec)
            .await
            .expect("reply queue");
        let mut replies = channel.consume(&reply_q, &reply_q).await.expect("consume");
        let publisher = conn
            .channel()
            .await
            .expect("channel")
            .into_publisher()
            .await
            .expect("confirms");
        let msg_id = new_id();
        let args = serde_json::value::RawValue::from_string("{}".into()).expect("json");
        let context = serde_json::Map::new();
        let body = encode_request(
            &OutgoingRequest {
                timeout: Some(2.0),
                ..OutgoingRequest::call("spin", &args, &context, &msg_id, Some(&reply_q))
            },
            &new_id(),
        );
        let options = PublishOptions {
            mandatory: true,
            ..PublishOptions::default()
        };
        publisher
            .publish("openstack", &topic, &body, &options)
            .await
            .expect("publish");
        let mut heartbeats = 0;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), replies.next()).await;
            let delivery = next
                .expect("a reply within 10 s")
                .expect("consumer open")
                .expect("delivery");
            let _ = delivery.ack().await;
            let reply = decode_reply(delivery.body()).expect("decodable reply");
            assert_eq!(reply.msg_id.as_deref(), Some(msg_id.as_str()));
            if reply.is_heartbeat() {
                heartbeats += 1;
            } else {
                conn.close().await;
                return (heartbeats, reply);
            }
        }
    });
    assert!(
        heartbeats >= 2,
        "expected a heartbeat every second of a 2.5 s call, got {heartbeats}"
    );
    assert!(last.ending, "the final reply ends the call");
    assert_eq!(last.failure.map(|f| f.class).as_deref(), Some("Timeout"));
}
