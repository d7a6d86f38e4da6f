//! Everything that touches lapin: connections, channels, topology, consumers, and the confirmed
//! publisher. The rest of the crate sees only the small types defined here.
//!
//! Invariant: no other module imports lapin.

mod acks;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, ConnectionProperties, ExchangeKind};

/// How long a publish may wait for the broker's confirm once the message is written. RabbitMQ
/// advises no less than the heartbeat timeout. While a resource alarm blocks the connection the
/// broker reads nothing, so this also bounds how long a publish waits out an alarm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long opening a connection (TCP, TLS and the AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a polite close may wait for the broker's answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The broker or the connection failed.
    #[error("{context}: {source}")]
    Broker {
        /// What we were doing.
        context: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// A name longer than AMQP's 255-byte short string.
    #[error("name too long for AMQP ({0} bytes, at most 255)")]
    NameTooLong(usize),
    /// The broker did not confirm in time (a blocked connection holds confirms back).
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// No broker connection came back in time.
    #[error("not connected to the broker (waited {0:?} for a reconnection)")]
    NotConnected(Duration),
    /// A message that must be routed was returned or refused.
    #[error("message not routed ({code}): {text}")]
    Unroutable {
        /// AMQP reply code (0 for a nack).
        code: u16,
        /// Broker's text.
        text: String,
    },
}

/// For cold paths only: the context is formatted before the call, failed or not. Per-message
/// paths build their error in the closure instead.
fn ctx(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> AmqpError {
    let context = context.into();
    move |source| AmqpError::Broker { context, source }
}

/// A checked AMQP short string. lapin panics on over-long strings, and names can come from
/// messages, so every name goes through here.
pub fn short(s: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(s).map_err(|_| AmqpError::NameTooLong(s.len()))
}

/// One AMQP connection. Cloning shares it.
#[derive(Clone)]
pub struct Connection {
    inner: std::sync::Arc<lapin::Connection>,
}

/// TLS settings for `amqps://` URLs. The broker's certificate is always verified, against the
/// system's roots plus `ca_pem`, and its name against the URL's host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// Extra trusted CA certificates (PEM), e.g. a private CA.
    pub ca_pem: Option<String>,
    /// Client certificate chain (PEM) and its private key (PEM, PKCS#8 or PKCS#1), for brokers
    /// that require one (`fail_if_no_peer_cert`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl Connection {
    /// Connect to `url`; `name` shows in the management UI. `heartbeat` (seconds) is added to
    /// the URL unless it sets one itself.
    pub async fn open(url: &str, name: &str, heartbeat: u16) -> Result<Connection, AmqpError> {
        Self::open_tls(url, name, heartbeat, &Tls::default()).await
    }

    /// As [`Connection::open`], with TLS settings for `amqps://` URLs.
    pub async fn open_tls(
        url: &str,
        name: &str,
        heartbeat: u16,
        tls: &Tls,
    ) -> Result<Connection, AmqpError> {
        let url = with_defaults(url, heartbeat);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let failed = ctx(format!(
            "cannot connect to {}",
            crate::config::redact_url(&url)
        ));
        let config = lapin::tcp::OwnedTLSConfig {
            identity: tls
                .client
                .as_ref()
                .map(|(pem, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: pem.clone(),
                    key: key.clone(),
                }),
            cert_chain: tls.ca_pem.clone(),
        };
        let runtime = lapin::runtime::default_runtime().map_err(ctx("no async runtime"))?;
        let connect = lapin::Connection::connect_with_config(&url, props, config, runtime);
        // Bounded: a broker (or a path to it) that accepts TCP and then says nothing would
        // otherwise hold a reconnection attempt forever.
        let inner = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(r) => r.map_err(failed)?,
            Err(_) => return Err(AmqpError::NotConnected(CONNECT_TIMEOUT)),
        };
        Ok(Connection {
            inner: std::sync::Arc::new(inner),
        })
    }

    /// Open a channel.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        let inner = self
            .inner
            .create_channel()
            .await
            .map_err(ctx("cannot open channel"))?;
        let acks = Arc::new(acks::Acks::new(inner.clone()));
        Ok(Channel { inner, acks })
    }

    /// Whether the connection is usable.
    pub fn is_connected(&self) -> bool {
        self.inner.status().connected()
    }

    /// What happens to the connection from now on: blocked, unblocked, failed. The stream is fed
    /// by lapin's event queue, which only holds these rare connection-level events.
    pub fn events(&self) -> impl futures_util::Stream<Item = ConnectionEvent> + Send + 'static {
        self.inner.events_listener().filter_map(|e| async move {
            match e {
                lapin::Event::ConnectionBlocked(reason) => Some(ConnectionEvent::Blocked(reason)),
                lapin::Event::ConnectionUnblocked => Some(ConnectionEvent::Unblocked),
                lapin::Event::Error(e) => Some(ConnectionEvent::Failed(e.to_string())),
                _ => None,
            }
        })
    }

    /// Close politely; bounded, since a half-open connection never answers.
    pub async fn close(&self) {
        if self.is_connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.inner.close(200, "bye".into())).await;
        }
    }
}

/// A connection-level event.
#[derive(Debug, Clone)]
pub enum ConnectionEvent {
    /// A resource alarm: the broker stopped reading from this connection.
    Blocked(String),
    /// The alarm cleared.
    Unblocked,
    /// The connection failed (I/O error, missed heartbeats, closed by the broker).
    Failed(String),
}

/// lapin keeps two buffers of 32 frames per connection, zero-filled up front, so the frame size
/// is memory that every connection holds: RabbitMQ's default 128 KiB frames make 8 MiB per
/// connection, about half of an idle daemon's RSS. RPC messages are small; larger ones are just
/// split into more frames.
const FRAME_MAX: u32 = 32 * 1024;

/// `url` with `heartbeat` and [`FRAME_MAX`] added, unless it sets them itself.
fn with_defaults(url: &str, heartbeat: u16) -> String {
    let mut url = url.to_owned();
    for (key, value) in [
        ("heartbeat", u32::from(heartbeat)),
        ("frame_max", FRAME_MAX),
    ] {
        if !url.contains(&format!("{key}=")) {
            let sep = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{sep}{key}={value}");
        }
    }
    url
}

/// The user `url` logs in as, decoded from the URL exactly as lapin decodes it for the
/// handshake (`ops%40corp` logs in as `ops@corp`), for the `user_id` property: RabbitMQ refuses
/// a message whose `user_id` is not the login. `None` when the URL names no user (the login is
/// then lapin's default), and with `auth_mechanism=external` or `anonymous`, where lapin sends
/// no credentials and the broker picks the user (a client certificate's name, say): a wrong
/// guess would get every message refused.
pub fn login_user(url: &str) -> Option<String> {
    use lapin::uri::{AMQPUri, SASLMechanism};
    if url::Url::parse(url).ok()?.username().is_empty() {
        return None;
    }
    let uri: AMQPUri = url.parse().ok()?;
    let by_password = match uri.query.auth_mechanism.unwrap_or_default() {
        SASLMechanism::Plain | SASLMechanism::AMQPlain | SASLMechanism::RabbitCrDemo => true,
        SASLMechanism::External | SASLMechanism::Anonymous => false,
    };
    Some(uri.authority.userinfo.username).filter(|user| by_password && !user.is_empty())
}

/// Queue flags, spelled as oslo.messaging spells them.
#[derive(Debug, Clone, Default)]
pub struct QueueSpec {
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Owned by this connection only.
    pub exclusive: bool,
    /// `x-queue-type: quorum`.
    pub quorum: bool,
    /// `x-expires` in milliseconds: the queue is deleted after being unused this long.
    pub expires_ms: Option<u32>,
}

/// Exchange kinds Warren uses.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Routing by key pattern (the control exchange).
    Topic,
    /// Every bound queue gets a copy (`<topic>_fanout`).
    Fanout,
    /// Exact key (nova-era reply exchanges).
    Direct,
}

/// One channel.
#[derive(Clone)]
pub struct Channel {
    inner: lapin::Channel,
    /// Acks of the deliveries of every consumer on this channel (tags are per channel).
    acks: Arc<acks::Acks>,
}

impl Channel {
    /// Declare an exchange.
    pub async fn declare_exchange(
        &self,
        name: &str,
        kind: Kind,
        durable: bool,
        auto_delete: bool,
    ) -> Result<(), AmqpError> {
        let kind = match kind {
            Kind::Topic => ExchangeKind::Topic,
            Kind::Fanout => ExchangeKind::Fanout,
            Kind::Direct => ExchangeKind::Direct,
        };
        let options = ExchangeDeclareOptions {
            durable,
            auto_delete,
            ..Default::default()
        };
        self.inner
            .exchange_declare(short(name)?, kind, options, FieldTable::default())
            .await
            .map_err(ctx(format!("cannot declare exchange '{name}'")))
    }

    /// Whether the exchange exists (a passive declare). A missing exchange closes the channel,
    /// so probe on a channel you can throw away.
    pub async fn exchange_exists(&self, name: &str) -> bool {
        let Ok(name) = short(name) else { return false };
        let options = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.inner
            .exchange_declare(name, ExchangeKind::Topic, options, FieldTable::default())
            .await
            .is_ok()
    }

    /// Declare a queue.
    pub async fn declare_queue(&self, name: &str, spec: &QueueSpec) -> Result<(), AmqpError> {
        let mut args = FieldTable::default();
        if spec.quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(ms) = spec.expires_ms {
            args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        let options = QueueDeclareOptions {
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            exclusive: spec.exclusive,
            ..Default::default()
        };
        self.inner
            .queue_declare(short(name)?, options, args)
            .await
            .map(|_| ())
            .map_err(ctx(format!("cannot declare queue '{name}'")))
    }

    /// Bind `queue` to `exchange` with `key`.
    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), AmqpError> {
        self.inner
            .queue_bind(
                short(queue)?,
                short(exchange)?,
                short(key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(ctx(format!(
                "cannot bind queue '{queue}' to '{exchange}' with '{key}'"
            )))
    }

    /// Bound the deliveries outstanding per consumer on this channel.
    pub async fn prefetch(&self, count: u16) -> Result<(), AmqpError> {
        self.inner
            .basic_qos(count, BasicQosOptions { global: false })
            .await
            .map_err(ctx("cannot set prefetch"))?;
        self.acks.set_prefetch(count);
        Ok(())
    }

    /// Start consuming `queue` with manual acks.
    pub async fn consume(&self, queue: &str, tag: &str) -> Result<Consumer, AmqpError> {
        let inner = self
            .inner
            .basic_consume(
                short(queue)?,
                short(tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(ctx(format!("cannot consume from '{queue}'")))?;
        Ok(Consumer {
            inner,
            queue: queue.to_owned(),
            acks: self.acks.clone(),
        })
    }

    /// Stop a consumer; deliveries already received stay ours to ack.
    pub async fn cancel(&self, tag: &str) -> Result<(), AmqpError> {
        let cancel = self
            .inner
            .basic_cancel(short(tag)?, BasicCancelOptions::default());
        // Bounded: on a connection that died unnoticed the broker never answers.
        match tokio::time::timeout(CLOSE_TIMEOUT, cancel).await {
            Ok(r) => r.map_err(ctx(format!("cannot cancel consumer '{tag}'"))),
            Err(_) => Err(AmqpError::NotConnected(CLOSE_TIMEOUT)),
        }
    }

    /// Put the channel in confirm mode and wrap it as a publisher.
    pub async fn into_publisher(self) -> Result<Publisher, AmqpError> {
        self.inner
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(ctx("cannot enable publisher confirms"))?;
        Ok(Publisher { channel: self })
    }

    /// Close the channel; bounded like [`Connection::close`].
    pub async fn close(&self) {
        if self.inner.status().connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.inner.close(200, "bye".into())).await;
        }
    }
}

/// A stream of deliveries from one queue. It ends when the consumer is cancelled (by us or by
/// the broker, e.g. the queue was deleted) or the channel dies.
pub struct Consumer {
    inner: lapin::Consumer,
    queue: String,
    acks: Arc<acks::Acks>,
}

impl Consumer {
    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery; `None` when the consumer ended.
    pub async fn next(&mut self) -> Option<Result<Delivery, AmqpError>> {
        self.inner.next().await.map(|r| {
            r.map(|inner| {
                self.acks.seen(inner.delivery_tag);
                Delivery {
                    inner,
                    acks: self.acks.clone(),
                    settled: std::sync::atomic::AtomicBool::new(false),
                }
            })
            .map_err(|source| AmqpError::Broker {
                context: format!("consumer on '{}' failed", self.queue),
                source,
            })
        })
    }
}

/// One received message. It must end in exactly one of [`Delivery::ack`] or
/// [`Delivery::reject`]; an abandoned delivery stays unacked until its channel closes.
pub struct Delivery {
    inner: lapin::message::Delivery,
    acks: Arc<acks::Acks>,
    /// Set by the first ack or reject. Acks go out on the channel, possibly in a frame for
    /// another delivery's tag, so lapin's single-use check on the acker never sees them and
    /// cannot guard a second settle, which the broker would answer by closing the channel.
    settled: std::sync::atomic::AtomicBool,
}

impl Delivery {
    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    /// The channel-scoped delivery tag (for logs).
    pub fn tag(&self) -> u64 {
        self.inner.delivery_tag
    }

    /// Whether the broker delivered this before.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        self.inner.routing_key.as_str()
    }

    /// The `content_type` property.
    pub fn content_type(&self) -> Option<&str> {
        self.inner
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// The broker-validated `user_id` property.
    pub fn user_id(&self) -> Option<&str> {
        self.inner.properties.user_id().as_ref().map(|s| s.as_str())
    }

    /// How often the broker delivered this message before, from the `x-delivery-count` header
    /// that quorum queues set (classic queues only say [`Delivery::redelivered`]).
    pub fn delivery_count(&self) -> Option<u64> {
        let headers = self.inner.properties.headers().as_ref()?;
        match headers.inner().get("x-delivery-count")? {
            AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(*n)),
            AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
            AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
            AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
            AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
            _ => None,
        }
    }

    /// The exchange it was published to.
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// Acknowledge, possibly in one frame with other deliveries of the channel (see
    /// `amqp/acks.rs`); returns once the frame is sent. `Ok(false)` means the ack could not be
    /// sent because the channel it came on is gone; the broker will redeliver it, so it must
    /// not be counted as done.
    pub async fn ack(&self) -> Result<bool, AmqpError> {
        if self
            .settled
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(false);
        }
        self.acks
            .ack(self.inner.delivery_tag, &self.inner.acker)
            .await
            .map_err(ctx("cannot ack"))
    }

    /// Reject; with `requeue = false` the broker dead-letters it (or drops it where the queue has
    /// no dead-letter exchange).
    pub async fn reject(&self, requeue: bool) -> Result<bool, AmqpError> {
        if self
            .settled
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(false);
        }
        let rejected = self
            .inner
            .acker
            .reject(BasicRejectOptions { requeue })
            .await;
        // Only now, with the reject written, may an ack frame cover this tag; a reject that
        // failed leaves it uncovered (the broker redelivers it when the channel goes).
        if matches!(rejected, Ok(true)) {
            self.acks.settled(self.inner.delivery_tag).await;
        }
        rejected.map_err(ctx("cannot reject"))
    }
}

/// How a publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Routed and confirmed.
    Confirmed,
    /// Mandatory and unroutable (312 NO_ROUTE): for a reply, the caller is gone.
    Returned {
        /// AMQP reply code.
        code: u16,
        /// Broker's text.
        text: String,
    },
    /// The broker refused it (internal error or `reject-publish` overflow).
    Nacked,
}

/// Per-message publish options.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Return the message if no queue takes it.
    pub mandatory: bool,
    /// Delivery mode 2 (the kombu default) rather than 1.
    pub persistent: bool,
    /// The AMQP `user_id` property. RabbitMQ refuses a message whose `user_id` is not the
    /// connection's user, which makes it the one caller identity a receiver can trust.
    pub user_id: Option<String>,
    /// AMQP `expiration`, milliseconds.
    pub expiration_ms: Option<u64>,
    /// Message headers.
    pub headers: Vec<(String, Header)>,
}

/// A header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// Text (an AMQP long string).
    Text(String),
    /// A signed integer.
    Int(i64),
}

/// A channel in confirm mode. Cloning shares the channel.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Publish JSON and wait (bounded) for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        options: &PublishOptions,
    ) -> Result<Published, AmqpError> {
        self.publish_then(exchange, key, body, options, || ()).await
    }

    /// [`Publisher::publish`], running `sent` as soon as the message is queued on the
    /// connection (or refused), without waiting for it to be written or confirmed: work that
    /// should not delay the message. If the message is refused before that (a name too long),
    /// `sent` is dropped unrun.
    pub async fn publish_then(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        options: &PublishOptions,
        sent: impl FnOnce(),
    ) -> Result<Published, AmqpError> {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(if options.persistent { 2 } else { 1 });
        if let Some(user) = &options.user_id {
            props = props.with_user_id(short(user)?);
        }
        if let Some(ms) = options.expiration_ms {
            props = props.with_expiration(ms.to_string().into());
        }
        if !options.headers.is_empty() {
            let mut table = FieldTable::default();
            for (key, value) in &options.headers {
                let value = match value {
                    Header::Text(t) => AMQPValue::LongString(t.as_str().into()),
                    Header::Int(n) => AMQPValue::LongLongInt(*n),
                };
                table.insert(short(key)?, value);
            }
            props = props.with_headers(table);
        }
        let publish = BasicPublishOptions {
            mandatory: options.mandatory,
            ..Default::default()
        };
        let (exchange_name, key_name) = (short(exchange)?, short(key)?);
        let mut publishing = std::pin::pin!(self.channel.inner.basic_publish(
            exchange_name,
            key_name,
            publish,
            body,
            props
        ));
        // The first poll queues the frames for the connection's writer; what is left is waiting
        // for it to write them. `sent` runs in between, overlapping that wait, and never waits
        // on the broker itself (a blocked connection, say).
        let first = futures_util::poll!(publishing.as_mut());
        sent();
        let confirm = match first {
            std::task::Poll::Ready(confirm) => confirm,
            std::task::Poll::Pending => publishing.await,
        }
        .map_err(|source| AmqpError::Broker {
            context: format!("cannot publish to '{exchange}' with key '{key}'"),
            source,
        })?;
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(CONFIRM_TIMEOUT))?
            .map_err(|source| AmqpError::Broker {
                context: format!("publish to '{exchange}' with key '{key}' failed"),
                source,
            })?;
        Ok(match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Published::Confirmed,
            Confirmation::Ack(Some(returned)) => Published::Returned {
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
            },
            Confirmation::Nack(_) => Published::Nacked,
        })
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn the_login_user_is_decoded_as_lapin_logs_in() {
        assert_eq!(
            login_user("amqp://ops:pw@h:5672/%2f").as_deref(),
            Some("ops")
        );
        // What lapin authenticates with, so what RabbitMQ accepts as `user_id`.
        assert_eq!(
            login_user("amqp://ops%40corp:p%3Aw@h/%2f").as_deref(),
            Some("ops@corp")
        );
        assert_eq!(
            login_user("amqps://%C3%A9quipe@h/").as_deref(),
            Some("équipe")
        );
        // No user named: no claim (lapin logs in as its default, guest).
        assert_eq!(login_user("amqp://h:5672/%2f"), None);
        assert_eq!(login_user("amqp://:pw@h/"), None);
        assert_eq!(
            login_user("amqp://ops@h/?auth_mechanism=amqplain").as_deref(),
            Some("ops")
        );
        // The broker picks the login (a client certificate's name): no claim.
        assert_eq!(login_user("amqps://ops@h/?auth_mechanism=external"), None);
        assert_eq!(login_user("amqp://ops@h/?auth_mechanism=ANONYMOUS"), None);
        // Not valid UTF-8 once decoded: lapin refuses the URL, so nothing is claimed.
        assert_eq!(login_user("amqp://%FF@h/"), None);
        assert_eq!(login_user("not a url"), None);
    }

    #[test]
    fn heartbeat_and_frame_max_are_added_unless_the_url_sets_them() {
        assert_eq!(
            with_defaults("amqp://h/%2f", 15),
            "amqp://h/%2f?heartbeat=15&frame_max=32768"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?frame_max=4096", 15),
            "amqp://h/%2f?frame_max=4096&heartbeat=15"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?heartbeat=5", 15),
            "amqp://h/%2f?heartbeat=5&frame_max=32768"
        );
    }
}
