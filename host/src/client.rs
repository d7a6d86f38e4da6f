//! The RPC client for Rust programs and the CLI: `call`, `multicall`, `cast`, `fanout_cast` and
//! `notify`, speaking the same wire format as oslo.messaging's `RPCClient` and `Notifier`.
//!
//! One client is one connection with one reply queue (`reply_<uuid hex>`), as oslo does per
//! process. A background task consumes the reply queue and routes each reply by `_msg_id` to the
//! call waiting for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::debug;

use crate::amqp::{
    AmqpError, Channel, Connection, Kind, PublishOptions, Published, Publisher, QueueSpec, Tls,
};
use crate::wire::{self, OutgoingRequest, RemoteError, Reply};

/// Where a request goes: every server of a topic, or one server.
#[derive(Debug, Clone)]
pub struct Target {
    /// The topic.
    pub topic: String,
    /// A server name, for `<topic>.<server>` routing.
    pub server: Option<String>,
}

impl Target {
    /// Any server of `topic`.
    pub fn topic(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            server: None,
        }
    }

    /// The routing key on the control exchange.
    pub fn routing_key(&self) -> String {
        match &self.server {
            Some(server) => format!("{}.{server}", self.topic),
            None => self.topic.clone(),
        }
    }
}

/// Why a call did not return a result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No reply in time (oslo's `MessagingTimeout`).
    #[error("timed out after {after:?} waiting for a reply to message ID {msg_id}")]
    Timeout {
        /// The call's `_msg_id`.
        msg_id: String,
        /// How long we waited.
        after: Duration,
    },
    /// The handler (or the server) failed; this is its error.
    #[error("remote error: {} {}", .0.class, .0.message)]
    Remote(RemoteError),
    /// Nothing is bound to the routing key: no server listens on the topic.
    #[error(
        "no queue is bound to '{key}' on exchange '{exchange}': is a server listening on that topic?"
    )]
    NoRoute {
        /// The exchange.
        exchange: String,
        /// The routing key.
        key: String,
    },
    /// The broker refused the message.
    #[error("the broker refused the message (nack)")]
    Refused,
    /// The connection or channel failed.
    #[error(transparent)]
    Broker(#[from] AmqpError),
    /// A reply we could not decode.
    #[error("undecodable reply: {0}")]
    BadReply(String),
    /// The reply consumer stopped (connection lost).
    #[error("reply queue consumer stopped; the connection was lost")]
    ReplyConsumerGone,
}

/// Replies routed to calls in flight. Each sender is unbounded: a call gets one reply (or, from
/// pre-2015 servers, a result and an ending), so what bounds it is the number of calls in flight.
type Waiters = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Reply>>>>;

/// A client. It connects on first use and again, with a fresh reply queue, after the connection
/// is lost: calls in flight at that moment fail with [`CallError::ReplyConsumerGone`], later
/// calls go out on the new connection.
pub struct Client {
    url: String,
    tls: Tls,
    exchange: String,
    /// The login user, sent as `user_id` (RabbitMQ refuses the message if it does not match).
    user: Option<String>,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
}

/// One connection and its reply queue.
struct Link {
    conn: Connection,
    publisher: Publisher,
    reply_queue: String,
    waiters: Waiters,
    reply_task: tokio::task::JoinHandle<()>,
}

impl Link {
    async fn open(url: &str, exchange: &str, tls: &Tls) -> Result<Link, CallError> {
        let conn = Connection::open_tls(url, "warren-client", 15, tls).await?;
        let publisher = conn.channel().await?.into_publisher().await?;
        ensure_exchange(&conn, exchange, Kind::Topic, false).await?;
        // A fresh name on every connection: the old exclusive queue may not be gone yet, and
        // re-declaring it would fail with RESOURCE_LOCKED.
        let reply_queue = format!("reply_{}", wire::new_id());
        let replies = conn.channel().await?;
        // Exclusive: the queue is this client's alone and vanishes with its connection.
        let spec = QueueSpec {
            exclusive: true,
            auto_delete: true,
            ..QueueSpec::default()
        };
        replies.declare_queue(&reply_queue, &spec).await?;
        let consumer = replies.consume(&reply_queue, &reply_queue).await?;
        let waiters: Waiters = Arc::default();
        let reply_task = tokio::spawn(route_replies(consumer, waiters.clone()));
        Ok(Link {
            conn,
            publisher,
            reply_queue,
            waiters,
            reply_task,
        })
    }

    fn usable(&self) -> bool {
        self.conn.is_connected() && !self.reply_task.is_finished()
    }
}

impl Client {
    /// Connect to `url` and use `exchange` as the control exchange.
    pub async fn connect(url: &str, exchange: &str) -> Result<Client, CallError> {
        Self::connect_tls(url, exchange, &Tls::default()).await
    }

    /// As [`Client::connect`], with TLS settings for an `amqps://` URL.
    pub async fn connect_tls(url: &str, exchange: &str, tls: &Tls) -> Result<Client, CallError> {
        let link = Link::open(url, exchange, tls).await?;
        let client = Self::lazy(url, exchange, tls);
        *client.link.lock().await = Some(Arc::new(link));
        Ok(client)
    }

    /// A client that connects on first use (and reconnects the same way after a loss), for a
    /// process that may never send anything.
    pub fn lazy(url: &str, exchange: &str, tls: &Tls) -> Client {
        Client {
            url: url.to_owned(),
            tls: tls.clone(),
            exchange: exchange.to_owned(),
            user: crate::amqp::login_user(url),
            link: tokio::sync::Mutex::new(None),
        }
    }

    /// The live connection, reconnecting first if the last one was lost.
    async fn link(&self) -> Result<Arc<Link>, CallError> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref().filter(|l| l.usable()) {
            return Ok(link.clone());
        }
        if let Some(old) = slot.take() {
            old.reply_task.abort();
            debug!("client connection lost; reconnecting");
        }
        let link = Arc::new(Link::open(&self.url, &self.exchange, &self.tls).await?);
        *slot = Some(link.clone());
        Ok(link)
    }

    /// The reply queue of the current connection (a new one after a reconnect).
    pub async fn reply_queue(&self) -> Result<String, CallError> {
        Ok(self.link().await?.reply_queue.clone())
    }

    /// Call `method` and wait up to `timeout` for its result. Against a streaming handler this
    /// is the last result (nova's `call`).
    pub async fn call(
        &self,
        target: &Target,
        method: &str,
        args: &RawValue,
        context: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<Box<RawValue>, CallError> {
        let link = self.link().await?;
        let msg_id = wire::new_id();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _guard = register(&link.waiters, &msg_id, tx);
        let body = wire::encode_request(
            &OutgoingRequest::call(method, args, context, &msg_id, Some(&link.reply_queue)),
            &wire::new_id(),
        );
        self.publish_call(&link, target, &body, timeout).await?;
        let wait = async {
            let mut last: Option<Box<RawValue>> = None;
            while let Some(reply) = rx.recv().await {
                if let Some(failure) = reply.failure {
                    return Err(CallError::Remote(failure));
                }
                if let Some(result) = reply.result {
                    last = Some(result);
                }
                if reply.ending {
                    return Ok(last.unwrap_or_else(null));
                }
                // Otherwise a result without ending (pre-2015 servers) or a call-monitor
                // heartbeat: keep waiting.
            }
            Err(CallError::ReplyConsumerGone)
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| CallError::Timeout {
                msg_id: msg_id.clone(),
                after: timeout,
            })?
    }

    /// nova's `multicall`: every result of a streaming handler, as it arrives. It speaks the
    /// nova (Essex) dialect (a flat request without `_reply_q`, replies on a queue named after
    /// `_msg_id`), which oslo.messaging servers no longer accept; Warren and nova-era servers do.
    pub async fn multicall(
        &self,
        target: &Target,
        method: &str,
        args: &RawValue,
        context: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<mpsc::Receiver<Result<Box<RawValue>, CallError>>, CallError> {
        let link = self.link().await?;
        let msg_id = wire::new_id();
        let channel = link.conn.channel().await?;
        let spec = QueueSpec {
            exclusive: true,
            auto_delete: true,
            ..QueueSpec::default()
        };
        channel.declare_queue(&msg_id, &spec).await?;
        let mut consumer = channel.consume(&msg_id, &msg_id).await?;
        let body = wire::encode_request_flat(
            &OutgoingRequest::call(method, args, context, &msg_id, None),
            &wire::new_id(),
        );
        self.publish_call(&link, target, &body, timeout).await?;
        // Bounded: the caller reads results as they come; a slow reader slows our acks.
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let next = match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(Ok(d))) => d,
                    Ok(Some(Err(e))) => {
                        let _ = tx.send(Err(CallError::Broker(e))).await;
                        break;
                    }
                    Ok(None) => {
                        let _ = tx.send(Err(CallError::ReplyConsumerGone)).await;
                        break;
                    }
                    Err(_) => {
                        let _ = tx
                            .send(Err(CallError::Timeout {
                                msg_id: msg_id.clone(),
                                after: timeout,
                            }))
                            .await;
                        break;
                    }
                };
                let _ = next.ack().await;
                match wire::decode_reply(next.body()) {
                    Ok(reply) => {
                        if let Some(f) = reply.failure {
                            let _ = tx.send(Err(CallError::Remote(f))).await;
                            break;
                        }
                        if reply.ending {
                            break;
                        }
                        if let Some(r) = reply.result
                            && tx.send(Ok(r)).await.is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(CallError::BadReply(e.to_string()))).await;
                        break;
                    }
                }
            }
            channel.close().await;
        });
        Ok(rx)
    }

    /// Fire and forget to `target`.
    pub async fn cast(
        &self,
        target: &Target,
        method: &str,
        args: &RawValue,
        context: &Map<String, Value>,
    ) -> Result<(), CallError> {
        let body = encode_cast(method, args, context);
        let options = PublishOptions {
            mandatory: true,
            persistent: true,
            expiration_ms: None,
            user_id: None,
            headers: Vec::new(),
        };
        self.publish(&self.exchange, &target.routing_key(), &body, &options)
            .await
    }

    /// Cast to every server of `topic` (its `<topic>_fanout` exchange).
    pub async fn fanout_cast(
        &self,
        topic: &str,
        method: &str,
        args: &RawValue,
        context: &Map<String, Value>,
    ) -> Result<(), CallError> {
        let exchange = format!("{topic}_fanout");
        ensure_exchange(&self.link().await?.conn, &exchange, Kind::Fanout, true).await?;
        let body = encode_cast(method, args, context);
        let options = PublishOptions {
            mandatory: true,
            persistent: false,
            expiration_ms: None,
            user_id: None,
            headers: Vec::new(),
        };
        self.publish(&exchange, topic, &body, &options).await
    }

    /// Publish an oslo notification (`messagingv2` format) on `<topic>.<priority>`, declaring
    /// that queue first as oslo does, so notifications wait for a consumer.
    pub async fn notify(&self, notification: &Notification<'_>) -> Result<(), CallError> {
        let priority = notification.priority.to_ascii_lowercase();
        let key = format!("{}.{priority}", notification.topic);
        let channel = self.link().await?.conn.channel().await?;
        channel.declare_queue(&key, &QueueSpec::default()).await?;
        channel.bind(&key, &self.exchange, &key).await?;
        channel.close().await;
        let body = wire::encode_notification(
            notification.publisher_id,
            notification.event_type,
            &notification.priority.to_ascii_uppercase(),
            notification.payload,
            notification.context,
            true,
        );
        let options = PublishOptions {
            mandatory: true,
            persistent: true,
            expiration_ms: None,
            user_id: None,
            headers: Vec::new(),
        };
        self.publish(&self.exchange, &key, &body, &options).await
    }

    /// Close the connection.
    pub async fn close(self) {
        self.disconnect().await;
    }

    /// Close the connection, if one is open; the next request opens a new one.
    pub async fn disconnect(&self) {
        if let Some(link) = self.link.lock().await.take() {
            link.reply_task.abort();
            link.conn.close().await;
        }
    }

    /// Every publish carries the connection's user as `user_id`, so servers can trust who sent it.
    async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        options: &PublishOptions,
    ) -> Result<(), CallError> {
        let link = self.link().await?;
        self.publish_on(&link, exchange, key, body, options).await
    }

    /// A call's request: persistent, and expiring with the caller's timeout, so a server
    /// that starts late does not run a call nobody waits for any more.
    async fn publish_call(
        &self,
        link: &Link,
        target: &Target,
        body: &[u8],
        timeout: Duration,
    ) -> Result<(), CallError> {
        let options = PublishOptions {
            mandatory: true,
            persistent: true,
            expiration_ms: Some(timeout.as_millis() as u64),
            ..PublishOptions::default()
        };
        self.publish_on(link, &self.exchange, &target.routing_key(), body, &options)
            .await
    }

    async fn publish_on(
        &self,
        link: &Link,
        exchange: &str,
        key: &str,
        body: &[u8],
        options: &PublishOptions,
    ) -> Result<(), CallError> {
        let options = PublishOptions {
            user_id: self.user.clone(),
            ..options.clone()
        };
        match link
            .publisher
            .publish(exchange, key, body, &options)
            .await?
        {
            Published::Confirmed => Ok(()),
            Published::Returned { .. } => Err(CallError::NoRoute {
                exchange: exchange.to_owned(),
                key: key.to_owned(),
            }),
            Published::Nacked => Err(CallError::Refused),
        }
    }
}

fn register(waiters: &Waiters, msg_id: &str, tx: mpsc::UnboundedSender<Reply>) -> WaiterGuard {
    if let Ok(mut w) = waiters.lock() {
        w.insert(msg_id.to_owned(), tx);
    }
    WaiterGuard {
        waiters: waiters.clone(),
        msg_id: msg_id.to_owned(),
    }
}

/// What `notify` publishes.
pub struct Notification<'a> {
    /// `<service>.<host>`.
    pub publisher_id: &'a str,
    /// e.g. `compute.instance.create.end`.
    pub event_type: &'a str,
    /// `info`, `warn`, `error`, `critical`, `debug`, `audit` or `sample`.
    pub priority: &'a str,
    /// The notification topic (oslo's default is `notifications`).
    pub topic: &'a str,
    /// The payload (a JSON object).
    pub payload: &'a RawValue,
    /// The context.
    pub context: &'a Map<String, Value>,
}

/// Removes a call's waiter however the call ends (result, error, timeout, cancellation).
struct WaiterGuard {
    waiters: Waiters,
    msg_id: String,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(&self.msg_id);
        }
    }
}

fn encode_cast(method: &str, args: &RawValue, context: &Map<String, Value>) -> Vec<u8> {
    wire::encode_request(
        &OutgoingRequest::cast(method, args, context),
        &wire::new_id(),
    )
}

async fn route_replies(mut consumer: crate::amqp::Consumer, waiters: Waiters) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let _ = delivery.ack().await;
        match wire::decode_reply(delivery.body()) {
            Ok(reply) => {
                let waiter = reply
                    .msg_id
                    .as_deref()
                    .and_then(|id| waiters.lock().ok().and_then(|w| w.get(id).cloned()));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(reply);
                    }
                    None => {
                        debug!(msg_id = ?reply.msg_id, "no call waiting for this reply; dropped")
                    }
                }
            }
            Err(e) => debug!(error = %e, "undecodable reply dropped"),
        }
    }
    // Dropping the waiters' senders wakes every pending call with `ReplyConsumerGone`.
    if let Ok(mut w) = waiters.lock() {
        w.clear();
    }
}

/// Declare an exchange unless it exists. A passive check first means we never fight a peer
/// that declared it with other flags (durable vs not), which would close our channel.
async fn ensure_exchange(
    conn: &Connection,
    name: &str,
    kind: Kind,
    auto_delete: bool,
) -> Result<(), AmqpError> {
    let probe: Channel = conn.channel().await?;
    if probe.exchange_exists(name).await {
        probe.close().await;
        return Ok(());
    }
    let channel = conn.channel().await?;
    let result = channel
        .declare_exchange(name, kind, false, auto_delete)
        .await;
    channel.close().await;
    result
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned())
        .unwrap_or_else(|_| unreachable!("`null` is valid JSON"))
}
