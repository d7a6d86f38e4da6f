//! Tests for the wire codec: the §7 examples, every rejection, round trips, and properties
//! over arbitrary input.
#![allow(clippy::unwrap_used, reason = "tests fail loudly by design")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use serde_json::value::{RawValue, to_raw_value};
use serde_json::{Map, Value, json};

use super::*;

const MSG_ID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
const REPLY_Q: &str = "reply_9f8e7d6c5b4a39281706f5e4d3c2b1a0";

#[test]
fn new_ids_are_distinct_uuid4_in_oslo_form() {
    let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_id()).collect();
    assert_eq!(ids.len(), 1000);
    for id in &ids {
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        assert_eq!(uuid.get_version(), Some(uuid::Version::Random));
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
    }
}

fn raw(value: Value) -> Box<RawValue> {
    to_raw_value(&value).unwrap()
}

fn parse(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

/// Unwraps an oslo envelope, checking its version key.
fn unwrap_envelope(body: &[u8]) -> Value {
    let outer = parse(body);
    assert_eq!(outer["oslo.version"], "2.0");
    assert_eq!(outer.as_object().unwrap().len(), 2);
    serde_json::from_str(outer["oslo.message"].as_str().unwrap()).unwrap()
}

fn envelope(message: &Value) -> Vec<u8> {
    json!({"oslo.version": "2.0", "oslo.message": message.to_string()})
        .to_string()
        .into_bytes()
}

fn is_hex32(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn essex_call() -> Value {
    json!({"method": "echo", "args": {"value": 42}, "_msg_id": MSG_ID,
     "_context_user_id": "u1", "_context_project_id": "p1", "_context_is_admin": false,
     "_context_read_deleted": "no", "_context_roles": ["member"],
     "_context_remote_address": "10.0.0.5", "_context_timestamp": "2012-04-05T12:00:00.000000",
     "_context_request_id": "req-6f1c", "_context_auth_token": "tok"})
}

fn oslo_call() -> Value {
    json!({"method": "echo", "args": {"value": 42}, "version": "5.0", "_msg_id": MSG_ID,
     "_reply_q": REPLY_Q, "_timeout": null, "_unique_id": "77aa0000000000000000000000000000",
     "_context_user_id": "u1", "_context_project_id": "p1", "_context_request_id": "req-6f1c",
     "_context_roles": ["member"], "_context_is_admin": false})
}

fn value_error() -> RemoteError {
    RemoteError {
        class: "ValueError".into(),
        module: "exceptions".into(),
        message: "bad".into(),
        tb: vec!["Traceback …\n".into(), "…".into()],
        args: vec![json!("bad")],
        kwargs: Map::new(),
    }
}

// --- §7 examples --------------------------------------------------------------------

#[test]
fn essex_call_decodes_and_replies_in_two_flat_messages() {
    let req = decode_request(essex_call().to_string().as_bytes()).unwrap();
    assert_eq!(req.dialect, Dialect::NovaEssex);
    assert!(!req.enveloped);
    assert_eq!(req.method, "echo");
    assert_eq!(req.args.get(), r#"{"value":42}"#);
    assert_eq!(req.context.len(), 9);
    assert_eq!(req.context["roles"], json!(["member"]));
    assert_eq!(req.context["is_admin"], json!(false));
    assert!(req.wants_reply());
    assert_eq!(req.reply_routing_key(), Some(MSG_ID));
    assert_eq!(req.heartbeat_interval(), None);

    let replies = encode_success(&req, [&*raw(json!(42))]);
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0], br#"{"result":42,"failure":null}"#);
    assert_eq!(
        replies[1],
        br#"{"result":null,"failure":null,"ending":true}"#
    );
}

#[test]
fn essex_failure_is_a_three_list() {
    let req = decode_request(essex_call().to_string().as_bytes()).unwrap();
    let body = encode_failure(&req, &value_error()).unwrap();
    assert_eq!(
        parse(&body),
        json!({"result": null, "failure": ["ValueError", "bad", ["Traceback …\n", "…"]]})
    );
}

#[test]
fn folsom_failure_is_oslo_serialize_remote_exception_string() {
    let mut call = essex_call();
    call["version"] = json!("1.0");
    let req = decode_request(call.to_string().as_bytes()).unwrap();
    assert_eq!(req.dialect, Dialect::NovaFolsom);
    let body = encode_failure(&req, &value_error()).unwrap();
    let reply = parse(&body);
    assert_eq!(reply.as_object().unwrap().len(), 2);
    assert_eq!(reply["result"], Value::Null);
    // Key order matters to nobody but is oslo's, which keeps diffs against captures clean.
    assert_eq!(
        reply["failure"].as_str().unwrap(),
        r#"{"class":"ValueError","module":"exceptions","message":"bad","tb":["Traceback …\n","…"],"args":["bad"],"kwargs":{}}"#
    );
}

#[test]
fn unique_id_or_namespace_without_version_is_still_folsom() {
    for key in ["_unique_id", "namespace"] {
        let mut call = essex_call();
        call[key] = json!("abc");
        let req = decode_request(call.to_string().as_bytes()).unwrap();
        assert_eq!(req.dialect, Dialect::NovaFolsom, "{key}");
    }
}

#[test]
fn oslo_call_decodes_and_replies_with_one_enveloped_message() {
    let req = decode_request(&envelope(&oslo_call())).unwrap();
    assert_eq!(req.dialect, Dialect::Oslo);
    assert!(req.enveloped && req.single_reply);
    assert_eq!(req.method, "echo");
    assert_eq!(req.version.as_deref(), Some("5.0"));
    assert_eq!(req.timeout, None);
    assert_eq!(
        req.unique_id.as_deref(),
        Some("77aa0000000000000000000000000000")
    );
    assert_eq!(req.context["request_id"], "req-6f1c");
    assert_eq!(req.reply_routing_key(), Some(REPLY_Q));

    let replies = encode_success(&req, [&*raw(json!(42))]);
    assert_eq!(replies.len(), 1);
    let reply = unwrap_envelope(&replies[0]);
    let keys: Vec<&str> = reply
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert_eq!(reply["result"], 42);
    assert_eq!(reply["failure"], Value::Null);
    assert_eq!(reply["ending"], true);
    assert_eq!(reply["_msg_id"], MSG_ID);
    assert!(is_hex32(&reply["_unique_id"]));

    let failure = unwrap_envelope(&encode_failure(&req, &value_error()).unwrap());
    assert_eq!(failure["result"], Value::Null);
    assert_eq!(failure["ending"], true);
    let inner: Value = serde_json::from_str(failure["failure"].as_str().unwrap()).unwrap();
    assert_eq!(inner["class"], "ValueError");
}

#[test]
fn oslo_multicall_keeps_the_last_value_and_empty_results_reply_null() {
    let req = decode_request(&envelope(&oslo_call())).unwrap();
    let (one, two) = (raw(json!(1)), raw(json!(2)));
    let replies = encode_success(&req, [&*one, &*two]);
    assert_eq!(replies.len(), 1);
    assert_eq!(unwrap_envelope(&replies[0])["result"], 2);
    let replies = encode_success(&req, []);
    assert_eq!(unwrap_envelope(&replies[0])["result"], Value::Null);
}

#[test]
fn flat_call_with_reply_q_is_grizzly_and_gets_value_then_terminator() {
    let req = decode_request(oslo_call().to_string().as_bytes()).unwrap();
    assert_eq!(req.dialect, Dialect::Oslo);
    assert!(!req.enveloped);
    let replies = encode_success(&req, [&*raw(json!(null))]);
    assert_eq!(replies.len(), 2);
    let (first, last) = (parse(&replies[0]), parse(&replies[1]));
    assert_eq!(
        (first["result"].clone(), first["ending"].clone()),
        (json!(null), json!(false))
    );
    assert_eq!(
        (last["result"].clone(), last["ending"].clone()),
        (json!(null), json!(true))
    );
    assert_eq!(first["_msg_id"], MSG_ID);
    assert_ne!(first["_unique_id"], last["_unique_id"]);
}

#[test]
fn oslo_callers_without_timeout_key_get_value_then_terminator() {
    let mut call = oslo_call();
    call.as_object_mut().unwrap().remove("_timeout");
    let req = decode_request(&envelope(&call)).unwrap();
    assert!(req.enveloped && !req.single_reply);
    let replies = encode_success(&req, [&*raw(json!(42))]);
    assert_eq!(replies.len(), 2);
    let (first, last) = (unwrap_envelope(&replies[0]), unwrap_envelope(&replies[1]));
    assert_eq!(
        (first["result"].clone(), first["ending"].clone()),
        (json!(42), json!(false))
    );
    assert_eq!(
        (last["result"].clone(), last["ending"].clone()),
        (json!(null), json!(true))
    );
    let failure = unwrap_envelope(&encode_failure(&req, &value_error()).unwrap());
    assert_eq!(failure["ending"], true);
}

#[test]
fn flat_requests_for_nova_servers() {
    let (args, ctx) = (raw(json!({"value": 42})), context());
    let call = OutgoingRequest::call("echo", &args, &ctx, MSG_ID, None);
    let body = encode_request_flat(&call, "77aa");
    assert_eq!(parse(&body)["_context_user_id"], "u1");
    let req = decode_request(&body).unwrap();
    assert_eq!((req.dialect, req.enveloped), (Dialect::NovaFolsom, false));
    assert_eq!(req.reply_routing_key(), Some(MSG_ID));
    assert_eq!(encode_success(&req, [&*args]).len(), 2);
}

#[test]
fn casts_get_no_replies() {
    let mut cast = oslo_call();
    for key in ["_msg_id", "_reply_q", "_timeout"] {
        cast.as_object_mut().unwrap().remove(key);
    }
    let req = decode_request(&envelope(&cast)).unwrap();
    assert!(!req.wants_reply());
    assert_eq!(req.reply_routing_key(), None);
    assert!(encode_success(&req, [&*raw(json!(1))]).is_empty());
    assert!(encode_failure(&req, &value_error()).is_none());
}

// --- envelope -------------------------------------------------------------------------

#[test]
fn envelope_major_version_must_be_two() {
    for version in [
        json!("1.0"),
        json!("3.0"),
        json!("x"),
        json!(2),
        json!(null),
    ] {
        let body = json!({"oslo.version": version, "oslo.message": oslo_call().to_string()});
        let err = decode_request(body.to_string().as_bytes()).unwrap_err();
        assert!(
            matches!(err, DecodeError::UnsupportedEnvelope(_)),
            "{version}: {err}"
        );
    }
    let body = json!({"oslo.version": "2.1", "oslo.message": oslo_call().to_string()});
    assert!(decode_request(body.to_string().as_bytes()).is_ok());
}

#[test]
fn dicts_without_both_envelope_keys_pass_through_as_flat() {
    let mut call = essex_call();
    call["oslo.version"] = json!("9.0");
    let req = decode_request(call.to_string().as_bytes()).unwrap();
    assert_eq!((req.dialect, req.enveloped), (Dialect::NovaEssex, false));
    let mut call = essex_call();
    call["oslo.message"] = json!(42);
    assert!(
        !decode_request(call.to_string().as_bytes())
            .unwrap()
            .enveloped
    );
}

#[test]
fn envelopes_are_unwrapped_once_only() {
    let nested = envelope(&json!({"oslo.version": "2.0", "oslo.message": "{}"}));
    assert!(matches!(
        decode_request(&nested),
        Err(DecodeError::MissingMethod)
    ));
}

#[test]
fn broken_envelopes_are_rejected() {
    let cases = [
        (
            json!({"oslo.version": "2.0", "oslo.message": {"method": "x"}}),
            "BadEnvelope",
        ),
        (
            json!({"oslo.version": "2.0", "oslo.message": "[1]"}),
            "NotAnObject",
        ),
        (
            json!({"oslo.version": "2.0", "oslo.message": "{"}),
            "InvalidJson",
        ),
    ];
    for (body, want) in cases {
        let err = decode_request(body.to_string().as_bytes()).unwrap_err();
        assert!(format!("{err:?}").starts_with(want), "{body}: {err:?}");
    }
}

// --- rejections -------------------------------------------------------------------------

fn decode_err(message: Value) -> DecodeError {
    decode_request(message.to_string().as_bytes()).unwrap_err()
}

#[test]
fn malformed_bodies_are_rejected() {
    assert!(matches!(
        decode_request(b"{\"method\":"),
        Err(DecodeError::InvalidJson(_))
    ));
    assert!(matches!(
        decode_request(b"\xff{}"),
        Err(DecodeError::NotUtf8)
    ));
    assert!(matches!(
        decode_request(b""),
        Err(DecodeError::InvalidJson(_))
    ));
    for body in ["[]", "42", "\"s\"", "null", " true "] {
        assert!(
            matches!(
                decode_request(body.as_bytes()),
                Err(DecodeError::NotAnObject)
            ),
            "{body}"
        );
    }
}

#[test]
fn method_must_be_a_string() {
    assert!(matches!(
        decode_err(json!({"args": {}})),
        DecodeError::MissingMethod
    ));
    assert!(matches!(
        decode_err(json!({"method": null})),
        DecodeError::MissingMethod
    ));
    for method in [json!(1), json!(["m"]), json!({})] {
        let err = decode_err(json!({ "method": method }));
        assert!(
            matches!(
                err,
                DecodeError::BadField {
                    field: "method",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn args_pass_through_for_the_runtime_to_judge_and_default_to_empty() {
    // Non-object args decode (so the caller can be answered with InvalidArgs), unchanged.
    for args in [json!([]), json!("a"), json!(1), json!(true)] {
        let body = json!({"method": "m", "args": args});
        let req = decode_request(body.to_string().as_bytes()).unwrap();
        assert_eq!(req.args.get(), args.to_string());
    }
    for body in [json!({"method": "m"}), json!({"method": "m", "args": null})] {
        assert_eq!(
            decode_request(body.to_string().as_bytes())
                .unwrap()
                .args
                .get(),
            "{}"
        );
    }
    let spaced = decode_request(b"{\"method\":\"m\",\"args\" :\n { \"a\" : 1 } }").unwrap();
    assert_eq!(spaced.args.get(), "{ \"a\" : 1 }");
}

#[test]
fn ids_must_be_strings_or_null() {
    for key in ["_msg_id", "_reply_q", "_unique_id", "version", "namespace"] {
        let err = decode_err(json!({"method": "m", key: 7}));
        assert!(
            matches!(err, DecodeError::BadField { field, .. } if field == key),
            "{err}"
        );
        let req = decode_request(json!({"method": "m", key: null}).to_string().as_bytes()).unwrap();
        assert_eq!(
            req.dialect == Dialect::NovaEssex,
            key == "_msg_id" || key == "_reply_q"
        );
    }
    let err = decode_err(json!({"method": "m", "_timeout": "60"}));
    assert!(matches!(
        err,
        DecodeError::BadField {
            field: "_timeout",
            ..
        }
    ));
    // Reply keys mean nothing in a request, and the reverse.
    assert!(decode_request(json!({"method": "m", "ending": "x"}).to_string().as_bytes()).is_ok());
    let err = decode_reply(br#"{"ending":1}"#).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::BadField {
                field: "ending",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn length_limits() {
    let ok = "m".repeat(255);
    assert!(decode_request(json!({ "method": ok }).to_string().as_bytes()).is_ok());
    let err = decode_err(json!({"method": "m".repeat(256)}));
    assert!(matches!(
        err,
        DecodeError::TooLong {
            field: "method",
            len: 256,
            limit: 255
        }
    ));
    let err = decode_err(json!({"method": "m", "_unique_id": "u".repeat(256)}));
    assert!(matches!(
        err,
        DecodeError::TooLong {
            field: "_unique_id",
            ..
        }
    ));
    let tight = Limits {
        max_method_len: 3,
        ..Limits::DEFAULT
    };
    assert!(decode_request_with(br#"{"method":"four"}"#, &tight).is_err());
}

#[test]
fn reply_queue_names() {
    for good in [
        REPLY_Q,
        MSG_ID,
        "6f1c2b9a-0000-4000-8000-000000000000",
        "reply_x",
        "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNzc2OTE4MwAAC0gAAAAAXDiWSg==.NnvL+/x",
    ] {
        assert!(valid_reply_queue(good), "{good}");
    }
    let long_suffix = format!("reply_{}", "a".repeat(65));
    for bad in [
        "",
        "reply_",
        "compute.host1",
        "amq.gen-JzTY20BRgKO",
        "amq.rabbitmq.reply-to.",
        "amq.direct",
        "a b",
        "reply_9f8e…",
        &"a".repeat(65),
        &long_suffix,
    ] {
        assert!(!valid_reply_queue(bad), "{bad}");
    }
}

#[test]
fn requests_with_bad_reply_queues_are_rejected() {
    let err = decode_err(json!({"method": "m", "_msg_id": "x", "_reply_q": "compute.host1"}));
    assert!(matches!(err, DecodeError::BadReplyQueue(q) if q == "compute.host1"));
    // A nova caller's msg_id is its queue name.
    let err = decode_err(json!({"method": "m", "_msg_id": "amq.gen-1"}));
    assert!(matches!(err, DecodeError::BadReplyQueue(_)));
    // `_reply_q` must look like a reply queue, not like a service's topic queue.
    let err = decode_err(json!({"method": "m", "_msg_id": MSG_ID, "_reply_q": "conductor"}));
    assert!(matches!(err, DecodeError::BadReplyQueue(q) if q == "conductor"));
    // With a reply queue, the msg_id is only a correlation id.
    let req = json!({"method": "m", "_msg_id": "any.thing", "_reply_q": REPLY_Q});
    assert!(decode_request(req.to_string().as_bytes()).is_ok());
}

#[test]
fn absurd_call_monitor_timeouts_are_clamped() {
    let req = json!({"method": "m", "_msg_id": MSG_ID, "_reply_q": REPLY_Q, "_timeout": 2e19});
    let req = decode_request(req.to_string().as_bytes()).unwrap();
    let every = req.heartbeat_interval().unwrap();
    assert!(every <= std::time::Duration::from_secs(86_400), "{every:?}");
}

#[test]
fn duplicate_keys_keep_the_last_value_like_python() {
    let req = decode_request(br#"{"method":"a","method":"b","_context_x":1,"_context_x":2}"#);
    let req = req.unwrap();
    assert_eq!(req.method, "b");
    assert_eq!(req.context["x"], 2);
}

// --- depth ------------------------------------------------------------------------------

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn ten_thousand_levels_fail_cleanly_everywhere() {
    let deep = nested(10_000);
    let err = decode_request(deep.as_bytes()).unwrap_err();
    assert!(matches!(err, DecodeError::TooDeep { limit: 64 }), "{err}");
    let in_args = format!(r#"{{"method":"m","args":{{"a":{deep}}}}}"#);
    assert!(matches!(
        decode_request(in_args.as_bytes()),
        Err(DecodeError::TooDeep { .. })
    ));
    let enveloped = json!({"oslo.version": "2.0", "oslo.message": in_args}).to_string();
    assert!(matches!(
        decode_request(enveloped.as_bytes()),
        Err(DecodeError::TooDeep { .. })
    ));
    let failure = json!({"result": null, "failure": deep}).to_string();
    assert!(matches!(
        decode_reply(failure.as_bytes()),
        Err(DecodeError::TooDeep { .. })
    ));
    assert!(matches!(
        decode_reply(deep.as_bytes()),
        Err(DecodeError::TooDeep { .. })
    ));
}

#[test]
fn depth_limit_is_exact_and_ignores_brackets_in_strings() {
    // The message object is level 1, `args` level 2.
    let body = |depth: usize| format!(r#"{{"method":"m","args":{{"a":{}}}}}"#, nested(depth - 2));
    assert!(decode_request(body(64).as_bytes()).is_ok());
    assert!(matches!(
        decode_request(body(65).as_bytes()),
        Err(DecodeError::TooDeep { .. })
    ));
    let brackets = format!(r#"{{"method":"{}\"[","args":{{}}}}"#, "[{".repeat(100));
    assert!(decode_request(brackets.as_bytes()).is_ok());
}

// --- client side and round trips --------------------------------------------------------

fn context() -> Map<String, Value> {
    json!({"user_id": "u1", "roles": ["member"], "is_admin": false})
        .as_object()
        .unwrap()
        .clone()
}

#[test]
fn encode_request_matches_oslo_key_order_and_round_trips() {
    let (args, ctx) = (raw(json!({"value": 42})), context());
    let call = OutgoingRequest {
        version: Some("5.0"),
        ..OutgoingRequest::call("echo", &args, &ctx, MSG_ID, Some(REPLY_Q))
    };
    let body = encode_request(&call, "77aa");
    let outer = parse(&body);
    assert_eq!(
        outer["oslo.message"].as_str().unwrap(),
        r#"{"method":"echo","args":{"value":42},"version":"5.0","_msg_id":"a1b2c3d4e5f60718293a4b5c6d7e8f90","_reply_q":"reply_9f8e7d6c5b4a39281706f5e4d3c2b1a0","_timeout":null,"_unique_id":"77aa","_context_is_admin":false,"_context_roles":["member"],"_context_user_id":"u1"}"#
    );
    let req = decode_request(&body).unwrap();
    assert_eq!((req.dialect, req.enveloped), (Dialect::Oslo, true));
    assert_eq!(req.context, ctx);
    assert_eq!(req.unique_id.as_deref(), Some("77aa"));

    let cast = OutgoingRequest {
        msg_id: None,
        timeout: Some(60.0),
        namespace: Some("ns"),
        ..call
    };
    let inner = unwrap_envelope(&encode_request(&cast, "77aa"));
    for absent in ["_msg_id", "_reply_q", "_timeout"] {
        assert!(inner.get(absent).is_none(), "{absent}");
    }
    assert_eq!(inner["namespace"], "ns");
}

#[test]
fn raw_args_with_whitespace_and_controls_survive_the_envelope() {
    let args =
        RawValue::from_string("{\n\t\"s\": \"a\\u0001\\\"\\\\\u{e9}\"\r\n}".to_owned()).unwrap();
    let ctx = Map::new();
    let call = OutgoingRequest::cast("m\u{1}\"", &args, &ctx);
    let req = decode_request(&encode_request(&call, "u")).unwrap();
    assert_eq!(req.args.get(), args.get());
    assert_eq!(req.method, "m\u{1}\"");
}

#[test]
fn oslo_replies_round_trip_through_decode_reply() {
    let result = raw(json!({"a": [1, 2, {"b": null}]}));
    for enveloped in [true, false] {
        let reply = decode_reply(&encode_oslo_reply(
            MSG_ID,
            Some(&result),
            None,
            true,
            enveloped,
        ));
        let reply = reply.unwrap();
        assert_eq!(reply.msg_id.as_deref(), Some(MSG_ID));
        assert_eq!(reply.result.unwrap().get(), result.get());
        assert!(reply.ending && reply.failure.is_none());
        assert_eq!(reply.unique_id.unwrap().len(), 32);

        let err = RemoteError::new("GuestError", "it broke").with_data(json!({"code": 7}));
        let reply = decode_reply(&encode_oslo_reply(
            MSG_ID,
            None,
            Some(&err),
            true,
            enveloped,
        ));
        let failure = reply.unwrap().failure.unwrap();
        assert_eq!(failure, err);
        assert_eq!(failure.data(), Some(&json!({"code": 7})));
        assert_eq!(failure.to_string(), "GuestError: it broke");
    }
}

#[test]
fn heartbeats() {
    let beat = decode_reply(&encode_heartbeat(MSG_ID, true)).unwrap();
    assert!(beat.is_heartbeat());
    assert_eq!(beat.msg_id.as_deref(), Some(MSG_ID));
    let interval = |timeout: Value| {
        let mut call = oslo_call();
        call["_timeout"] = timeout;
        decode_request(&envelope(&call))
            .unwrap()
            .heartbeat_interval()
    };
    assert_eq!(interval(json!(60)), Some(Duration::from_secs(30)));
    assert_eq!(interval(json!(3.9)), Some(Duration::from_millis(1500)));
    assert_eq!(interval(json!(1.9)), None);
    assert_eq!(interval(json!(-5)), None);
    assert_eq!(interval(json!(null)), None);
    assert_eq!(
        interval(json!(1e300)),
        Some(Duration::from_secs(86_400)),
        "clamped"
    );
}

#[test]
fn decode_reply_reads_every_era() {
    let diablo = decode_reply(br#"{"result": null, "failure": null}"#).unwrap();
    assert!(diablo.result.is_none() && !diablo.ending && diablo.msg_id.is_none());

    let essex = decode_reply(&encode_nova_failure(Dialect::NovaEssex, &value_error())).unwrap();
    let failure = essex.failure.unwrap();
    assert_eq!(
        (failure.class.as_str(), failure.message.as_str()),
        ("ValueError", "bad")
    );
    assert_eq!(failure.tb, value_error().tb);

    let folsom = decode_reply(&encode_nova_failure(Dialect::NovaFolsom, &value_error())).unwrap();
    assert_eq!(folsom.failure.unwrap(), value_error());

    let ending = decode_reply(&encode_nova_ending()).unwrap();
    assert!(ending.ending && !ending.is_heartbeat());
    let value = decode_reply(&encode_nova_result(&raw(json!("x")))).unwrap();
    assert_eq!(value.result.unwrap().get(), "\"x\"");

    // Odd failures still surface as failures, and Python-falsy ones as none.
    let odd = decode_reply(br#"{"failure": "not json"}"#)
        .unwrap()
        .failure
        .unwrap();
    assert_eq!(odd.message, "not json");
    let odd = decode_reply(br#"{"failure": {"class": 5, "tb": "one line"}}"#).unwrap();
    let odd = odd.failure.unwrap();
    assert_eq!((odd.class.as_str(), odd.tb.len()), ("5", 1));
    for falsy in [r#""""#, "[]", "{}", "false", "null"] {
        let body = format!(r#"{{"result": 1, "failure": {falsy}}}"#);
        assert!(
            decode_reply(body.as_bytes()).unwrap().failure.is_none(),
            "{falsy}"
        );
    }
}

#[test]
fn dispatcher_errors_match_oslo() {
    let err = RemoteError::no_such_method("frob");
    assert_eq!(err.module, "oslo_messaging.rpc.dispatcher");
    assert_eq!(err.message, "Endpoint does not support RPC method frob");
    assert_eq!(err.args, vec![json!("frob")]);
    assert!(err.kwargs.is_empty());
    let err = RemoteError::unsupported_version("9.0", "frob");
    assert_eq!(
        err.message,
        "Endpoint does not support RPC version 9.0. Attempted method: frob"
    );
    assert_eq!(
        (err.args[0].clone(), err.kwargs["method"].clone()),
        (json!("9.0"), json!("frob"))
    );
    assert_eq!(RemoteError::new("E", "m").module, WARREN_MODULE);
}

#[test]
fn notifications() {
    let payload = raw(json!({"instance_id": "i-1"}));
    let ctx = context();
    let body = encode_notification(
        "compute.host1",
        "compute.instance.create.end",
        "INFO",
        &payload,
        &ctx,
        true,
    );
    let message = unwrap_envelope(&body);
    let message_id = message["message_id"].as_str().unwrap();
    assert_eq!((message_id.len(), message_id.matches('-').count()), (36, 4));
    assert_eq!(message["publisher_id"], "compute.host1");
    assert_eq!(message["priority"], "INFO");
    assert_eq!(message["payload"], json!({"instance_id": "i-1"}));
    assert!(is_hex32(&message["_unique_id"]));
    assert_eq!(message["_context_user_id"], "u1");
    let timestamp = message["timestamp"].as_str().unwrap();
    assert!(
        timestamp.len() == 19 || timestamp.len() == 26,
        "{timestamp}"
    );
    assert_eq!(&timestamp[4..5], "-");
    let flat = parse(&encode_notification(
        "p", "e", "WARN", &payload, &ctx, false,
    ));
    assert_eq!(flat["event_type"], "e");
}

#[test]
fn timestamps_match_python_str_datetime() {
    let at = |secs: u64, micros: u64| UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros);
    assert_eq!(
        format_timestamp(at(1_778_666_400, 123_456)),
        "2026-05-13 10:00:00.123456"
    );
    assert_eq!(
        format_timestamp(at(951_868_799, 1)),
        "2000-02-29 23:59:59.000001"
    );
    assert_eq!(format_timestamp(at(0, 0)), "1970-01-01 00:00:00");
    assert_eq!(
        format_timestamp(at(4_107_542_400, 999_999)),
        "2100-03-01 00:00:00.999999"
    );
    assert_eq!(
        format_timestamp(UNIX_EPOCH - Duration::from_secs(5)),
        "1970-01-01 00:00:00"
    );
    assert!(format_timestamp(SystemTime::now()).starts_with("20"));
}

// --- properties -----------------------------------------------------------------------

fn any_string(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

/// Keys that steer the decoder, mixed with arbitrary ones.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "method",
            "args",
            "_msg_id",
            "_reply_q",
            "_unique_id",
            "_timeout",
            "version",
            "namespace",
            "result",
            "failure",
            "ending",
            "oslo.version",
            "oslo.message",
            "_context_user_id",
        ])
        .prop_map(String::from),
        any_string(8),
    ]
}

/// JSON without floats, whose text serde_json may not reproduce bit for bit.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any_string(12).prop_map(Value::String),
        Just(json!("2.0")),
        Just(json!(REPLY_Q)),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(any_string(10), json_value(), 0..6)
        .prop_map(|map| map.into_iter().collect())
}

fn depth_of(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

proptest! {
    #[test]
    fn depth_scan_agrees_with_the_parsed_depth(value in json_value(), limit in 0usize..8) {
        let text = value.to_string();
        let within = check_depth(&text, limit).is_ok();
        prop_assert_eq!(within, depth_of(&value) <= limit, "{}", text);
        // Enveloping turns all of it into one string, which has no depth.
        let quoted = serde_json::to_string(&text).unwrap();
        prop_assert!(check_depth(&quoted, 0).is_ok());
    }

    #[test]
    fn decoders_never_panic_on_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_request(&body);
        let _ = decode_reply(&body);
    }

    #[test]
    fn decoders_never_panic_on_json(value in json_value()) {
        let _ = decode_request(value.to_string().as_bytes());
        let _ = decode_reply(value.to_string().as_bytes());
        let _ = decode_request(&envelope(&value));
        let _ = decode_reply(&envelope(&value));
    }

    #[test]
    fn requests_round_trip(
        method in any_string(40),
        args in object(),
        ctx in object(),
        call in any::<bool>(),
        timeout in prop::option::of(0u32..10_000),
        version in prop::option::of("[0-9]\\.[0-9]{1,2}"),
        namespace in prop::option::of(any_string(10)),
    ) {
        let args = raw(Value::Object(args));
        let msg_id = uuid::Uuid::new_v4().simple().to_string();
        let out = OutgoingRequest {
            method: &method,
            args: &args,
            context: &ctx,
            msg_id: call.then_some(msg_id.as_str()),
            reply_q: call.then_some(REPLY_Q),
            timeout: timeout.map(f64::from),
            version: version.as_deref(),
            namespace: namespace.as_deref(),
        };
        let req = decode_request(&encode_request(&out, "uid")).unwrap();
        prop_assert_eq!(&req.method, &method);
        prop_assert_eq!(req.args.get(), args.get());
        prop_assert_eq!(&req.context, &ctx);
        prop_assert_eq!(req.msg_id.as_deref(), out.msg_id);
        prop_assert_eq!(req.reply_q.as_deref(), out.reply_q);
        prop_assert_eq!(req.timeout, if call { out.timeout } else { None });
        prop_assert_eq!(&req.version, &version);
        prop_assert_eq!(&req.namespace, &namespace);
        prop_assert_eq!(req.unique_id.as_deref(), Some("uid"));

        let replies = encode_success(&req, [&*args]);
        prop_assert_eq!(replies.len(), usize::from(call));
        if let Some(body) = replies.first() {
            let reply = decode_reply(body).unwrap();
            prop_assert_eq!(reply.result.as_deref().map(RawValue::get), Some(args.get()));
            prop_assert_eq!(reply.msg_id, Some(msg_id));
        }
    }
}
