//! Requests: decoding what nova and oslo callers send (§2), and encoding what the Rust
//! client sends (always the oslo 2.0 envelope, keys in oslo.messaging's order).

use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{
    DecodeError, Dialect, Fields, Limits, decode_fields, encode, is_null, opt_string,
    serialize_context,
};

/// A decoded RPC request: a call when it has a `_msg_id`, otherwise a cast.
#[derive(Debug, Clone)]
pub struct Request {
    /// Which family of caller sent it; decides the reply shape.
    pub dialect: Dialect,
    /// Whether it came in an oslo envelope; oslo replies copy this.
    pub enveloped: bool,
    /// Whether the caller takes its result and `ending` in one message. Only
    /// oslo.messaging ≥ 6.3 is known to, and it is recognised by the `_timeout` key it puts
    /// on every call; older oslo and nova callers drop the `result` of a message that also
    /// says `ending` (§3a, and oslo.messaging 1.x's `_process_reply`).
    pub single_reply: bool,
    /// The method to invoke.
    pub method: String,
    /// Keyword arguments, verbatim from the wire: `{}` when the caller sent none or `null`.
    /// Not necessarily an object; the runtime answers anything else with `InvalidArgs`.
    pub args: Box<RawValue>,
    /// The caller's context: every `_context_<key>` entry, keyed by `<key>`.
    pub context: Map<String, Value>,
    /// Correlation id of a call (`_msg_id`); `None` for a cast.
    pub msg_id: Option<String>,
    /// The caller's reply queue (`_reply_q`), sent by oslo-era callers.
    pub reply_q: Option<String>,
    /// Per-message id (`_unique_id`) that oslo-era peers use to drop duplicates.
    pub unique_id: Option<String>,
    /// oslo's call-monitor timeout (`_timeout`) in seconds; see [`Request::heartbeat_interval`].
    pub timeout: Option<f64>,
    /// Requested API version; nova and oslo read a missing one as `"1.0"`.
    pub version: Option<String>,
    /// Requested endpoint namespace.
    pub namespace: Option<String>,
}

impl Request {
    /// Whether the caller waits for a reply (a call rather than a cast).
    pub fn wants_reply(&self) -> bool {
        self.msg_id.is_some()
    }

    /// The routing key for replies on the default exchange `""`: `_reply_q` if present,
    /// else `_msg_id`, which nova-era callers also use as their queue name. `None` for a cast.
    pub fn reply_routing_key(&self) -> Option<&str> {
        self.msg_id.as_ref()?;
        self.reply_q.as_deref().or(self.msg_id.as_deref())
    }

    /// How often to send [`encode_heartbeat`](super::encode_heartbeat) replies while the
    /// method runs. oslo's dispatcher sends them every `int(_timeout) / 2` seconds when that
    /// is at least one second, and only oslo callers understand them.
    pub fn heartbeat_interval(&self) -> Option<Duration> {
        if self.dialect != Dialect::Oslo || !self.wants_reply() {
            return None;
        }
        let whole_seconds = self.timeout?.trunc();
        if whole_seconds < 2.0 {
            return None;
        }
        // Clamped: `_timeout` is the caller's word, and an absurd one must not overflow the
        // timer arithmetic that uses the interval.
        Duration::try_from_secs_f64((whole_seconds / 2.0).min(MAX_HEARTBEAT_SECS)).ok()
    }
}

/// The longest call-monitor heartbeat interval honoured, in seconds (one day).
const MAX_HEARTBEAT_SECS: f64 = 86_400.0;

/// Decodes a request body with [`Limits::DEFAULT`].
pub fn decode_request(body: &[u8]) -> Result<Request, DecodeError> {
    decode_request_with(body, &Limits::DEFAULT)
}

/// Decodes a request body: an oslo 2.0 envelope or a flat nova/oslo dict.
pub fn decode_request_with(body: &[u8], limits: &Limits) -> Result<Request, DecodeError> {
    decode_fields(body, limits, |fields, enveloped| {
        request_from(fields, enveloped, limits)
    })
}

fn request_from(
    fields: Fields<'_>,
    enveloped: bool,
    limits: &Limits,
) -> Result<Request, DecodeError> {
    let method = opt_string(fields.method, "method", limits.max_method_len)?
        .ok_or(DecodeError::MissingMethod)?;
    // Anything but an object is the caller's mistake, but one to answer (`InvalidArgs` from the
    // runtime) rather than to drop: rejecting it here would leave a caller waiting for its
    // timeout, since a decode error has no reply address.
    let args = match fields.args {
        raw if is_null(raw) => RawValue::from_string("{}".to_owned())?,
        Some(raw) => raw.to_owned(),
        None => RawValue::from_string("{}".to_owned())?,
    };
    let msg_id = opt_string(fields.msg_id, "_msg_id", limits.max_id_len)?;
    let reply_q = opt_string(fields.reply_q, "_reply_q", limits.max_id_len)?;
    let unique_id = opt_string(fields.unique_id, "_unique_id", limits.max_id_len)?;
    let version = opt_string(fields.version, "version", limits.max_id_len)?;
    let namespace = opt_string(fields.namespace, "namespace", limits.max_id_len)?;
    let timeout = match fields.timeout {
        None => None,
        Some(raw) => serde_json::from_str(raw.get()).map_err(|_| DecodeError::BadField {
            field: "_timeout",
            expected: "a number or null",
        })?,
    };
    // Whichever name replies would be routed to must look like a reply queue. `_reply_q` is
    // checked even on casts, since a sane caller never sends a strange one.
    // `_reply_q` has had one shape since it appeared (`reply_<hex>`, or RabbitMQ's direct
    // reply-to); only nova's `_msg_id` needs the looser check. Anything else could aim replies
    // at a service's own queue (`conductor`), with contents the caller chose.
    let reply_queue = reply_q.as_deref().or(msg_id.as_deref());
    let strict_ok = |q: &str| q.starts_with("reply_") || q.starts_with("amq.rabbitmq.reply-to.");
    if let Some(queue) = reply_queue
        .filter(|queue| !valid_reply_queue(queue) || (reply_q.is_some() && !strict_ok(queue)))
    {
        return Err(DecodeError::BadReplyQueue(queue.to_owned()));
    }
    // Key presence, not value, marks the post-Essex senders: all three keys arrived after
    // failures became JSON strings (§8).
    let dialect = if enveloped || reply_q.is_some() {
        Dialect::Oslo
    } else if fields.version.is_some() || fields.namespace.is_some() || fields.unique_id.is_some() {
        Dialect::NovaFolsom
    } else {
        Dialect::NovaEssex
    };
    Ok(Request {
        dialect,
        enveloped,
        single_reply: enveloped && fields.timeout.is_some(),
        method,
        args,
        context: fields.context,
        msg_id,
        reply_q,
        unique_id,
        timeout,
        version,
        namespace,
    })
}

/// Whether `name` may receive replies. Accepted: oslo's `reply_<suffix>` with 1–64
/// characters of `[A-Za-z0-9_-]` after the prefix; a nova `_msg_id`-style name of 1–64 such
/// characters (uuid4 hex, with or without dashes); and RabbitMQ direct reply-to names
/// `amq.rabbitmq.reply-to.<token>` up to 255 bytes. Everything else, including every other
/// `amq.*` name and any name with a dot, is refused, so a request cannot route replies into
/// a topic queue such as `compute.host1` or a broker-internal queue.
///
/// A plain 1–64 character name such as `compute` still passes, because nova-era callers
/// may choose their `_msg_id` freely; the reply then lands in whatever queue has that name.
pub fn valid_reply_queue(name: &str) -> bool {
    const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to.";
    let token_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    let token = |s: &str| (1..=64).contains(&s.len()) && s.bytes().all(token_byte);
    if let Some(rest) = name.strip_prefix(DIRECT_REPLY_TO) {
        // Direct reply-to names embed base64, hence `+`, `/`, `=` and `.`.
        return !rest.is_empty()
            && name.len() <= 255
            && rest.bytes().all(|b| token_byte(b) || b"+/=.".contains(&b));
    }
    match name.strip_prefix("reply_") {
        Some(suffix) => token(suffix),
        None => token(name),
    }
}

/// A request for the client to send. `msg_id` makes it a call; then `reply_q` names the
/// caller's reply queue and `timeout` becomes `_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingRequest<'a> {
    /// Method to invoke.
    pub method: &'a str,
    /// Keyword arguments; must be a JSON object for any nova or oslo server to accept it.
    pub args: &'a RawValue,
    /// Context, sent as `_context_<key>` entries.
    pub context: &'a Map<String, Value>,
    /// Correlation id for a call ([`new_id`](super::new_id)); `None` for a cast.
    pub msg_id: Option<&'a str>,
    /// Reply queue for a call, normally `reply_<hex>`.
    pub reply_q: Option<&'a str>,
    /// Call-monitor timeout in seconds. oslo servers heart-beat every `int(t) / 2` s when
    /// it is at least 2; `None` is sent as `null`, as oslo.messaging does without a monitor.
    pub timeout: Option<f64>,
    /// Requested API version.
    pub version: Option<&'a str>,
    /// Requested endpoint namespace.
    pub namespace: Option<&'a str>,
}

impl<'a> OutgoingRequest<'a> {
    /// A cast: no `msg_id`, so no reply is asked for.
    pub fn cast(method: &'a str, args: &'a RawValue, context: &'a Map<String, Value>) -> Self {
        OutgoingRequest {
            method,
            args,
            context,
            msg_id: None,
            reply_q: None,
            timeout: None,
            version: None,
            namespace: None,
        }
    }

    /// A call identified by `msg_id`, whose replies go to `reply_q` (`None` for nova's
    /// flat multicall, which replies on a queue named after `msg_id`).
    pub fn call(
        method: &'a str,
        args: &'a RawValue,
        context: &'a Map<String, Value>,
        msg_id: &'a str,
        reply_q: Option<&'a str>,
    ) -> Self {
        OutgoingRequest {
            msg_id: Some(msg_id),
            reply_q,
            ..OutgoingRequest::cast(method, args, context)
        }
    }
}

/// An [`OutgoingRequest`] with its `_unique_id`, in oslo.messaging's key order
/// (`_make_message`, then `_send`).
struct WireRequest<'a, 'b> {
    req: &'a OutgoingRequest<'b>,
    unique_id: &'a str,
}

impl Serialize for WireRequest<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let req = self.req;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("method", req.method)?;
        map.serialize_entry("args", req.args)?;
        if let Some(namespace) = req.namespace {
            map.serialize_entry("namespace", namespace)?;
        }
        if let Some(version) = req.version {
            map.serialize_entry("version", version)?;
        }
        if let Some(msg_id) = req.msg_id {
            map.serialize_entry("_msg_id", msg_id)?;
            if let Some(reply_q) = req.reply_q {
                map.serialize_entry("_reply_q", reply_q)?;
            }
            map.serialize_entry("_timeout", &req.timeout)?;
        }
        map.serialize_entry("_unique_id", self.unique_id)?;
        serialize_context(&mut map, req.context)?;
        map.end()
    }
}

/// Encodes a request as oslo.messaging does: a 2.0 envelope around the flat dict. Every
/// server since nova 2013.2 requires the envelope; nova 2011–2012 servers cannot read it.
pub fn encode_request(req: &OutgoingRequest<'_>, unique_id: &str) -> Vec<u8> {
    encode(&WireRequest { req, unique_id }, true, req.args.get().len())
}

/// Encodes the same dict without the envelope, as nova 2011–2013.1 callers did. Only
/// nova-era servers and Warren read it; a nova-style multicall (no `reply_q`, replies on a
/// queue named `msg_id`) uses it so each streamed result comes back. nova-era servers ignore
/// the keys they predate; Warren takes the `_unique_id` as the mark of a post-Essex caller
/// and answers with [`Dialect::NovaFolsom`] replies, whose failures keep `module` and `kwargs`.
pub fn encode_request_flat(req: &OutgoingRequest<'_>, unique_id: &str) -> Vec<u8> {
    encode(&WireRequest { req, unique_id }, false, req.args.get().len())
}
