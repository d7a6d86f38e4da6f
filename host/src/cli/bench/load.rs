//! The load generator: oslo-format `call`s from N concurrent callers, and cast floods.
//!
//! It behaves like one oslo.messaging client process with N threads: one connection, one
//! confirm-mode publisher, one exclusive `reply_<hex>` queue whose consumer routes replies by
//! `_msg_id`. Each request is what oslo's `RPCClient.call` sends (the 2.0 envelope with
//! `_msg_id`, `_reply_q`, `_timeout`, `_unique_id`), published `mandatory` and persistent
//! with the call timeout as its expiration, and confirmed before the caller waits for the
//! reply. It goes through `amqp.rs` and `wire`, like Warren's own client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use warren::amqp::{Connection, Consumer, PublishOptions, Published, Publisher, QueueSpec};
use warren::wire::{self, OutgoingRequest, Reply};

/// How long one call may wait for its reply before it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Casts published at once during a flood (confirms pending).
const FLOOD_WINDOW: usize = 512;

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>;

/// One client connection with its reply queue.
pub struct LoadGen {
    conn: Connection,
    publisher: Publisher,
    reply_queue: String,
    waiters: Waiters,
    router: tokio::task::JoinHandle<()>,
    exchange: String,
    method: String,
    args: Box<RawValue>,
    /// What `echo` must answer: the `value` sent.
    expected: String,
    context: Map<String, Value>,
}

/// The result of one call phase.
#[derive(Debug, Clone, Serialize)]
pub struct CallStats {
    /// Concurrent callers.
    pub callers: usize,
    /// Calls completed inside the measured window.
    pub calls: u64,
    /// Calls that failed or timed out.
    pub errors: u64,
    /// The measured window, seconds.
    pub secs: f64,
    /// Calls per second.
    pub rate: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Slowest call, milliseconds.
    pub max_ms: f64,
}

/// Every call timed in one or more windows of a call phase.
#[derive(Debug, Clone)]
pub struct CallSamples {
    callers: usize,
    took: Vec<Duration>,
    errors: u64,
    /// Total length of the windows, seconds.
    secs: f64,
}

impl CallSamples {
    /// No window yet.
    pub fn new(callers: usize) -> CallSamples {
        CallSamples {
            callers,
            took: Vec::new(),
            errors: 0,
            secs: 0.0,
        }
    }

    /// Add another window's calls (of the same caller count).
    pub fn merge(&mut self, other: CallSamples) {
        self.took.extend(other.took);
        self.errors += other.errors;
        self.secs += other.secs;
    }

    /// Rate and percentiles over all the windows.
    pub fn stats(mut self) -> CallStats {
        self.took.sort_unstable();
        let took = &self.took;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        CallStats {
            callers: self.callers,
            calls: took.len() as u64,
            errors: self.errors,
            secs: self.secs,
            rate: if self.secs > 0.0 {
                took.len() as f64 / self.secs
            } else {
                0.0
            },
            p50_ms: percentile(took, 0.50).map_or(0.0, ms),
            p99_ms: percentile(took, 0.99).map_or(0.0, ms),
            max_ms: took.last().copied().map_or(0.0, ms),
        }
    }
}

impl LoadGen {
    /// Connect, declare the reply queue and start routing replies. `payload_bytes` sizes the
    /// string sent as `value`.
    pub async fn connect(
        url: &str,
        exchange: &str,
        method: &str,
        payload_bytes: usize,
    ) -> anyhow::Result<LoadGen> {
        let conn = Connection::open(url, "warren-bench-load", 60).await?;
        let publisher = conn.channel().await?.into_publisher().await?;
        let reply_queue = format!("reply_{}", wire::new_id());
        let replies = conn.channel().await?;
        let spec = QueueSpec {
            exclusive: true,
            auto_delete: true,
            ..QueueSpec::default()
        };
        replies.declare_queue(&reply_queue, &spec).await?;
        let consumer = replies.consume(&reply_queue, &reply_queue).await?;
        let waiters: Waiters = Arc::default();
        let router = tokio::spawn(route_replies(consumer, waiters.clone()));
        let expected = serde_json::to_string(&"x".repeat(payload_bytes))?;
        let args = RawValue::from_string(format!("{{\"value\": {expected}}}"))?;
        Ok(LoadGen {
            conn,
            publisher,
            reply_queue,
            waiters,
            router,
            exchange: exchange.to_owned(),
            method: method.to_owned(),
            args,
            expected,
            context: Map::new(),
        })
    }

    /// One call, timed from the publish to the reply.
    async fn call(&self, topic: &str) -> Result<Duration, String> {
        let started = Instant::now();
        let msg_id = wire::new_id();
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(msg_id.clone(), tx);
        }
        let body = wire::encode_request(
            &OutgoingRequest::call(
                &self.method,
                &self.args,
                &self.context,
                &msg_id,
                Some(&self.reply_queue),
            ),
            &wire::new_id(),
        );
        let options = PublishOptions {
            mandatory: true,
            persistent: true,
            expiration_ms: Some(CALL_TIMEOUT.as_millis() as u64),
            ..PublishOptions::default()
        };
        let outcome = async {
            match self
                .publisher
                .publish(&self.exchange, topic, &body, &options)
                .await
            {
                Ok(Published::Confirmed) => {}
                Ok(other) => return Err(format!("request not routed: {other:?}")),
                Err(e) => return Err(e.to_string()),
            }
            let reply = tokio::time::timeout(CALL_TIMEOUT, rx)
                .await
                .map_err(|_| format!("no reply within {CALL_TIMEOUT:?}"))?
                .map_err(|_| "the reply consumer stopped".to_owned())?;
            if let Some(failure) = reply.failure {
                return Err(format!(
                    "remote error {}: {}",
                    failure.class, failure.message
                ));
            }
            match reply.result {
                Some(r) if r.get() == self.expected => Ok(started.elapsed()),
                other => Err(format!("unexpected result {other:?}")),
            }
        }
        .await;
        if outcome.is_err()
            && let Ok(mut w) = self.waiters.lock()
        {
            w.remove(&msg_id);
        }
        outcome
    }

    /// `callers` concurrent callers call in a loop for `warmup` + `window`; calls that start
    /// and end inside the window are counted.
    pub async fn calls(
        self: &Arc<Self>,
        topic: &str,
        callers: usize,
        warmup: Duration,
        window: Duration,
    ) -> CallSamples {
        let from = Instant::now() + warmup;
        let until = from + window;
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let load = Arc::clone(self);
                let topic = topic.to_owned();
                tokio::spawn(async move {
                    let mut took = Vec::new();
                    let mut errors = 0u64;
                    let mut first_error = None;
                    while Instant::now() < until {
                        let started = Instant::now();
                        match load.call(&topic).await {
                            Ok(d) => {
                                if started >= from && Instant::now() <= until {
                                    took.push(d);
                                }
                            }
                            Err(e) => {
                                errors += 1;
                                first_error.get_or_insert(e);
                            }
                        }
                    }
                    (took, errors, first_error)
                })
            })
            .collect();
        let mut samples = CallSamples::new(callers);
        samples.secs = window.as_secs_f64();
        for task in tasks {
            if let Ok((t, e, first)) = task.await {
                samples.took.extend(t);
                samples.errors += e;
                if let Some(first) = first {
                    eprintln!("  call error (of {e}): {first}");
                }
            }
        }
        samples
    }

    /// Publish `count` casts of the method to `topic`, each confirmed by the broker, with
    /// [`FLOOD_WINDOW`] confirms outstanding. Returns how long publishing took.
    pub async fn flood(&self, topic: &str, count: u64) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let options = PublishOptions {
            mandatory: true,
            persistent: true,
            ..PublishOptions::default()
        };
        let mut failed = 0u64;
        let mut publishes = futures_util::stream::iter(0..count)
            .map(|_| {
                let body = wire::encode_request(
                    &OutgoingRequest::cast(&self.method, &self.args, &self.context),
                    &wire::new_id(),
                );
                let options = &options;
                async move {
                    self.publisher
                        .publish(&self.exchange, topic, &body, options)
                        .await
                }
            })
            .buffer_unordered(FLOOD_WINDOW);
        while let Some(published) = publishes.next().await {
            if !matches!(published, Ok(Published::Confirmed)) {
                failed += 1;
            }
        }
        anyhow::ensure!(failed == 0, "{failed} of {count} casts were not confirmed");
        Ok(started.elapsed())
    }

    /// Close the connection (its reply queue goes with it).
    pub async fn close(&self) {
        self.router.abort();
        self.conn.close().await;
    }
}

/// Routes each ending reply to the call waiting for it; a call that timed out has removed its
/// waiter, so a late reply is dropped.
async fn route_replies(mut consumer: Consumer, waiters: Waiters) {
    while let Some(Ok(delivery)) = consumer.next().await {
        if let Ok(reply) = wire::decode_reply(delivery.body())
            && (reply.ending || reply.failure.is_some())
            && let Some(id) = reply.msg_id.as_deref()
        {
            let waiter = waiters.lock().ok().and_then(|mut w| w.remove(id));
            if let Some(tx) = waiter {
                let _ = tx.send(reply);
            }
        }
        let _ = delivery.ack().await;
    }
}

/// Nearest-rank percentile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(secs: f64, millis: &[u64], errors: u64) -> CallSamples {
        CallSamples {
            callers: 4,
            took: millis.iter().map(|&m| Duration::from_millis(m)).collect(),
            errors,
            secs,
        }
    }

    #[test]
    fn merged_windows_give_the_rate_and_percentiles_of_all_their_calls() {
        let mut all = CallSamples::new(4);
        all.merge(window(2.0, &[5, 1, 3], 1));
        all.merge(window(1.0, &[2, 100, 4], 0));
        let stats = all.stats();
        assert_eq!(stats.callers, 4);
        assert_eq!(stats.calls, 6);
        assert_eq!(stats.errors, 1);
        assert_eq!(stats.secs, 3.0);
        assert_eq!(stats.rate, 2.0);
        assert_eq!(stats.p50_ms, 3.0);
        assert_eq!(stats.max_ms, 100.0);
    }

    #[test]
    fn no_window_is_no_rate_rather_than_a_division_by_zero() {
        let stats = CallSamples::new(1).stats();
        assert_eq!((stats.calls, stats.rate, stats.p50_ms), (0, 0.0, 0.0));
    }
}
