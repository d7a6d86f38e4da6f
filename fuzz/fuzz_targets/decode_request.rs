//! Arbitrary bytes into Warren's wire decoders (`warren::wire`), as a delivery body would
//! arrive from the broker. Beyond "no panic", every decoded value is checked against the
//! hygiene rules of `host/src/wire/request.rs`, re-encoded the way the daemon and the
//! client would, and decoded again. See fuzz/README.md.

#![no_main]

/// `warren::wire`, compiled from the host's own source: the module is pure (serde, uuid,
/// thiserror), so the fuzzer need not build wasmtime and lapin (see fuzz/Cargo.toml).
#[path = "../../host/src/wire/mod.rs"]
#[allow(dead_code, unused_imports)]
mod wire;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;
use wire::{
    Dialect, Limits, OutgoingRequest, RemoteError, Reply, Request, decode_reply, decode_reply_with,
    decode_request_with, encode_failure, encode_heartbeat, encode_nova_ending, encode_nova_failure,
    encode_nova_result, encode_oslo_reply, encode_request, encode_request_flat, encode_success,
    valid_reply_queue,
};

/// Small limits, so the fuzzer reaches every `TooDeep` and `TooLong` path with short inputs.
/// Every one is at or below its default, so whatever passes them must pass the defaults too.
const TIGHT: Limits = Limits {
    max_depth: 4,
    max_method_len: 8,
    max_id_len: 40,
};

/// The `_unique_id` the re-encoded requests carry; within both limits.
const UNIQUE_ID: &str = "fuzz";

fuzz_target!(|body: &[u8]| {
    let loose = decode_request_with(body, &Limits::DEFAULT);
    let tight = decode_request_with(body, &TIGHT);
    if let Ok(req) = &loose {
        check_request(req, &Limits::DEFAULT);
    }
    if let Ok(req) = &tight {
        check_request(req, &TIGHT);
        // Limits only ever refuse: a body within the tight ones decodes the same without them.
        let loose = loose
            .as_ref()
            .expect("accepted with tight limits, refused with defaults");
        assert_same_request(req, loose);
    }

    let loose = decode_reply(body);
    let tight = decode_reply_with(body, &TIGHT);
    if let Ok(reply) = &loose {
        check_reply(reply, &Limits::DEFAULT);
    }
    if let Ok(reply) = &tight {
        check_reply(reply, &TIGHT);
        let loose = loose
            .as_ref()
            .expect("reply accepted with tight limits only");
        assert_eq!(reply.msg_id, loose.msg_id);
        assert_eq!(raw_text(&reply.result), raw_text(&loose.result));
        assert_eq!(reply.ending, loose.ending);
        assert_eq!(reply.failure.is_some(), loose.failure.is_some());
    }

    if let Ok(text) = std::str::from_utf8(body) {
        check_text(text);
    }
});

/// The invariants of a decoded request, then its replies and its re-encoding.
fn check_request(req: &Request, limits: &Limits) {
    assert!(req.method.len() <= limits.max_method_len, "method too long");
    for id in [
        &req.msg_id,
        &req.reply_q,
        &req.unique_id,
        &req.version,
        &req.namespace,
    ] {
        assert!(
            id.as_ref().is_none_or(|id| id.len() <= limits.max_id_len),
            "{id:?}"
        );
    }
    // Replies can only be aimed at reply queues.
    if let Some(queue) = &req.reply_q {
        assert!(valid_reply_queue(queue), "reply_q {queue:?}");
        assert!(
            queue.starts_with("reply_") || queue.starts_with("amq.rabbitmq.reply-to."),
            "reply_q {queue:?}"
        );
        assert_eq!(req.dialect, Dialect::Oslo);
    }
    assert_eq!(req.reply_routing_key().is_some(), req.wants_reply());
    if let Some(key) = req.reply_routing_key() {
        assert!(valid_reply_queue(key), "reply routing key {key:?}");
        assert!(key.len() <= 255, "longer than an AMQP short string");
    }
    if req.enveloped {
        assert_eq!(req.dialect, Dialect::Oslo);
    }
    if req.single_reply {
        assert!(req.enveloped);
    }
    // args are JSON (numbers are not range-checked: `1e400` passes through verbatim, as
    // Python reads it as inf) that fits below the message object.
    assert!(is_json(req.args.get()), "args are not JSON");
    assert!(
        text_depth(req.args.get()) < limits.max_depth,
        "args nest too deep"
    );
    for value in req.context.values() {
        assert!(depth(value) < limits.max_depth, "context nests too deep");
    }
    if let Some(every) = req.heartbeat_interval() {
        assert!(req.dialect == Dialect::Oslo && req.wants_reply());
        assert!(
            every.as_secs() >= 1 && every.as_secs() <= 86_400,
            "{every:?}"
        );
        let beat = decode_reply(&encode_heartbeat(msg_id(req), req.enveloped))
            .expect("heartbeat does not decode");
        assert!(beat.is_heartbeat());
        assert_eq!(beat.msg_id.as_deref(), req.msg_id.as_deref());
    }

    check_success_replies(req);
    check_failure_reply(req);
    check_reencoded(req, limits);
    // A notification built from a request's pieces is valid JSON.
    let note = wire::encode_notification(
        &req.method,
        &req.method,
        "INFO",
        &req.args,
        &req.context,
        req.enveloped,
    );
    assert!(is_json(
        std::str::from_utf8(&note).expect("notification is not UTF-8")
    ));
}

fn msg_id(req: &Request) -> &str {
    req.msg_id.as_deref().unwrap_or_default()
}

/// `encode_success` for the request's own args as the result, decoded by the client side.
fn check_success_replies(req: &Request) {
    let replies = encode_success(req, [&*req.args, &*req.args]);
    if !req.wants_reply() {
        assert!(replies.is_empty(), "a cast got replies");
        return;
    }
    let expected = match req.dialect {
        Dialect::Oslo if req.single_reply => 1,
        _ => 3,
    };
    assert_eq!(replies.len(), expected, "{:?}", req.dialect);
    for (i, body) in replies.iter().enumerate() {
        let reply = decode_reply(body).expect("our own reply does not decode");
        let last = i + 1 == replies.len();
        assert!(reply.failure.is_none());
        assert_eq!(
            reply.ending,
            last,
            "ending on reply {i} of {}",
            replies.len()
        );
        let want_result = req.single_reply || !last;
        assert_eq!(
            reply.result.as_deref().map(RawValue::get),
            want_result.then(|| req.args.get())
        );
        match req.dialect {
            Dialect::Oslo => {
                assert_eq!(reply.msg_id.as_deref(), req.msg_id.as_deref());
                assert_eq!(reply.unique_id.as_ref().map(String::len), Some(32));
                assert_eq!(body.starts_with(b"{\"oslo.version\""), req.enveloped);
            }
            Dialect::NovaFolsom | Dialect::NovaEssex => {
                assert_eq!(reply.msg_id, None);
                assert!(!reply.is_heartbeat() || !last);
            }
        }
    }
}

/// `encode_failure` with a dispatcher error naming the (hostile) method and version.
fn check_failure_reply(req: &Request) {
    let err = match &req.version {
        Some(version) => RemoteError::unsupported_version(version, &req.method),
        None => RemoteError::no_such_method(&req.method),
    };
    let Some(body) = encode_failure(req, &err) else {
        assert!(!req.wants_reply(), "a call got no failure reply");
        return;
    };
    let reply = decode_reply(&body).expect("our own failure reply does not decode");
    let failure = reply.failure.expect("failure reply without a failure");
    assert!(reply.result.is_none());
    if req.dialect == Dialect::NovaEssex {
        assert_eq!(
            (&failure.class, &failure.message),
            (&err.class, &err.message)
        );
        assert_eq!(failure.tb, err.tb);
    } else {
        assert_eq!(failure, err);
    }
    if req.dialect == Dialect::Oslo {
        assert!(reply.ending);
        assert_eq!(reply.msg_id.as_deref(), req.msg_id.as_deref());
    }
}

/// The request as the Rust client would send it (envelope and flat), decoded again under
/// the same limits: what Warren accepted once it accepts again, unchanged.
fn check_reencoded(req: &Request, limits: &Limits) {
    let out = OutgoingRequest {
        method: &req.method,
        args: &req.args,
        context: &req.context,
        msg_id: req.msg_id.as_deref(),
        reply_q: req.reply_q.as_deref(),
        timeout: req.timeout,
        version: req.version.as_deref(),
        namespace: req.namespace.as_deref(),
    };
    for enveloped in [true, false] {
        let body = if enveloped {
            encode_request(&out, UNIQUE_ID)
        } else {
            encode_request_flat(&out, UNIQUE_ID)
        };
        let again = decode_request_with(&body, limits)
            .unwrap_or_else(|err| panic!("re-encoded request refused ({enveloped}): {err}"));
        assert_eq!(again.enveloped, enveloped);
        assert_eq!(again.method, req.method);
        assert_eq!(again.args.get(), req.args.get());
        assert!(same_json(
            &Value::Object(again.context.clone()),
            &Value::Object(req.context.clone())
        ));
        assert_eq!(again.msg_id, req.msg_id);
        assert_eq!(again.version, req.version);
        assert_eq!(again.namespace, req.namespace);
        assert_eq!(again.unique_id.as_deref(), Some(UNIQUE_ID));
        // The client sends `_reply_q` and `_timeout` only with calls.
        if req.wants_reply() {
            assert_eq!(again.reply_q, req.reply_q);
            assert!(same_f64(again.timeout, req.timeout));
            assert_eq!(again.single_reply, enveloped);
        } else {
            assert_eq!(again.reply_q, None);
            assert!(!again.single_reply);
        }
        if enveloped {
            assert_eq!(again.dialect, Dialect::Oslo);
        }
    }
}

/// The invariants of a decoded reply, then the reply re-encoded in every shape.
fn check_reply(reply: &Reply, limits: &Limits) {
    for id in [&reply.msg_id, &reply.unique_id] {
        assert!(
            id.as_ref().is_none_or(|id| id.len() <= limits.max_id_len),
            "{id:?}"
        );
    }
    if let Some(result) = &reply.result {
        assert_ne!(result.get(), "null");
        assert!(is_json(result.get()), "result is not JSON");
        assert!(
            text_depth(result.get()) < limits.max_depth,
            "result nests too deep"
        );
    }
    let msg_id = reply.msg_id.as_deref().unwrap_or("m");
    for enveloped in [true, false] {
        let body = encode_oslo_reply(
            msg_id,
            reply.result.as_deref(),
            reply.failure.as_ref(),
            reply.ending,
            enveloped,
        );
        let again = decode_reply(&body).expect("re-encoded reply refused");
        assert_eq!(again.msg_id.as_deref(), Some(msg_id));
        assert_eq!(raw_text(&again.result), raw_text(&reply.result));
        assert_eq!(again.ending, reply.ending);
        assert_same_failure(again.failure.as_ref(), reply.failure.as_ref());
    }
    if let Some(result) = &reply.result {
        let again = decode_reply(&encode_nova_result(result)).expect("nova result refused");
        assert_eq!(raw_text(&again.result), Some(result.get()));
        assert!(!again.ending && again.failure.is_none());
    }
    if let Some(failure) = &reply.failure {
        for dialect in [Dialect::NovaEssex, Dialect::NovaFolsom] {
            let again =
                decode_reply(&encode_nova_failure(dialect, failure)).expect("nova failure refused");
            let again = again.failure.expect("nova failure lost");
            assert_eq!(
                (&again.class, &again.message),
                (&failure.class, &failure.message)
            );
            assert_eq!(again.tb, failure.tb);
        }
    }
    let ending = decode_reply(&encode_nova_ending()).expect("terminator refused");
    assert!(ending.ending);
}

fn assert_same_failure(a: Option<&RemoteError>, b: Option<&RemoteError>) {
    let (Some(a), Some(b)) = (a, b) else {
        assert_eq!(a.is_some(), b.is_some(), "failure appeared or vanished");
        return;
    };
    assert_eq!(
        (&a.class, &a.module, &a.message),
        (&b.class, &b.module, &b.message)
    );
    assert_eq!(a.tb, b.tb);
    assert!(same_json(
        &Value::Array(a.args.clone()),
        &Value::Array(b.args.clone())
    ));
    assert!(same_json(
        &Value::Object(a.kwargs.clone()),
        &Value::Object(b.kwargs.clone())
    ));
}

/// String helpers that take message-borne text.
fn check_text(text: &str) {
    for max in [0, 1, 7, 64, 255] {
        let cut = wire::truncate(text, max);
        assert!(cut.len() <= max && text.starts_with(cut));
        assert!(
            cut.len() + 4 > max.min(text.len()),
            "cut more than one character"
        );
    }
    if valid_reply_queue(text) {
        assert!(!text.is_empty() && text.len() <= 255, "{text:?}");
        assert!(
            text.starts_with("amq.rabbitmq.reply-to.") || !text.contains('.'),
            "{text:?}"
        );
        assert!(text.is_ascii());
    }
}

fn raw_text(raw: &Option<Box<RawValue>>) -> Option<&str> {
    raw.as_deref().map(RawValue::get)
}

/// Two decoded requests agree on everything a handler or a reply sees.
fn assert_same_request(a: &Request, b: &Request) {
    assert_eq!(
        (a.dialect, a.enveloped, a.single_reply),
        (b.dialect, b.enveloped, b.single_reply)
    );
    assert_eq!(a.method, b.method);
    assert_eq!(a.args.get(), b.args.get());
    assert_eq!(a.context, b.context);
    assert_eq!(
        (&a.msg_id, &a.reply_q, &a.unique_id),
        (&b.msg_id, &b.reply_q, &b.unique_id)
    );
    assert_eq!((&a.version, &a.namespace), (&b.version, &b.namespace));
    assert!(same_f64(a.timeout, b.timeout));
}

fn is_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// Nesting of arrays and objects in JSON text, counted independently of the decoder's own
/// scan: a byte-at-a-time walk that skips strings and their escapes.
fn text_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for byte in text.bytes() {
        match (in_string, escaped, byte) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Nesting of arrays and objects, a scalar counting 0; values here are at most 128 deep.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// JSON equality where floats may differ in the last place: serde_json's default float
/// parser is not exact, so printing and re-parsing a float may move it by an ulp.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            same_f64(x.as_f64(), y.as_f64())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn same_f64(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
        (x, y) => x.is_none() && y.is_none(),
    }
}
