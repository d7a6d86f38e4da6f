//! The daemon: load handlers, declare oslo's topology, consume, dispatch, and shut down in
//! order (stop intake, drain in-flight work, close).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::amqp::{Channel, Connection, Consumer, Kind, QueueSpec};
use crate::config::{Config, redact_url};
use crate::dispatch::{DispatchSettings, Dispatcher};
use crate::registry::{Handler, Registry};
use crate::runtime::{EngineSettings, Runtime};

/// oslo's `rabbit_transient_queues_ttl` default: unused fanout queues expire after 30 minutes.
const FANOUT_QUEUE_EXPIRES_MS: u32 = 1_800_000;

/// The queue names oslo.messaging's `listen()` uses for a topic on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicQueues {
    /// `<topic>`, shared by every server of the topic.
    pub topic: String,
    /// `<topic>.<server>`.
    pub server: String,
    /// `<topic>_fanout`, the fanout exchange.
    pub fanout_exchange: String,
    /// `<topic>_fanout_<uuid hex>`, this process's copy of every fanout.
    pub fanout_queue: String,
}

impl TopicQueues {
    /// Names for `topic` on `server`, with a fresh per-process fanout queue name.
    pub fn new(topic: &str, server: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            server: format!("{topic}.{server}"),
            fanout_exchange: format!("{topic}_fanout"),
            fanout_queue: format!("{topic}_fanout_{}", uuid::Uuid::new_v4().simple()),
        }
    }
}

/// Run the daemon until `shutdown` resolves (or a fatal broker error), then drain and close.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let settings = EngineSettings {
        max_memory_bytes: config
            .handlers
            .iter()
            .map(|h| h.limits.memory_bytes)
            .max()
            .unwrap_or(64 << 20),
        // Room for every running invocation plus the smoke tests of reloads.
        max_instances: (config.server.concurrency as u32)
            .saturating_mul(2)
            .saturating_add(8),
    };
    let runtime = Arc::new(Runtime::new(&settings)?);
    info!(allocator = ?runtime.allocator(), "wasm runtime ready");

    let mut registry = Registry::default();
    for h in &config.handlers {
        let bytes = tokio::fs::read(&h.module).await.with_context(|| {
            format!("handler '{}': cannot read {}", h.topic, h.module.display())
        })?;
        let (rt, topic, limits) = (runtime.clone(), h.topic.clone(), h.limits.clone());
        let module = tokio::task::spawn_blocking(move || rt.load(&topic, &bytes, &limits))
            .await?
            .with_context(|| {
                format!("handler '{}': cannot load {}", h.topic, h.module.display())
            })?;
        info!(topic = %h.topic, module = %h.module.display(), hash = %module.hash_prefix(),
            methods = %module.methods().collect::<Vec<_>>().join(","), "handler loaded");
        registry.insert(Handler::new(
            h.topic.clone(),
            h.module.clone(),
            h.limits.clone(),
            module,
        ));
    }

    let name = &config.server.name;
    let url = &config.broker.url;
    info!(broker = %redact_url(url), exchange = %config.broker.exchange, server = %name, "connecting");
    // Separate connections: a resource alarm blocks publishers, and must not stop consumption.
    let consume_conn = Connection::open(
        url,
        &format!("warren-{name}-consume"),
        config.broker.heartbeat,
    )
    .await?;
    let publish_conn = Connection::open(
        url,
        &format!("warren-{name}-publish"),
        config.broker.heartbeat,
    )
    .await?;
    let publisher = publish_conn.channel().await?.into_publisher().await?;
    let dispatcher = Arc::new(Dispatcher::new(
        runtime.clone(),
        publisher,
        &DispatchSettings {
            concurrency: config.server.concurrency,
            dedup_window: config.server.dedup_window,
            max_message_bytes: config.server.max_message_bytes,
        },
    ));

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut channels = Vec::new();
    for handler in registry.iter() {
        let channel = consume_conn.channel().await?;
        channel.prefetch(config.server.prefetch).await?;
        let queues = TopicQueues::new(&handler.topic, name);
        declare(&channel, &config, &queues).await?;
        for queue in [&queues.topic, &queues.server, &queues.fanout_queue] {
            let tag = format!("warren-{name}-{queue}");
            let consumer = channel.consume(queue, &tag).await?;
            let intake = Intake {
                channel: channel.clone(),
                tag,
                consumer,
            };
            tracker.spawn(consume_loop(
                intake,
                handler.clone(),
                dispatcher.clone(),
                tracker.clone(),
                cancel.clone(),
            ));
        }
        channels.push(channel);
    }
    let topics: Vec<&str> = registry.iter().map(|h| h.topic.as_str()).collect();
    info!(topics = %topics.join(","), "ready");

    tokio::select! {
        _ = shutdown => info!("shutdown requested: no new messages; draining in-flight work"),
        _ = cancel.cancelled() => error!("a consumer stopped unexpectedly; shutting down"),
    }
    let failed = cancel.is_cancelled();
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(config.server.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!(timeout = ?config.server.shutdown_timeout, "in-flight work did not finish in time; unacked messages will be redelivered");
    }
    for channel in &channels {
        channel.close().await;
    }
    consume_conn.close().await;
    publish_conn.close().await;
    info!("stopped");
    if failed {
        anyhow::bail!("stopped after losing a consumer (see the log above)");
    }
    Ok(())
}

/// Declare exactly what oslo.messaging's rabbit driver declares for an RPC server, so both can
/// share a broker (flags from wire-protocol.md §1b).
async fn declare(channel: &Channel, config: &Config, q: &TopicQueues) -> anyhow::Result<()> {
    let b = &config.broker;
    channel
        .declare_exchange(&b.exchange, Kind::Topic, b.durable, false)
        .await?;
    let shared = QueueSpec {
        durable: b.durable,
        quorum: b.quorum,
        ..QueueSpec::default()
    };
    channel.declare_queue(&q.topic, &shared).await?;
    channel.bind(&q.topic, &b.exchange, &q.topic).await?;
    channel.declare_queue(&q.server, &shared).await?;
    channel.bind(&q.server, &b.exchange, &q.server).await?;
    channel
        .declare_exchange(&q.fanout_exchange, Kind::Fanout, false, true)
        .await?;
    let fanout = QueueSpec {
        expires_ms: Some(FANOUT_QUEUE_EXPIRES_MS),
        ..QueueSpec::default()
    };
    channel.declare_queue(&q.fanout_queue, &fanout).await?;
    channel
        .bind(&q.fanout_queue, &q.fanout_exchange, &q.topic)
        .await?;
    Ok(())
}

/// One consumer and what it takes to cancel it.
struct Intake {
    channel: Channel,
    tag: String,
    consumer: Consumer,
}

/// Take deliveries from one queue until cancelled; each is handled in its own tracked task.
/// Prefetch bounds how many of those tasks exist at once.
async fn consume_loop(
    intake: Intake,
    handler: Arc<Handler>,
    dispatcher: Arc<Dispatcher>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let Intake {
        channel,
        tag,
        mut consumer,
    } = intake;
    let queue = consumer.queue().to_owned();
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                // Stop intake first; deliveries the broker already pushed stay unacked and are
                // requeued when the channel closes.
                if let Err(e) = channel.cancel(&tag).await {
                    warn!(%queue, error = %e, "could not cancel consumer");
                }
                break;
            }
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let (handler, dispatcher, queue) =
                    (handler.clone(), dispatcher.clone(), queue.clone());
                tracker.spawn(async move { dispatcher.handle(&handler, &queue, delivery).await });
            }
            Some(Err(e)) => {
                error!(%queue, error = %e, "consumer failed");
                cancel.cancel();
                break;
            }
            None => {
                error!(%queue, "consumer was cancelled by the broker (queue deleted?)");
                cancel.cancel();
                break;
            }
        }
    }
}
