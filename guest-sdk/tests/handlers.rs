//! The SDK as a plugin author uses it: handlers run through the native stand-in host.

// `testing` needs the stand-in host, which wasm32 builds replace with the real imports.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::BTreeMap;
use std::convert::Infallible;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use warren_guest::log::Level;
use warren_guest::testing::{Outcome, invoke};
use warren_guest::{Context, Error, Stream, emit};

#[derive(Deserialize)]
struct Pair {
    a: i64,
    b: i64,
}

fn add(Pair { a, b }: Pair) -> Result<i64, Error> {
    Ok(a + b)
}

fn div(Pair { a, b }: Pair) -> Result<i64, Error> {
    if b == 0 {
        return Err(Error::new("ZeroDivisionError", "division by zero").with_data(json!({"a": a})));
    }
    Ok(a / b)
}

fn class(outcome: &Outcome) -> Option<&str> {
    outcome.error.as_ref().map(|err| err.class.as_str())
}

#[test]
fn success_writes_one_result() {
    let out = invoke(add, r#"{"a": 40, "b": 2}"#, "{}");
    assert_eq!(
        out,
        Outcome {
            results: vec![json!(42)],
            error: None,
            logs: vec![]
        }
    );
    assert_eq!(out.value(), Ok(json!(42)));
    assert_eq!(out.values(), Ok(vec![json!(42)]));
}

#[test]
fn typed_error_keeps_class_message_and_data() {
    let out = invoke(div, r#"{"a": 1, "b": 0}"#, "{}");
    assert!(out.results.is_empty());
    let err = out.error.expect("div by zero fails");
    assert_eq!(
        serde_json::to_value(&err).ok(),
        Some(
            json!({"class": "ZeroDivisionError", "message": "division by zero", "data": {"a": 1}})
        )
    );
}

#[test]
fn error_json_omits_missing_data() {
    let err = Error::new("NotFound", "gone");
    assert_eq!(
        serde_json::to_value(&err).ok(),
        Some(json!({"class": "NotFound", "message": "gone"}))
    );
}

#[test]
fn args_that_do_not_fit_are_invalid_args_with_serde_message() {
    let missing = invoke(add, r#"{"a": 1}"#, "{}");
    assert_eq!(class(&missing), Some("InvalidArgs"));
    let message = missing.error.map(|err| err.message).unwrap_or_default();
    assert!(message.contains("missing field `b`"), "{message}");

    let wrong_type = invoke(add, r#"{"a": 1, "b": "2"}"#, "{}");
    assert_eq!(class(&wrong_type), Some("InvalidArgs"));
    let message = wrong_type.error.map(|err| err.message).unwrap_or_default();
    assert!(message.contains("invalid type: string"), "{message}");

    // The host never sends these, but they must not panic either.
    assert_eq!(class(&invoke(add, "not json", "{}")), Some("InvalidArgs"));
    assert_eq!(class(&invoke(add, "", "{}")), Some("InvalidArgs"));
    assert_eq!(class(&invoke(add, "42", "{}")), Some("InvalidArgs"));
}

#[test]
fn args_can_be_any_deserialize_type() {
    fn keys(args: Map<String, Value>) -> Result<Vec<String>, Infallible> {
        Ok(args.into_iter().map(|(key, _)| key).collect())
    }
    let out = invoke(keys, r#"{"x": 1, "y": null}"#, "{}");
    assert_eq!(out.value(), Ok(json!(["x", "y"])));
}

#[test]
fn stream_writes_one_result_per_item() {
    fn count(args: BTreeMap<String, u32>) -> Result<Stream<impl Iterator<Item = u32>>, Error> {
        Ok(Stream(0..args.get("n").copied().unwrap_or(0)))
    }
    let out = invoke(count, r#"{"n": 4}"#, "{}");
    assert_eq!(out.results, [0, 1, 2, 3]);
    assert_eq!(out.value(), Ok(json!(3)));

    let empty = invoke(count, r#"{"n": 0}"#, "{}");
    assert!(empty.results.is_empty());
    assert_eq!(empty.values(), Ok(vec![Value::Null]));
}

#[test]
fn stream_items_may_be_null_or_structured() {
    fn items() -> Result<Stream<Vec<Option<Value>>>, Error> {
        Ok(Stream(vec![None, Some(json!({"k": [1]}))]))
    }
    assert_eq!(
        invoke(items, "{}", "{}").results,
        [Value::Null, json!({"k": [1]})]
    );
}

#[test]
fn emit_streams_imperatively_and_unit_adds_nothing() {
    fn countdown() -> Result<(), Error> {
        emit(&3)?;
        emit(&json!(null))?;
        emit("go")
    }
    assert_eq!(
        invoke(countdown, "{}", "{}").results,
        [json!(3), Value::Null, json!("go")]
    );

    fn emit_then_return() -> Result<&'static str, Error> {
        emit(&1)?;
        Ok("last")
    }
    let out = invoke(emit_then_return, "{}", "{}");
    assert_eq!(out.results, [json!(1), json!("last")]);
    assert_eq!(out.value(), Ok(json!("last")));
}

#[test]
fn null_results_write_nothing() {
    fn unit() -> Result<(), Error> {
        Ok(())
    }
    fn none() -> Result<Option<u8>, Error> {
        Ok(None)
    }
    for out in [invoke(unit, "{}", "{}"), invoke(none, "{}", "{}")] {
        assert!(out.results.is_empty());
        assert_eq!(out.error, None);
        assert_eq!(out.value(), Ok(Value::Null));
    }
}

#[test]
fn results_before_a_failure_are_discarded_by_the_caller() {
    fn half_done() -> Result<(), Error> {
        emit(&1)?;
        Err(Error::new("Boom", "midway"))
    }
    let out = invoke(half_done, "{}", "{}");
    assert_eq!(out.results, [1]);
    assert_eq!(
        out.values().map_err(|err| err.class),
        Err("Boom".to_owned())
    );
}

/// JSON object keys must be strings, so this never serializes.
type TupleKeyed = BTreeMap<(u8, u8), u8>;

#[test]
fn unserializable_results_are_errors_not_panics() {
    fn tuple_keys() -> Result<TupleKeyed, Error> {
        Ok(BTreeMap::from([((1, 2), 3)]))
    }
    let out = invoke(tuple_keys, "{}", "{}");
    assert_eq!(class(&out), Some("InvalidResult"));
    assert!(out.results.is_empty());

    fn stream_fails_midway() -> Result<Stream<Vec<TupleKeyed>>, Error> {
        Ok(Stream(vec![BTreeMap::new(), BTreeMap::from([((1, 2), 3)])]))
    }
    let out = invoke(stream_fails_midway, "{}", "{}");
    assert_eq!(out.results, [json!({})]);
    assert_eq!(class(&out), Some("InvalidResult"));
}

#[test]
fn error_conversions() {
    fn stringly() -> Result<u8, String> {
        Err("plain message".to_owned())
    }
    fn static_str() -> Result<u8, &'static str> {
        Err("static message")
    }
    fn never() -> Result<u8, Infallible> {
        Ok(7)
    }
    let err = invoke(stringly, "{}", "{}").error;
    assert_eq!(err, Some(Error::new("Error", "plain message")));
    let err = invoke(static_str, "{}", "{}").error;
    assert_eq!(err, Some(Error::new("Error", "static message")));
    assert_eq!(invoke(never, "{}", "{}").value(), Ok(json!(7)));
}

#[test]
fn context_is_read_by_handlers_that_take_it() {
    fn whoami(_: Map<String, Value>, ctx: &Context) -> Result<Value, Error> {
        Ok(json!([
            ctx.user_id(),
            ctx.request_id(),
            ctx.project_id(),
            ctx.get("roles")
        ]))
    }
    let context = r#"{"user_id": "u1", "request_id": "req-1", "roles": ["admin"], "extra": 1}"#;
    let out = invoke(whoami, "{}", context);
    assert_eq!(out.value(), Ok(json!(["u1", "req-1", null, ["admin"]])));

    fn whole(ctx: &Context) -> Result<Map<String, Value>, Error> {
        Ok(ctx.as_map().clone())
    }
    assert_eq!(invoke(whole, "{}", "{}").value(), Ok(json!({})));
    assert_eq!(
        invoke(whole, "{}", context)
            .value()
            .map(|v| v["extra"].clone()),
        Ok(json!(1))
    );
    // Not something the host sends; it must read as empty, not fail the method.
    assert_eq!(invoke(whole, "{}", "[1]").value(), Ok(json!({})));
    assert_eq!(invoke(whole, "{}", "").value(), Ok(json!({})));
}

#[test]
fn closures_are_handlers_too() {
    let prefix = "user ";
    let with_context = |args: Map<String, Value>, ctx: &Context| {
        Ok::<_, Error>(format!(
            "{prefix}{} {}",
            ctx.user_id().unwrap_or("-"),
            args.len()
        ))
    };
    let out = invoke(with_context, r#"{"a": 1}"#, r#"{"user_id": "u1"}"#);
    assert_eq!(out.value(), Ok(json!("user u1 1")));
    let context_only = |ctx: &Context| Ok::<_, Error>(ctx.as_map().len());
    assert_eq!(
        invoke(context_only, "{}", r#"{"x": 1}"#).value(),
        Ok(json!(1))
    );
}

#[test]
fn context_fields_of_other_types_are_not_strings() {
    let ctx = Context::from_map(Map::from_iter([("user_id".to_owned(), json!(5))]));
    assert_eq!(ctx.user_id(), None);
    assert_eq!(ctx.get("user_id"), Some(&json!(5)));
}

#[test]
fn logs_keep_level_and_order() {
    fn chatty() -> Result<(), Error> {
        warren_guest::trace!("t");
        warren_guest::debug!("d {}", 1);
        warren_guest::info!("i {x}", x = "é");
        warren_guest::warn!("w");
        warren_guest::error!("e");
        warren_guest::log::info("plain");
        warren_guest::log::log(Level::Warn, "explicit");
        Ok(())
    }
    let out = invoke(chatty, "{}", "{}");
    let expected = [
        (Level::Trace, "t"),
        (Level::Debug, "d 1"),
        (Level::Info, "i é"),
        (Level::Warn, "w"),
        (Level::Error, "e"),
        (Level::Info, "plain"),
        (Level::Warn, "explicit"),
    ]
    .map(|(level, line)| (level, line.to_owned()));
    assert_eq!(out.logs, expected);
}

#[test]
fn panics_are_guest_traps_with_the_message() {
    fn formatted() -> Result<(), Error> {
        panic!("bad {}", 42)
    }
    let err = invoke(formatted, "{}", "{}").error;
    assert_eq!(err, Some(Error::new("GuestTrap", "bad 42")));
    // The stand-in host is left clean for the next invocation.
    assert_eq!(
        invoke(add, r#"{"a": 1, "b": 1}"#, "{}").value(),
        Ok(json!(2))
    );
}

#[test]
fn nested_invocations_restore_the_outer_one() {
    fn outer() -> Result<Value, Error> {
        warren_guest::info!("outer before");
        let inner = invoke(add, r#"{"a": 2, "b": 3}"#, "{}");
        warren_guest::info!("outer after");
        Ok(json!({"inner": inner.value()?, "inner_logs": inner.logs.len()}))
    }
    let out = invoke(outer, "{}", "{}");
    assert_eq!(out.value(), Ok(json!({"inner": 5, "inner_logs": 0})));
    assert_eq!(out.logs.len(), 2);
}

#[test]
fn run_returns_the_status() {
    // Outside `invoke` args read as `{}`, which `add` rejects.
    assert_eq!(warren_guest::__private::run(add), 1);
    assert_eq!(warren_guest::__private::run(|| Ok::<_, Error>("fine")), 0);
}

mod handlers {
    use warren_guest::Error;

    pub fn ping() -> Result<&'static str, Error> {
        Ok("pong")
    }
}

fn echo(args: Value) -> Result<Value, Error> {
    Ok(args)
}

// Compiles on native targets without exporting anything; on wasm32 this is the module's API.
warren_guest::export!(echo, add, "math.div" => div, "ping" => handlers::ping,);

#[test]
fn method_names_the_host_never_calls_are_refused() {
    use warren_guest::__private::check_method_name;
    for name in [
        "echo", "math.div", "Memory", "memory2", "a_", "warren", "cabi",
    ] {
        check_method_name(name);
    }
    for name in [
        "",
        "_start",
        "__x",
        "warren_abi_version",
        "cabi_realloc",
        "memory",
    ] {
        let refused = std::panic::catch_unwind(|| check_method_name(name)).is_err();
        assert!(refused, "{name:?} should be refused");
    }
}
