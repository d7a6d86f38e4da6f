//! Outbound RPC from guests: the `call`, `cast`, `fanout_cast` and `notify` imports of ABI v1.
//!
//! The runtime owns the guest-facing half: it parses the guest's request, checks it against the
//! handler's [`RpcGrants`] (default deny), propagates the request context with the call depth,
//! and bounds the wait by what is left of the invocation's own time limit. Sending is someone
//! else's job, behind [`Outbound`]: the runtime never touches the broker.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::{Failure, class};

/// Context key holding how deep in a chain of handler-to-handler calls a request is (0 or
/// absent for a request from outside). Set by the host on every outbound message.
pub const DEPTH_KEY: &str = "warren_call_depth";

/// Longest chain of handler-to-handler calls. A handler calling itself without end, or two
/// handlers calling each other, fail with `CallDepthExceeded` here instead of filling every
/// queue and invocation slot of the daemon.
pub const MAX_CALL_DEPTH: u64 = 8;

/// Outbound messages one invocation may send; bounds what one guest can push to the broker.
pub const MAX_OUTBOUND_PER_INVOCATION: usize = 64;

/// Every daemon's admin topic is this prefix and its server name (`crate::server::admin_topic`).
pub const ADMIN_TOPIC_PREFIX: &str = "warren.";

/// Error classes of outbound RPC (`ABI.md`, "Outbound RPC").
pub mod classes {
    /// The handler's config does not grant this kind of message to this topic.
    pub const FORBIDDEN: &str = "Forbidden";
    /// The chain of handler-to-handler calls is longer than [`super::MAX_CALL_DEPTH`].
    pub const CALL_DEPTH_EXCEEDED: &str = "CallDepthExceeded";
    /// No broker (`warren invoke`), the broker is unreachable, or no server listens on the
    /// topic.
    pub const UNAVAILABLE: &str = "Unavailable";
    /// The guest's request is malformed.
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// More outbound messages than [`super::MAX_OUTBOUND_PER_INVOCATION`].
    pub const TOO_MANY_REQUESTS: &str = "TooManyRequests";
    /// A call's result is larger than the handler accepts as input (its `max_args_bytes`).
    pub const REPLY_TOO_LARGE: &str = "ReplyTooLarge";
}

/// Topics a handler may send to, per kind of message. Empty lists (the default) grant nothing;
/// `"*"` grants every topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RpcGrants {
    /// Topics it may `call`.
    pub call: Vec<String>,
    /// Topics it may `cast` and `fanout_cast` to.
    pub cast: Vec<String>,
    /// Notification topics (`notifications` → `notifications.<priority>`) it may `notify`.
    pub notify: Vec<String>,
}

impl RpcGrants {
    fn list(&self, kind: Kind) -> &[String] {
        match kind {
            Kind::Call => &self.call,
            Kind::Cast | Kind::FanoutCast => &self.cast,
            Kind::Notify => &self.notify,
        }
    }

    /// Whether `kind` messages to `topic` are granted. `"*"` does not cover daemons' admin
    /// topics (`warren.<server>`): a handler's messages carry the daemon's own broker login,
    /// which `[server] admin_users` may list, so only a grant naming the topic reaches one.
    pub fn allows(&self, kind: Kind, topic: &str) -> bool {
        self.list(kind)
            .iter()
            .any(|t| t == topic || (t == "*" && !topic.starts_with(ADMIN_TOPIC_PREFIX)))
    }
}

/// The four kinds of outbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Request and reply, with a timeout.
    Call,
    /// Fire and forget to one server of a topic (or `topic.server`).
    Cast,
    /// Fire and forget to every server of a topic.
    FanoutCast,
    /// An oslo notification on `<topic>.<priority>`.
    Notify,
}

impl Kind {
    /// The import's name, as in `ABI.md`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Call => "call",
            Kind::Cast => "cast",
            Kind::FanoutCast => "fanout_cast",
            Kind::Notify => "notify",
        }
    }
}

/// One message a guest asked the host to send, checked and with its context filled in.
#[derive(Debug)]
pub struct Message {
    /// What kind of message.
    pub kind: Kind,
    /// The handler sending it (its topic), for logs and notifications' `publisher_id`.
    pub from: String,
    /// Target topic (for `notify`, the notification topic).
    pub topic: String,
    /// `topic.server` routing, for `call` and `cast`.
    pub server: Option<String>,
    /// The method (for `notify`, the event type).
    pub method: String,
    /// The args object (for `notify`, the payload).
    pub args: Box<RawValue>,
    /// `notify`'s priority, lowercase (`info` unless the guest said otherwise).
    pub priority: String,
    /// The request context to send: the invocation's own, the guest's additions, and the depth.
    pub context: Map<String, Value>,
    /// How long a `call` waits for its reply; for the others, how long the send may take.
    pub wait: Duration,
}

/// Sends what guests ask for. Implemented by the daemon; `None` (as in `warren invoke`) makes
/// every outbound request fail with `Unavailable`.
///
/// `send` runs on the invocation's blocking thread and may block until the reply arrives, never
/// longer than `message.wait`.
pub trait Outbound: Send + Sync {
    /// Send `message`; for a call, return the reply's result (the last one of a stream).
    fn send(&self, message: Message) -> Result<Option<Box<RawValue>>, Failure>;
}

/// The guest's request, as JSON (`ABI.md`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    topic: Option<String>,
    method: Option<String>,
    args: Option<Box<RawValue>>,
    server: Option<String>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    context: Map<String, Value>,
    event_type: Option<String>,
    payload: Option<Box<RawValue>>,
    priority: Option<String>,
}

/// Notification priorities oslo accepts.
const PRIORITIES: [&str; 7] = [
    "audit", "debug", "info", "warn", "error", "critical", "sample",
];

/// Hold what a request brings back to `cap` bytes. The reply is already in the daemon's memory
/// (the broker bounds it), but the guest would have to take all of it: a bigger result fails
/// the request with `ReplyTooLarge`, which the guest can handle, instead of exhausting the
/// guest's memory; a bigger remote failure (a long message, large data) is cut down to fit.
fn bounded(
    outcome: Result<Option<Box<RawValue>>, Failure>,
    cap: usize,
    what: &str,
) -> Result<Option<Box<RawValue>>, Failure> {
    match outcome {
        Ok(Some(result)) if result.get().len() > cap => Err(Failure::new(
            classes::REPLY_TOO_LARGE,
            format!(
                "the reply to this {what} is {} bytes, over the handler's max_args_bytes ({cap})",
                result.get().len()
            ),
        )),
        Err(mut failure) if json_len(&failure) > cap => {
            failure.data = None;
            failure.class = failure.class.chars().take(64).collect();
            // Escaping makes a character up to six bytes of JSON, so halve the message until
            // the whole failure fits; a cap too small for any of it leaves the class alone.
            let mut keep = failure.message.len().min(cap);
            while json_len(&failure) > cap && !failure.message.is_empty() {
                keep /= 2;
                while !failure.message.is_char_boundary(keep) {
                    keep -= 1;
                }
                failure.message.truncate(keep);
                if keep > 0 {
                    failure.message.push_str(" [cut to fit max_args_bytes]");
                }
            }
            Err(failure)
        }
        other => other,
    }
}

fn json_len(failure: &Failure) -> usize {
    serde_json::to_vec(failure).map_or(0, |v| v.len())
}

/// Topic, server, method and event names end up in routing keys and queue names.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(classes::INVALID_REQUEST, message)
}

/// What one invocation needs to make outbound requests.
pub(crate) struct Session {
    pub grants: Option<std::sync::Arc<RpcGrants>>,
    pub sender: Option<std::sync::Arc<dyn Outbound>>,
    pub deadline: Instant,
    pub sent: usize,
    /// The largest reply handed to the guest: the handler's `max_args_bytes`, since a reply is
    /// input to it as much as its args are.
    pub max_reply_bytes: usize,
}

impl Session {
    /// Check and send one guest request. `context` is the invocation's request context.
    pub fn request(
        &mut self,
        kind: Kind,
        from: &str,
        context: &[u8],
        bytes: &[u8],
    ) -> Result<Option<Box<RawValue>>, Failure> {
        let request: Request = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("{} request is not valid: {e}", kind.as_str())))?;
        let message = self.check(kind, from, context, request)?;
        if self.sent >= MAX_OUTBOUND_PER_INVOCATION {
            return Err(Failure::new(
                classes::TOO_MANY_REQUESTS,
                format!(
                    "an invocation may send at most {MAX_OUTBOUND_PER_INVOCATION} outbound messages"
                ),
            ));
        }
        let Some(sender) = &self.sender else {
            return Err(Failure::new(
                classes::UNAVAILABLE,
                "outbound RPC needs the daemon (`warren serve`); this host has no broker",
            ));
        };
        self.sent += 1;
        let what = format!("{} to '{}'", kind.as_str(), message.topic);
        bounded(sender.send(message), self.max_reply_bytes, &what)
    }

    fn check(
        &self,
        kind: Kind,
        from: &str,
        context: &[u8],
        request: Request,
    ) -> Result<Message, Failure> {
        let name = kind.as_str();
        let (topic, method, args) = match kind {
            Kind::Notify => {
                if request.method.is_some() || request.args.is_some() || request.server.is_some() {
                    return Err(invalid(
                        "notify takes event_type, payload, priority and topic, not method, args or server",
                    ));
                }
                let event = request
                    .event_type
                    .ok_or_else(|| invalid("notify needs an event_type"))?;
                let payload = request.payload.unwrap_or_else(empty_object);
                let topic = request.topic.unwrap_or_else(|| "notifications".to_owned());
                (topic, event, payload)
            }
            _ => {
                if request.event_type.is_some()
                    || request.payload.is_some()
                    || request.priority.is_some()
                {
                    return Err(invalid(format!(
                        "{name} takes topic, method, args, server, timeout_ms and context"
                    )));
                }
                let topic = request
                    .topic
                    .ok_or_else(|| invalid(format!("{name} needs a topic")))?;
                let method = request
                    .method
                    .ok_or_else(|| invalid(format!("{name} needs a method")))?;
                let args = request.args.unwrap_or_else(empty_object);
                if !args.get().trim_start().starts_with('{') {
                    return Err(invalid(format!("{name}: args must be a JSON object")));
                }
                (topic, method, args)
            }
        };
        if !valid_name(&topic) {
            return Err(invalid(format!(
                "{name}: topic '{}' must be 1-255 letters, digits, '-', '_', '.' or ':'",
                shown(&topic)
            )));
        }
        if !valid_name(&method) {
            return Err(invalid(format!(
                "{name}: '{}' must be 1-255 letters, digits, '-', '_', '.' or ':'",
                shown(&method)
            )));
        }
        if let Some(server) = &request.server
            && (kind == Kind::FanoutCast || !valid_name(server))
        {
            return Err(invalid(format!(
                "{name}: server '{}' is not allowed here",
                shown(server)
            )));
        }
        let granted = self
            .grants
            .as_deref()
            .is_some_and(|g| g.allows(kind, &topic));
        if !granted {
            return Err(Failure::new(
                classes::FORBIDDEN,
                format!(
                    "handler '{from}' may not {name} topic '{topic}': grant it with `{}` in the handler's config",
                    match kind {
                        Kind::Call => "call",
                        Kind::Cast | Kind::FanoutCast => "cast",
                        Kind::Notify => "notify",
                    }
                ),
            ));
        }
        let priority = match (kind, request.priority) {
            (Kind::Notify, Some(p)) => {
                let p = p.to_ascii_lowercase();
                if !PRIORITIES.contains(&p.as_str()) {
                    return Err(invalid(format!(
                        "notify: priority '{}' is not one of {}",
                        shown(&p),
                        PRIORITIES.join(", ")
                    )));
                }
                p
            }
            _ => "info".to_owned(),
        };

        // The caller's context travels on, with what the guest adds; never the broker-validated
        // identity (the receiver sets its own from the message) and never a depth of the
        // guest's choosing.
        let mut out: Map<String, Value> = serde_json::from_slice(context).unwrap_or_default();
        let depth = out.get(DEPTH_KEY).and_then(Value::as_u64).unwrap_or(0);
        if depth >= MAX_CALL_DEPTH {
            return Err(Failure::new(
                classes::CALL_DEPTH_EXCEEDED,
                format!(
                    "{name} to '{topic}' would be {} handler-to-handler calls deep (at most {MAX_CALL_DEPTH}): is a handler calling itself, or two handlers each other, without end?",
                    depth + 1
                ),
            ));
        }
        for (key, value) in request.context {
            out.insert(key, value);
        }
        out.remove(crate::runtime::CONTEXT_USER_ID);
        out.insert(DEPTH_KEY.to_owned(), Value::from(depth + 1));

        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::new(
                class::TIMEOUT,
                format!("no time left in the invocation to {name} '{topic}'"),
            ));
        }
        let wait = match request.timeout_ms {
            Some(0) => return Err(invalid(format!("{name}: timeout_ms must be at least 1"))),
            Some(ms) => left.min(Duration::from_millis(ms)),
            None => left,
        };
        Ok(Message {
            kind,
            from: from.to_owned(),
            topic,
            server: request.server,
            method,
            args,
            priority,
            context: out,
            wait,
        })
    }
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned())
        .unwrap_or_else(|_| unreachable!("an empty object is valid JSON"))
}

/// Bound a guest-supplied string before it reaches an error message.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<Message>>,
    }

    impl Outbound for Recorder {
        fn send(&self, message: Message) -> Result<Option<Box<RawValue>>, Failure> {
            self.sent.lock().expect("lock").push(message);
            Ok(RawValue::from_string("7".to_owned()).ok())
        }
    }

    fn session(grants: RpcGrants, sender: Option<Arc<Recorder>>) -> Session {
        Session {
            grants: Some(Arc::new(grants)),
            sender: sender.map(|s| s as Arc<dyn Outbound>),
            deadline: Instant::now() + Duration::from_secs(5),
            sent: 0,
            max_reply_bytes: 1 << 20,
        }
    }

    fn grants() -> RpcGrants {
        RpcGrants {
            call: vec!["calc".into()],
            cast: vec!["*".into()],
            notify: vec!["notifications".into()],
        }
    }

    #[test]
    fn default_deny_and_grants_per_kind() {
        let rec = Arc::new(Recorder::default());
        let mut s = session(RpcGrants::default(), Some(rec.clone()));
        let req = br#"{"topic": "calc", "method": "add", "args": {"a": 1}}"#;
        let err = s
            .request(Kind::Call, "api", b"{}", req)
            .expect_err("refused");
        assert_eq!(err.class, classes::FORBIDDEN);
        assert!(
            err.message.contains("'api' may not call topic 'calc'"),
            "{err}"
        );

        let mut s = session(grants(), Some(rec.clone()));
        assert_eq!(
            s.request(Kind::Call, "api", b"{}", req)
                .expect("ok")
                .expect("ok")
                .get(),
            "7"
        );
        let other = br#"{"topic": "echo", "method": "echo"}"#;
        assert_eq!(
            s.request(Kind::Call, "api", b"{}", other)
                .expect_err("refused")
                .class,
            classes::FORBIDDEN
        );
        // `*` in cast covers fanout_cast too; calls stay limited to their own list.
        assert!(s.request(Kind::Cast, "api", b"{}", other).is_ok());
        assert!(s.request(Kind::FanoutCast, "api", b"{}", other).is_ok());
        let note = br#"{"event_type": "api.done", "payload": {"ok": true}, "priority": "WARN"}"#;
        assert!(s.request(Kind::Notify, "api", b"{}", note).is_ok());
        let sent = rec.sent.lock().expect("ok");
        assert_eq!(sent.len(), 4);
        assert_eq!(sent[3].topic, "notifications");
        assert_eq!(sent[3].priority, "warn");
        assert_eq!(sent[1].args.get(), "{}");
    }

    #[test]
    fn context_is_propagated_with_the_depth_and_without_the_trusted_identity() {
        let rec = Arc::new(Recorder::default());
        let mut s = session(grants(), Some(rec.clone()));
        let ctx = br#"{"request_id": "req-1", "amqp_user_id": "alice", "warren_call_depth": 2}"#;
        let req = br#"{"topic": "calc", "method": "add", "context": {"tenant": "t1", "warren_call_depth": 0, "amqp_user_id": "mallory"}}"#;
        s.request(Kind::Call, "api", ctx, req).expect("ok");
        let sent = rec.sent.lock().expect("ok");
        let c = &sent[0].context;
        assert_eq!(c["request_id"], "req-1");
        assert_eq!(c["tenant"], "t1");
        assert_eq!(c[DEPTH_KEY], 3, "the host sets the depth, not the guest");
        assert!(!c.contains_key(crate::runtime::CONTEXT_USER_ID));
    }

    #[test]
    fn depth_is_bounded() {
        let mut s = session(grants(), Some(Arc::new(Recorder::default())));
        let ctx = format!(r#"{{"{DEPTH_KEY}": {MAX_CALL_DEPTH}}}"#);
        let req = br#"{"topic": "calc", "method": "add"}"#;
        let err = s
            .request(Kind::Call, "api", ctx.as_bytes(), req)
            .expect_err("refused");
        assert_eq!(err.class, classes::CALL_DEPTH_EXCEEDED);
    }

    #[test]
    fn waits_are_clamped_to_the_invocation_deadline() {
        let rec = Arc::new(Recorder::default());
        let mut s = session(grants(), Some(rec.clone()));
        s.deadline = Instant::now() + Duration::from_millis(300);
        let req = br#"{"topic": "calc", "method": "add", "timeout_ms": 60000}"#;
        s.request(Kind::Call, "api", b"{}", req).expect("ok");
        let short = br#"{"topic": "calc", "method": "add", "timeout_ms": 5}"#;
        s.request(Kind::Call, "api", b"{}", short).expect("ok");
        let sent = rec.sent.lock().expect("ok");
        assert!(sent[0].wait <= Duration::from_millis(300));
        assert_eq!(sent[1].wait, Duration::from_millis(5));
    }

    /// Answers every request with `answer`.
    struct Answers(Result<Option<Box<RawValue>>, Failure>);

    impl Outbound for Answers {
        fn send(&self, _: Message) -> Result<Option<Box<RawValue>>, Failure> {
            self.0.clone()
        }
    }

    #[test]
    fn replies_are_held_to_the_handlers_max_args_bytes() {
        let req = br#"{"topic": "calc", "method": "add"}"#;
        let send = |cap: usize, answer: Result<Option<Box<RawValue>>, Failure>| {
            let mut s = session(grants(), None);
            s.sender = Some(Arc::new(Answers(answer)));
            s.max_reply_bytes = cap;
            s.request(Kind::Call, "api", b"{}", req)
        };
        let text = |n: usize| RawValue::from_string(format!("\"{}\"", "x".repeat(n - 2))).ok();

        let at_cap = send(100, Ok(text(100))).expect("at the cap");
        assert_eq!(at_cap.map(|r| r.get().len()), Some(100));
        let err = send(100, Ok(text(101))).expect_err("over the cap");
        assert_eq!(err.class, classes::REPLY_TOO_LARGE, "{err:?}");
        assert!(
            err.message.contains("call to 'calc' is 101 bytes") && err.message.contains("(100)"),
            "{err:?}"
        );

        let small = Failure::new("ZeroDivisionError", "division by zero");
        assert_eq!(send(400, Err(small.clone())).expect_err("passed on"), small);
        // Three-byte characters (cuts land inside them) and control characters (six bytes
        // each in JSON), with data to drop.
        for (message, first) in [("€".repeat(300), "€"), ("\u{1}".repeat(300), "\u{1}")] {
            let mut big = Failure::new("ValueError", message);
            big.data = Some(serde_json::json!({"blob": "y".repeat(500)}));
            let err = send(401, Err(big)).expect_err("passed on, cut down");
            assert_eq!(err.class, "ValueError", "the class stays");
            assert_eq!(err.data, None, "{err:?}");
            assert!(
                err.message.starts_with(first)
                    && err.message.ends_with("[cut to fit max_args_bytes]"),
                "{err:?}"
            );
            assert!(json_len(&err) <= 401, "{} bytes: {err:?}", json_len(&err));
        }
        let err = send(30, Err(Failure::new("ValueError", "x".repeat(100)))).expect_err("cut");
        assert_eq!(
            (err.class.as_str(), err.message.as_str()),
            ("ValueError", "")
        );
    }

    #[test]
    fn a_wildcard_grant_does_not_reach_admin_topics() {
        let g = RpcGrants {
            call: vec!["*".into()],
            cast: vec!["*".into(), "warren.host2".into()],
            notify: vec![],
        };
        assert!(g.allows(Kind::Call, "calc"));
        assert!(!g.allows(Kind::Call, "warren.host1"), "not through \"*\"");
        assert!(g.allows(Kind::Cast, "warren.host2"), "named: granted");
        assert!(!g.allows(Kind::Cast, "warren.host1"));
    }

    #[test]
    fn malformed_requests_are_refused_before_sending() {
        let rec = Arc::new(Recorder::default());
        let mut s = session(grants(), Some(rec.clone()));
        for (kind, req) in [
            (Kind::Call, &b"not json"[..]),
            (Kind::Call, br#"{"method": "add"}"#),
            (Kind::Call, br#"{"topic": "calc"}"#),
            (
                Kind::Call,
                br#"{"topic": "calc", "method": "add", "args": [1]}"#,
            ),
            (Kind::Call, br#"{"topic": "ca lc", "method": "add"}"#),
            (
                Kind::Call,
                br#"{"topic": "calc", "method": "add", "bogus": 1}"#,
            ),
            (
                Kind::FanoutCast,
                br#"{"topic": "calc", "method": "add", "server": "h"}"#,
            ),
            (Kind::Notify, br#"{"payload": {}}"#),
            (Kind::Notify, br#"{"event_type": "e", "priority": "loud"}"#),
        ] {
            let err = s.request(kind, "api", b"{}", req).expect_err("refused");
            assert_eq!(
                err.class,
                classes::INVALID_REQUEST,
                "{}",
                String::from_utf8_lossy(req)
            );
        }
        assert!(rec.sent.lock().expect("ok").is_empty());
    }

    #[test]
    fn without_a_sender_requests_are_unavailable_and_the_count_is_bounded() {
        let mut s = session(grants(), None);
        let req = br#"{"topic": "calc", "method": "add"}"#;
        assert_eq!(
            s.request(Kind::Call, "api", b"{}", req)
                .expect_err("refused")
                .class,
            classes::UNAVAILABLE
        );
        let mut s = session(grants(), Some(Arc::new(Recorder::default())));
        for _ in 0..MAX_OUTBOUND_PER_INVOCATION {
            s.request(Kind::Cast, "api", b"{}", req).expect("ok");
        }
        assert_eq!(
            s.request(Kind::Cast, "api", b"{}", req)
                .expect_err("refused")
                .class,
            classes::TOO_MANY_REQUESTS
        );
    }
}
