//! The daemon: load handlers, declare oslo's topology, consume, dispatch, reload what changes on
//! disk, answer the admin topic, and shut down in order (stop intake, drain in-flight work,
//! close).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::Admin;
use crate::amqp::{Channel, Connection, ConnectionEvent, Consumer, Kind, QueueSpec};
use crate::config::{self, Config};
use crate::dispatch::{DispatchSettings, Dispatcher, Link, Service};
use crate::metrics::Metrics;
use crate::registry::{Handler, Registry, Reloaded};
use crate::runtime::{EngineSettings, ModuleCache, Runtime};
use crate::watch::{self, Watcher};

/// Modules compiled or checked at once during start-up.
const STARTUP_LOADS: usize = 4;

/// Sandboxes made ahead of their calls at once, across handlers (`Next::prepare`): enough for
/// the handlers a quiet daemon serves one call at a time, each holding a pool slot.
const PREPARED: u32 = 8;

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
    format!("{}{name}", crate::runtime::outbound::ADMIN_TOPIC_PREFIX)
}

/// A handler being served. It outlives broker connections: on every (re)connection a runner
/// declares its queues and consumes them again.
struct Serving {
    handler: Arc<Handler>,
    config: config::Handler,
    /// Its queue names. The fanout queue keeps its name across reconnections: it is not
    /// exclusive, so the new connection takes it over (no RESOURCE_LOCKED), and fanouts sent
    /// while we were away are waiting in it. A new process gets a new name.
    queues: TopicQueues,
    /// Cancelling stops this handler's intake; a child of the daemon's token.
    cancel: CancellationToken,
    /// This handler's runners and in-flight deliveries, awaited when it is removed.
    tasks: TaskTracker,
}

/// One pair of broker connections. When either fails the whole session is dropped and a new
/// one built: consumers, channels and the publisher all belong to one session.
pub(crate) struct Session {
    consume: Connection,
    publish: Connection,
    /// Cancelled by whatever first sees a connection fail.
    lost: CancellationToken,
}

/// Everything the daemon's tasks share.
pub(crate) struct Daemon {
    pub(crate) config: Mutex<Config>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) cache: Option<ModuleCache>,
    pub(crate) registry: Registry,
    pub(crate) metrics: Arc<Metrics>,
    dispatcher: Arc<Dispatcher>,
    serving: Mutex<HashMap<String, Serving>>,
    /// The live session, if connected. Read and written under the `serving` lock, so a handler
    /// added during a reconnection is started exactly once.
    session: std::sync::Mutex<Option<Arc<Session>>>,
    watcher: std::sync::Mutex<Option<Watcher>>,
    /// The admin consumer and the reload loop.
    background: TaskTracker,
    cancel: CancellationToken,
    /// Held by every reload, config reload and rollback: two of them at once (a file event and
    /// `warren reload`) could otherwise both start the same new handler.
    pub(crate) reloading: Mutex<()>,
}

/// Run the daemon until `shutdown` resolves, reconnecting whenever the broker connection is
/// lost; then stop intake, drain in-flight work, and close.
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
        // Room for every running invocation, as many again waiting on outbound calls (they
        // give their slot back while they wait), the smoke tests of loads and reloads, and
        // the sandboxes made ahead of their calls.
        max_instances: u32::try_from(
            config.server.concurrency * 4 + STARTUP_LOADS + 8 + PREPARED as usize,
        )
        .unwrap_or(u32::MAX),
        max_prepared: PREPARED,
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

    release_freed_memory();

    let metrics = Arc::new(Metrics::new());
    metrics.set_prefetch(config.server.prefetch);
    let cancel = CancellationToken::new();
    let endpoint = match &config.metrics {
        Some(m) => Some(
            crate::metrics::serve(metrics.clone(), m.address, cancel.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {}", m.address))?,
        ),
        None => None,
    };
    // Connects only when a guest first sends something.
    let outbound = Arc::new(crate::outbound::Sender::new(
        &config.broker.url,
        &config.broker.exchange,
        &config.broker.tls,
        &config.server.name,
        tokio::runtime::Handle::current(),
    ));
    let dispatcher = Arc::new(Dispatcher::new(
        runtime.clone(),
        &DispatchSettings {
            concurrency: config.server.concurrency,
            dedup_window: config.server.dedup_window,
            max_message_bytes: config.server.max_message_bytes,
            max_deliveries: config.server.max_deliveries,
            dead_letter_exchange: config.server.dead_letter_exchange.clone(),
            outbound: Some(outbound.clone()),
        },
        metrics.clone(),
    ));
    let watching = config.server.watch;
    let config_path = watch::absolute(&config.path);
    let daemon = Arc::new(Daemon {
        config: Mutex::new(config),
        runtime,
        cache,
        registry: Registry::default(),
        metrics,
        dispatcher,
        serving: Mutex::new(HashMap::new()),
        session: std::sync::Mutex::new(None),
        watcher: std::sync::Mutex::new(None),
        background: TaskTracker::new(),
        cancel,
        reloading: Mutex::new(()),
    });

    if watching {
        let (raw_tx, raw_rx) = mpsc::channel(256);
        let mut watcher = Watcher::new(raw_tx).context("cannot start the file watcher")?;
        watcher
            .add(&config_path)
            .with_context(|| format!("cannot watch {}", config_path.display()))?;
        *daemon.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        daemon
            .background
            .spawn(reload_loop(daemon.clone(), raw_rx, config_path));
    }
    for (h, module) in loaded {
        daemon.serve(h, module).await;
    }

    let stopped = daemon.connect_loop(shutdown).await;
    if stopped.is_ok() {
        info!("shutdown requested: no new messages; draining in-flight work");
    }
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
        }
        daemon.background.close();
        daemon.background.wait().await;
    })
    .await;
    if drained.is_err() {
        warn!(
            ?timeout,
            "in-flight work did not finish in time; unacked messages will be redelivered"
        );
    }
    daemon.dispatcher.set_link(None);
    outbound.close().await;
    let session = daemon
        .session
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(session) = session {
        session.lost.cancel();
        session.consume.close().await;
        session.publish.close().await;
    }
    if let Some((_, task)) = endpoint {
        let _ = task.await;
    }
    info!("stopped");
    stopped
}

/// Jittered exponential backoff: each wait is drawn from the upper half of the current step,
/// which doubles up to the cap, so a fleet of daemons that lost the same broker does not
/// reconnect in lockstep.
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: initial,
        }
    }

    /// The next wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        use rand::Rng as _;
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    /// Start again from the initial wait (after a success).
    pub(crate) fn reset(&mut self) {
        self.step = self.initial;
    }
}

/// Sleep `delay` unless one of the tokens is cancelled first; true if it slept fully.
async fn pause(delay: Duration, a: &CancellationToken, b: &CancellationToken) -> bool {
    tokio::select! {
        _ = a.cancelled() => false,
        _ = b.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
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
    /// Connect, serve, and reconnect after every loss until `shutdown` resolves. Returns when
    /// asked to stop; the caller drains and closes.
    async fn connect_loop(
        self: &Arc<Self>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let broker = self.config.lock().await.broker.clone();
        let mut backoff = Backoff::new(broker.reconnect_initial, broker.reconnect_max);
        let mut connections = 0u64;
        info!(broker = %crate::config::redact_url(&broker.url), exchange = %broker.exchange, "connecting");
        loop {
            let attempt = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                attempt = self.connect() => attempt,
            };
            match attempt {
                Ok(session) => {
                    connections += 1;
                    backoff.reset();
                    self.metrics.connected(connections > 1);
                    let topics: Vec<String> = self
                        .registry
                        .all()
                        .iter()
                        .map(|h| h.topic.clone())
                        .collect();
                    let name = self.config.lock().await.server.name.clone();
                    info!(topics = %topics.join(","), admin = %admin_topic(&name), connections, "connected");
                    if connections == 1 {
                        info!("ready");
                    }
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = session.lost.cancelled() => {}
                    }
                    self.end_session(&session).await;
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot connect to the broker; retrying");
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Open both connections, declare the shared topology, hand the publisher to the
    /// dispatcher, and start every handler's runner and the admin consumer.
    async fn connect(self: &Arc<Self>) -> anyhow::Result<Arc<Session>> {
        let config = self.config.lock().await.clone();
        let name = &config.server.name;
        let b = &config.broker;
        // Separate connections: a resource alarm blocks publishers, and must not stop
        // consumption.
        let consume = Connection::open_tls(
            &b.url,
            &format!("warren-{name}-consume"),
            b.heartbeat,
            &b.tls,
        )
        .await?;
        let publish = match Connection::open_tls(
            &b.url,
            &format!("warren-{name}-publish"),
            b.heartbeat,
            &b.tls,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                consume.close().await;
                return Err(e.into());
            }
        };
        let session = Arc::new(Session {
            consume,
            publish,
            lost: CancellationToken::new(),
        });
        for (conn, role) in [(&session.consume, "consume"), (&session.publish, "publish")] {
            self.background.spawn(watch_connection(
                conn.clone(),
                role,
                session.lost.clone(),
                self.cancel.clone(),
                self.metrics.clone(),
            ));
        }
        let prepared = async {
            let publisher = session.publish.channel().await?.into_publisher().await?;
            if let Some(dlx) = &config.server.dead_letter_exchange {
                declare_dead_letter(&session.consume, dlx).await?;
            }
            anyhow::Ok(publisher)
        }
        .await;
        let publisher = match prepared {
            Ok(p) => p,
            Err(e) => {
                session.lost.cancel();
                session.consume.close().await;
                session.publish.close().await;
                return Err(e);
            }
        };
        self.dispatcher.set_link(Some(Link {
            publisher,
            lost: session.lost.clone(),
        }));
        let mut started = Vec::new();
        {
            let serving = self.serving.lock().await;
            *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.clone());
            for s in serving.values() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                started.push(rx);
                s.tasks.spawn(run_handler(
                    self.clone(),
                    session.clone(),
                    s.handler.clone(),
                    s.queues.clone(),
                    s.cancel.clone(),
                    s.tasks.clone(),
                    Some(tx),
                ));
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        started.push(rx);
        self.background
            .spawn(run_admin(self.clone(), session.clone(), Some(tx)));
        all_ready(started).await;
        Ok(session)
    }

    /// Forget a lost session: replies wait for the next one, its consumers have stopped.
    async fn end_session(&self, session: &Arc<Session>) {
        self.dispatcher.set_link(None);
        self.metrics.disconnected();
        {
            let _serving = self.serving.lock().await;
            let mut current = self.session.lock().unwrap_or_else(|p| p.into_inner());
            if current.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) {
                *current = None;
            }
        }
        warn!("broker connection lost; reconnecting");
        // Whichever connection still stands goes too, in the background: a half-open one
        // answers nothing, and the next session must not wait for it.
        let old = session.clone();
        self.background.spawn(async move {
            old.consume.close().await;
            old.publish.close().await;
        });
    }

    /// Start serving a handler: on the current session now, and on every later one.
    async fn serve(self: &Arc<Self>, h: config::Handler, module: crate::runtime::Module) {
        let handler = Arc::new(Handler::new(
            h.topic.clone(),
            h.module.clone(),
            h.limits.clone(),
            module,
        ));
        let name = self.config.lock().await.server.name.clone();
        let queues = TopicQueues::new(&handler.topic, &name);
        let cancel = self.cancel.child_token();
        let tasks = TaskTracker::new();
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
        let v = handler.current();
        self.metrics
            .handler_version(&handler.topic, Some((v.id, &v.module.hash_prefix())));
        let mut serving = self.serving.lock().await;
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut started = Vec::new();
        if let Some(session) = session {
            let (tx, rx) = tokio::sync::oneshot::channel();
            started.push(rx);
            tasks.spawn(run_handler(
                self.clone(),
                session,
                handler.clone(),
                queues.clone(),
                cancel.clone(),
                tasks.clone(),
                Some(tx),
            ));
        }
        serving.insert(
            h.topic.clone(),
            Serving {
                handler,
                config: h,
                queues,
                cancel,
                tasks,
            },
        );
        drop(serving);
        all_ready(started).await;
    }

    /// Stop a handler: cancel its consumers, let its in-flight work finish, close its channel.
    async fn unserve(&self, topic: &str) {
        let Some(s) = self.serving.lock().await.remove(topic) else {
            return;
        };
        self.registry.remove(topic);
        self.metrics.handler_version(topic, None);
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
        info!(%topic, "handler removed");
    }

    /// Reload one handler from its file; logs the outcome.
    pub(crate) async fn reload_handler(&self, handler: Arc<Handler>) -> Reloaded {
        let _one_at_a_time = self.reloading.lock().await;
        let (rt, cache, h) = (self.runtime.clone(), self.cache.clone(), handler.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let outcome = h.reload(&rt, cache.as_ref());
            if !matches!(outcome, Reloaded::Unchanged) {
                release_freed_memory();
            }
            outcome
        })
        .await
        .unwrap_or_else(|e| Reloaded::Failed(format!("reload task failed: {e}")));
        match &outcome {
            Reloaded::Unchanged => {}
            Reloaded::Swapped { id } => {
                let v = handler.current();
                self.metrics.reload(&handler.topic, true);
                self.metrics
                    .handler_version(&handler.topic, Some((v.id, &v.module.hash_prefix())));
                info!(topic = %handler.topic, version = id, hash = %v.module.hash_prefix(),
                    methods = %v.module.methods().collect::<Vec<_>>().join(","), "handler reloaded");
            }
            Reloaded::Failed(reason) => {
                self.metrics.reload(&handler.topic, false);
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
        // Who may use the admin topic applies at once: revoking an operator must not wait
        // for a restart. Every other [server] key is fixed for the life of the process.
        let mut restart_only = old.server.clone();
        restart_only.admin_users = new.server.admin_users.clone();
        if old.broker != new.broker || restart_only != new.server {
            warn!(
                "changes to [broker] or [server] take effect after a restart (admin_users excepted); handlers are reloaded now"
            );
        }
        if old.server.admin_users != new.server.admin_users {
            info!(admin_users = ?new.server.admin_users, "admin_users changed");
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
            config.server.admin_users = new.server.admin_users.clone();
        }
        for (topic, h) in wanted {
            if self.serving.lock().await.contains_key(&topic) {
                continue;
            }
            let (rt, cache, hc) = (self.runtime.clone(), self.cache.clone(), h.clone());
            let loaded =
                tokio::task::spawn_blocking(move || load_handler(&rt, cache.as_ref(), &hc)).await;
            match loaded {
                Ok(Ok(module)) => {
                    self.serve(h, module).await;
                    info!(%topic, "handler added");
                }
                Ok(Err(e)) => error!(%topic, error = %format!("{e:#}"), "new handler not added"),
                Err(e) => error!(%topic, error = %e, "new handler not added"),
            }
        }
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

/// Serve one handler on one session: declare its queues, consume them, and do it again if the
/// broker cancels a consumer (its queue was deleted) while the connection stands. Returns when
/// the handler is stopped or the session is lost.
async fn run_handler(
    daemon: Arc<Daemon>,
    session: Arc<Session>,
    handler: Arc<Handler>,
    queues: TopicQueues,
    stop: CancellationToken,
    tasks: TaskTracker,
    mut ready: Ready,
) {
    let topic = handler.topic.clone();
    let mut backoff = {
        let b = &daemon.config.lock().await.broker;
        Backoff::new(b.reconnect_initial, b.reconnect_max)
    };
    loop {
        if stop.is_cancelled() || session.lost.is_cancelled() {
            return;
        }
        let config = daemon.config.lock().await.clone();
        let attached = attach(&session, &config, &queues).await;
        let (channel, consumers) = match attached {
            Ok(a) => a,
            Err(e) => {
                if !session.consume.is_connected() {
                    session.lost.cancel();
                    return;
                }
                error!(%topic, error = %format!("{e:#}"), "cannot declare or consume the handler's queues; retrying");
                // Start-up goes on without it rather than hang; the retries are logged.
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                if !pause(backoff.next_delay(), &stop, &session.lost).await {
                    return;
                }
                continue;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        // This channel's deliveries, so that stopping can wait for their acks before closing
        // it; each is also on the handler's tracker, which shutdown drains.
        let deliveries = TaskTracker::new();
        let attempt = stop.child_token();
        let ends = futures_util::future::join_all(consumers.into_iter().map(|(tag, consumer)| {
            consume_loop(
                Intake {
                    channel: channel.clone(),
                    tag,
                    consumer,
                },
                handler.clone(),
                daemon.dispatcher.clone(),
                Trackers {
                    handler: tasks.clone(),
                    channel: deliveries.clone(),
                },
                attempt.clone(),
                session.lost.clone(),
            )
        }))
        .await;
        if ends.contains(&End::Failed) && !session.consume.is_connected() {
            session.lost.cancel();
        }
        if session.lost.is_cancelled() {
            // The channel is gone with its connection; unacked deliveries come back on the next
            // session, and the acks of those still running will be refused as stale.
            return;
        }
        deliveries.close();
        deliveries.wait().await;
        channel.close().await;
        if stop.is_cancelled() {
            return;
        }
        if ends.contains(&End::Failed) {
            warn!(%topic, "the handler's channel failed; opening a new one");
        } else {
            warn!(%topic, "a consumer was cancelled by the broker (queue deleted?); declaring the queues again");
        }
        if !pause(backoff.next_delay(), &stop, &session.lost).await {
            return;
        }
    }
}

/// Open a channel for a handler, declare its topology and start its three consumers.
async fn attach(
    session: &Session,
    config: &Config,
    queues: &TopicQueues,
) -> anyhow::Result<(Channel, Vec<(String, Consumer)>)> {
    let name = &config.server.name;
    let channel = session.consume.channel().await?;
    let consumers = async {
        channel.prefetch(config.server.prefetch).await?;
        declare(&channel, config, queues).await?;
        let mut consumers = Vec::with_capacity(3);
        for queue in [&queues.topic, &queues.server, &queues.fanout_queue] {
            let tag = format!("warren-{name}-{queue}");
            consumers.push((tag.clone(), channel.consume(queue, &tag).await?));
        }
        anyhow::Ok(consumers)
    }
    .await;
    match consumers {
        Ok(c) => Ok((channel, c)),
        Err(e) => {
            channel.close().await;
            Err(e)
        }
    }
}

/// Consume the admin topic `warren.<server>` (status, reload, rollback) on one session, from
/// an exclusive queue of this process's own: it dies with the connection instead of collecting
/// requests nobody answers, and several daemons may share a server name (oslo allows it for
/// multi-worker services); the first to answer wins. A fresh name on every session, since the
/// old exclusive queue may outlive its connection briefly (RESOURCE_LOCKED otherwise).
async fn run_admin(daemon: Arc<Daemon>, session: Arc<Session>, mut ready: Ready) {
    let mut backoff = {
        let b = &daemon.config.lock().await.broker;
        Backoff::new(b.reconnect_initial, b.reconnect_max)
    };
    loop {
        if daemon.cancel.is_cancelled() || session.lost.is_cancelled() {
            return;
        }
        let config = daemon.config.lock().await.clone();
        let topic = admin_topic(&config.server.name);
        let attached = async {
            let channel = session.consume.channel().await?;
            channel.prefetch(4).await?;
            channel
                .declare_exchange(
                    &config.broker.exchange,
                    Kind::Topic,
                    config.broker.durable,
                    false,
                )
                .await?;
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
            anyhow::Ok(Intake {
                channel,
                tag,
                consumer,
            })
        }
        .await;
        let intake = match attached {
            Ok(i) => i,
            Err(e) => {
                if !session.consume.is_connected() {
                    session.lost.cancel();
                    return;
                }
                error!(%topic, error = %format!("{e:#}"), "cannot consume the admin topic; retrying");
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                if !pause(backoff.next_delay(), &daemon.cancel, &session.lost).await {
                    return;
                }
                continue;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        let channel = intake.channel.clone();
        let admin = Arc::new(Admin {
            daemon: Arc::downgrade(&daemon),
            topic,
        });
        let deliveries = TaskTracker::new();
        // A child: a consumer cancelled by the broker cancels its token, which must not be
        // the daemon's.
        let end = consume_loop(
            intake,
            admin,
            daemon.dispatcher.clone(),
            Trackers {
                handler: daemon.background.clone(),
                channel: deliveries.clone(),
            },
            daemon.cancel.child_token(),
            session.lost.clone(),
        )
        .await;
        if end == End::Failed && !session.consume.is_connected() {
            session.lost.cancel();
        }
        if session.lost.is_cancelled() {
            return;
        }
        deliveries.close();
        deliveries.wait().await;
        channel.close().await;
        if daemon.cancel.is_cancelled()
            || !pause(backoff.next_delay(), &daemon.cancel, &session.lost).await
        {
            return;
        }
    }
}

/// Report a connection's failure (and log its alarms) until the session ends or the daemon
/// stops. Besides lapin's events, the status is checked every second: a close the broker
/// initiated does not always come as an error event.
async fn watch_connection(
    conn: Connection,
    role: &'static str,
    lost: CancellationToken,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let mut events = std::pin::pin!(conn.events());
    let mut check = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = stop.cancelled() => return,
            _ = check.tick() => {
                if !conn.is_connected() {
                    warn!(connection = role, "broker connection closed");
                    lost.cancel();
                    return;
                }
            }
            event = events.next() => match event {
                Some(ConnectionEvent::Failed(e)) => {
                    warn!(connection = role, error = %e, "broker connection failed");
                    lost.cancel();
                    return;
                }
                Some(ConnectionEvent::Blocked(reason)) => {
                    warn!(connection = role, %reason, "broker blocked the connection (resource alarm); publishes wait, bounded by the confirm timeout");
                    if role == "publish" {
                        metrics.blocked(true);
                    }
                }
                Some(ConnectionEvent::Unblocked) => {
                    info!(connection = role, "broker unblocked the connection");
                    if role == "publish" {
                        metrics.blocked(false);
                    }
                }
                None => {
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// The dead-letter exchange and its queue, bound to everything, so nothing sent there is lost
/// even before an operator looks.
async fn declare_dead_letter(conn: &Connection, dlx: &str) -> anyhow::Result<()> {
    let channel = conn.channel().await?;
    let declared = async {
        channel
            .declare_exchange(dlx, Kind::Topic, true, false)
            .await?;
        let spec = QueueSpec {
            durable: true,
            ..QueueSpec::default()
        };
        channel.declare_queue(dlx, &spec).await?;
        channel.bind(dlx, dlx, "#").await?;
        anyhow::Ok(())
    }
    .await;
    channel.close().await;
    declared.with_context(|| format!("cannot declare the dead-letter exchange '{dlx}'"))
}

/// Told once a runner consumes (dropped unsent if it gives up first), so "ready" and
/// "handler added" are logged only when requests can actually be routed.
type Ready = Option<tokio::sync::oneshot::Sender<()>>;

/// Wait until every runner behind `receivers` consumes or gives up.
async fn all_ready(receivers: Vec<tokio::sync::oneshot::Receiver<()>>) {
    for r in receivers {
        let _ = r.await;
    }
}

/// One consumer and what it takes to cancel it.
struct Intake {
    channel: Channel,
    tag: String,
    consumer: Consumer,
}

/// Where a delivery's task is tracked: with its handler (drained on removal and shutdown) and
/// with its channel (drained before the channel closes, so acks are not lost).
struct Trackers {
    handler: TaskTracker,
    channel: TaskTracker,
}

/// Why a consumer loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// We stopped it.
    Stopped,
    /// The broker cancelled the consumer (queue deleted).
    Cancelled,
    /// The consumer failed (usually: the connection died).
    Failed,
}

/// Take deliveries from one queue until `stop` or `lost`; each is handled in its own task.
/// Prefetch bounds how many of those tasks exist at once. A consumer that ends on its own
/// cancels `stop`, so its siblings on the same channel stop too and are consumed again
/// together.
async fn consume_loop<S: Service + 'static>(
    intake: Intake,
    service: Arc<S>,
    dispatcher: Arc<Dispatcher>,
    trackers: Trackers,
    stop: CancellationToken,
    lost: CancellationToken,
) -> End {
    let Intake {
        channel,
        tag,
        mut consumer,
    } = intake;
    let queue: Arc<str> = consumer.queue().into();
    loop {
        let next = tokio::select! {
            _ = lost.cancelled() => return End::Failed,
            _ = stop.cancelled() => {
                // Stop intake first; deliveries the broker already pushed stay unacked and are
                // requeued when the channel closes.
                if let Err(e) = channel.cancel(&tag).await {
                    warn!(%queue, error = %e, "could not cancel consumer");
                }
                return End::Stopped;
            }
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let (service, dispatcher, queue) =
                    (service.clone(), dispatcher.clone(), queue.clone());
                let task = async move {
                    // `handle` settles every delivery itself; a panic would skip that and pin a
                    // prefetch slot until the channel closes, so it is caught and rejected here.
                    // Boxed here, in the task's first poll, so that the spawned future is only
                    // the delivery and a few pointers: tokio moves it into its task cell and
                    // writes the task's output over it, and `handle`'s future is kilobytes.
                    let handled = std::panic::AssertUnwindSafe(Box::pin(
                        dispatcher.handle(&*service, &delivery),
                    ))
                    .catch_unwind()
                    .await;
                    if handled.is_err() {
                        error!(%queue, tag = delivery.tag(), "delivery handling panicked; message rejected");
                        let _ = delivery.reject(false).await;
                    }
                };
                trackers.handler.spawn(trackers.channel.track_future(task));
            }
            Some(Err(e)) => {
                if stop.is_cancelled() || lost.is_cancelled() {
                    return End::Stopped;
                }
                warn!(%queue, error = %e, "consumer failed");
                stop.cancel();
                return End::Failed;
            }
            None => {
                if stop.is_cancelled() || lost.is_cancelled() {
                    return End::Stopped;
                }
                stop.cancel();
                return End::Cancelled;
            }
        }
    }
}

/// Give the heap that compiling modules used back to the system. Cranelift allocates tens of
/// megabytes per module and frees them, but glibc keeps freed memory in its arenas, so a daemon
/// that compiled its handlers at start-up would otherwise idle about 20 MB above one that took
/// them from the cache.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
