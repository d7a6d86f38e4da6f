//! The wire codec: message bodies as nova.rpc (2011–2013) and oslo.messaging put them on
//! RabbitMQ. Section numbers (§) refer to `wire-protocol.md`, the fact sheet this follows.
//!
//! **Boundary:** this module is pure. It does no I/O and knows nothing of lapin, tokio or
//! wasmtime, so it can be fuzzed and unit-tested on byte strings alone. Its only ambient
//! inputs are fresh uuid4s for `_unique_id`/`message_id` and the clock for notification
//! timestamps.
//!
//! **Invariant:** no input makes it panic or recurse without bound. serde_json refuses
//! input nested deeper than 127 levels, which keeps parsing and dropping values stack-safe;
//! on top of that a flat, non-recursive bracket scan enforces [`Limits::max_depth`] on every
//! message before anything from it is returned, so a 10 000-deep `[[[…` fails with
//! [`DecodeError::TooDeep`].
//! The caller caps the body size before decoding.
//!
//! # Requests
//! [`decode_request`] accepts the oslo 2.0 envelope (§2c, unwrapped exactly once, as oslo's
//! `deserialize_msg` does) and flat dicts. The [`Dialect`] it reports decides the reply shape:
//!
//! | request | dialect | success replies | failure reply |
//! |---|---|---|---|
//! | enveloped with `_timeout` (oslo.messaging ≥ 6.3) | `Oslo`, `single_reply` | one `{result, failure: null, ending: true, _msg_id, _unique_id}` | one with `result: null`, `failure: "<json>"` |
//! | enveloped without `_timeout` (nova 2013.2, oslo.messaging < 6.3), or flat with `_reply_q` (nova 2013.1) | `Oslo` | `{result, …, ending: false}` per value, then `{result: null, …, ending: true}` | as above |
//! | flat, no `_reply_q`, has `version`/`namespace`/`_unique_id` (nova 2012.2–2013.1) | `NovaFolsom` | `{result, failure: null}` per value, then `{result: null, failure: null, ending: true}` | `{result: null, failure: "<json>"}` |
//! | flat, none of those (nova 2011.3/2012.1) | `NovaEssex` | as `NovaFolsom` | `{result: null, failure: [class, message, tb]}` |
//!
//! oslo replies are enveloped exactly when the request was. [`encode_success`] and
//! [`encode_failure`] apply this table; the single-message encoders are public for the
//! client library and for tests. The split of the oslo rows comes from two client
//! behaviours: before oslo.messaging 2.x (and in all of nova) a client checks `ending`
//! before `result`, so a value sent together with `ending` is lost (§3a); since 6.3 a
//! `result: null, ending: false` message is a call-monitor heartbeat, which crashes a
//! client that set no monitor (§3b caveat). The `_timeout` key tells the two eras apart,
//! so modern callers still get a single message. Diablo callers treat the Essex
//! terminator as the end of the stream because its `result` is null, so they need no
//! dialect of their own.
//!
//! Replies always go to the default exchange `""` with routing key
//! [`Request::reply_routing_key`] (§1b interop note). [`valid_reply_queue`] keeps a request
//! from steering replies into arbitrary queues.
//!
//! # Failures
//! A failure is oslo's `serialize_remote_exception` dict `{class, module, message, tb, args,
//! kwargs}` JSON-encoded into a string (§3a/§3b), or the Essex 3-list. [`RemoteError`]'s
//! constructors choose `module` so oslo clients react well: `"warren"` is never importable
//! and never in `allowed_remote_exmods`, so the client raises `RemoteError(class, message,
//! tb)`; dispatcher errors use oslo's own module and constructor arguments, so a client that
//! allows that module rebuilds the real `NoSuchMethod`/`UnsupportedVersion`.

#![warn(missing_docs)]

mod notify;
mod reply;
mod request;
#[cfg(test)]
mod tests;

use std::io;

use serde::Serialize;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

pub use notify::{encode_notification, format_timestamp};
pub use reply::{
    DISPATCHER_MODULE, RemoteError, Reply, WARREN_MODULE, decode_reply, decode_reply_with,
    encode_failure, encode_heartbeat, encode_nova_ending, encode_nova_failure, encode_nova_result,
    encode_oslo_reply, encode_success,
};
pub use request::{
    OutgoingRequest, Request, decode_request, decode_request_with, encode_request,
    encode_request_flat, valid_reply_queue,
};

/// The oslo envelope version Warren sends; received envelopes must share its major number.
pub const ENVELOPE_VERSION: &str = "2.0";

/// How a request arrived, which decides the shape of its replies (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// oslo.messaging or nova ≥ 2013: enveloped, or flat with `_reply_q`. Replies carry
    /// `_msg_id` and go to `_reply_q`; failures are JSON strings.
    Oslo,
    /// nova 2012.2 (Folsom) to 2013.1 without `_reply_q`: flat, replies to the `_msg_id`
    /// queue, failures are JSON strings.
    NovaFolsom,
    /// nova 2011.3 (Diablo) and 2012.1 (Essex): flat, replies to the `_msg_id` queue,
    /// failures are `[class, message, traceback]` lists.
    NovaEssex,
}

/// Hygiene limits applied while decoding. Each one bounds memory or log noise that a
/// hostile or broken peer could otherwise cause; the body size cap belongs to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of arrays and objects, counting the message object itself as 1.
    /// It applies to a flat message, to the message inside an envelope (whose other keys
    /// are dropped unread) and to a failure string, each on its own.
    /// Values above 127 are moot: serde_json refuses deeper input on its own.
    pub max_depth: usize,
    /// Longest method name, in bytes.
    pub max_method_len: usize,
    /// Longest `_msg_id`, `_reply_q`, `_unique_id`, `version` or `namespace`, in bytes.
    /// 255 is also AMQP's limit for a routing key.
    pub max_id_len: usize,
}

impl Limits {
    /// The limits [`decode_request`] and [`decode_reply`] use.
    pub const DEFAULT: Limits = Limits {
        max_depth: 64,
        max_method_len: 255,
        max_id_len: 255,
    };
}

/// Why a body could not be decoded. Every variant is a property of the input, so callers
/// can log it and reject the delivery without further context.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is not UTF-8, so no JSON parser in the stack would accept it.
    #[error("body is not valid UTF-8")]
    NotUtf8,
    /// The body, or the message inside an envelope, is not valid JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(#[from] serde_json::Error),
    /// The message is valid JSON but not an object.
    #[error("message is not a JSON object")]
    NotAnObject,
    /// An envelope whose `oslo.version` does not have major version 2.
    #[error("unsupported oslo envelope version {0} (Warren speaks {ENVELOPE_VERSION})")]
    UnsupportedEnvelope(String),
    /// Both envelope keys are present but the envelope is unusable.
    #[error("malformed oslo envelope: {0}")]
    BadEnvelope(&'static str),
    /// A request without a `method` (or with `"method": null`).
    #[error("request has no method")]
    MissingMethod,
    /// A known field has the wrong JSON type.
    #[error("field `{field}` must be {expected}")]
    BadField {
        /// The JSON key as it appears on the wire.
        field: &'static str,
        /// What the field must hold.
        expected: &'static str,
    },
    /// Arrays and objects nest deeper than [`Limits::max_depth`].
    #[error("JSON nests deeper than {limit} levels")]
    TooDeep {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// A string field is longer than its limit.
    #[error("field `{field}` is {len} bytes long, the limit is {limit}")]
    TooLong {
        /// The JSON key as it appears on the wire.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit that was exceeded.
        limit: usize,
    },
    /// `_reply_q`, or `_msg_id` used as a queue name, fails [`valid_reply_queue`].
    #[error("refusing to reply to queue {0:?}")]
    BadReplyQueue(String),
}

/// A fresh uuid4 as 32 lowercase hex digits: the form of every `_msg_id`, `_unique_id` and
/// reply-queue suffix that nova and oslo generate.
pub fn new_id() -> String {
    new_uuid().simple().to_string()
}

/// A fresh uuid4 from the thread's CSPRNG (`rand`'s ChaCha, seeded from the OS). Every reply
/// carries one, and `Uuid::new_v4` asks the kernel (a `getrandom` syscall) each time.
pub fn new_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

// ---------------------------------------------------------------------------------------
// Decoding helpers shared by requests and replies.

/// The top-level keys Warren reads, borrowed from the text so that `args` and `result` are
/// copied exactly once, into the caller's `Box<RawValue>`, and never re-serialised.
#[derive(Default)]
struct Fields<'a> {
    method: Option<&'a RawValue>,
    args: Option<&'a RawValue>,
    msg_id: Option<&'a RawValue>,
    reply_q: Option<&'a RawValue>,
    unique_id: Option<&'a RawValue>,
    timeout: Option<&'a RawValue>,
    version: Option<&'a RawValue>,
    namespace: Option<&'a RawValue>,
    result: Option<&'a RawValue>,
    failure: Option<&'a RawValue>,
    ending: Option<&'a RawValue>,
    envelope_version: Option<&'a RawValue>,
    envelope_message: Option<EnvelopeMessage>,
    /// `_context_*` entries with the prefix removed, as oslo's `unpack_context` does.
    context: Map<String, Value>,
}

enum Key {
    Method,
    Args,
    MsgId,
    ReplyQ,
    UniqueId,
    Timeout,
    Version,
    Namespace,
    Result,
    Failure,
    Ending,
    EnvelopeVersion,
    EnvelopeMessage,
    Context(String),
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "method" => Key::Method,
                    "args" => Key::Args,
                    "_msg_id" => Key::MsgId,
                    "_reply_q" => Key::ReplyQ,
                    "_unique_id" => Key::UniqueId,
                    "_timeout" => Key::Timeout,
                    "version" => Key::Version,
                    "namespace" => Key::Namespace,
                    "result" => Key::Result,
                    "failure" => Key::Failure,
                    "ending" => Key::Ending,
                    "oslo.version" => Key::EnvelopeVersion,
                    "oslo.message" => Key::EnvelopeMessage,
                    _ => match key.strip_prefix("_context_") {
                        Some(name) => Key::Context(name.to_owned()),
                        None => Key::Other,
                    },
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Fields::default();
                // A repeated key overwrites the earlier one, as Python's json module does.
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::Method => &mut fields.method,
                        Key::Args => &mut fields.args,
                        Key::MsgId => &mut fields.msg_id,
                        Key::ReplyQ => &mut fields.reply_q,
                        Key::UniqueId => &mut fields.unique_id,
                        Key::Timeout => &mut fields.timeout,
                        Key::Version => &mut fields.version,
                        Key::Namespace => &mut fields.namespace,
                        Key::Result => &mut fields.result,
                        Key::Failure => &mut fields.failure,
                        Key::Ending => &mut fields.ending,
                        Key::EnvelopeVersion => &mut fields.envelope_version,
                        Key::EnvelopeMessage => {
                            fields.envelope_message = Some(map.next_value()?);
                            continue;
                        }
                        Key::Context(name) => {
                            fields.context.insert(name, map.next_value()?);
                            continue;
                        }
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// The `oslo.message` value. It is decoded straight into a `String` during the outer parse,
/// because holding it as raw text first meant scanning the bulk of the body once more;
/// other types are kept apart rather than failing, since without `oslo.version` they are
/// just a key of a flat message.
enum EnvelopeMessage {
    Text(String),
    Other,
}

impl<'de> Deserialize<'de> for EnvelopeMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MessageVisitor;
        impl<'de> Visitor<'de> for MessageVisitor {
            type Value = EnvelopeMessage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<EnvelopeMessage, E> {
                Ok(EnvelopeMessage::Text(text.to_owned()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<EnvelopeMessage, E> {
                Ok(EnvelopeMessage::Text(text))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<EnvelopeMessage, E> {
                Ok(EnvelopeMessage::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<EnvelopeMessage, E> {
                Ok(EnvelopeMessage::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<EnvelopeMessage, E> {
                Ok(EnvelopeMessage::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<EnvelopeMessage, E> {
                Ok(EnvelopeMessage::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<EnvelopeMessage, E> {
                Ok(EnvelopeMessage::Other)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(EnvelopeMessage::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(EnvelopeMessage::Other)
            }
        }
        deserializer.deserialize_any(MessageVisitor)
    }
}

/// Decodes a body into its fields, unwrapping an oslo envelope. The message text inside
/// an envelope is handed to `with` because the fields borrow from it.
fn decode_fields<T>(
    body: &[u8],
    limits: &Limits,
    with: impl FnOnce(Fields<'_>, bool) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let text = std::str::from_utf8(body).map_err(|_| DecodeError::NotUtf8)?;
    // Parsing before the depth scan is safe: serde_json stops at 128 levels on its own. It
    // spares an envelope's scan, whose other keys oslo ignores and Warren drops unread.
    let mut outer = match parse_object(text) {
        Ok(outer) => outer,
        Err(err) => {
            check_depth(text, limits.max_depth)?;
            return Err(err);
        }
    };
    // oslo's deserialize_msg unwraps only when both keys are present; anything else is a
    // flat message, whatever else it contains.
    let (Some(version), Some(message)) = (outer.envelope_version, outer.envelope_message.take())
    else {
        check_depth(text, limits.max_depth)?;
        return with(outer, false);
    };
    let version: String = serde_json::from_str(version.get())
        .map_err(|_| DecodeError::UnsupportedEnvelope(version.get().to_owned()))?;
    let major = version.split('.').next().unwrap_or_default().trim();
    if major.parse::<u32>().ok() != Some(2) {
        return Err(DecodeError::UnsupportedEnvelope(version));
    }
    let EnvelopeMessage::Text(inner) = message else {
        return Err(DecodeError::BadEnvelope("oslo.message is not a string"));
    };
    check_depth(&inner, limits.max_depth)?;
    with(parse_object(&inner)?, true)
}

fn parse_object(text: &str) -> Result<Fields<'_>, DecodeError> {
    if !text.trim_start().starts_with('{') {
        // Say "not an object" only for valid JSON, so garbage is reported as garbage.
        serde_json::from_str::<IgnoredAny>(text)?;
        return Err(DecodeError::NotAnObject);
    }
    Ok(serde_json::from_str(text)?)
}

/// Counts bracket nesting in one pass with no recursion, skipping over strings so that
/// brackets inside them don't count. Malformed JSON is left for serde_json to report.
fn check_depth(text: &str, max_depth: usize) -> Result<(), DecodeError> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        i += 1;
        match byte {
            b'"' => loop {
                let Some(rest) = bytes.get(i..) else {
                    return Ok(());
                };
                let Some(at) = find_quote_or_backslash(rest) else {
                    return Ok(());
                };
                i += at + 1;
                if rest.get(at) == Some(&b'"') {
                    break;
                }
                // A backslash: whatever it escapes cannot end the string.
                i += 1;
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(DecodeError::TooDeep { limit: max_depth });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Finds the first `"` or `\` eight bytes at a time (the classic "has zero byte" trick),
/// because string bodies are most of a message and a byte loop doubled the decode time.
/// The lowest flagged byte of a word is always a true match, so the position is exact.
fn find_quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    const QUOTES: u64 = ONES * b'"' as u64;
    const BACKSLASHES: u64 = ONES * b'\\' as u64;
    let has_zero_byte = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in chunks.by_ref() {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        let hits = has_zero_byte(word ^ QUOTES) | has_zero_byte(word ^ BACKSLASHES);
        if hits != 0 {
            return Some(offset + (hits.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    let tail = chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\');
    tail.map(|at| offset + at)
}

fn is_null(raw: Option<&RawValue>) -> bool {
    raw.is_none_or(|raw| raw.get() == "null")
}

/// An optional string field; `null` counts as absent, as Python's `dict.get` makes it.
fn opt_string(
    raw: Option<&RawValue>,
    field: &'static str,
    max_len: usize,
) -> Result<Option<String>, DecodeError> {
    let Some(raw) = raw else { return Ok(None) };
    let value: Option<String> =
        serde_json::from_str(raw.get()).map_err(|_| DecodeError::BadField {
            field,
            expected: "a string or null",
        })?;
    if let Some(value) = &value {
        check_len(field, value, max_len)?;
    }
    Ok(value)
}

fn check_len(field: &'static str, value: &str, limit: usize) -> Result<(), DecodeError> {
    if value.len() > limit {
        return Err(DecodeError::TooLong {
            field,
            len: value.len(),
            limit,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Encoding helpers.

/// Serialises a message, wrapped in an oslo envelope when `enveloped`.
fn encode<T: Serialize + ?Sized>(message: &T, enveloped: bool, size_hint: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size_hint + 128);
    if enveloped {
        // Writing the inner JSON through an escaper builds the `oslo.message` string in one
        // pass, without an intermediate String.
        out.extend_from_slice(b"{\"oslo.version\":\"");
        out.extend_from_slice(ENVELOPE_VERSION.as_bytes());
        out.extend_from_slice(b"\",\"oslo.message\":\"");
        write_json(JsonStringEscaper(&mut out), message);
        out.extend_from_slice(b"\"}");
    } else {
        write_json(&mut out, message);
    }
    out
}

/// Serialising Warren's wire types cannot fail: every map key is a string, the only custom
/// `Serialize` impls forward serde_json's own results, and writing to a `Vec` is infallible.
/// The encoders therefore return plain bodies rather than a `Result` nobody could act on.
fn write_json<W: io::Write, T: Serialize + ?Sized>(writer: W, value: &T) {
    let written = serde_json::to_writer(writer, value);
    debug_assert!(
        written.is_ok(),
        "serialising a wire type failed: {written:?}"
    );
}

/// Escapes JSON text into the body of a JSON string literal. Only `"`, `\` and control
/// bytes need escaping; multi-byte UTF-8 sequences never contain them, so bytes can be
/// handled one at a time. Raw text from a `RawValue` may carry whitespace such as `\n`,
/// which Python's strict decoder refuses unescaped inside a string.
struct JsonStringEscaper<'a>(&'a mut Vec<u8>);

impl io::Write for JsonStringEscaper<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut clean_from = 0;
        for (i, &byte) in bytes.iter().enumerate() {
            let short: &[u8] = match byte {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => &[],
                _ => continue,
            };
            self.0.extend_from_slice(&bytes[clean_from..i]);
            if short.is_empty() {
                let hex = [HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]];
                self.0.extend_from_slice(b"\\u00");
                self.0.extend_from_slice(&hex);
            } else {
                self.0.extend_from_slice(short);
            }
            clean_from = i + 1;
        }
        self.0.extend_from_slice(&bytes[clean_from..]);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes a context as oslo's `pack_context` does: one `_context_<key>` entry per item.
fn serialize_context<M: serde::ser::SerializeMap>(
    map: &mut M,
    context: &Map<String, Value>,
) -> Result<(), M::Error> {
    struct PrefixedKey<'a>(&'a str);
    impl Serialize for PrefixedKey<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            // collect_str lets serde_json escape straight into the output, with no
            // temporary String per key.
            serializer.collect_str(&format_args!("_context_{}", self.0))
        }
    }
    for (key, value) in context {
        map.serialize_entry(&PrefixedKey(key), value)?;
    }
    Ok(())
}

/// `s` cut to at most `max` bytes on a character boundary: message-borne strings are bounded
/// before they reach logs and metric labels.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
