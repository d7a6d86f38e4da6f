//! The daemon: load handlers, declare oslo's topology, consume, dispatch, reload what changes on
//! disk, answer the admin topic, and shut down in order (stop intake, drain in-flight work,
//! close).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use futures_util::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::Admin;
use crate::amqp::{Channel, Connection, Consumer, Kind, QueueSpec};
use crate::config::{self, Config, redact_url};
use crate::dispatch::{DispatchSettings, Dispatcher, Service};
use crate::registry::{Handler, Registry, Reloaded};
use crate::runtime::{EngineSettings, ModuleCache, Runtime};
use crate::watch::{self, Watcher};

/// Modules compiled or checked at once during start-up.
const STARTUP_LOADS: usize = 4;

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

/// The admin topic of server `name`: `warren.<name>`.
pub fn admin_topic(name: &str) -> String {
    format!("warren.{name}")
}

/// A handler being served: its consumers and the tasks handling its deliveries.
struct Serving {
    handler: Arc<Handler>,
    config: config::Handler,
    channel: Channel,
    /// Cancelling stops this handler's intake; a child of the daemon's token.
    cancel: CancellationToken,
    /// This handler's consumer loops and in-flight deliveries, awaited when it is removed.
    tasks: TaskTracker,
}

/// Everything the daemon's tasks share.
pub(crate) struct Daemon {
    pub(crate) config: Mutex<Config>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) cache: Option<ModuleCache>,
    pub(crate) registry: Registry,
    consume_conn: Connection,
    dispatcher: Arc<Dispatcher>,
    serving: Mutex<HashMap<String, Serving>>,
    watcher: std::sync::Mutex<Option<Watcher>>,
    cancel: CancellationToken,
    /// Held by every reload, config reload and rollback: two of them at once (a file event and
    /// `warren reload`) could otherwise both start the same new handler.
    pub(crate) reloading: Mutex<()>,
}

/// Run the daemon until `shutdown` resolves (or a fatal broker error), then drain and close.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let settings = EngineSettings {
        // Room for handlers added by a config reload, up to the pool's slot size.
        max_memory_bytes: config
            .handlers
            .iter()
            .map(|h| h.limits.memory_bytes)
            .max()
            .unwrap_or(0)
            .max(64 << 20),
        // Room for every running invocation plus the smoke tests of loads and reloads.
        max_instances: u32::try_from(config.server.concurrency * 2 + STARTUP_LOADS + 8)
            .unwrap_or(u32::MAX),
    };
    let runtime = Arc::new(Runtime::new(&settings)?);
    let cache = config.server.cache_dir.clone().map(ModuleCache::new);
    info!(allocator = ?runtime.allocator(), cache = ?cache.as_ref().map(|c| c.dir()), "wasm runtime ready");

    // Load every module before touching the broker: a bad config fails fast and clearly.
    // A few at a time: each smoke test takes a pool slot, and compiling is CPU-bound anyway.
    let loaded: Vec<(config::Handler, crate::runtime::Module)> =
        futures_util::stream::iter(config.handlers.clone())
            .map(|h| {
                let (rt, cache) = (runtime.clone(), cache.clone());
                async move {
                    tokio::task::spawn_blocking(move || {
                        load_handler(&rt, cache.as_ref(), &h).map(|m| (h, m))
                    })
                    .await?
                }
            })
            .buffered(STARTUP_LOADS)
            .try_collect()
            .await?;

    let name = config.server.name.clone();
    let url = config.broker.url.clone();
    info!(broker = %redact_url(&url), exchange = %config.broker.exchange, server = %name, "connecting");
    // Separate connections: a resource alarm blocks publishers, and must not stop consumption.
    let consume_conn = Connection::open(
        &url,
        &format!("warren-{name}-consume"),
        config.broker.heartbeat,
    )
    .await?;
    let publish_conn = Connection::open(
        &url,
        &format!("warren-{name}-publish"),
        config.broker.heartbeat,
    )
    .await?;
    let publisher = publish_conn.channel().await?.into_publisher().await?;
    let cancel = CancellationToken::new();
    let dispatcher = Arc::new(Dispatcher::new(
        runtime.clone(),
        publisher,
        &DispatchSettings {
            concurrency: config.server.concurrency,
            dedup_window: config.server.dedup_window,
            max_message_bytes: config.server.max_message_bytes,
        },
        cancel.clone(),
    ));
    let watching = config.server.watch;
    let config_path = watch::absolute(&config.path);
    let daemon = Arc::new(Daemon {
        config: Mutex::new(config),
        runtime,
        cache,
        registry: Registry::default(),
        consume_conn,
        dispatcher,
        serving: Mutex::new(HashMap::new()),
        watcher: std::sync::Mutex::new(None),
        cancel,
        reloading: Mutex::new(()),
    });
    let background = TaskTracker::new();

    if watching {
        let (raw_tx, raw_rx) = mpsc::channel(256);
        let mut watcher = Watcher::new(raw_tx).context("cannot start the file watcher")?;
        watcher
            .add(&config_path)
            .with_context(|| format!("cannot watch {}", config_path.display()))?;
        *daemon.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        background.spawn(reload_loop(daemon.clone(), raw_rx, config_path));
    }
    // Declaring a handler's topology is a dozen broker round trips; do all handlers at once.
    futures_util::future::try_join_all(
        loaded
            .into_iter()
            .map(|(h, module)| daemon.serve(h, module)),
    )
    .await?;
    let admin_channel = daemon.serve_admin(&background).await?;
    let topics: Vec<String> = daemon
        .registry
        .all()
        .iter()
        .map(|h| h.topic.clone())
        .collect();
    info!(topics = %topics.join(","), admin = %admin_topic(&name), "ready");

    tokio::select! {
        _ = shutdown => info!("shutdown requested: no new messages; draining in-flight work"),
        _ = daemon.cancel.cancelled() => error!("a consumer stopped unexpectedly; shutting down"),
    }
    let failed = daemon.cancel.is_cancelled();
    daemon.cancel.cancel();
    let timeout = daemon.config.lock().await.server.shutdown_timeout;
    let drained = tokio::time::timeout(timeout, async {
        let serving: Vec<Serving> = daemon
            .serving
            .lock()
            .await
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in &serving {
            s.tasks.close();
        }
        for s in &serving {
            s.tasks.wait().await;
            s.channel.close().await;
        }
        background.close();
        background.wait().await;
    })
    .await;
    if drained.is_err() {
        warn!(
            ?timeout,
            "in-flight work did not finish in time; unacked messages will be redelivered"
        );
    }
    admin_channel.close().await;
    daemon.consume_conn.close().await;
    publish_conn.close().await;
    info!("stopped");
    if failed {
        anyhow::bail!("stopped after losing a consumer (see the log above)");
    }
    Ok(())
}

fn load_handler(
    runtime: &Runtime,
    cache: Option<&ModuleCache>,
    h: &config::Handler,
) -> anyhow::Result<crate::runtime::Module> {
    let bytes = std::fs::read(&h.module)
        .with_context(|| format!("handler '{}': cannot read {}", h.topic, h.module.display()))?;
    let (module, from) = runtime
        .load_cached(&h.topic, &bytes, &h.limits, cache)
        .with_context(|| format!("handler '{}': cannot load {}", h.topic, h.module.display()))?;
    info!(topic = %h.topic, module = %h.module.display(), hash = %module.hash_prefix(), cache = ?from,
        methods = %module.methods().collect::<Vec<_>>().join(","), "handler loaded");
    Ok(module)
}

impl Daemon {
    /// Declare a handler's queues and start consuming them.
    async fn serve(
        self: &Arc<Self>,
        h: config::Handler,
        module: crate::runtime::Module,
    ) -> anyhow::Result<()> {
        let handler = Arc::new(Handler::new(
            h.topic.clone(),
            h.module.clone(),
            h.limits.clone(),
            module,
        ));
        let config = self.config.lock().await.clone();
        let name = &config.server.name;
        let channel = self.consume_conn.channel().await?;
        channel.prefetch(config.server.prefetch).await?;
        let queues = TopicQueues::new(&handler.topic, name);
        declare(&channel, &config, &queues).await?;
        let cancel = self.cancel.child_token();
        let tasks = TaskTracker::new();
        for queue in [&queues.topic, &queues.server, &queues.fanout_queue] {
            let tag = format!("warren-{name}-{queue}");
            let consumer = channel.consume(queue, &tag).await?;
            let intake = Intake {
                channel: channel.clone(),
                tag,
                consumer,
            };
            tasks.spawn(consume_loop(
                intake,
                handler.clone(),
                self.dispatcher.clone(),
                tasks.clone(),
                cancel.clone(),
                self.cancel.clone(),
            ));
        }
        if let Some(w) = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            && let Err(e) = w.add(&handler.path)
        {
            warn!(topic = %handler.topic, error = %e, "cannot watch the module; hot reload is off for it");
        }
        self.registry.insert(handler.clone());
        self.serving.lock().await.insert(
            h.topic.clone(),
            Serving {
                handler,
                config: h,
                channel,
                cancel,
                tasks,
            },
        );
        Ok(())
    }

    /// Stop a handler: cancel its consumers, let its in-flight work finish, close its channel.
    async fn unserve(&self, topic: &str) {
        let Some(s) = self.serving.lock().await.remove(topic) else {
            return;
        };
        self.registry.remove(topic);
        if let Some(w) = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            w.remove(&s.handler.path);
        }
        s.cancel.cancel();
        s.tasks.close();
        let timeout = self.config.lock().await.server.shutdown_timeout;
        if tokio::time::timeout(timeout, s.tasks.wait()).await.is_err() {
            warn!(%topic, "removed handler's in-flight work did not finish in time; it will be redelivered");
        }
        s.channel.close().await;
        info!(%topic, "handler removed");
    }

    /// Reload one handler from its file; logs the outcome.
    pub(crate) async fn reload_handler(&self, handler: Arc<Handler>) -> Reloaded {
        let _one_at_a_time = self.reloading.lock().await;
        let (rt, cache, h) = (self.runtime.clone(), self.cache.clone(), handler.clone());
        let outcome = tokio::task::spawn_blocking(move || h.reload(&rt, cache.as_ref()))
            .await
            .unwrap_or_else(|e| Reloaded::Failed(format!("reload task failed: {e}")));
        match &outcome {
            Reloaded::Unchanged => {}
            Reloaded::Swapped { id } => {
                let v = handler.current();
                info!(topic = %handler.topic, version = id, hash = %v.module.hash_prefix(),
                    methods = %v.module.methods().collect::<Vec<_>>().join(","), "handler reloaded");
            }
            Reloaded::Failed(reason) => {
                error!(topic = %handler.topic, file = %handler.path.display(), %reason,
                    "reload failed; the previous version keeps serving");
            }
        }
        outcome
    }

    /// Re-read the config and add, remove or replace handlers to match it. An invalid config
    /// changes nothing.
    pub(crate) async fn reload_config(self: &Arc<Self>) {
        let _one_at_a_time = self.reloading.lock().await;
        let path = self.config.lock().await.path.clone();
        let new = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "config reload failed; the running configuration stays");
                return;
            }
        };
        let old = self.config.lock().await.clone();
        if old.broker != new.broker || old.server != new.server {
            warn!(
                "changes to [broker] or [server] take effect after a restart; handlers are reloaded now"
            );
        }
        let wanted: HashMap<String, config::Handler> = new
            .handlers
            .iter()
            .map(|h| (h.topic.clone(), h.clone()))
            .collect();
        let running: HashMap<String, config::Handler> = self
            .serving
            .lock()
            .await
            .iter()
            .map(|(t, s)| (t.clone(), s.config.clone()))
            .collect();
        for (topic, h) in &running {
            let same = wanted
                .get(topic)
                .is_some_and(|w| w.module == h.module && w.limits == h.limits);
            if !same {
                self.unserve(topic).await;
            }
        }
        {
            let mut config = self.config.lock().await;
            config.handlers = new.handlers.clone();
        }
        for (topic, h) in wanted {
            if self.serving.lock().await.contains_key(&topic) {
                continue;
            }
            let (rt, cache, hc) = (self.runtime.clone(), self.cache.clone(), h.clone());
            let loaded =
                tokio::task::spawn_blocking(move || load_handler(&rt, cache.as_ref(), &hc)).await;
            match loaded {
                Ok(Ok(module)) => match self.serve(h, module).await {
                    Ok(()) => info!(%topic, "handler added"),
                    Err(e) => {
                        error!(%topic, error = %format!("{e:#}"), "cannot serve the new handler")
                    }
                },
                Ok(Err(e)) => error!(%topic, error = %format!("{e:#}"), "new handler not added"),
                Err(e) => error!(%topic, error = %e, "new handler not added"),
            }
        }
    }

    /// Consume the admin topic `warren.<server>` (status, reload, rollback).
    async fn serve_admin(self: &Arc<Self>, background: &TaskTracker) -> anyhow::Result<Channel> {
        let config = self.config.lock().await.clone();
        let topic = admin_topic(&config.server.name);
        let channel = self.consume_conn.channel().await?;
        channel.prefetch(4).await?;
        channel
            .declare_exchange(
                &config.broker.exchange,
                Kind::Topic,
                config.broker.durable,
                false,
            )
            .await?;
        // A queue of this process's own, bound under the admin topic: it dies with the daemon
        // instead of collecting requests nobody answers, and several daemons may share a server
        // name (oslo allows it for multi-worker services); the first to answer wins.
        let queue = format!("{topic}.{}", uuid::Uuid::new_v4().simple());
        let spec = QueueSpec {
            exclusive: true,
            auto_delete: true,
            ..QueueSpec::default()
        };
        channel.declare_queue(&queue, &spec).await?;
        channel
            .bind(&queue, &config.broker.exchange, &topic)
            .await?;
        let tag = format!("warren-{}-admin", config.server.name);
        let consumer = channel.consume(&queue, &tag).await?;
        let admin = Arc::new(Admin {
            daemon: Arc::downgrade(self),
            topic,
        });
        let intake = Intake {
            channel: channel.clone(),
            tag,
            consumer,
        };
        background.spawn(consume_loop(
            intake,
            admin,
            self.dispatcher.clone(),
            background.clone(),
            self.cancel.clone(),
            self.cancel.clone(),
        ));
        Ok(channel)
    }
}

/// Debounce watcher events and rescans into reloads of modules and of the config.
async fn reload_loop(daemon: Arc<Daemon>, mut raw: mpsc::Receiver<PathBuf>, config_path: PathBuf) {
    use tokio::time::{Instant, interval, sleep_until};
    let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
    let mut seen = HashMap::new();
    let files = |d: &Daemon| {
        d.watcher
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(Watcher::files))
            .unwrap_or_default()
    };
    watch::rescan(&files(&daemon), &mut seen);
    let mut rescan = interval(watch::RESCAN);
    loop {
        let next = pending.values().min().copied();
        tokio::select! {
            _ = daemon.cancel.cancelled() => break,
            Some(path) = raw.recv() => {
                pending.insert(path, Instant::now() + watch::DEBOUNCE);
            }
            _ = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                let due: Vec<PathBuf> = pending.iter().filter(|(_, t)| **t <= now).map(|(p, _)| p.clone()).collect();
                for path in due {
                    pending.remove(&path);
                    seen.insert(path.clone(), watch::stamp(&path));
                    on_change(&daemon, &path, &config_path).await;
                }
            }
            _ = rescan.tick() => {
                for path in watch::rescan(&files(&daemon), &mut seen) {
                    pending.entry(path).or_insert_with(|| Instant::now() + watch::DEBOUNCE);
                }
            }
        }
    }
}

async fn on_change(daemon: &Arc<Daemon>, path: &Path, config_path: &Path) {
    if path == config_path {
        info!(file = %path.display(), "config changed; reloading it");
        daemon.reload_config().await;
        return;
    }
    for handler in daemon.registry.all() {
        if watch::absolute(&handler.path) == path {
            daemon.reload_handler(handler).await;
        }
    }
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

/// Take deliveries from one queue until `stop`; each is handled in its own task on `tasks`.
/// Prefetch bounds how many of those tasks exist at once. A consumer that ends on its own
/// cancels `fatal` (the daemon), since nothing would serve its queue any more.
async fn consume_loop<S: Service + 'static>(
    intake: Intake,
    service: Arc<S>,
    dispatcher: Arc<Dispatcher>,
    tasks: TaskTracker,
    stop: CancellationToken,
    fatal: CancellationToken,
) {
    let Intake {
        channel,
        tag,
        mut consumer,
    } = intake;
    let queue = consumer.queue().to_owned();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => {
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
                let (service, dispatcher, queue) =
                    (service.clone(), dispatcher.clone(), queue.clone());
                tasks.spawn(async move {
                    // `handle` settles every delivery itself; a panic would skip that and pin a
                    // prefetch slot until the channel closes, so it is caught and rejected here.
                    let handled = std::panic::AssertUnwindSafe(dispatcher.handle(&*service, &queue, &delivery))
                        .catch_unwind()
                        .await;
                    if handled.is_err() {
                        error!(%queue, tag = delivery.tag(), "delivery handling panicked; message rejected");
                        let _ = delivery.reject(false).await;
                    }
                });
            }
            Some(Err(e)) if !stop.is_cancelled() => {
                error!(%queue, error = %e, "consumer failed");
                fatal.cancel();
                break;
            }
            None if !stop.is_cancelled() => {
                error!(%queue, "consumer was cancelled by the broker (queue deleted?)");
                fatal.cancel();
                break;
            }
            _ => break,
        }
    }
}
