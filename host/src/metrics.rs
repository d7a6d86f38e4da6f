//! What the daemon counts, and the HTTP endpoint that shows it: `/metrics` in Prometheus text
//! format and `/healthz` (200 while the broker connection is up, 503 otherwise).
//!
//! Label values that come from messages are bounded before they become labels: a method is
//! labelled only if the module exports it (`-` otherwise) and error classes are cut to 64
//! bytes, so a caller cannot grow the number of series by sending made-up names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How a request ended, for `warren_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler returned results.
    Ok,
    /// The handler (or the host on its behalf) returned an error; `class` says which.
    Error,
    /// The invocation ran past its time limit.
    Timeout,
    /// The guest trapped or ran out of memory.
    Trap,
    /// Refused before dispatch: too big, not JSON, undecodable.
    Rejected,
    /// A repeat of a `_unique_id` already handled.
    Duplicate,
    /// Delivered too often; sent to the dead-letter exchange instead of run.
    Poison,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Trap => "trap",
            Outcome::Rejected => "rejected",
            Outcome::Duplicate => "duplicate",
            Outcome::Poison => "poison",
        }
    }

    /// The outcome of a failure of class `class`.
    pub fn of_class(class: &str) -> Outcome {
        use crate::runtime::class;
        match class {
            class::TIMEOUT => Outcome::Timeout,
            class::GUEST_TRAP | class::MEMORY_LIMIT_EXCEEDED => Outcome::Trap,
            _ => Outcome::Error,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    topic: String,
    method: String,
    outcome: &'static str,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    topic: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicReasonLabels {
    topic: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicOutcomeLabels {
    topic: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerInfoLabels {
    topic: String,
    version: String,
    hash: String,
}

/// The hot maps' hasher: their keys are configured topics and exported method names, not
/// what a sender chooses, so speed wins over flood resistance.
type FastHash = foldhash::fast::RandomState;

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 50 µs (a fresh-sandbox echo) to 10 s (well past the default 5 s timeout).
    Histogram::new([
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// The series every request of a topic touches, found once per delivery
/// ([`Metrics::topic`]): a family lookup builds its label set (a `String` per label) and hashes
/// it, which cost more than the rest of the bookkeeping of a call. Bounded by the configured
/// topics and, per topic, by the methods its modules export (only those are labelled).
pub struct TopicSeries {
    topic: Box<str>,
    in_flight: Gauge,
    held: Gauge,
    methods: RwLock<HashMap<Box<str>, Arc<MethodSeries>, FastHash>>,
    /// The families a method's series are created in, on its first call.
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
}

impl TopicSeries {
    /// Track one unsettled delivery until the guard drops.
    pub fn holding(&self) -> GaugeGuard {
        GaugeGuard::new(self.held.clone())
    }

    /// Track one running invocation until the guard drops.
    pub fn running(&self) -> GaugeGuard {
        GaugeGuard::new(self.in_flight.clone())
    }

    /// Count a successful request of `method` (an exported method, or `-`).
    pub fn succeeded(&self, method: &str) {
        self.method(method).ok.inc();
    }

    /// Record an invocation's wall time (`method` is exported by the handler's module).
    pub fn invocation(&self, method: &str, seconds: f64) {
        self.method(method).duration.observe(seconds);
    }

    fn method(&self, method: &str) -> Arc<MethodSeries> {
        if let Some(m) = read(&self.methods).get(method) {
            return m.clone();
        }
        let ok = self.requests.get_or_create_owned(&RequestLabels {
            topic: self.topic.to_string(),
            method: method.to_owned(),
            outcome: Outcome::Ok.as_str(),
            class: String::new(),
        });
        let duration = self.duration.get_or_create_owned(&MethodLabels {
            topic: self.topic.to_string(),
            method: method.to_owned(),
        });
        write(&self.methods)
            .entry(method.into())
            .or_insert_with(|| Arc::new(MethodSeries { ok, duration }))
            .clone()
    }
}

/// The series of one method's successful calls.
struct MethodSeries {
    ok: Counter,
    duration: Histogram,
}

/// Every metric of one daemon. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    in_flight: Family<TopicLabels, Gauge>,
    held: Family<TopicLabels, Gauge>,
    prefetch: Gauge,
    replies: Family<OutcomeLabels, Counter>,
    /// `replies` by outcome, in [`REPLY_OUTCOMES`] order.
    reply_series: [Counter; REPLY_OUTCOMES.len()],
    topics: RwLock<HashMap<Box<str>, Arc<TopicSeries>, FastHash>>,
    redeliveries: Family<TopicLabels, Counter>,
    dead_lettered: Family<TopicReasonLabels, Counter>,
    stale_settles: Counter,
    reloads: Family<TopicOutcomeLabels, Counter>,
    handler_info: Family<HandlerInfoLabels, Gauge>,
    info_labels: std::sync::Mutex<std::collections::HashMap<String, HandlerInfoLabels>>,
    reconnects: Counter,
    connected: Gauge,
    blocked: Gauge,
    healthy: AtomicBool,
}

/// What a reply publish can end in, for `warren_replies_total{outcome}`.
pub const REPLY_OUTCOMES: [&str; 4] = ["confirmed", "returned", "nacked", "failed"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, all zero, not connected.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("warren");
        let replies = Family::<OutcomeLabels, Counter>::default();
        let reply_series =
            REPLY_OUTCOMES.map(|outcome| replies.get_or_create_owned(&OutcomeLabels { outcome }));
        let m = Metrics {
            requests: Family::default(),
            duration: HistogramFamily::new_with_constructor(duration_histogram),
            in_flight: Family::default(),
            held: Family::default(),
            prefetch: Gauge::default(),
            replies,
            reply_series,
            topics: RwLock::default(),
            redeliveries: Family::default(),
            dead_lettered: Family::default(),
            stale_settles: Counter::default(),
            reloads: Family::default(),
            handler_info: Family::default(),
            info_labels: Default::default(),
            reconnects: Counter::default(),
            connected: Gauge::default(),
            blocked: Gauge::default(),
            healthy: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests handled, by topic, method, outcome (ok, error, timeout, trap, rejected, duplicate, poison) and error class",
            m.requests.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "Wall time of handler invocations",
            m.duration.clone(),
        );
        registry.register(
            "invocations_in_flight",
            "Invocations running now",
            m.in_flight.clone(),
        );
        registry.register(
            "deliveries_held",
            "Deliveries received and not yet settled, per topic (compare with warren_prefetch per queue)",
            m.held.clone(),
        );
        registry.register(
            "prefetch",
            "Deliveries the broker may have outstanding per consumer (basic.qos)",
            m.prefetch.clone(),
        );
        registry.register(
            "replies",
            "Replies published, by outcome (confirmed, returned: caller gone, nacked, failed)",
            m.replies.clone(),
        );
        registry.register(
            "redeliveries",
            "Deliveries the broker marked as redelivered",
            m.redeliveries.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages sent to the dead-letter exchange (or answered and dropped without one), by reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "stale_settles",
            "Acks or rejects that could not be sent because their channel was gone (the broker redelivers those messages)",
            m.stale_settles.clone(),
        );
        registry.register(
            "reloads",
            "Handler reloads, by outcome (ok, failed)",
            m.reloads.clone(),
        );
        registry.register(
            "handler_info",
            "The module version each handler serves (value 1; version and hash as labels)",
            m.handler_info.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Successful reconnections to the broker after a loss",
            m.reconnects.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while the consume and publish connections are up",
            m.connected.clone(),
        );
        registry.register(
            "broker_blocked",
            "1 while the broker blocks the publish connection (resource alarm)",
            m.blocked.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The hot series of `topic`, created on its first request. A delivery looks them up once
    /// and updates them through the handle.
    pub fn topic(&self, topic: &str) -> Arc<TopicSeries> {
        if let Some(series) = read(&self.topics).get(topic) {
            return series.clone();
        }
        let labels = TopicLabels {
            topic: topic.to_owned(),
        };
        write(&self.topics)
            .entry(topic.into())
            .or_insert_with(|| {
                Arc::new(TopicSeries {
                    topic: topic.into(),
                    in_flight: self.in_flight.get_or_create_owned(&labels),
                    held: self.held.get_or_create_owned(&labels),
                    methods: RwLock::default(),
                    requests: self.requests.clone(),
                    duration: self.duration.clone(),
                })
            })
            .clone()
    }

    /// Count a request that ended in `outcome`. `method` must be a label already bounded (an
    /// exported method, or `-`).
    pub fn request(&self, topic: &str, method: &str, outcome: Outcome, class: &str) {
        if outcome == Outcome::Ok && class.is_empty() {
            self.topic(topic).succeeded(method);
            return;
        }
        let class = crate::wire::truncate(class, 64);
        self.requests
            .get_or_create(&RequestLabels {
                topic: topic.to_owned(),
                method: method.to_owned(),
                outcome: outcome.as_str(),
                class: class.to_owned(),
            })
            .inc();
    }

    /// The configured prefetch.
    pub fn set_prefetch(&self, prefetch: u16) {
        self.prefetch.set(i64::from(prefetch));
    }

    /// Count a reply publish outcome: `confirmed`, `returned`, `nacked` or `failed`.
    pub fn reply(&self, outcome: &'static str) {
        match REPLY_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.reply_series[i].inc(),
            None => self.replies.get_or_create(&OutcomeLabels { outcome }).inc(),
        };
    }

    /// Count a redelivered message.
    pub fn redelivered(&self, topic: &str) {
        self.redeliveries
            .get_or_create(&TopicLabels {
                topic: topic.to_owned(),
            })
            .inc();
    }

    /// Count a dead-lettered message; `reason` is `poison` or `crashed_cast`.
    pub fn dead_lettered(&self, topic: &str, reason: &'static str) {
        self.dead_lettered
            .get_or_create(&TopicReasonLabels {
                topic: topic.to_owned(),
                reason,
            })
            .inc();
    }

    /// Count an ack or reject that could not be sent.
    pub fn stale_settle(&self) {
        self.stale_settles.inc();
    }

    /// Count a reload attempt.
    pub fn reload(&self, topic: &str, ok: bool) {
        self.reloads
            .get_or_create(&TopicOutcomeLabels {
                topic: topic.to_owned(),
                outcome: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// `topic` now serves `version` (`hash` is the module's hash prefix); `None` removes it.
    pub fn handler_version(&self, topic: &str, version: Option<(u64, &str)>) {
        // prometheus-client cannot list a family's series, so the current one per topic is
        // remembered here to remove it when the version changes.
        let mut current = self.info_labels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = current.remove(topic) {
            self.handler_info.remove(&old);
        }
        if let Some((version, hash)) = version {
            let labels = HandlerInfoLabels {
                topic: topic.to_owned(),
                version: version.to_string(),
                hash: hash.to_owned(),
            };
            self.handler_info.get_or_create(&labels).set(1);
            current.insert(topic.to_owned(), labels);
        }
    }

    /// The broker connections came up (`reconnect`: not for the first time).
    pub fn connected(&self, reconnect: bool) {
        if reconnect {
            self.reconnects.inc();
        }
        self.connected.set(1);
        self.healthy.store(true, Ordering::Relaxed);
    }

    /// The broker connections are down.
    pub fn disconnected(&self) {
        self.connected.set(0);
        self.blocked.set(0);
        self.healthy.store(false, Ordering::Relaxed);
    }

    /// The broker blocked (or unblocked) the publish connection.
    pub fn blocked(&self, blocked: bool) {
        self.blocked.set(i64::from(blocked));
    }

    /// Whether `/healthz` says ok.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// A lock poisoned by a panicking writer still holds a consistent map (inserts are whole), so
/// metrics keep counting.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Decrements its gauge when dropped, however the work it tracks ends.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serve `/metrics` and `/healthz` on `address` until `stop`. Returns the bound address (port
/// 0 picks a free one) once listening.
pub async fn serve(
    metrics: Arc<Metrics>,
    address: SocketAddr,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    info!(address = %bound, "metrics listening (/metrics, /healthz)");
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "metrics endpoint: accept failed");
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&metrics, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // A scraper that never finishes its request must not hold a task forever.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            });
        }
    });
    Ok((bound, task))
}

fn respond<B>(
    metrics: &Metrics,
    req: &hyper::Request<B>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::{Method, StatusCode};
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (&Method::GET, "/healthz") if metrics.healthy() => {
            (StatusCode::OK, "text/plain", "ok\n".to_owned())
        }
        (&Method::GET, "/healthz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "broker unreachable\n".to_owned(),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series whose line starts with `series` (labels included), if shown.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn successful_requests_count_per_topic_and_method_through_the_cached_series() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.request("a", "echo", Outcome::Ok, "");
        }
        m.request("a", "add", Outcome::Ok, "");
        m.request("b", "echo", Outcome::Ok, "");
        m.request("a", "echo", Outcome::Error, "ValueError");
        m.request("a", "-", Outcome::Rejected, "");
        let text = m.encode();
        let ok = |t: &str, method: &str| {
            value(
                &text,
                &format!(
                    "warren_requests_total{{topic=\"{t}\",method=\"{method}\",outcome=\"ok\",class=\"\"}}"
                ),
            )
        };
        assert_eq!(ok("a", "echo"), Some(3.0), "{text}");
        assert_eq!(ok("a", "add"), Some(1.0), "{text}");
        assert_eq!(ok("b", "echo"), Some(1.0), "{text}");
        assert_eq!(
            value(
                &text,
                "warren_requests_total{topic=\"a\",method=\"echo\",outcome=\"error\",class=\"ValueError\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "warren_requests_total{topic=\"a\",method=\"-\",outcome=\"rejected\",class=\"\"}"
            ),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn invocation_durations_land_in_their_method_histogram() {
        let m = Metrics::new();
        let a = m.topic("a");
        a.invocation("echo", 0.000_2);
        a.invocation("echo", 0.3);
        a.invocation("add", 0.000_01);
        let text = m.encode();
        let count = |method: &str| {
            value(
                &text,
                &format!(
                    "warren_invocation_duration_seconds_count{{topic=\"a\",method=\"{method}\"}}"
                ),
            )
        };
        assert_eq!(count("echo"), Some(2.0), "{text}");
        assert_eq!(count("add"), Some(1.0), "{text}");
        assert_eq!(
            value(
                &text,
                "warren_invocation_duration_seconds_bucket{le=\"0.00025\",topic=\"a\",method=\"echo\"}"
            ),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn gauges_follow_their_guards_per_topic() {
        let m = Metrics::new();
        let held = |m: &Metrics, t: &str| {
            value(
                &m.encode(),
                &format!("warren_deliveries_held{{topic=\"{t}\"}}"),
            )
        };
        let running = |m: &Metrics, t: &str| {
            value(
                &m.encode(),
                &format!("warren_invocations_in_flight{{topic=\"{t}\"}}"),
            )
        };
        // Looked up again for each guard: a topic's series are the same whatever the handle.
        let h1 = m.topic("a").holding();
        let h2 = m.topic("a").holding();
        let h3 = m.topic("b").holding();
        let r1 = m.topic("a").running();
        assert_eq!(held(&m, "a"), Some(2.0));
        assert_eq!(held(&m, "b"), Some(1.0));
        assert_eq!(running(&m, "a"), Some(1.0));
        drop((h1, r1));
        assert_eq!(held(&m, "a"), Some(1.0));
        assert_eq!(running(&m, "a"), Some(0.0));
        drop((h2, h3));
        assert_eq!(held(&m, "a"), Some(0.0));
        assert_eq!(held(&m, "b"), Some(0.0));
    }

    #[test]
    fn every_reply_outcome_is_shown_from_the_start_and_counted_apart() {
        let m = Metrics::new();
        let replies = |m: &Metrics, o: &str| {
            value(
                &m.encode(),
                &format!("warren_replies_total{{outcome=\"{o}\"}}"),
            )
        };
        for o in REPLY_OUTCOMES {
            assert_eq!(replies(&m, o), Some(0.0), "{o}");
        }
        m.reply("confirmed");
        m.reply("confirmed");
        m.reply("returned");
        m.reply("failed");
        assert_eq!(replies(&m, "confirmed"), Some(2.0));
        assert_eq!(replies(&m, "returned"), Some(1.0));
        assert_eq!(replies(&m, "nacked"), Some(0.0));
        assert_eq!(replies(&m, "failed"), Some(1.0));
    }
}
