//! Replies and remote failures (§3): encoding them for each dialect, and decoding what any
//! nova or oslo server sends back.

use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{
    DecodeError, Dialect, Fields, Limits, Request, check_depth, decode_fields, encode, new_id,
    opt_string,
};

/// `module` of errors raised by Warren or its guests. No Python client can import it, so
/// oslo and nova clients raise their generic `RemoteError(class, message, tb)`.
pub const WARREN_MODULE: &str = "warren";

/// `module` of oslo.messaging's dispatcher errors (`NoSuchMethod`, `UnsupportedVersion`).
pub const DISPATCHER_MODULE: &str = "oslo_messaging.rpc.dispatcher";

/// A remote exception as oslo's `serialize_remote_exception` describes it. Fields are in
/// that function's key order, which is also the order they are encoded in.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("{class}: {message}")]
pub struct RemoteError {
    /// Exception class name, e.g. `ValueError`.
    pub class: String,
    /// Python module of the class; decides whether a client may rebuild it (§3b).
    pub module: String,
    /// `str(exception)`.
    pub message: String,
    /// Traceback lines.
    pub tb: Vec<String>,
    /// Positional constructor arguments, used only when a client rebuilds the class.
    pub args: Vec<Value>,
    /// Keyword constructor arguments. Warren errors carry guest data under `"data"`.
    pub kwargs: Map<String, Value>,
}

impl RemoteError {
    /// An error raised by Warren or a guest, in module [`WARREN_MODULE`]. `args` is
    /// `[message]`, as Python's `Exception(message).args` would be.
    pub fn new(class: impl Into<String>, message: impl Into<String>) -> RemoteError {
        let message = message.into();
        RemoteError {
            class: class.into(),
            module: WARREN_MODULE.to_owned(),
            args: vec![Value::String(message.clone())],
            message,
            tb: Vec::new(),
            kwargs: Map::new(),
        }
    }

    /// Attaches structured data as `kwargs["data"]`. oslo clients never rebuild a
    /// [`WARREN_MODULE`] class, so these kwargs are never passed to a Python constructor;
    /// Rust clients read them back with [`RemoteError::data`]. Essex-era failure lists
    /// have no room for it and drop it.
    pub fn with_data(mut self, data: Value) -> RemoteError {
        self.kwargs.insert("data".to_owned(), data);
        self
    }

    /// The structured data attached with [`RemoteError::with_data`], if any.
    pub fn data(&self) -> Option<&Value> {
        self.kwargs.get("data")
    }

    /// oslo's `NoSuchMethod`, with its exact message. `args` is `[method]` so that a client
    /// allowing [`DISPATCHER_MODULE`] rebuilds it as `NoSuchMethod(method)`; by default it
    /// surfaces as `RemoteError`.
    pub fn no_such_method(method: &str) -> RemoteError {
        RemoteError {
            class: "NoSuchMethod".to_owned(),
            module: DISPATCHER_MODULE.to_owned(),
            message: format!("Endpoint does not support RPC method {method}"),
            tb: Vec::new(),
            args: vec![Value::String(method.to_owned())],
            kwargs: Map::new(),
        }
    }

    /// oslo's `UnsupportedVersion`, with its exact message, rebuildable as
    /// `UnsupportedVersion(version, method=method)`.
    pub fn unsupported_version(version: &str, method: &str) -> RemoteError {
        let mut kwargs = Map::new();
        kwargs.insert("method".to_owned(), Value::String(method.to_owned()));
        RemoteError {
            class: "UnsupportedVersion".to_owned(),
            module: DISPATCHER_MODULE.to_owned(),
            message: format!(
                "Endpoint does not support RPC version {version}. Attempted method: {method}"
            ),
            tb: Vec::new(),
            args: vec![Value::String(version.to_owned())],
            kwargs,
        }
    }

    /// Reads a decoded `failure` value liberally, because a caller is better served by an
    /// odd error than by a decode failure. `None` for the values Python finds falsy, which
    /// its clients treat as "no failure".
    fn from_value(value: Value) -> Option<RemoteError> {
        fn text(value: Option<&Value>) -> String {
            match value {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            }
        }
        fn lines(value: Option<&Value>) -> Vec<String> {
            match value {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items.iter().map(|item| text(Some(item))).collect(),
                Some(other) => vec![text(Some(other))],
            }
        }
        match value {
            Value::Null | Value::Bool(false) => None,
            Value::Array(items) if items.is_empty() => None,
            Value::Object(fields) if fields.is_empty() => None,
            // Essex: [class, message, traceback lines].
            Value::Array(items) => Some(RemoteError {
                class: text(items.first()),
                module: String::new(),
                message: text(items.get(1)),
                tb: lines(items.get(2)),
                args: Vec::new(),
                kwargs: Map::new(),
            }),
            Value::Object(mut fields) => Some(RemoteError {
                class: text(fields.get("class")),
                module: text(fields.get("module")),
                message: text(fields.get("message")),
                tb: lines(fields.get("tb")),
                args: match fields.remove("args") {
                    Some(Value::Array(args)) => args,
                    _ => Vec::new(),
                },
                kwargs: match fields.remove("kwargs") {
                    Some(Value::Object(kwargs)) => kwargs,
                    _ => Map::new(),
                },
            }),
            other => Some(RemoteError::unparsed(other.to_string())),
        }
    }

    fn unparsed(message: String) -> RemoteError {
        RemoteError {
            class: "RemoteError".to_owned(),
            module: String::new(),
            message,
            tb: Vec::new(),
            args: Vec::new(),
            kwargs: Map::new(),
        }
    }
}

/// A [`RemoteError`] as the JSON string nova ≥ 2012.2 and oslo put in `failure`.
struct FailureString<'a>(&'a RemoteError);

impl Serialize for FailureString<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(self.0).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }
}

#[derive(Serialize)]
struct OsloReply<'a> {
    result: Option<&'a RawValue>,
    failure: Option<FailureString<'a>>,
    ending: bool,
    #[serde(rename = "_msg_id")]
    msg_id: &'a str,
    #[serde(rename = "_unique_id")]
    unique_id: &'a str,
}

#[derive(Serialize)]
struct NovaReply<'a, F> {
    result: Option<&'a RawValue>,
    failure: Option<F>,
    // Essex added `ending` only to the terminator; value messages never carried it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ending: bool,
}

/// One oslo reply, `{result, failure, ending, _msg_id, _unique_id}`, with a fresh
/// `_unique_id`. `enveloped` should copy the request's [`Request::enveloped`].
pub fn encode_oslo_reply(
    req_msg_id: &str,
    result: Option<&RawValue>,
    failure: Option<&RemoteError>,
    ending: bool,
    enveloped: bool,
) -> Vec<u8> {
    let reply = OsloReply {
        result,
        failure: failure.map(FailureString),
        ending,
        msg_id: req_msg_id,
        unique_id: &new_id(),
    };
    encode(&reply, enveloped, result.map_or(0, |r| r.get().len()))
}

/// oslo's call-monitor heartbeat, `{result: null, failure: null, ending: false, …}`. Send it
/// only at [`Request::heartbeat_interval`]: oslo clients without a monitor crash on it.
pub fn encode_heartbeat(msg_id: &str, enveloped: bool) -> Vec<u8> {
    encode_oslo_reply(msg_id, None, None, false, enveloped)
}

/// A nova value message, `{"result": X, "failure": null}`.
pub fn encode_nova_result(result: &RawValue) -> Vec<u8> {
    let reply = NovaReply::<()> {
        result: Some(result),
        failure: None,
        ending: false,
    };
    encode(&reply, false, result.get().len())
}

/// The nova terminator, `{"result": null, "failure": null, "ending": true}`.
pub fn encode_nova_ending() -> Vec<u8> {
    br#"{"result":null,"failure":null,"ending":true}"#.to_vec()
}

/// A nova failure message, `{"result": null, "failure": F}`: the `[class, message, tb]` list
/// for [`Dialect::NovaEssex`], the JSON string otherwise. nova sends no terminator after it.
pub fn encode_nova_failure(dialect: Dialect, err: &RemoteError) -> Vec<u8> {
    if dialect == Dialect::NovaEssex {
        let list = (&err.class, &err.message, &err.tb);
        encode(
            &NovaReply {
                result: None,
                failure: Some(list),
                ending: false,
            },
            false,
            0,
        )
    } else {
        let string = FailureString(err);
        encode(
            &NovaReply {
                result: None,
                failure: Some(string),
                ending: false,
            },
            false,
            0,
        )
    }
}

/// The replies for a successful call, in sending order; empty for a cast. `results` holds
/// the method's values: usually one, several for a nova multicall, none for a method that
/// returns nothing. A [`Request::single_reply`] caller gets one message with the last value,
/// the only one it keeps (§3b); everyone else gets each value, then the terminator.
pub fn encode_success<'a>(
    req: &Request,
    results: impl IntoIterator<Item = &'a RawValue>,
) -> Vec<Vec<u8>> {
    let Some(msg_id) = req.msg_id.as_deref() else {
        return Vec::new();
    };
    match req.dialect {
        Dialect::Oslo if req.single_reply => {
            let last = results.into_iter().last();
            vec![encode_oslo_reply(msg_id, last, None, true, req.enveloped)]
        }
        // Safe only because these callers predate call-monitor heartbeats, which a null
        // `result` without `ending` would look like.
        Dialect::Oslo => results
            .into_iter()
            .map(|result| encode_oslo_reply(msg_id, Some(result), None, false, req.enveloped))
            .chain([encode_oslo_reply(msg_id, None, None, true, req.enveloped)])
            .collect(),
        Dialect::NovaFolsom | Dialect::NovaEssex => results
            .into_iter()
            .map(encode_nova_result)
            .chain([encode_nova_ending()])
            .collect(),
    }
}

/// The single failure reply for a call in the request's dialect; `None` for a cast.
pub fn encode_failure(req: &Request, err: &RemoteError) -> Option<Vec<u8>> {
    let msg_id = req.msg_id.as_deref()?;
    Some(match req.dialect {
        Dialect::Oslo => encode_oslo_reply(msg_id, None, Some(err), true, req.enveloped),
        dialect => encode_nova_failure(dialect, err),
    })
}

/// A decoded reply of any era. Callers apply the oslo rules (§3b): a `failure` ends the
/// call; otherwise keep the last `result` until `ending`.
#[derive(Debug, Clone)]
pub struct Reply {
    /// `_msg_id` of the call answered; absent in nova-era replies, whose queue identifies it.
    pub msg_id: Option<String>,
    /// `_unique_id`, for duplicate detection.
    pub unique_id: Option<String>,
    /// The value, verbatim; `None` when absent or `null`.
    pub result: Option<Box<RawValue>>,
    /// The remote exception, from a JSON string, an Essex list or a plain object.
    pub failure: Option<RemoteError>,
    /// Whether this is the last message for the call.
    pub ending: bool,
}

impl Reply {
    /// Whether this is an oslo call-monitor heartbeat: no result, no failure, not ending.
    /// Only meaningful on a call sent with `_timeout`; Diablo servers end their streams
    /// with a message of the same shape.
    pub fn is_heartbeat(&self) -> bool {
        self.result.is_none() && self.failure.is_none() && !self.ending
    }
}

/// Decodes a reply with [`Limits::DEFAULT`].
pub fn decode_reply(body: &[u8]) -> Result<Reply, DecodeError> {
    decode_reply_with(body, &Limits::DEFAULT)
}

/// Decodes a reply: oslo (enveloped or flat) or nova, with a failure in any of its forms.
pub fn decode_reply_with(body: &[u8], limits: &Limits) -> Result<Reply, DecodeError> {
    decode_fields(body, limits, |fields, _| reply_from(fields, limits))
}

fn reply_from(fields: Fields<'_>, limits: &Limits) -> Result<Reply, DecodeError> {
    let ending = match fields.ending {
        None => None,
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| DecodeError::BadField {
            field: "ending",
            expected: "a boolean or null",
        })?,
    };
    Ok(Reply {
        msg_id: opt_string(fields.msg_id, "_msg_id", limits.max_id_len)?,
        unique_id: opt_string(fields.unique_id, "_unique_id", limits.max_id_len)?,
        result: fields
            .result
            .filter(|raw| raw.get() != "null")
            .map(ToOwned::to_owned),
        failure: decode_failure(fields.failure, limits)?,
        ending: ending.unwrap_or(false),
    })
}

fn decode_failure(
    raw: Option<&RawValue>,
    limits: &Limits,
) -> Result<Option<RemoteError>, DecodeError> {
    let Some(raw) = raw else { return Ok(None) };
    if !raw.get().starts_with('"') {
        // Its depth was checked with the rest of the body.
        return Ok(RemoteError::from_value(serde_json::from_str(raw.get())?));
    }
    let text: String = serde_json::from_str(raw.get())?;
    if text.is_empty() {
        return Ok(None);
    }
    // The string is a JSON document of its own, so the body's depth check did not see it.
    check_depth(&text, limits.max_depth)?;
    Ok(match serde_json::from_str(&text) {
        Ok(value @ (Value::Object(_) | Value::Array(_))) => RemoteError::from_value(value),
        _ => Some(RemoteError::unparsed(text)),
    })
}
