//! Outbound RPC from guests through the daemon: the example `api` plugin calling `echo` and
//! `calc`, grants refusing what the config does not list, context propagation, notifications,
//! and chains of calls (mutual, self, endless) that finish instead of deadlocking.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    Daemon, DeleteQueues, Rpc, any_server, eventually, get_message, handler, plugin, remote_error,
    unique,
};

const CALL: Duration = Duration::from_secs(20);
const SEEN: Duration = Duration::from_secs(10);

/// Topics for one test: the api handler's and the echo and calc handlers' it calls.
struct Topics {
    api: String,
    echo: String,
    calc: String,
}

impl Topics {
    fn new() -> Topics {
        Topics {
            api: unique("out_api"),
            echo: unique("out_echo"),
            calc: unique("out_calc"),
        }
    }

    /// A daemon serving all three, the api handler granted `grants` (TOML keys).
    fn serve(&self, server: &str, grants: &str) -> Daemon {
        let handlers = [
            handler(&self.api, &plugin("api"), grants),
            handler(&self.echo, &plugin("echo"), ""),
            handler(&self.calc, &plugin("calc"), ""),
        ]
        .concat();
        Daemon::start(server, &handlers)
    }

    fn cleanup(&self, server: &str) -> [DeleteQueues; 3] {
        [
            DeleteQueues::rpc(&self.api, &[server]),
            DeleteQueues::rpc(&self.echo, &[server]),
            DeleteQueues::rpc(&self.calc, &[server]),
        ]
    }
}

fn relay(topic: &str, method: &str, args: Value) -> String {
    serde_json::json!({"topic": topic, "method": method, "args": args}).to_string()
}

#[test]
fn a_handler_calls_two_others_and_passes_their_failures_on() {
    let t = Topics::new();
    let server = unique("d");
    let _cleanup = t.cleanup(&server);
    let grants = format!("call = [\"{}\", \"{}\"]", t.echo, t.calc);
    let _daemon = t.serve(&server, &grants);
    let rpc = Rpc::connect();
    let api = any_server(&t.api);

    let args = |method: &str, a: Value| relay(&t.calc, method, a);
    let sum = rpc.call(
        &api,
        "relay",
        &args("add", serde_json::json!({"a": 40, "b": 2})),
        CALL,
    );
    assert_eq!(sum.expect("relayed call"), "42");
    let echoed = rpc.call(
        &api,
        "relay",
        &relay(
            &t.echo,
            "echo",
            serde_json::json!({"value": {"deep": [1, 2]}}),
        ),
        CALL,
    );
    assert_eq!(echoed.expect("relayed call"), r#"{"deep":[1,2]}"#);

    // The remote handler's own error reaches the outer caller unchanged.
    let err = remote_error(rpc.call(
        &api,
        "relay",
        &args("div", serde_json::json!({"a": 1, "b": 0})),
        CALL,
    ));
    assert_eq!(err.class, "ZeroDivisionError", "{err:?}");
}

#[test]
fn the_example_api_plugin_sums_through_calc_and_echo_and_publishes_notifications() {
    let t = Topics::new();
    let server = unique("d");
    let notifications = unique("out_notif");
    let _cleanup = t.cleanup(&server);
    let _notif = DeleteQueues::notifications(&notifications);
    let grants = format!(
        "call = [\"{}\", \"{}\"]\nnotify = [\"{notifications}\"]",
        t.echo, t.calc
    );
    let daemon = t.serve(&server, &grants);
    let rpc = Rpc::connect();
    let args = serde_json::json!({"a": 1, "b": 2, "calc_topic": t.calc, "echo_topic": t.echo});
    let summary = rpc.call(&any_server(&t.api), "summary", &args.to_string(), CALL);
    let summary: Value = serde_json::from_str(&summary.expect("summary")).expect("JSON");
    assert_eq!(summary, serde_json::json!({"sum": 3, "echoed": 3}));
    // Its notification goes to "notifications", which this config does not grant: the plugin
    // logs that and still answers.
    assert!(
        daemon
            .wait_log("summary notification not sent&Forbidden", SEEN)
            .is_some(),
        "log:\n{}",
        daemon.log_text()
    );

    let rpc = Rpc::connect();
    let announce = serde_json::json!({
        "event_type": "api.test",
        "payload": {"n": 1},
        "topic": notifications,
        "priority": "warn",
    });
    let out = rpc.call(&any_server(&t.api), "announce", &announce.to_string(), CALL);
    assert_eq!(out.expect("notified"), "null");
    let queue = format!("{notifications}.warn");
    let body = eventually(SEEN, || get_message(&queue)).expect("a notification arrives");
    let envelope: Value = serde_json::from_slice(&body).expect("JSON");
    let message: Value =
        serde_json::from_str(envelope["oslo.message"].as_str().expect("oslo envelope"))
            .expect("inner JSON");
    assert_eq!(message["event_type"], "api.test");
    assert_eq!(message["priority"], "WARN");
    assert_eq!(message["payload"]["n"], 1);
    assert_eq!(message["publisher_id"], format!("{}.{server}", t.api));
}

#[test]
fn calls_and_notifications_not_granted_are_refused_with_a_clear_error() {
    let t = Topics::new();
    let server = unique("d");
    let _cleanup = t.cleanup(&server);
    // Only echo may be called; nothing may be cast or notified.
    let daemon = t.serve(&server, &format!("call = [\"{}\"]", t.echo));
    let rpc = Rpc::connect();
    let api = any_server(&t.api);

    let err = remote_error(rpc.call(
        &api,
        "relay",
        &relay(&t.calc, "add", serde_json::json!({"a": 1, "b": 2})),
        CALL,
    ));
    assert_eq!(err.class, "Forbidden", "{err:?}");
    assert!(
        err.message
            .contains(&format!("may not call topic '{}'", t.calc)),
        "{}",
        err.message
    );
    let cast = serde_json::json!({"kind": "cast", "topic": t.echo, "method": "echo", "args": {"value": 1}});
    let err = remote_error(rpc.call(&api, "relay", &cast.to_string(), CALL));
    assert_eq!(
        err.class, "Forbidden",
        "a call grant is not a cast grant: {err:?}"
    );
    let notify = serde_json::json!({"event_type": "x"});
    let err = remote_error(rpc.call(&api, "announce", &notify.to_string(), CALL));
    assert_eq!(err.class, "Forbidden", "{err:?}");
    assert!(
        daemon
            .wait_log("outbound request failed&class=Forbidden", SEEN)
            .is_some(),
        "no log line for the refusal; log:\n{}",
        daemon.log_text()
    );

    // The granted topic still works, and so does the daemon.
    let ok = rpc.call(
        &api,
        "relay",
        &relay(&t.echo, "echo", serde_json::json!({"value": 7})),
        CALL,
    );
    assert_eq!(ok.expect("granted call"), "7");
}

#[test]
fn the_request_context_travels_on_with_the_call_depth() {
    let t = Topics::new();
    let server = unique("d");
    let _cleanup = t.cleanup(&server);
    let _daemon = t.serve(&server, &format!("call = [\"{}\"]", t.echo));
    let rpc = Rpc::connect();
    let context = rpc.call_with_context(
        &any_server(&t.api),
        "relay",
        &relay(&t.echo, "context", serde_json::json!({})),
        r#"{"request_id": "req-outbound-1", "user_id": "u1", "warren_call_depth": 0}"#,
        CALL,
    );
    let context: Value = serde_json::from_str(&context.expect("relayed")).expect("JSON");
    assert_eq!(context["request_id"], "req-outbound-1");
    assert_eq!(context["user_id"], "u1");
    assert_eq!(context["warren_call_depth"], 1);
    // The callee's trusted identity is the daemon's broker login, set by RabbitMQ, not a
    // value carried over from the outer request.
    assert_eq!(context["amqp_user_id"], "guest");
}

#[test]
fn two_handlers_calling_each_other_finish_under_concurrency() {
    // a → b → a: every request holds a slot while it waits for the next. With concurrency 2
    // and 8 chains at once, chains finish only because waiting invocations give their slot back.
    let (a, b) = (unique("out_a"), unique("out_b"));
    let server = unique("d");
    let _ca = DeleteQueues::rpc(&a, &[&server]);
    let _cb = DeleteQueues::rpc(&b, &[&server]);
    let handlers = [
        handler(&a, &plugin("api"), &format!("call = [\"{b}\"]")),
        handler(&b, &plugin("api"), &format!("call = [\"{a}\"]")),
    ]
    .concat();
    let _daemon = Daemon::start_with(&server, &handlers, "concurrency = 2");
    // The client calls a.relay, which calls b.relay, which calls a.context.
    let outer = relay(
        &b,
        "relay",
        serde_json::json!({"topic": a, "method": "context", "args": {}}),
    );
    let chains: Vec<_> = (0..8)
        .map(|i| {
            let (a, outer) = (a.clone(), outer.clone());
            std::thread::spawn(move || {
                let rpc = Rpc::connect();
                let ctx = format!(r#"{{"request_id": "chain-{i}"}}"#);
                rpc.call_with_context(&any_server(&a), "relay", &outer, &ctx, CALL)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let started = Instant::now();
    for (i, chain) in chains.into_iter().enumerate() {
        let out = chain
            .join()
            .expect("caller thread")
            .expect("the chain finishes");
        let context: Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(context["request_id"], format!("chain-{i}"));
        assert_eq!(context["warren_call_depth"], 2, "client → a → b → a");
    }
    assert!(
        started.elapsed() < CALL,
        "chains took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_handler_calling_itself_without_end_fails_with_call_depth_exceeded() {
    let topic = unique("out_self");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = Daemon::start(
        &server,
        &handler(&topic, &plugin("api"), &format!("call = [\"{topic}\"]")),
    );
    let rpc = Rpc::connect();
    let args = serde_json::json!({"topic": topic}).to_string();
    let err = remote_error(rpc.call(&any_server(&topic), "recurse", &args, CALL));
    assert_eq!(err.class, "CallDepthExceeded", "{err:?}");
    assert!(
        daemon.wait_log("class=CallDepthExceeded", SEEN).is_some(),
        "log:\n{}",
        daemon.log_text()
    );
    // Nothing is left running or queued, and the daemon answers.
    let echo = rpc.call(&any_server(&topic), "context", "{}", CALL);
    assert!(echo.is_ok(), "{echo:?}");
}

#[test]
fn a_call_to_a_topic_nobody_serves_fails_fast_and_one_nobody_answers_times_out() {
    let t = Topics::new();
    let server = unique("d");
    let silent = unique("out_silent");
    let nobody = unique("out_nobody");
    let _cleanup = t.cleanup(&server);
    let _silent = DeleteQueues::rpc(&silent, &[]);
    let _daemon = t.serve(
        &server,
        &format!("call = [\"{silent}\", \"{nobody}\"]\ntimeout_ms = 3000"),
    );
    let rpc = Rpc::connect();
    let api = any_server(&t.api);

    let err = remote_error(rpc.call(
        &api,
        "relay",
        &relay(&nobody, "m", serde_json::json!({})),
        CALL,
    ));
    assert_eq!(err.class, "Unavailable", "{err:?}");

    // A queue bound to the topic with no consumer: the request is routed and never answered.
    crate::support::declare_bound_queue(&silent);
    let started = Instant::now();
    let timed = serde_json::json!({"topic": silent, "method": "m", "timeout_ms": 300});
    let err = remote_error(rpc.call(&api, "relay", &timed.to_string(), CALL));
    assert_eq!(err.class, "Timeout", "{err:?}");
    assert!(err.message.contains(&silent), "{}", err.message);
    // Without timeout_ms the wait ends with the invocation's own limit (3 s), not later.
    let untimed = relay(&silent, "m", serde_json::json!({}));
    let err = remote_error(rpc.call(&api, "relay", &untimed, CALL));
    assert_eq!(err.class, "Timeout", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "CallError is the library's own error type"
)]
fn a_reply_larger_than_the_callers_max_args_bytes_fails_with_reply_too_large() {
    let (api, files) = (unique("out_api"), unique("out_files"));
    let server = unique("d");
    let _cleanup = [
        DeleteQueues::rpc(&api, &[&server]),
        DeleteQueues::rpc(&files, &[&server]),
    ];
    let data = tempfile::tempdir().expect("tempdir");
    std::fs::write(data.path().join("small.txt"), "x".repeat(100)).expect("write");
    std::fs::write(data.path().join("big.txt"), "x".repeat(20_000)).expect("write");
    let handlers = [
        handler(
            &api,
            &plugin("api"),
            &format!("call = [\"{files}\"]\nmax_args_bytes = 4096"),
        ),
        handler(
            &files,
            &plugin("files"),
            &format!(
                "dirs = [{{ host = \"{}\", guest = \"/data\" }}]",
                data.path().display()
            ),
        ),
    ]
    .concat();
    let daemon = Daemon::start(&server, &handlers);
    let rpc = Rpc::connect();
    let read = |file: &str| {
        rpc.call(
            &any_server(&api),
            "relay",
            &relay(
                &files,
                "read",
                serde_json::json!({"path": format!("/data/{file}")}),
            ),
            CALL,
        )
    };

    let small = read("small.txt").expect("a small reply reaches the guest");
    assert_eq!(small, format!("\"{}\"", "x".repeat(100)));
    let err = remote_error(read("big.txt"));
    assert_eq!(err.class, "ReplyTooLarge", "{err:?}");
    assert!(
        err.message
            .contains(&format!("call to '{files}' is 20002 bytes"))
            && err.message.contains("max_args_bytes (4096)"),
        "{err:?}"
    );
    // The handler that got the failure, and the daemon, keep serving.
    assert!(read("small.txt").is_ok(), "log:\n{}", daemon.log_text());
}
