//! One delivery, end to end: check, decode, deduplicate, invoke, reply, and settle.
//!
//! The acknowledgement policy lives here and only here (the table is in ARCHITECTURE.md):
//!
//! | outcome | delivery ends in |
//! |---|---|
//! | body over the size cap, non-JSON content type, undecodable | reject, no requeue (logged) |
//! | duplicate `_unique_id` already handled | ack (logged) |
//! | handler ran (ok or any failure), reply confirmed or caller gone, or a cast | ack |
//! | reply could not be published (broker trouble) | reject with requeue: it runs again |
//!
//! A request is acked only after its handler finished and its reply was confirmed, so a crash
//! of the daemon never loses a request; it may run twice, which `_unique_id` dedup narrows.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::amqp::{Delivery, PublishOptions, Published, Publisher};
use crate::registry::Handler;
use crate::runtime::{Failure, Runtime, class};
use crate::wire::{self, RemoteError, Request};

/// Context key carrying the AMQP `user_id` property, which RabbitMQ validates.
pub const USER_ID_KEY: &str = "amqp_user_id";

/// What answers the requests of one queue: a Wasm handler, or the daemon's admin topic.
pub trait Service: Send + Sync {
    /// The topic, for logs.
    fn topic(&self) -> &str;
    /// Produce the results (or the failure) for a decoded request.
    fn serve(
        &self,
        dispatcher: &Dispatcher,
        request: &Request,
    ) -> impl std::future::Future<Output = Result<Vec<Box<RawValue>>, Failure>> + Send;
}

impl Service for Handler {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn serve(
        &self,
        dispatcher: &Dispatcher,
        request: &Request,
    ) -> Result<Vec<Box<RawValue>>, Failure> {
        // Taken once: the whole invocation runs on this version even if a reload swaps.
        let version = self.current();
        tracing::Span::current().record("version", version.id);
        dispatcher.invoke(self, &version.module, request).await
    }
}

/// Shared by every consumer of the daemon.
pub struct Dispatcher {
    runtime: Arc<Runtime>,
    publisher: Publisher,
    /// Bounds invocations running at once across all handlers; deliveries wait for a permit
    /// while still unacked, so prefetch, not memory, is what the backlog costs.
    invocations: Arc<Semaphore>,
    dedup: Mutex<Dedup>,
    max_message_bytes: usize,
    limits: wire::Limits,
    /// Cancelled when replies can no longer be published: requeueing every call whose reply
    /// failed would run it again and again on a dead publisher.
    fatal: CancellationToken,
}

/// Settings the dispatcher needs from the config.
pub struct DispatchSettings {
    /// Invocations at once.
    pub concurrency: usize,
    /// Remembered `_unique_id`s.
    pub dedup_window: usize,
    /// Largest body accepted.
    pub max_message_bytes: usize,
}

impl Dispatcher {
    /// A dispatcher invoking on `runtime` and replying through `publisher`.
    pub fn new(
        runtime: Arc<Runtime>,
        publisher: Publisher,
        settings: &DispatchSettings,
        fatal: CancellationToken,
    ) -> Self {
        Self {
            runtime,
            publisher,
            invocations: Arc::new(Semaphore::new(settings.concurrency)),
            dedup: Mutex::new(Dedup::new(settings.dedup_window)),
            max_message_bytes: settings.max_message_bytes,
            limits: wire::Limits::DEFAULT,
            fatal,
        }
    }

    /// Handle one delivery from a queue of `handler` and settle it (ack or reject). Never
    /// panics and never returns an error: every outcome is logged here.
    pub async fn handle<S: Service>(&self, service: &S, queue: &str, delivery: &Delivery) {
        let tag = delivery.tag();
        let span = tracing::info_span!("delivery", topic = %service.topic(), queue, tag,
            method = tracing::field::Empty, msg_id = tracing::field::Empty,
            unique_id = tracing::field::Empty, version = tracing::field::Empty,
            outcome = tracing::field::Empty);
        async {
            let settle = self.process(service, delivery).await;
            tracing::Span::current().record("outcome", settle.as_str());
            let settled = settle_delivery(delivery, &settle).await;
            // Remember the id only once the ack went out: a redelivery of a request whose ack
            // was lost must be answered again, not dropped.
            if let (
                true,
                Settle::Ack {
                    unique_id: Some(id),
                },
            ) = (settled, settle)
                && let Ok(mut dedup) = self.dedup.lock()
            {
                dedup.insert(id);
            }
        }
        .instrument(span)
        .await
    }

    async fn process<S: Service>(&self, service: &S, delivery: &Delivery) -> Settle {
        let body = delivery.body();
        if body.len() > self.max_message_bytes {
            warn!(
                size = body.len(),
                cap = self.max_message_bytes,
                "message over the size cap rejected unread"
            );
            return Settle::Reject;
        }
        if let Some(ct) = delivery.content_type()
            && !ct.eq_ignore_ascii_case("application/json")
        {
            warn!(content_type = %truncate(ct, 64), "message with a non-JSON content type rejected");
            return Settle::Reject;
        }
        let mut request = match wire::decode_request_with(body, &self.limits) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, size = body.len(), "undecodable message rejected");
                return Settle::Reject;
            }
        };
        // The broker-validated sender, under a key no message can set: `_context_*` fields are
        // the caller's claims, this is the only identity a handler can trust.
        request.context.remove(USER_ID_KEY);
        if let Some(user) = delivery.user_id() {
            request.context.insert(USER_ID_KEY.to_owned(), user.into());
        }
        let span = tracing::Span::current();
        span.record("method", truncate(&request.method, 64));
        if let Some(id) = &request.msg_id {
            span.record("msg_id", id.as_str());
        }
        if let Some(id) = &request.unique_id {
            span.record("unique_id", id.as_str());
            if self.dedup.lock().map(|d| d.contains(id)).unwrap_or(false) {
                info!("duplicate message dropped (same _unique_id already handled)");
                return Settle::Ack { unique_id: None };
            }
        }

        let outcome = service.serve(self, &request).await;
        if let Err(f) = &outcome {
            if request.wants_reply() {
                info!(class = %f.class, error = %f.message, "handler failed; failure sent to caller");
            } else {
                warn!(class = %f.class, error = %f.message, "cast handler failed");
            }
        }
        if request.wants_reply()
            && let Err(e) = self.reply(&request, outcome).await
        {
            error!(error = %e, "reply could not be published; request requeued");
            if matches!(e, crate::amqp::AmqpError::Broker { .. }) {
                self.fatal.cancel();
            }
            return Settle::Requeue;
        }
        Settle::Ack {
            unique_id: request.unique_id,
        }
    }

    /// Run the request's method on `module` in a sandbox, on a blocking thread.
    pub async fn invoke(
        &self,
        handler: &Handler,
        module: &crate::runtime::Module,
        request: &Request,
    ) -> Result<Vec<Box<RawValue>>, Failure> {
        if !module.has_method(&request.method) {
            return Err(Failure::new(
                class::NO_SUCH_METHOD,
                format!(
                    "Endpoint does not support RPC method {}",
                    truncate(&request.method, 255)
                ),
            ));
        }
        let context: Arc<[u8]> = match serde_json::to_vec(&request.context) {
            Ok(bytes) => bytes.into(),
            Err(e) => {
                return Err(Failure::new(
                    class::INTERNAL,
                    format!("cannot encode context: {e}"),
                ));
            }
        };
        let Ok(permit) = self.invocations.clone().acquire_owned().await else {
            return Err(Failure::new(class::OVERLOADED, "daemon is shutting down"));
        };
        let runtime = self.runtime.clone();
        let module = module.clone();
        let method = request.method.clone();
        let args = request.args.clone();
        let limits = handler.limits.clone();
        let span = tracing::Span::current();
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _enter = span.enter();
            runtime.invoke(&module, &method, &args, context, &limits)
        });
        let heartbeat = request
            .heartbeat_interval()
            .zip(request.reply_routing_key())
            .zip(request.msg_id.as_deref())
            .map(|((every, key), msg_id)| (every, key, msg_id));
        let joined = match heartbeat {
            None => work.await,
            Some((every, key, msg_id)) => {
                self.with_heartbeats(work, every, key, msg_id, request.enveloped)
                    .await
            }
        };
        joined.unwrap_or_else(|e| {
            Err(Failure::new(
                class::INTERNAL,
                format!("invocation task failed: {e}"),
            ))
        })
    }

    /// Run `work` while sending oslo call-monitor heartbeats every `every`.
    async fn with_heartbeats<T>(
        &self,
        work: tokio::task::JoinHandle<T>,
        every: Duration,
        key: &str,
        msg_id: &str,
        enveloped: bool,
    ) -> Result<T, tokio::task::JoinError> {
        let mut work = std::pin::pin!(work);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = ticker.tick() => {
                    let body = wire::encode_heartbeat(msg_id, enveloped);
                    if let Err(e) = self.publisher.publish("", key, &body, &reply_options()).await {
                        warn!(error = %e, "call-monitor heartbeat not sent");
                    }
                }
            }
        }
    }

    async fn reply(
        &self,
        request: &Request,
        outcome: Result<Vec<Box<RawValue>>, Failure>,
    ) -> Result<(), crate::amqp::AmqpError> {
        let Some(key) = request.reply_routing_key() else {
            return Ok(());
        };
        // The reply table per dialect (who gets every streamed result, who only the last,
        // where the terminator goes) belongs to the wire codec.
        let bodies: Vec<Vec<u8>> = match outcome {
            Ok(results) => wire::encode_success(request, results.iter().map(|r| &**r)),
            Err(f) => wire::encode_failure(request, &remote_error(&f, &request.method))
                .into_iter()
                .collect(),
        };
        for body in bodies {
            match self
                .publisher
                .publish("", key, &body, &reply_options())
                .await?
            {
                Published::Confirmed => {}
                Published::Returned { code, text } => {
                    warn!(reply_to = key, code, %text, "caller is gone; reply dropped");
                    return Ok(());
                }
                Published::Nacked => {
                    warn!(reply_to = key, "broker refused the reply; dropped");
                    return Ok(());
                }
            }
        }
        debug!(reply_to = key, "replied");
        Ok(())
    }
}

fn reply_options() -> PublishOptions {
    PublishOptions {
        mandatory: true,
        persistent: false,
        expiration_ms: None,
        user_id: None,
    }
}

/// How a remote caller sees a handler failure. `NoSuchMethod` takes oslo's own module and text
/// so an oslo client recognises it; everything else is a Warren error carrying the guest's data.
pub fn remote_error(f: &Failure, method: &str) -> RemoteError {
    if f.class == class::NO_SUCH_METHOD {
        return RemoteError::no_such_method(truncate(method, 255));
    }
    let err = RemoteError::new(f.class.clone(), f.message.clone());
    match &f.data {
        Some(data) => err.with_data(data.clone()),
        None => err,
    }
}

enum Settle {
    Ack { unique_id: Option<String> },
    Reject,
    Requeue,
}

impl Settle {
    fn as_str(&self) -> &'static str {
        match self {
            Settle::Ack { .. } => "ack",
            Settle::Reject => "reject",
            Settle::Requeue => "requeue",
        }
    }
}

/// Ack or reject; true when the broker got it.
async fn settle_delivery(delivery: &Delivery, settle: &Settle) -> bool {
    let result = match settle {
        Settle::Ack { .. } => delivery.ack().await,
        Settle::Reject => delivery.reject(false).await,
        Settle::Requeue => delivery.reject(true).await,
    };
    match result {
        Ok(true) => true,
        // The channel died since the delivery arrived: the broker will redeliver it.
        Ok(false) => {
            warn!(
                settle = settle.as_str(),
                "stale delivery (its channel is gone); the broker will redeliver it"
            );
            false
        }
        Err(e) => {
            warn!(settle = settle.as_str(), error = %e, "could not settle delivery; the broker will redeliver it");
            false
        }
    }
}

/// Recently handled `_unique_id`s, oldest evicted first.
struct Dedup {
    seen: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Dedup {
    fn new(cap: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    fn insert(&mut self, id: String) {
        if self.cap == 0 || !self.seen.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
