//! The structured error a handler fails with.

use std::convert::Infallible;
use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// A handler failure, sent to the caller as `{"class": …, "message": …, "data": …}`.
///
/// `class` is what a caller over oslo.messaging sees as the remote exception's class, so pick a
/// short, stable type name (`"ZeroDivisionError"`, `"NotFound"`, …).
///
/// Handlers may return any error type `E: Into<Error>`. Besides [`Error`] itself:
///
/// * `String` and `&str` become class `"Error"` with that message: there is no better class to
///   guess, so return an [`Error`] when the caller should be able to tell failures apart;
/// * [`Infallible`] lets a handler that cannot fail say so.
///
/// There is deliberately no `From<serde_json::Error>`: the SDK itself reports args that do not
/// deserialize as [`Error::INVALID_ARGS`] and results that do not serialize as
/// `"InvalidResult"`, but a JSON error inside a handler can mean anything.
///
/// ```
/// use warren_guest::Error;
/// use warren_guest::serde_json::json;
///
/// let err = Error::new("ZeroDivisionError", "division by zero").with_data(json!({"a": 1, "b": 0}));
/// assert_eq!(err.to_string(), "ZeroDivisionError: division by zero");
/// assert_eq!(err.data, Some(json!({"a": 1, "b": 0})));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    /// Short type name of the failure, e.g. `"ZeroDivisionError"`.
    pub class: String,
    /// Human-readable text.
    pub message: String,
    /// Structured details, omitted from the JSON when `None`.
    pub data: Option<Value>,
}

impl Error {
    /// The class for args that do not fit the handler's schema; the host uses it too, for args
    /// that are not a JSON object.
    ///
    /// ```
    /// assert_eq!(warren_guest::Error::INVALID_ARGS, "InvalidArgs");
    /// ```
    pub const INVALID_ARGS: &'static str = "InvalidArgs";

    /// Class given to errors converted from a bare `String` or `&str`.
    ///
    /// ```
    /// let err: warren_guest::Error = "no such user".into();
    /// assert_eq!(err.class, warren_guest::Error::GENERIC);
    /// ```
    pub const GENERIC: &'static str = "Error";

    /// Class for a result that could not be serialized to JSON (the host uses it for outputs
    /// that are not valid JSON).
    pub(crate) const INVALID_RESULT: &'static str = "InvalidResult";

    /// An error of `class` with `message` and no data.
    ///
    /// ```
    /// let err = warren_guest::Error::new("NotFound", "no user u1");
    /// assert_eq!((err.class.as_str(), err.message.as_str()), ("NotFound", "no user u1"));
    /// assert_eq!(err.data, None);
    /// ```
    pub fn new(class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            class: class.into(),
            message: message.into(),
            data: None,
        }
    }

    /// An [`Error::INVALID_ARGS`] error: the args do not fit what the method expects.
    ///
    /// ```
    /// let err = warren_guest::Error::invalid_args("n must be at most 90");
    /// assert_eq!(err.class, "InvalidArgs");
    /// ```
    pub fn invalid_args(message: impl Into<String>) -> Self {
        Self::new(Self::INVALID_ARGS, message)
    }

    /// Attaches structured details, replacing any set before.
    ///
    /// Takes a [`Value`] rather than any `Serialize` so that attaching data cannot fail; use
    /// [`serde_json::json!`] or [`serde_json::to_value`] to build it.
    ///
    /// ```
    /// use warren_guest::{Error, serde_json::json};
    ///
    /// let err = Error::new("NotFound", "no such user").with_data(json!({"user_id": "u1"}));
    /// assert_eq!(err.data.unwrap()["user_id"], "u1");
    /// ```
    #[must_use]
    pub fn with_data(mut self, data: impl Into<Value>) -> Self {
        self.data = Some(data.into());
        self
    }

    pub(crate) fn invalid_result(err: &serde_json::Error) -> Self {
        Self::new(
            Self::INVALID_RESULT,
            format!("cannot serialize the result to JSON: {err}"),
        )
    }

    /// The JSON that `error_write` takes.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        // A `Value` always serializes (its maps have string keys, its numbers are finite), so
        // this fallback only keeps the failure path free of panics.
        serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"class":"GuestError","message":"the error could not be serialized"}"#.to_vec()
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.message)
    }
}

impl std::error::Error for Error {}

impl Serialize for Error {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2 + usize::from(self.data.is_some())))?;
        map.serialize_entry("class", &self.class)?;
        map.serialize_entry("message", &self.message)?;
        if let Some(data) = &self.data {
            map.serialize_entry("data", data)?;
        }
        map.end()
    }
}

impl From<Infallible> for Error {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self::new(Self::GENERIC, message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Self::new(Self::GENERIC, message)
    }
}
