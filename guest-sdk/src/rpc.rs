//! Outbound RPC: `call`, `cast`, `fanout_cast` and `notify` to other topics, through the host.
//!
//! The host sends only what the handler's config grants (`call`, `cast` and `notify` topic
//! lists in its `[[handler]]` entry; nothing by default), passes the request context on (with
//! the call depth, which it bounds), and never lets a call wait past the invocation's own time
//! limit. A refused or failed request comes back as an [`Error`] with the class the host or the
//! remote handler gave it (`Forbidden`, `Timeout`, `Unavailable`, `CallDepthExceeded`,
//! `ReplyTooLarge`, or the remote handler's own class), so `?` passes it on to this handler's
//! caller unchanged.
//!
//! ```
//! use serde::Deserialize;
//! use warren_guest::{Error, rpc};
//!
//! #[derive(Deserialize)]
//! struct Sum { a: i64, b: i64 }
//!
//! /// Adds through the `calc` handler, then tells whoever listens.
//! fn add(Sum { a, b }: Sum) -> Result<i64, Error> {
//!     let sum: i64 = rpc::call("calc", "add", &serde_json::json!({"a": a, "b": b}))?;
//!     rpc::notify("api.sum", &serde_json::json!({"sum": sum}))?;
//!     Ok(sum)
//! }
//! # use warren_guest::{testing, serde_json::{self, Value}};
//! # let _stub = testing::stub_rpc(|kind, req| match kind {
//! #     "call" => Ok(Value::from(req["args"]["a"].as_i64().unwrap() + req["args"]["b"].as_i64().unwrap())),
//! #     _ => Ok(Value::Null),
//! # });
//! # assert_eq!(testing::invoke(add, r#"{"a": 1, "b": 2}"#, "{}").value(), Ok(3.into()));
//! ```

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::Error;
use crate::abi;

/// Where a `call` or `cast` goes: any server of a topic, or one server (`topic.server`), and how
/// long a call waits.
///
/// ```
/// use std::time::Duration;
/// use warren_guest::rpc::Target;
///
/// let target = Target::new("compute").server("host-1").timeout(Duration::from_secs(2));
/// let any: Target = "compute".into();
/// # let _ = (target, any);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    topic: String,
    server: Option<String>,
    timeout: Option<Duration>,
    context: Map<String, Value>,
}

impl Target {
    /// Any server of `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            server: None,
            timeout: None,
            context: Map::new(),
        }
    }

    /// Only the server named `server` (routing key `topic.server`).
    #[must_use]
    pub fn server(mut self, server: impl Into<String>) -> Self {
        self.server = Some(server.into());
        self
    }

    /// How long a call waits for its reply. The host never waits past the invocation's own
    /// time limit, which is also the default.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Add `key` to the context sent on (besides the current request's context, which always
    /// travels on).
    #[must_use]
    pub fn context(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.context.insert(key.into(), value.into());
        self
    }

    fn request(&self, method: &str, args: Value) -> Value {
        let mut request = json!({"topic": self.topic, "method": method, "args": args});
        if let Some(server) = &self.server {
            request["server"] = server.as_str().into();
        }
        if let Some(timeout) = self.timeout {
            request["timeout_ms"] = u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .into();
        }
        if !self.context.is_empty() {
            request["context"] = Value::Object(self.context.clone());
        }
        request
    }
}

impl From<&str> for Target {
    fn from(topic: &str) -> Self {
        Self::new(topic)
    }
}

impl From<String> for Target {
    fn from(topic: String) -> Self {
        Self::new(topic)
    }
}

/// Call `method` on `target` and wait for its result (the last one, if it streams several).
///
/// The result is deserialized into `R` (use [`Value`] to take it as it is); a result that does
/// not fit fails with class `InvalidResult`.
pub fn call<R: DeserializeOwned>(
    target: impl Into<Target>,
    method: &str,
    args: &impl Serialize,
) -> Result<R, Error> {
    let request = target.into().request(method, to_args(args)?);
    let reply = send(abi::Kind::Call, &request)?;
    serde_json::from_slice(&reply).map_err(|e| {
        Error::new(
            "InvalidResult",
            format!("the result of {method} does not fit the expected type: {e}"),
        )
    })
}

/// Send `method` to one server of `target` without waiting for it to run. `Ok` means the
/// broker took the message.
pub fn cast(target: impl Into<Target>, method: &str, args: &impl Serialize) -> Result<(), Error> {
    let request = target.into().request(method, to_args(args)?);
    send(abi::Kind::Cast, &request).map(drop)
}

/// Send `method` to every server of `topic` (its fanout exchange), without waiting.
pub fn fanout_cast(topic: &str, method: &str, args: &impl Serialize) -> Result<(), Error> {
    let request = Target::new(topic).request(method, to_args(args)?);
    send(abi::Kind::FanoutCast, &request).map(drop)
}

/// Publish an oslo notification of `event_type` at priority `info` on the `notifications`
/// topic (queue `notifications.info`).
pub fn notify(event_type: &str, payload: &impl Serialize) -> Result<(), Error> {
    notify_to("notifications", "info", event_type, payload)
}

/// Publish an oslo notification on `<topic>.<priority>`; `priority` is one of `audit`, `debug`,
/// `info`, `warn`, `error`, `critical` or `sample`.
pub fn notify_to(
    topic: &str,
    priority: &str,
    event_type: &str,
    payload: &impl Serialize,
) -> Result<(), Error> {
    let payload = serde_json::to_value(payload).map_err(|e| {
        Error::new(
            "InvalidRequest",
            format!("cannot serialize the payload: {e}"),
        )
    })?;
    let request = json!({
        "topic": topic,
        "priority": priority,
        "event_type": event_type,
        "payload": payload,
    });
    send(abi::Kind::Notify, &request).map(drop)
}

fn to_args(args: &impl Serialize) -> Result<Value, Error> {
    match serde_json::to_value(args) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(Error::new(
            "InvalidRequest",
            "args must serialize to a JSON object",
        )),
        Err(e) => Err(Error::new(
            "InvalidRequest",
            format!("cannot serialize the args: {e}"),
        )),
    }
}

/// Send one request; the reply bytes on success, the host's error otherwise.
fn send(kind: abi::Kind, request: &Value) -> Result<Vec<u8>, Error> {
    let bytes = serde_json::to_vec(request)
        .map_err(|e| Error::new("InvalidRequest", format!("cannot encode the request: {e}")))?;
    let (status, reply) = abi::send(kind, &bytes);
    if status == 0 {
        return Ok(reply);
    }
    Err(error_from(&reply))
}

/// The host's error JSON (`{"class", "message", "data"}`) as an [`Error`].
fn error_from(bytes: &[u8]) -> Error {
    let value: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    match (text("class"), text("message")) {
        (Some(class), Some(message)) => {
            let error = Error::new(class, message);
            match value.get("data") {
                Some(data) if !data.is_null() => error.with_data(data.clone()),
                _ => error,
            }
        }
        _ => Error::new("GuestError", "the host's error reply is malformed"),
    }
}
