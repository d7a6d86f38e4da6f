//! One delivery, end to end: check, decode, deduplicate, invoke, reply, and settle.
//!
//! The acknowledgement policy lives here and only here (the table is in ARCHITECTURE.md):
//!
//! | outcome | delivery ends in |
//! |---|---|
//! | body over the size cap, non-JSON content type, undecodable | reject, no requeue (logged) |
//! | duplicate `_unique_id` already handled | ack (logged) |
//! | handler ran (ok or any failure), reply confirmed or caller gone, or a cast | ack |
//! | a cast whose guest crashed (trap, timeout, memory), dead-letter target set | dead-lettered, then ack |
//! | delivered more than `max_deliveries` times (quorum `x-delivery-count`: poison) | dead-lettered (or failure reply), then ack |
//! | reply or dead-letter could not be published (broker trouble) | reject with requeue: it runs again |
//!
//! A request is acked only after its handler finished and its reply was confirmed, so a crash
//! of the daemon never loses a request; it may run twice, which `_unique_id` dedup narrows.
//! An ack whose channel died meanwhile is not sent (the broker redelivers the message); that is
//! logged and counted, never taken for success.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use futures_util::future::Either;
use serde_json::value::RawValue;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Level, warn};

use crate::in_span;
use crate::log::lazy::{LazySpan, Scoped, SpanSource};

use crate::amqp::{AmqpError, Delivery, Header, PublishOptions, Published, Publisher};
use crate::metrics::{Metrics, Outcome, TopicSeries};
use crate::registry::{Handler, Version};
use crate::runtime::{Failure, Next, Runtime, Spent, class};
use crate::wire::{self, RemoteError, Request, truncate};

/// How long a reply waits for a publisher while the daemon reconnects. The request is requeued
/// (and runs again) if none comes in time.
pub const LINK_WAIT: Duration = Duration::from_secs(30);

/// Error class of a request delivered too often.
pub const POISON_CLASS: &str = "PoisonMessage";

/// Context key carrying the AMQP `user_id` property, which RabbitMQ validates.
pub const USER_ID_KEY: &str = crate::runtime::CONTEXT_USER_ID;

/// The results of a request, or why there are none.
pub type Answer = Result<Vec<Box<RawValue>>, Failure>;

/// What answers the requests of one queue: a Wasm handler, or the daemon's admin topic.
pub trait Service: Send + Sync {
    /// What one request runs on, taken once as it is admitted (a handler's current version),
    /// so that its log lines and its invocation agree even if a reload swaps meanwhile.
    type Snapshot: Send + Sync;
    /// The topic, for logs.
    fn topic(&self) -> &str;
    /// Take what the next request runs on.
    fn snapshot(&self) -> Self::Snapshot;
    /// The snapshot's version number, for logs.
    fn version(snapshot: &Self::Snapshot) -> Option<u64>;
    /// Produce the results (or the failure) for a decoded request, and the sandbox they came
    /// from, dropped once they are sent.
    fn serve(
        &self,
        dispatcher: &Dispatcher,
        snapshot: &Self::Snapshot,
        request: &Request,
        series: &TopicSeries,
    ) -> impl std::future::Future<Output = (Answer, Spent)> + Send;
    /// `method` as a metric label: itself if `snapshot` can call it, `-` otherwise (labels
    /// must stay few).
    fn method_label<'a>(&self, snapshot: &Self::Snapshot, method: &'a str) -> &'a str;
}

impl Service for Handler {
    type Snapshot = Arc<Version>;

    fn topic(&self) -> &str {
        &self.topic
    }

    fn snapshot(&self) -> Arc<Version> {
        self.current()
    }

    fn version(snapshot: &Arc<Version>) -> Option<u64> {
        Some(snapshot.id)
    }

    fn method_label<'a>(&self, version: &Arc<Version>, method: &'a str) -> &'a str {
        if version.module.has_method(method) {
            method
        } else {
            "-"
        }
    }

    async fn serve(
        &self,
        dispatcher: &Dispatcher,
        version: &Arc<Version>,
        request: &Request,
        series: &TopicSeries,
    ) -> (Answer, Spent) {
        let _running = series.running();
        let started = Instant::now();
        let (outcome, spent) = dispatcher.invoke(self, &version.module, request).await;
        if version.module.has_method(&request.method) {
            series.invocation(&request.method, started.elapsed().as_secs_f64());
        }
        self.stats.record(outcome.is_ok());
        (outcome, spent)
    }
}

/// Shared by every consumer of the daemon.
pub struct Dispatcher {
    runtime: Arc<Runtime>,
    /// The publisher of the current broker connection; `None` while reconnecting.
    link: ArcSwapOption<Link>,
    /// Wakes replies waiting for a link.
    link_changed: Notify,
    metrics: Arc<Metrics>,
    /// Bounds invocations running at once across all handlers; deliveries wait for a permit
    /// while still unacked, so prefetch, not memory, is what the backlog costs.
    invocations: Arc<Semaphore>,
    dedup: Mutex<Dedup>,
    max_message_bytes: usize,
    limits: wire::Limits,
    max_deliveries: u32,
    dead_letter_exchange: Option<String>,
    /// Sends guests' outbound RPC; `None` makes every outbound request `Unavailable`.
    outbound: Option<Arc<crate::outbound::Sender>>,
}

/// A publisher and the token that reports its connection lost.
pub struct Link {
    /// Confirmed publishing on the current publish connection.
    pub publisher: Publisher,
    /// Cancelled by whoever sees the connection fail; the daemon then reconnects.
    pub lost: CancellationToken,
}

/// Settings the dispatcher needs from the config.
pub struct DispatchSettings {
    /// Invocations at once.
    pub concurrency: usize,
    /// Remembered `_unique_id`s.
    pub dedup_window: usize,
    /// Largest body accepted.
    pub max_message_bytes: usize,
    /// Deliveries after which a request is dead-lettered instead of run.
    pub max_deliveries: u32,
    /// Where poison requests and crashed casts go.
    pub dead_letter_exchange: Option<String>,
    /// Sends guests' outbound RPC.
    pub outbound: Option<Arc<crate::outbound::Sender>>,
}

impl Dispatcher {
    /// A dispatcher invoking on `runtime`; it replies once [`Dispatcher::set_link`] gave it a
    /// publisher.
    pub fn new(runtime: Arc<Runtime>, settings: &DispatchSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            runtime,
            link: ArcSwapOption::empty(),
            link_changed: Notify::new(),
            metrics,
            invocations: Arc::new(Semaphore::new(settings.concurrency)),
            dedup: Mutex::new(Dedup::new(settings.dedup_window)),
            max_message_bytes: settings.max_message_bytes,
            limits: wire::Limits::DEFAULT,
            max_deliveries: settings.max_deliveries,
            dead_letter_exchange: settings.dead_letter_exchange.clone(),
            outbound: settings.outbound.clone(),
        }
    }

    /// Publish through `link` from now on (`None` while reconnecting).
    pub fn set_link(&self, link: Option<Link>) {
        self.link.store(link.map(Arc::new));
        self.link_changed.notify_waiters();
    }

    /// Publish with confirms on the current link, waiting (bounded) for one while the daemon
    /// reconnects. A broker failure marks the link lost, which makes the daemon reconnect.
    async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        options: &PublishOptions,
    ) -> Result<Published, AmqpError> {
        self.publish_then(
            exchange,
            key,
            body,
            options,
            Spent::none(),
            &mut Next::none(),
        )
        .await
    }

    /// [`Dispatcher::publish`], releasing `spent` ([`Spent::release`]) into `next` as soon as
    /// the message is on its way, or before waiting for a link.
    async fn publish_then(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        options: &PublishOptions,
        spent: Spent,
        next: &mut Next,
    ) -> Result<Published, AmqpError> {
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        let mut spent = Some(spent);
        let link = loop {
            let changed = self.link_changed.notified();
            if let Some(link) = self.link.load_full().filter(|l| !l.lost.is_cancelled()) {
                break link;
            }
            // A spent sandbox holds a pool slot; it must not wait out a reconnection.
            if let Some(spent) = spent.take() {
                *next = spent.release();
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(AmqpError::NotConnected(LINK_WAIT));
            }
        };
        let published = link
            .publisher
            .publish_then(exchange, key, body, options, || {
                if let Some(spent) = spent {
                    *next = spent.release();
                }
            })
            .await;
        if let Err(AmqpError::Broker { .. }) = &published {
            link.lost.cancel();
        }
        published
    }

    /// Handle one delivery from a queue of `handler` and settle it (ack or reject). Never
    /// panics and never returns an error: every outcome is logged here.
    pub async fn handle<S: Service>(&self, service: &S, delivery: &Delivery) {
        let tag = delivery.tag();
        let topic = service.topic();
        let series = self.metrics.topic(topic);
        let _held = series.holding();
        match self.admit(delivery) {
            Ok(request) => {
                let snapshot = service.snapshot();
                let version = S::version(&snapshot);
                // Every line logged about this delivery carries these fields. Most deliveries
                // log nothing, so the span is made only for the first line (`log::lazy`).
                let span = LazySpan::new(|| {
                    tracing::info_span!("delivery", topic = %topic, tag,
                        method = truncate(&request.method, 64),
                        msg_id = request.msg_id.as_deref(),
                        unique_id = request.unique_id.as_deref(),
                        version)
                });
                let mut next = Next::none();
                let serving =
                    self.serve_request(service, &snapshot, delivery, &request, &series, &mut next);
                let settle = Scoped::new(&span, serving).await;
                self.settle(delivery, settle, &span).await;
                drop(_held);
                self.prepare(next, topic).await;
            }
            Err(refused) => {
                let span = LazySpan::new(|| tracing::info_span!("delivery", topic = %topic, tag));
                span.span().in_scope(|| refused.log());
                self.metrics.request(topic, "-", Outcome::Rejected, "");
                self.settle(delivery, Settle::Reject, &span).await;
            }
        }
    }

    /// Make the next sandbox of the handler that just answered (see [`Next::prepare`]): only
    /// now, once the call is answered and settled, so that nothing of it waits for this.
    async fn prepare(&self, next: Next, topic: &str) {
        let preparing = std::panic::AssertUnwindSafe(next.prepare(&self.runtime));
        if preparing.catch_unwind().await.is_err() {
            tracing::error!(
                topic,
                "making a handler's next sandbox panicked; its next call makes its own"
            );
        }
    }

    /// Ack or reject a delivery and, once an ack went out, remember its `_unique_id`.
    async fn settle(&self, delivery: &Delivery, settle: Settle, span: &dyn SpanSource) {
        // Settling is not polled in the delivery's span: its two warnings enter it themselves.
        let settled = settle_delivery(delivery, &settle, span).await;
        if !settled {
            self.metrics.stale_settle();
        }
        // Remember the id only once the ack went out: a redelivery of a request whose ack
        // was lost must be answered again, not dropped.
        if let (
            true,
            Settle::Ack {
                unique_id: Some(key),
            },
        ) = (settled, settle)
            && let Ok(mut dedup) = self.dedup.lock()
        {
            dedup.insert_key(key);
        }
    }

    /// Check and decode a delivery; a refused one is rejected unread.
    fn admit(&self, delivery: &Delivery) -> Result<Request, Refused> {
        let body = delivery.body();
        if body.len() > self.max_message_bytes {
            return Err(Refused::TooBig {
                size: body.len(),
                cap: self.max_message_bytes,
            });
        }
        if let Some(ct) = delivery.content_type()
            && !ct.eq_ignore_ascii_case("application/json")
        {
            return Err(Refused::NotJson(truncate(ct, 64).to_owned()));
        }
        let mut request = match wire::decode_request_with(body, &self.limits) {
            Ok(r) => r,
            Err(e) => {
                return Err(Refused::Undecodable {
                    error: e.to_string(),
                    size: body.len(),
                });
            }
        };
        // The broker-validated sender, under a key no message can set: `_context_*` fields are
        // the caller's claims, this is the only identity a handler can trust.
        request.context.remove(USER_ID_KEY);
        if let Some(user) = delivery.user_id() {
            request.context.insert(USER_ID_KEY.to_owned(), user.into());
        }
        Ok(request)
    }

    /// Serve an admitted request and say how to settle its delivery.
    async fn serve_request<S: Service>(
        &self,
        service: &S,
        snapshot: &S::Snapshot,
        delivery: &Delivery,
        request: &Request,
        series: &TopicSeries,
        next: &mut Next,
    ) -> Settle {
        let topic = service.topic();
        // Parsed once: looked up now, remembered once the ack is out.
        let unique_id = request.unique_id.as_deref().map(DedupKey::of);
        if let Some(key) = &unique_id
            && self
                .dedup
                .lock()
                .map(|d| d.contains_key(key))
                .unwrap_or(false)
        {
            in_span!(
                Level::INFO,
                "duplicate message dropped (same _unique_id already handled)"
            );
            self.metrics.request(topic, "-", Outcome::Duplicate, "");
            return Settle::Ack { unique_id: None };
        }
        let method = service.method_label(snapshot, &request.method);

        let deliveries = self.deliveries(topic, delivery);
        if deliveries > self.max_deliveries {
            self.metrics
                .request(topic, method, Outcome::Poison, POISON_CLASS);
            return self.poison(topic, delivery, request, deliveries).await;
        }

        let (outcome, spent) = service.serve(self, snapshot, request, series).await;
        match &outcome {
            Ok(_) => series.succeeded(method),
            Err(f) => {
                self.metrics
                    .request(topic, method, Outcome::of_class(&f.class), &f.class);
                if request.wants_reply() {
                    in_span!(Level::INFO, class = %f.class, error = %f.message, "handler failed; failure sent to caller");
                } else {
                    in_span!(Level::WARN, class = %f.class, error = %f.message, "cast handler failed");
                }
            }
        }
        if !request.wants_reply()
            && let Err(f) = &outcome
            && crashed(&f.class)
            && let Some(dlx) = &self.dead_letter_exchange
        {
            let reason = format!("{}: {}", f.class, truncate(&f.message, 512));
            if let Err(e) = self
                .dead_letter(dlx, topic, delivery, &f.class, &reason, deliveries)
                .await
            {
                in_span!(Level::ERROR, error = %e, "crashed cast could not be dead-lettered; requeued");
                return Settle::Requeue;
            }
            self.metrics.dead_lettered(topic, "crashed_cast");
        }
        if request.wants_reply()
            && let Err(e) = self.reply(request, outcome, spent, next).await
        {
            in_span!(Level::ERROR, error = %e, "reply could not be published; request requeued");
            return Settle::Requeue;
        }
        Settle::Ack { unique_id }
    }

    /// Which delivery of this message this is (1 for the first), from the `x-delivery-count`
    /// that quorum queues keep. Classic queues only say "redelivered", and a count kept here
    /// would both vanish with a crashed daemon (the case that matters) and grow with our own
    /// reconnections (which are not the message's fault), so there the count stays unknown.
    fn deliveries(&self, topic: &str, delivery: &Delivery) -> u32 {
        if delivery.redelivered() {
            self.metrics.redelivered(topic);
        }
        delivery.delivery_count().map_or(1, |n| {
            u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX)
        })
    }

    /// Take a message delivered too often out of circulation: dead-letter it (or, without a
    /// dead-letter exchange, answer a call with a failure), log it, and ack it.
    async fn poison(
        &self,
        topic: &str,
        delivery: &Delivery,
        request: &Request,
        deliveries: u32,
    ) -> Settle {
        let reason = format!(
            "delivered {deliveries} times without completing (max_deliveries = {})",
            self.max_deliveries
        );
        match &self.dead_letter_exchange {
            Some(dlx) => {
                if let Err(e) = self
                    .dead_letter(dlx, topic, delivery, POISON_CLASS, &reason, deliveries)
                    .await
                {
                    in_span!(Level::ERROR, error = %e, "poison message could not be dead-lettered; requeued");
                    return Settle::Requeue;
                }
                in_span!(Level::ERROR, %reason, dead_letter_exchange = %dlx, "poison message dead-lettered");
            }
            None => {
                in_span!(Level::ERROR, %reason, "poison message dropped (no dead_letter_exchange configured)")
            }
        }
        self.metrics.dead_lettered(topic, "poison");
        if request.wants_reply() {
            let failure = Failure::new(POISON_CLASS, reason);
            if let Err(e) = self
                .reply(request, Err(failure), Spent::none(), &mut Next::none())
                .await
            {
                in_span!(Level::WARN, error = %e, "failure reply for a poison message not sent");
            }
        }
        Settle::Ack {
            unique_id: request.unique_id.as_deref().map(DedupKey::of),
        }
    }

    /// Publish the message, unchanged, to the dead-letter exchange under its routing key, with
    /// why in its headers.
    async fn dead_letter(
        &self,
        dlx: &str,
        topic: &str,
        delivery: &Delivery,
        class: &str,
        reason: &str,
        deliveries: u32,
    ) -> Result<(), AmqpError> {
        let options = PublishOptions {
            mandatory: true,
            persistent: true,
            expiration_ms: None,
            user_id: None,
            headers: vec![
                ("x-warren-reason".into(), Header::Text(reason.to_owned())),
                ("x-warren-topic".into(), Header::Text(topic.to_owned())),
                (
                    "x-warren-class".into(),
                    Header::Text(truncate(class, 64).to_owned()),
                ),
                (
                    "x-warren-deliveries".into(),
                    Header::Int(i64::from(deliveries)),
                ),
                (
                    "x-warren-exchange".into(),
                    Header::Text(delivery.exchange().to_owned()),
                ),
            ],
        };
        match self
            .publish(dlx, delivery.routing_key(), delivery.body(), &options)
            .await?
        {
            Published::Confirmed => Ok(()),
            Published::Returned { code, text } => Err(AmqpError::Unroutable { code, text }),
            Published::Nacked => Err(AmqpError::Unroutable {
                code: 0,
                text: "nacked by the broker".into(),
            }),
        }
    }

    /// Run the request's method on `module` in a sandbox: in this task, yielding the worker at
    /// every epoch tick, or, for a guest granted outbound RPC (whose requests block until
    /// answered), on a blocking thread. Hands back the spent sandbox of the first kind, for
    /// the caller to drop once the reply is on its way; the second drops its own there.
    pub async fn invoke(
        &self,
        handler: &Handler,
        module: &crate::runtime::Module,
        request: &Request,
    ) -> (Answer, Spent) {
        match self.invoke_keeping(handler, module, request).await {
            Ok((answer, spent)) => (answer, spent),
            Err(failure) => (Err(failure), Spent::none()),
        }
    }

    /// [`Dispatcher::invoke`], failing early (`Err`) where no sandbox was made.
    async fn invoke_keeping(
        &self,
        handler: &Handler,
        module: &crate::runtime::Module,
        request: &Request,
    ) -> Result<(Answer, Spent), Failure> {
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
        let limits = &handler.limits;
        let heartbeat = request
            .heartbeat_interval()
            .zip(request.reply_routing_key())
            .zip(request.msg_id.as_deref())
            .map(|((every, key), msg_id)| (every, key, msg_id));
        if let (Some(sender), Some(_)) = (&self.outbound, &limits.rpc) {
            let work = self.invoke_blocking(module, request, context, limits, sender, permit);
            let answer = self
                .with_heartbeats(work, heartbeat, request.enveloped)
                .await;
            return Ok((answer, Spent::none()));
        }
        // The hot path: no thread hop. The guest's fiber yields at every epoch tick, so even a
        // long invocation holds this worker for one tick at a time.
        let _permit = permit;
        let work =
            self.runtime
                .invoke_keeping(module, &request.method, &request.args, context, limits);
        // A panic in the runtime fails this request with a reply, as a crashed blocking task
        // would, rather than unwinding through the delivery.
        let work = std::panic::AssertUnwindSafe(work).catch_unwind();
        match self
            .with_heartbeats(work, heartbeat, request.enveloped)
            .await
        {
            Ok(kept) => Ok(kept),
            Err(_) => Err(Failure::new(class::INTERNAL, "invocation panicked")),
        }
    }

    /// An invocation whose outbound requests block its thread while they wait: it runs on a
    /// blocking thread and lends its permit back while it waits.
    fn invoke_blocking(
        &self,
        module: &crate::runtime::Module,
        request: &Request,
        context: Arc<[u8]>,
        limits: &crate::runtime::Limits,
        sender: &Arc<crate::outbound::Sender>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> impl std::future::Future<Output = Result<Vec<Box<RawValue>>, Failure>> + use<> {
        let runtime = self.runtime.clone();
        let module = module.clone();
        let method = request.method.clone();
        let args = request.args.clone();
        let limits = limits.clone();
        let span = crate::log::lazy::current_or_ambient();
        let slots = self.invocations.clone();
        let outbound = crate::outbound::Invocation::new(sender.clone(), slots, permit);
        let work = tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let outbound = Arc::new(outbound) as Arc<dyn crate::runtime::Outbound>;
            runtime.invoke_with(&module, &method, &args, context, &limits, Some(outbound))
        });
        async move {
            work.await.unwrap_or_else(|e| {
                Err(Failure::new(
                    class::INTERNAL,
                    format!("invocation task failed: {e}"),
                ))
            })
        }
    }

    /// Run `work`, sending oslo call-monitor heartbeats every `every` to `key` meanwhile when
    /// the caller asked for them.
    ///
    /// Not an `async fn`: that would keep `work` twice in its state (as the argument and as
    /// what it awaits, rust-lang/rust#62958), and the heartbeat loop, which holds a publish
    /// beside the work, is boxed. Every delivery's task is allocated and copied per message,
    /// and these two made it three times larger.
    fn with_heartbeats<'a, T, F>(
        &'a self,
        work: F,
        heartbeat: Option<(Duration, &'a str, &'a str)>,
        enveloped: bool,
    ) -> impl std::future::Future<Output = T> + use<'a, T, F>
    where
        F: std::future::Future<Output = T> + 'a,
    {
        match heartbeat {
            None => Either::Left(work),
            Some(heartbeat) => Either::Right(Box::pin(self.heartbeats(work, heartbeat, enveloped))),
        }
    }

    async fn heartbeats<T>(
        &self,
        work: impl std::future::Future<Output = T>,
        (every, key, msg_id): (Duration, &str, &str),
        enveloped: bool,
    ) -> T {
        let mut work = std::pin::pin!(work);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = ticker.tick() => {
                    let body = wire::encode_heartbeat(msg_id, enveloped);
                    if let Err(e) = self.publish("", key, &body, &reply_options()).await {
                        in_span!(Level::WARN, error = %e, "call-monitor heartbeat not sent");
                    }
                }
            }
        }
    }

    /// Publish the reply (or replies) to `request`; `spent` is released into `next` as soon as
    /// the first is on its way, so that resetting the sandbox does not delay the caller.
    async fn reply(
        &self,
        request: &Request,
        outcome: Answer,
        spent: Spent,
        next: &mut Next,
    ) -> Result<(), AmqpError> {
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
        let mut spent = Some(spent);
        for body in bodies {
            let spent = spent.take().unwrap_or_else(Spent::none);
            let published = self
                .publish_then("", key, &body, &reply_options(), spent, next)
                .await;
            match published {
                Ok(Published::Confirmed) => self.metrics.reply("confirmed"),
                Ok(Published::Returned { code, text }) => {
                    self.metrics.reply("returned");
                    in_span!(Level::WARN, reply_to = key, code, %text, "caller is gone; reply dropped");
                    return Ok(());
                }
                Ok(Published::Nacked) => {
                    self.metrics.reply("nacked");
                    in_span!(
                        Level::WARN,
                        reply_to = key,
                        "broker refused the reply; dropped"
                    );
                    return Ok(());
                }
                Err(e) => {
                    self.metrics.reply("failed");
                    return Err(e);
                }
            }
        }
        in_span!(Level::DEBUG, reply_to = key, "replied");
        Ok(())
    }
}

fn reply_options() -> PublishOptions {
    PublishOptions {
        mandatory: true,
        persistent: false,
        expiration_ms: None,
        user_id: None,
        headers: Vec::new(),
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
    Ack { unique_id: Option<DedupKey> },
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
async fn settle_delivery(delivery: &Delivery, settle: &Settle, span: &dyn SpanSource) -> bool {
    let result = match settle {
        Settle::Ack { .. } => delivery.ack().await,
        Settle::Reject => delivery.reject(false).await,
        Settle::Requeue => delivery.reject(true).await,
    };
    match result {
        Ok(true) => true,
        // The channel died since the delivery arrived: the broker will redeliver it.
        Ok(false) => {
            span.span().in_scope(|| {
                warn!(
                    settle = settle.as_str(),
                    "stale delivery (its channel is gone); the broker will redeliver it"
                );
            });
            false
        }
        Err(e) => {
            span.span().in_scope(|| {
                warn!(settle = settle.as_str(), error = %e, "could not settle delivery; the broker will redeliver it");
            });
            false
        }
    }
}

/// Why a delivery was rejected before it was decoded.
enum Refused {
    TooBig { size: usize, cap: usize },
    NotJson(String),
    Undecodable { error: String, size: usize },
}

impl Refused {
    fn log(&self) {
        match self {
            Refused::TooBig { size, cap } => {
                warn!(size, cap, "message over the size cap rejected unread");
            }
            Refused::NotJson(content_type) => {
                warn!(%content_type, "message with a non-JSON content type rejected");
            }
            Refused::Undecodable { error, size } => {
                warn!(%error, size, "undecodable message rejected");
            }
        }
    }
}

/// Largest dedup set reserved up front (entries); a larger window grows as it fills.
const MAX_DEDUP_PRESIZE: usize = 1 << 17;

/// Recently handled `_unique_id`s, oldest evicted first.
struct Dedup {
    /// Keys are the senders' choice, so the hash is seeded per process.
    seen: HashSet<DedupKey, foldhash::quality::RandomState>,
    order: VecDeque<DedupKey>,
    cap: usize,
}

/// A `_unique_id` as [`Dedup`] keeps it. oslo's are `uuid.uuid4().hex`, 32 lowercase hex
/// digits, kept as the number they spell: it is looked up twice per message, and a number
/// needs no allocation and hashes in half the bytes. Any other id is kept as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DedupKey {
    Hex(u128),
    Text(Box<str>),
}

impl DedupKey {
    fn of(id: &str) -> Self {
        if id.len() != 32 {
            return Self::Text(id.into());
        }
        // One pass, digits checked and folded together (a check, then `from_str_radix`, took
        // three times as long). Lowercase only: `ABC…` and `abc…` are different ids and must
        // stay apart.
        let (high, low) = id.as_bytes().split_at(16);
        match (hex_u64(high), hex_u64(low)) {
            (Some(high), Some(low)) => Self::Hex(u128::from(high) << 64 | u128::from(low)),
            _ => Self::Text(id.into()),
        }
    }
}

/// 16 lowercase hex digits as a number (in halves: 64-bit steps cost half of 128-bit ones).
fn hex_u64(digits: &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for &byte in digits {
        let digit = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            _ => return None,
        };
        n = n << 4 | u64::from(digit);
    }
    Some(n)
}

impl Dedup {
    fn new(cap: usize) -> Self {
        Self {
            // Twice the window: every insert past it also removes, and the tombstones that
            // leaves make the set rehash itself once its spare room is used up; twice the
            // room makes that rare.
            seen: HashSet::with_capacity_and_hasher(
                cap.saturating_mul(2).min(MAX_DEDUP_PRESIZE),
                foldhash::quality::RandomState::default(),
            ),
            order: VecDeque::new(),
            cap,
        }
    }

    fn contains_key(&self, key: &DedupKey) -> bool {
        self.seen.contains(key)
    }

    fn insert_key(&mut self, key: DedupKey) {
        if self.cap == 0 {
            return;
        }
        if !self.seen.insert(key.clone()) {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }
}

/// Whether a failure of `class` means the guest crashed rather than answered.
fn crashed(class: &str) -> bool {
    matches!(
        class,
        class::GUEST_TRAP | class::TIMEOUT | class::MEMORY_LIMIT_EXCEEDED
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    impl Dedup {
        fn contains(&self, id: &str) -> bool {
            self.contains_key(&DedupKey::of(id))
        }

        fn insert(&mut self, id: &str) {
            self.insert_key(DedupKey::of(id));
        }
    }

    #[test]
    fn dedup_remembers_the_last_cap_ids_and_forgets_older_ones() {
        let mut dedup = Dedup::new(2);
        dedup.insert(A);
        dedup.insert("not-hex");
        assert!(dedup.contains(A) && dedup.contains("not-hex"));
        dedup.insert(A); // already there: not a new entry, evicts nothing
        assert!(dedup.contains("not-hex"));
        dedup.insert(B);
        assert!(!dedup.contains(A), "the oldest is evicted");
        assert!(dedup.contains("not-hex") && dedup.contains(B));
    }

    #[test]
    fn dedup_keeps_ids_apart_that_spell_the_same_number_differently() {
        let mut dedup = Dedup::new(10);
        dedup.insert(A);
        assert!(!dedup.contains(&A.to_uppercase()));
        assert!(!dedup.contains(&A[1..]), "31 digits");
        assert!(!dedup.contains(&format!("0{A}")), "33 digits");
        assert!(!dedup.contains(&format!("+{}", &A[1..])));
        let last_not_hex = format!("{}g", &A[..31]);
        assert_eq!(
            DedupKey::of(&last_not_hex),
            DedupKey::Text(last_not_hex.clone().into())
        );
        assert_eq!(
            DedupKey::of(A),
            DedupKey::Hex(0x0123456789abcdef0123456789abcdef)
        );
        assert_eq!(
            DedupKey::of(&A.to_uppercase()),
            DedupKey::Text(A.to_uppercase().into())
        );
    }

    #[test]
    fn dedup_with_no_window_remembers_nothing() {
        let mut dedup = Dedup::new(0);
        dedup.insert(A);
        assert!(!dedup.contains(A));
    }
}
