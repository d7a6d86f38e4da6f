//! Warren example plugin: a front handler that does its work by calling other handlers over
//! RPC (outbound `call`, `cast`, `fanout_cast` and `notify`, see `guest-sdk/ABI.md`).
//!
//! Its `[[handler]]` entry must grant what it sends: `config/warren.toml` lets it call `echo`
//! and `calc` and notify `notifications`; everything else is refused with `Forbidden`.
//!
//! | method | args | does |
//! |---|---|---|
//! | `summary` | `{"a": 1, "b": 2}` | calls `calc.add` and `echo.echo`, notifies `api.summary`; returns `{"sum": 3, "echoed": 3}` (`calc_topic` and `echo_topic` name other topics) |
//! | `relay` | `{"kind": "call", "topic": "calc", "method": "add", "args": {...}, "server": null, "timeout_ms": null}` | sends one request of `kind` (`call`, `cast`, `fanout_cast`) and returns the call's result (`null` for the others) |
//! | `recurse` | `{"topic": "api"}` | calls `recurse` on `topic` again and again: ends with `CallDepthExceeded`, which shows the host's depth limit |
//! | `announce` | `{"event_type": "e", "payload": {...}, "topic": "notifications", "priority": "info"}` | publishes an oslo notification |
//! | `context` | `{}` | returns the request context (shows what a call passes on) |

use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren_guest::rpc::{self, Target};
use warren_guest::serde_json::{Map, Value, json};
use warren_guest::{Context, Error};

#[derive(Deserialize)]
struct Operands {
    a: Value,
    b: Value,
    /// Where the calculator and the echo handler are served (tests give their own topics).
    #[serde(default = "calc_topic")]
    calc_topic: String,
    #[serde(default = "echo_topic")]
    echo_topic: String,
}

fn calc_topic() -> String {
    "calc".into()
}

fn echo_topic() -> String {
    "echo".into()
}

#[derive(Serialize)]
struct Summary {
    sum: Value,
    echoed: Value,
}

/// Two calls, one after the other, and a notification; a failure of either call (a
/// `ZeroDivisionError`, a `Forbidden`, a `Timeout`) reaches our caller as it is.
fn summary(args: Operands) -> Result<Summary, Error> {
    let Operands { a, b, .. } = &args;
    let sum: Value = rpc::call(args.calc_topic.as_str(), "add", &json!({"a": a, "b": b}))?;
    let echoed: Value = rpc::call(args.echo_topic.as_str(), "echo", &json!({"value": sum}))?;
    // The notification is a side effect worth losing rather than failing the call for.
    if let Err(e) = rpc::notify("api.summary", &json!({"sum": sum})) {
        warren_guest::warn!("summary notification not sent: {e}");
    }
    Ok(Summary { sum, echoed })
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Call,
    Cast,
    FanoutCast,
}

#[derive(Deserialize)]
struct Relay {
    #[serde(default = "call")]
    kind: Kind,
    topic: String,
    method: String,
    #[serde(default)]
    args: Map<String, Value>,
    server: Option<String>,
    timeout_ms: Option<u64>,
}

fn call() -> Kind {
    Kind::Call
}

fn relay(r: Relay) -> Result<Value, Error> {
    let mut target = Target::new(r.topic.as_str());
    if let Some(server) = r.server {
        target = target.server(server);
    }
    if let Some(ms) = r.timeout_ms {
        target = target.timeout(Duration::from_millis(ms));
    }
    match r.kind {
        Kind::Call => rpc::call(target, &r.method, &r.args),
        Kind::Cast => rpc::cast(target, &r.method, &r.args).map(|()| Value::Null),
        Kind::FanoutCast => rpc::fanout_cast(&r.topic, &r.method, &r.args).map(|()| Value::Null),
    }
}

#[derive(Deserialize)]
struct Recurse {
    topic: String,
}

fn recurse(Recurse { topic }: Recurse) -> Result<Value, Error> {
    rpc::call(topic.as_str(), "recurse", &json!({"topic": topic}))
}

#[derive(Deserialize)]
struct Announce {
    event_type: String,
    #[serde(default)]
    payload: Map<String, Value>,
    #[serde(default = "notifications")]
    topic: String,
    #[serde(default = "info")]
    priority: String,
}

fn notifications() -> String {
    "notifications".into()
}

fn info() -> String {
    "info".into()
}

fn announce(a: Announce) -> Result<(), Error> {
    rpc::notify_to(&a.topic, &a.priority, &a.event_type, &a.payload)
}

fn context(ctx: &Context) -> Result<Map<String, Value>, Error> {
    Ok(ctx.as_map().clone())
}

warren_guest::export!(summary, relay, recurse, announce, context);

#[cfg(test)]
mod tests {
    use super::*;
    use warren_guest::testing;

    #[test]
    fn summary_calls_calc_then_echo() {
        let _stub = testing::stub_rpc(|kind, req| match (kind, req["topic"].as_str()) {
            ("call", Some("calc")) => Ok(json!(
                req["args"]["a"].as_i64().unwrap_or(0) + req["args"]["b"].as_i64().unwrap_or(0)
            )),
            ("call", Some("echo")) => Ok(req["args"]["value"].clone()),
            ("notify", _) => Ok(Value::Null),
            other => panic!("unexpected {other:?}"),
        });
        let out = testing::invoke(summary, r#"{"a": 1, "b": 2}"#, "{}");
        assert_eq!(out.value(), Ok(json!({"sum": 3, "echoed": 3})));
    }

    #[test]
    fn a_refused_call_is_passed_on() {
        let _stub = testing::stub_rpc(|_, _| Err(Error::new("Forbidden", "no")));
        let err = testing::invoke(summary, r#"{"a": 1, "b": 2}"#, "{}")
            .value()
            .unwrap_err();
        assert_eq!(err.class, "Forbidden");
    }
}
