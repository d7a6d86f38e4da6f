//! Warren against the real Python peers of tests/interop: an oslo.messaging RPCClient calling
//! Warren, and Warren's CLI calling an oslo.messaging RPC server and notification listener.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    Daemon, DeleteQueues, Proc, eventually, handler, interop_script, plugin, serve_wat, unique,
    warren_remote, whoami_wat,
};

const LIMIT: Duration = Duration::from_secs(60);
const SEEN: Duration = Duration::from_secs(20);

/// `oslo_client.py call TOPIC METHOD ARGS [extra]`, started (run several side by side).
fn oslo_call(topic: &str, method: &str, args: &str, extra: &[&str]) -> Proc {
    let mut argv = vec!["call", topic, method, args, "--timeout", "20"];
    argv.extend_from_slice(extra);
    interop_script("oslo_client.py", &argv)
}

/// The one JSON line an `oslo_client.py call` prints.
fn call_result(call: Proc) -> Value {
    let out = call.finish(LIMIT);
    out.assert_success();
    out.last_json()
}

#[test]
fn oslo_rpc_client_gets_results_and_exceptions_from_warren() {
    let echo_topic = unique("it_oslo_echo");
    let calc_topic = unique("it_oslo_calc");
    let server = unique("w");
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

    let echo = oslo_call(&echo_topic, "echo", r#"{"value": 42}"#, &[]);
    let div = oslo_call(&calc_topic, "div", r#"{"a": 1, "b": 0}"#, &[]);
    let unknown = oslo_call(&calc_topic, "no_such_method", "{}", &[]);

    assert_eq!(call_result(echo), json!({"ok": true, "result": 42}));
    let r = call_result(div);
    assert_eq!(
        (&r["ok"], &r["remote_exc_type"]),
        (&json!(false), &json!("ZeroDivisionError")),
        "{r}"
    );
    let r = call_result(unknown);
    assert_eq!(
        (&r["ok"], &r["remote_exc_type"]),
        (&json!(false), &json!("NoSuchMethod")),
        "{r}"
    );
}

#[test]
fn oslo_cast_and_fanout_cast_run_the_warren_handler() {
    let topic = unique("it_oslo_cast");
    let server = unique("w");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = serve_wat(&server, &topic, &whoami_wat("W"), "");

    let cast = |token: &str, extra: &[&str]| {
        let args = json!({ "token": token }).to_string();
        let mut argv = vec!["cast", &topic, "note", &args];
        argv.extend_from_slice(extra);
        interop_script("oslo_client.py", &argv)
    };
    let (topic_token, fanout_token) = (unique("cast"), unique("fanout"));
    let casts = [cast(&topic_token, &[]), cast(&fanout_token, &["--fanout"])];
    for c in casts {
        let out = c.finish(LIMIT);
        out.assert_success();
        assert_eq!(out.last_json(), json!({"ok": true}), "{out:?}");
    }
    for token in [&topic_token, &fanout_token] {
        assert!(
            daemon.wait_log(&format!("W got&{token}"), SEEN).is_some(),
            "the oslo cast {token} never reached the handler; log:\n{}",
            daemon.log_text()
        );
    }
}

#[test]
fn oslo_call_with_server_reaches_that_warren_daemon() {
    let topic = unique("it_oslo_target");
    let (a, b) = (unique("A"), unique("B"));
    let _cleanup = DeleteQueues::rpc(&topic, &[&a, &b]);
    let _daemons = [&a, &b].map(|name| serve_wat(name, &topic, &whoami_wat(name), ""));

    // Two calls per server: a broken routing (any server of the topic) passes by luck 1 in 16.
    let calls: Vec<(&String, Proc)> = [&a, &b, &a, &b]
        .into_iter()
        .map(|s| (s, oslo_call(&topic, "whoami", "{}", &["--server", s])))
        .collect();
    for (server, call) in calls {
        assert_eq!(
            call_result(call),
            json!({"ok": true, "result": server}),
            "--server {server}"
        );
    }
}

/// An `oslo_server.py` on `topic` recording casts in a file of its own, ready to be called.
struct OsloServer {
    proc: Proc,
    record: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl OsloServer {
    fn start(topic: &str) -> OsloServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = dir.path().join("record.jsonl");
        let record_arg = record.to_str().expect("utf-8 path");
        let proc = interop_script(
            "oslo_server.py",
            &[
                "--topic", topic, "--server", "oslo1", "--record", record_arg,
            ],
        );
        assert!(
            proc.wait_stdout("READY", LIMIT).is_some(),
            "oslo_server.py never became ready\n{}",
            proc.printed()
        );
        OsloServer {
            proc,
            record,
            _dir: dir,
        }
    }

    /// Wait until the record file holds `value` on a line of its own.
    fn wait_recorded(&self, value: &Value) {
        let line = value.to_string();
        let found = eventually(SEEN, || {
            let text = std::fs::read_to_string(&self.record).ok()?;
            text.lines()
                .any(|l| serde_json::from_str::<Value>(l).ok().as_ref() == Some(value))
                .then_some(())
        });
        assert!(
            found.is_some(),
            "oslo server never recorded {line}; record: {:?}\n{}",
            std::fs::read_to_string(&self.record).ok(),
            self.proc.printed()
        );
    }
}

#[test]
fn warren_call_gets_results_and_errors_from_an_oslo_server() {
    let topic = unique("it_osrv_call");
    let _cleanup = DeleteQueues::rpc(&topic, &["oslo1"]);
    let _server = OsloServer::start(&topic);

    let out = warren_remote(&[
        "call",
        &topic,
        "echo",
        r#"{"value": 42}"#,
        "--timeout",
        "20",
    ]);
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "42"), "{out:?}");

    let out = warren_remote(&[
        "call",
        &topic,
        "fail",
        r#"{"message": "boom"}"#,
        "--timeout",
        "20",
    ]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("ValueError") && out.stderr.contains("boom"),
        "{out:?}"
    );
}

#[test]
fn warren_cast_and_fanout_reach_an_oslo_server() {
    let topic = unique("it_osrv_cast");
    let _cleanup = DeleteQueues::rpc(&topic, &["oslo1"]);
    let server = OsloServer::start(&topic);

    warren_remote(&["cast", &topic, "record", r#"{"value": "cast-1"}"#]).assert_success();
    server.wait_recorded(&json!("cast-1"));
    warren_remote(&["fanout", &topic, "record", r#"{"value": "fanout-1"}"#]).assert_success();
    server.wait_recorded(&json!("fanout-1"));
}

#[test]
fn warren_notify_reaches_an_oslo_notification_listener() {
    let topic = unique("it_notify");
    let _cleanup = DeleteQueues::notifications(&topic);
    let listener = interop_script(
        "oslo_client.py",
        &[
            "listen-notifications",
            "--topic",
            &topic,
            "--count",
            "1",
            "--timeout",
            "20",
        ],
    );
    assert!(
        listener.wait_stdout(r#""ready": true"#, LIMIT).is_some(),
        "the listener never became ready\n{}",
        listener.printed()
    );

    let out = warren_remote(&[
        "notify",
        "compute.instance.create.end",
        r#"{"instance_id": "i-1", "n": 7}"#,
        "--topic",
        &topic,
        "--priority",
        "warn",
    ]);
    out.assert_success();

    let out = listener.finish(LIMIT);
    out.assert_success();
    let lines = out.json_lines();
    let got: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("event_type").is_some())
        .collect();
    assert_eq!(got.len(), 1, "{out:?}");
    assert_eq!(
        got[0]["event_type"], "compute.instance.create.end",
        "{out:?}"
    );
    assert_eq!(
        got[0]["payload"],
        json!({"instance_id": "i-1", "n": 7}),
        "{out:?}"
    );
    assert_eq!(got[0]["priority"], "WARN", "{out:?}");
    assert_eq!(got[0]["publisher_id"], "warren.cli", "{out:?}");
}
