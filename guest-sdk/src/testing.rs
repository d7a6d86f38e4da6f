//! Run handlers natively, with a stand-in host, to unit-test them with `cargo test`.
//!
//! Only available off wasm32. [`invoke`] runs a handler the way the host would run an exported
//! method and collects what it wrote.
//!
//! ```
//! use serde::Deserialize;
//! use warren_guest::{Error, testing};
//!
//! #[derive(Deserialize)]
//! struct Div { a: f64, b: f64 }
//!
//! fn div(Div { a, b }: Div) -> Result<f64, Error> {
//!     if b == 0.0 {
//!         return Err(Error::new("ZeroDivisionError", "division by zero"));
//!     }
//!     Ok(a / b)
//! }
//!
//! assert_eq!(testing::invoke(div, r#"{"a": 1, "b": 4}"#, "{}").value(), Ok(0.25.into()));
//! let err = testing::invoke(div, r#"{"a": 1, "b": 0}"#, "{}").value().unwrap_err();
//! assert_eq!(err.class, "ZeroDivisionError");
//! ```

use std::panic::{self, AssertUnwindSafe};

use serde_json::Value;

use crate::abi::{self, Invocation};
use crate::log::Level;
use crate::{Error, Handler};

/// Everything one invocation wrote, as the host would see it.
///
/// ```
/// use warren_guest::{Error, log::Level, testing};
///
/// fn hello() -> Result<&'static str, Error> {
///     warren_guest::info!("saying hello");
///     Ok("hello")
/// }
///
/// let out = testing::invoke(hello, "{}", "{}");
/// assert_eq!(out.results, ["hello"]);
/// assert_eq!(out.error, None);
/// assert_eq!(out.logs, [(Level::Info, "saying hello".to_owned())]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Each `output_write`, in order, including those made before a failure.
    pub results: Vec<Value>,
    /// The error the caller gets, if the invocation failed: the one the handler wrote, or what
    /// the host reports for a panic (`GuestTrap`), a non-zero status without an error or a
    /// malformed one (`GuestError`), or an output that is not JSON (`InvalidResult`).
    pub error: Option<Error>,
    /// Each log line, in order.
    pub logs: Vec<(Level, String)>,
}

impl Outcome {
    /// What a nova `call` gets: the last result, `null` when there was none, or the error.
    ///
    /// ```
    /// use warren_guest::{Error, Stream, Value, testing};
    ///
    /// fn three() -> Result<Stream<[u8; 3]>, Error> { Ok(Stream([1, 2, 3])) }
    /// fn none() -> Result<(), Error> { Ok(()) }
    ///
    /// assert_eq!(testing::invoke(three, "{}", "{}").value(), Ok(3.into()));
    /// assert_eq!(testing::invoke(none, "{}", "{}").value(), Ok(Value::Null));
    /// ```
    pub fn value(&self) -> Result<Value, Error> {
        let mut values = self.values()?;
        Ok(values.pop().unwrap_or(Value::Null))
    }

    /// What a nova `multicall` gets: every result in order, a single `null` when there was
    /// none, or the error (results written before it are discarded).
    ///
    /// ```
    /// use warren_guest::{Error, Stream, Value, emit, testing};
    ///
    /// fn three() -> Result<Stream<[u8; 3]>, Error> { Ok(Stream([1, 2, 3])) }
    /// fn fails() -> Result<(), Error> {
    ///     emit(&1)?;
    ///     Err(Error::new("Boom", "after one result"))
    /// }
    ///
    /// assert_eq!(testing::invoke(three, "{}", "{}").values(), Ok(vec![1.into(), 2.into(), 3.into()]));
    /// assert_eq!(testing::invoke(fails, "{}", "{}").values().unwrap_err().class, "Boom");
    /// ```
    pub fn values(&self) -> Result<Vec<Value>, Error> {
        match &self.error {
            Some(err) => Err(err.clone()),
            None if self.results.is_empty() => Ok(vec![Value::Null]),
            None => Ok(self.results.clone()),
        }
    }
}

/// Runs `handler` as an exported method with `args` and `context` (JSON text, as the host
/// passes them) and returns what it wrote.
///
/// A panic in the handler is caught and reported as a `GuestTrap` error holding the panic
/// message, as the host does with the message a real module prints to stderr.
///
/// ```
/// use warren_guest::{Error, testing};
///
/// fn boom() -> Result<(), Error> { panic!("on purpose") }
///
/// let err = testing::invoke(boom, "{}", "{}").error.unwrap();
/// assert_eq!((err.class.as_str(), err.message.as_str()), ("GuestTrap", "on purpose"));
/// ```
pub fn invoke<M, H: Handler<M>>(handler: H, args: &str, context: &str) -> Outcome {
    let outer = abi::swap(Some(Invocation {
        args: args.as_bytes().to_vec(),
        context: context.as_bytes().to_vec(),
        ..Invocation::default()
    }));
    // The handler is dropped after the call, so a panic cannot leave it half-used.
    let status = panic::catch_unwind(AssertUnwindSafe(|| crate::__private::run(handler)));
    let invocation = abi::swap(outer).unwrap_or_default();

    let mut error = match status {
        Err(payload) => Some(Error::new("GuestTrap", panic_message(payload.as_ref()))),
        Ok(status) => match invocation.error {
            Some(json) => Some(parse_error(&json)),
            None if status != 0 => Some(Error::new(
                "GuestError",
                format!("the method returned status {status} without an error"),
            )),
            None => None,
        },
    };
    let mut results = Vec::with_capacity(invocation.outputs.len());
    for json in &invocation.outputs {
        match serde_json::from_slice(json) {
            Ok(value) => results.push(value),
            Err(err) => {
                error.get_or_insert_with(|| {
                    Error::new("InvalidResult", format!("output is not valid JSON: {err}"))
                });
            }
        }
    }
    let logs = invocation
        .logs
        .into_iter()
        .map(|(level, line)| (Level::from_abi(level), line))
        .collect();
    Outcome {
        results,
        error,
        logs,
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "the handler panicked".to_owned()
    }
}

/// Reads an `error_write` payload the way the host does.
fn parse_error(json: &[u8]) -> Error {
    let malformed = |why: &str| Error::new("GuestError", format!("malformed error JSON: {why}"));
    let mut object = match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return malformed("not an object"),
        Err(err) => return malformed(&err.to_string()),
    };
    let (Some(Value::String(class)), Some(Value::String(message))) =
        (object.remove("class"), object.remove("message"))
    else {
        return malformed("`class` and `message` must be strings");
    };
    Error {
        class,
        message,
        data: object.remove("data"),
    }
}

/// Stand in for the host's outbound RPC ([`crate::rpc`]) until the returned guard is dropped.
///
/// `stub` gets the kind (`"call"`, `"cast"`, `"fanout_cast"` or `"notify"`) and the request the
/// host would get (`{"topic", "method", "args", ...}` as in ABI.md) and returns the result or
/// the error. Without a stub every outbound request fails with class `Unavailable`.
///
/// ```
/// use warren_guest::{Error, rpc, serde_json::{Value, json}, testing};
///
/// fn double(args: Value) -> Result<i64, Error> {
///     let n: i64 = rpc::call("calc", "add", &json!({"a": args["n"], "b": args["n"]}))?;
///     Ok(n)
/// }
///
/// let _stub = testing::stub_rpc(|kind, request| {
///     assert_eq!((kind, request["topic"].as_str()), ("call", Some("calc")));
///     Ok(json!(request["args"]["a"].as_i64().unwrap() * 2))
/// });
/// assert_eq!(testing::invoke(double, r#"{"n": 21}"#, "{}").value(), Ok(42.into()));
/// ```
pub fn stub_rpc(stub: impl FnMut(&str, &Value) -> Result<Value, Error> + 'static) -> StubGuard {
    abi::STUB.with_borrow_mut(|slot| *slot = Some(Box::new(stub)));
    StubGuard(())
}

/// Removes the stub installed by [`stub_rpc`] when dropped.
#[must_use = "the stub is removed when the guard is dropped"]
pub struct StubGuard(());

impl Drop for StubGuard {
    fn drop(&mut self) {
        abi::STUB.with_borrow_mut(|slot| *slot = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_errors_are_guest_errors() {
        for json in [
            &b"nope"[..],
            b"[]",
            br#"{"class": "X"}"#,
            br#"{"class": 1, "message": "m"}"#,
        ] {
            assert_eq!(parse_error(json).class, "GuestError", "{json:?}");
        }
        let err = parse_error(br#"{"class": "X", "message": "m", "data": [1], "extra": 2}"#);
        assert_eq!(err, Error::new("X", "m").with_data(vec![1]));
    }

    #[test]
    fn unknown_log_levels_count_as_info() {
        assert_eq!(Level::from_abi(-1), Level::Info);
        assert_eq!(Level::from_abi(7), Level::Info);
        assert_eq!(Level::from_abi(4), Level::Error);
    }
}
