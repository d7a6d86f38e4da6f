//! hello-rust: the polyglot contract (`plugins/polyglot.md`) in Rust, on the `warren-guest` SDK.
//!
//! The args are checked by hand rather than through serde structs, so that the error messages
//! are the contract's, word for word, in every language.

use std::collections::BTreeMap;

use warren_guest::serde_json::value::RawValue;
use warren_guest::serde_json::{Map, Value, json};
use warren_guest::{Context, Error, Stream, log};

/// The args object, parsed.
type Args = Map<String, Value>;

const COUNT_RANGE: &str = "n must be an integer from 0 to 1000";

/// `echo {"value": V}` → `V`, its JSON text as it arrived.
fn echo(mut args: BTreeMap<String, Box<RawValue>>) -> Result<Box<RawValue>, Error> {
    // Raw text, not a `Value`: big numbers keep every digit.
    args.remove("value")
        .ok_or_else(|| Error::invalid_args("missing field: value"))
}

/// `fail {"message": M}` → error `PluginError` with `M` (default `failed`) and `{"code": 42}`.
fn fail(args: Args) -> Result<(), Error> {
    let message = args
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("failed");
    Err(Error::new("PluginError", message).with_data(json!({"code": 42})))
}

/// `count {"n": N}` → streams `1..=N` for `0 <= N <= 1000`, logging `counting to N` at info.
fn count(args: Args) -> Result<Stream<std::ops::RangeInclusive<i64>>, Error> {
    let n = args
        .get("n")
        .and_then(Value::as_i64)
        .filter(|n| (0..=1000).contains(n))
        .ok_or_else(|| Error::invalid_args(COUNT_RANGE))?;
    log::info(&format!("counting to {n}"));
    Ok(Stream(1..=n))
}

/// `whoami` → the context's `user_id` when it is a string, else `null`.
fn whoami(ctx: &Context) -> Result<Option<String>, Error> {
    Ok(ctx.user_id().map(str::to_owned))
}

warren_guest::export!(echo, fail, count, whoami);

#[cfg(test)]
mod tests {
    use super::*;
    use warren_guest::testing::invoke;

    #[test]
    fn follows_the_contract() {
        assert_eq!(
            invoke(echo, r#"{"value": [1]}"#, "{}").results,
            [json!([1])]
        );
        let err = invoke(echo, "{}", "{}").error.expect("error");
        assert_eq!(
            (err.class.as_str(), err.message.as_str()),
            ("InvalidArgs", "missing field: value")
        );
        let err = invoke(fail, "{}", "{}").error.expect("error");
        assert_eq!(err.message, "failed");
        assert_eq!(invoke(count, r#"{"n": 3}"#, "{}").results, [1, 2, 3]);
        let err = invoke(count, r#"{"n": 3.0}"#, "{}").error.expect("error");
        assert_eq!(err.message, COUNT_RANGE);
        assert_eq!(invoke(whoami, "{}", r#"{"user_id": "u1"}"#).results, ["u1"]);
        assert_eq!(invoke(whoami, "{}", "{}").values(), Ok(vec![Value::Null]));
    }
}
