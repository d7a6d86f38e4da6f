//! `warren call | multicall | cast | fanout | notify`: the client side, from the shell.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use warren::client::{CallError, Client, Notification, Target};
use warren::config::{Config, DEFAULT_BROKER_URL, DEFAULT_EXCHANGE};

use super::{EXIT_FAILED, usage_error};

/// How to reach the broker; shared by every client command.
#[derive(Args, Clone)]
pub struct BrokerArgs {
    /// Broker URL [default: WARREN_BROKER_URL, else the config's, else amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, global = true)]
    broker: Option<String>,
    /// Take the broker URL and exchange from this daemon config.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Control exchange [default: the config's, else openstack]
    #[arg(long, global = true)]
    exchange: Option<String>,
}

/// Where the client commands connect.
struct Broker {
    url: String,
    exchange: String,
    tls: warren::amqp::Tls,
}

impl Broker {
    async fn connect(&self) -> Result<Client, CallError> {
        Client::connect_tls(&self.url, &self.exchange, &self.tls).await
    }
}

impl BrokerArgs {
    /// The broker URL, the exchange, and the config's TLS settings (none without `--config`).
    fn resolve(&self) -> anyhow::Result<Broker> {
        let config = match &self.config {
            Some(path) => Some(Config::load(path)?),
            None => None,
        };
        let url = self
            .broker
            .clone()
            .or_else(|| std::env::var("WARREN_BROKER_URL").ok())
            .or_else(|| config.as_ref().map(|c| c.broker.url.clone()))
            .unwrap_or_else(|| DEFAULT_BROKER_URL.to_owned());
        let exchange = self
            .exchange
            .clone()
            .or_else(|| config.as_ref().map(|c| c.broker.exchange.clone()))
            .unwrap_or_else(|| DEFAULT_EXCHANGE.to_owned());
        let tls = config.map(|c| c.broker.tls).unwrap_or_default();
        Ok(Broker { url, exchange, tls })
    }
}

/// Call a method and print its result as JSON.
///
/// Exits 1 with the remote error's class and message on stderr if the handler failed, and 1
/// with a timeout message if no reply came in time.
#[derive(Args)]
#[command(
    after_help = "Examples:\n  warren call echo echo '{\"value\": 42}'\n  \
warren call calc div '{\"a\": 1, \"b\": 0}'\n  warren call echo echo '{\"value\": 1}' --server host1 --timeout 5"
)]
pub struct CallArgs {
    /// Topic to call.
    topic: String,
    /// Method name.
    method: String,
    /// Arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
    /// Send to one server (`<topic>.<server>`) instead of any server of the topic.
    #[arg(long)]
    server: Option<String>,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Request context as a JSON object (sent as `_context_*` fields).
    #[arg(long, default_value = "{}")]
    context: String,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Call a streaming method and print each result as it arrives (nova's multicall).
#[derive(Args)]
#[command(after_help = "Example:\n  warren multicall calc fib '{\"n\": 10}'")]
pub struct MulticallArgs {
    #[command(flatten)]
    pub call: CallArgs,
}

/// Send a method without waiting for any result (fire and forget).
#[derive(Args)]
#[command(after_help = "Example:\n  warren cast echo echo '{\"value\": 1}'")]
pub struct CastArgs {
    /// Topic to cast to.
    topic: String,
    /// Method name.
    method: String,
    /// Arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
    /// Send to one server (`<topic>.<server>`).
    #[arg(long)]
    server: Option<String>,
    /// Request context as a JSON object.
    #[arg(long, default_value = "{}")]
    context: String,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Cast to every server of a topic (its `<topic>_fanout` exchange).
#[derive(Args)]
#[command(after_help = "Example:\n  warren fanout echo echo '{\"value\": 1}'")]
pub struct FanoutArgs {
    /// Topic.
    topic: String,
    /// Method name.
    method: String,
    /// Arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
    /// Request context as a JSON object.
    #[arg(long, default_value = "{}")]
    context: String,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Publish an oslo notification on `<topic>.<priority>` (default `notifications.info`).
#[derive(Args)]
#[command(
    after_help = "Example:\n  warren notify compute.instance.create.end '{\"id\": 1}' --priority info"
)]
pub struct NotifyArgs {
    /// Event type, e.g. compute.instance.create.end.
    event_type: String,
    /// Payload as a JSON object.
    #[arg(default_value = "{}")]
    payload: String,
    /// Priority: debug, info, warn, error, critical, audit or sample.
    #[arg(long, default_value = "info")]
    priority: String,
    /// Notification topic.
    #[arg(long, default_value = "notifications")]
    topic: String,
    /// publisher_id of the notification.
    #[arg(long, default_value = "warren.cli")]
    publisher_id: String,
    /// Request context as a JSON object.
    #[arg(long, default_value = "{}")]
    context: String,
    #[command(flatten)]
    broker: BrokerArgs,
}

fn object(text: &str, what: &str) -> anyhow::Result<Box<RawValue>> {
    let raw: Box<RawValue> =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{what} is not valid JSON: {e}"))?;
    anyhow::ensure!(
        raw.get().trim_start().starts_with('{'),
        "{what} must be a JSON object"
    );
    Ok(raw)
}

fn context(text: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => anyhow::bail!("--context must be a JSON object"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn report(err: CallError) -> ExitCode {
    match &err {
        CallError::Remote(remote) => {
            eprintln!("remote error: {}: {}", remote.class, remote.message);
            let doc = serde_json::json!({"class": remote.class, "module": remote.module, "message": remote.message, "kwargs": remote.kwargs});
            eprintln!("{doc}");
        }
        _ => eprintln!("error: {err}"),
    }
    ExitCode::from(EXIT_FAILED)
}

/// `warren call` and `warren multicall`.
pub fn call(args: CallArgs, multi: bool) -> ExitCode {
    let prepared = (|| -> anyhow::Result<_> {
        let broker = args.broker.resolve()?;
        anyhow::ensure!(
            args.timeout > 0.0 && args.timeout.is_finite(),
            "--timeout must be a positive number of seconds"
        );
        Ok((
            broker,
            object(&args.args, "ARGS")?,
            context(&args.context)?,
            runtime()?,
        ))
    })();
    let (broker, call_args, ctx, rt) = match prepared {
        Ok(p) => p,
        Err(e) => return usage_error(e),
    };
    let target = Target {
        topic: args.topic.clone(),
        server: args.server.clone(),
    };
    let timeout = Duration::from_secs_f64(args.timeout);
    rt.block_on(async {
        let client = match broker.connect().await {
            Ok(c) => c,
            Err(e) => return report(e),
        };
        let code = if multi {
            match client
                .multicall(&target, &args.method, &call_args, &ctx, timeout)
                .await
            {
                Ok(mut rx) => {
                    let mut code = ExitCode::SUCCESS;
                    while let Some(item) = rx.recv().await {
                        match item {
                            Ok(result) => println!("{}", result.get()),
                            Err(e) => {
                                code = report(e);
                                break;
                            }
                        }
                    }
                    code
                }
                Err(e) => report(e),
            }
        } else {
            match client
                .call(&target, &args.method, &call_args, &ctx, timeout)
                .await
            {
                Ok(result) => {
                    println!("{}", result.get());
                    ExitCode::SUCCESS
                }
                Err(e) => report(e),
            }
        };
        client.close().await;
        code
    })
}

/// `warren cast`.
pub fn cast(args: CastArgs) -> ExitCode {
    let target = Target {
        topic: args.topic,
        server: args.server,
    };
    send(
        &args.broker,
        &args.args,
        &args.context,
        Op::Cast {
            target,
            method: args.method,
        },
    )
}

/// `warren fanout`.
pub fn fanout(args: FanoutArgs) -> ExitCode {
    send(
        &args.broker,
        &args.args,
        &args.context,
        Op::Fanout {
            topic: args.topic,
            method: args.method,
        },
    )
}

/// `warren notify`.
pub fn notify(args: NotifyArgs) -> ExitCode {
    const PRIORITIES: [&str; 7] = [
        "debug", "info", "warn", "error", "critical", "audit", "sample",
    ];
    if !PRIORITIES.contains(&args.priority.to_ascii_lowercase().as_str()) {
        return usage_error(anyhow::anyhow!(
            "--priority must be one of {}",
            PRIORITIES.join(", ")
        ));
    }
    let broker = args.broker.clone();
    let (payload, ctx) = (args.payload.clone(), args.context.clone());
    send(&broker, &payload, &ctx, Op::Notify(args))
}

/// A one-way send.
enum Op {
    Cast { target: Target, method: String },
    Fanout { topic: String, method: String },
    Notify(NotifyArgs),
}

fn send(broker: &BrokerArgs, body: &str, ctx: &str, op: Op) -> ExitCode {
    let prepared = (|| -> anyhow::Result<_> {
        let broker = broker.resolve()?;
        Ok((
            broker,
            object(body, "the JSON argument")?,
            context(ctx)?,
            runtime()?,
        ))
    })();
    let (broker, body, ctx, rt) = match prepared {
        Ok(p) => p,
        Err(e) => return usage_error(e),
    };
    rt.block_on(async move {
        let client = match broker.connect().await {
            Ok(c) => c,
            Err(e) => return report(e),
        };
        let sent = match &op {
            Op::Cast { target, method } => client.cast(target, method, &body, &ctx).await,
            Op::Fanout { topic, method } => client.fanout_cast(topic, method, &body, &ctx).await,
            Op::Notify(n) => {
                let notification = Notification {
                    publisher_id: &n.publisher_id,
                    event_type: &n.event_type,
                    priority: &n.priority,
                    topic: &n.topic,
                    payload: &body,
                    context: &ctx,
                };
                client.notify(&notification).await
            }
        };
        client.close().await;
        match sent {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(e),
        }
    })
}

/// The admin commands' shared help: who a daemon answers.
macro_rules! admin_users_note {
    () => {
        "\n\nA daemon whose config sets `[server] admin_users` answers only those broker users: \
         the\nlogin of the broker URL used here. Anyone else gets a Forbidden remote error."
    };
}

/// Which daemon an admin command talks to.
#[derive(Args)]
pub struct AdminTarget {
    /// The daemon's server name (its `[server] name`) [default: this host's name]
    #[arg(long)]
    server: Option<String>,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Show a running daemon's handlers: topic, module, version, hash, methods, load time, and the
/// last reload error.
#[derive(Args)]
#[command(after_help = concat!("Examples:\n  warren status\n  warren status --server host1 --json", admin_users_note!()))]
pub struct StatusArgs {
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: AdminTarget,
}

/// Make a running daemon re-read its config and its modules now (it also does this by itself
/// when the files change).
#[derive(Args)]
#[command(after_help = concat!("Examples:\n  warren reload\n  warren reload calc", admin_users_note!()))]
pub struct ReloadArgs {
    /// Only this handler's module (the config is not re-read then).
    topic: Option<String>,
    #[command(flatten)]
    target: AdminTarget,
}

/// Put a handler back on its previous good version.
///
/// The version rolled back from is kept: a second rollback goes forward again. The rollback
/// holds until the module file changes; reloads of the unchanged file leave it in place.
#[derive(Args)]
#[command(after_help = concat!("Example:\n  warren rollback calc", admin_users_note!()))]
pub struct RollbackArgs {
    /// The handler's topic.
    topic: String,
    #[command(flatten)]
    target: AdminTarget,
}

fn admin(target: &AdminTarget, method: &str, args: Value) -> Result<Value, ExitCode> {
    let prepared = (|| -> anyhow::Result<_> {
        let broker = target.broker.resolve()?;
        let server = match &target.server {
            Some(s) => s.clone(),
            None => hostname::get()?.to_string_lossy().into_owned(),
        };
        Ok((
            broker,
            server,
            serde_json::value::to_raw_value(&args)?,
            runtime()?,
        ))
    })();
    let (broker, server, args, rt) = prepared.map_err(usage_error)?;
    rt.block_on(async {
        let client = broker.connect().await.map_err(report)?;
        let target = Target::topic(warren::server::admin_topic(&server));
        let result = client
            .call(&target, method, &args, &Map::new(), Duration::from_secs(30))
            .await;
        client.close().await;
        let raw = result.map_err(report)?;
        serde_json::from_str(raw.get()).map_err(|e| usage_error(e.into()))
    })
}

/// `warren status`.
pub fn status(args: StatusArgs) -> ExitCode {
    let value = match admin(&args.target, "status", serde_json::json!({})) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if args.json {
        println!("{value}");
        return ExitCode::SUCCESS;
    }
    let handlers: Vec<warren::registry::HandlerStatus> =
        serde_json::from_value(value["handlers"].clone()).unwrap_or_default();
    println!("server {}", value["server"].as_str().unwrap_or("?"));
    for h in handlers {
        println!("\n{}", h.topic);
        println!("  module:    {}", h.module);
        println!(
            "  version:   {} (sha256 {}…){}",
            h.version,
            h.hash,
            if h.can_roll_back {
                ", previous kept"
            } else {
                ""
            }
        );
        println!("  methods:   {}", h.methods.join(", "));
        println!("  loaded at: {} (unix time)", h.loaded_at);
        println!(
            "  requests:  {} ok, {} failed",
            h.requests_ok, h.requests_failed
        );
        if let Some(e) = h.last_error {
            println!("  last reload error: {e}");
        }
    }
    ExitCode::SUCCESS
}

/// `warren reload`.
pub fn reload(args: ReloadArgs) -> ExitCode {
    let body = match &args.topic {
        Some(t) => serde_json::json!({"topic": t}),
        None => serde_json::json!({}),
    };
    match admin(&args.target, "reload", body) {
        Ok(v) => {
            let mut failed = false;
            if let Some(map) = v.as_object() {
                for (topic, outcome) in map {
                    failed |= outcome["outcome"] == "failed";
                    match outcome["outcome"].as_str() {
                        Some("failed") => println!(
                            "{topic}: failed: {}",
                            outcome["error"].as_str().unwrap_or("?")
                        ),
                        Some(o) => println!("{topic}: {o} (version {})", outcome["version"]),
                        None => println!("{topic}: {outcome}"),
                    }
                }
            }
            if failed {
                ExitCode::from(EXIT_FAILED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(code) => code,
    }
}

/// `warren rollback`.
pub fn rollback(args: RollbackArgs) -> ExitCode {
    match admin(
        &args.target,
        "rollback",
        serde_json::json!({"topic": args.topic}),
    ) {
        Ok(v) => {
            println!("{}: now serving version {}", args.topic, v["version"]);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
