//! The daemon's TOML configuration: schema, defaults, environment overrides, and validation
//! errors that name the file, the line and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::runtime::{Grants, Limits, Preopen, RpcGrants};

/// The local broker every tool falls back to.
pub const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// oslo.messaging's default `control_exchange`.
pub const DEFAULT_EXCHANGE: &str = "openstack";

/// A config problem, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}:{column}: {key}: {message}")]
pub struct ConfigError {
    /// The config file.
    pub path: PathBuf,
    /// 1-based line (0 when the problem has no position, e.g. an environment override).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key the problem is about (`handler[1].module`), or `-` when unknown.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Resolved daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from; module paths are relative to its directory.
    pub path: PathBuf,
    /// Broker connection.
    pub broker: Broker,
    /// This server's identity and resource bounds.
    pub server: Server,
    /// One entry per topic served.
    pub handlers: Vec<Handler>,
    /// `[metrics]`: where `/metrics` and `/healthz` are served; `None` when the section is absent.
    pub metrics: Option<Metrics>,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// Listen address of the HTTP endpoint (`127.0.0.1:9464`; port 0 picks a free one).
    pub address: std::net::SocketAddr,
}

/// `[broker]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// AMQP URL; may hold credentials, so log only [`redact_url`] of it.
    pub url: String,
    /// oslo's `control_exchange` (a topic exchange).
    pub exchange: String,
    /// AMQP heartbeat in seconds (RabbitMQ recommends 5–20).
    pub heartbeat: u16,
    /// Declare topic queues and exchanges durable (oslo's `amqp_durable_queues`).
    pub durable: bool,
    /// Declare topic queues as quorum queues (implies durable; oslo's `rabbit_quorum_queue`).
    pub quorum: bool,
    /// First wait before reconnecting after a connection loss; doubles up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// TLS for `amqps://` URLs: a private CA and a client certificate.
    pub tls: crate::amqp::Tls,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Name used for `<topic>.<server>` routing. Defaults to the host name.
    pub name: String,
    /// Deliveries the broker may have outstanding per consumer (`basic.qos`).
    pub prefetch: u16,
    /// Invocations running at once across all handlers.
    pub concurrency: usize,
    /// How long shutdown waits for in-flight work before closing anyway.
    pub shutdown_timeout: Duration,
    /// How many recent `_unique_id`s are remembered to drop duplicates.
    pub dedup_window: usize,
    /// Largest message body accepted; bigger ones are rejected before parsing.
    pub max_message_bytes: usize,
    /// Where compiled modules are cached across restarts; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Reload modules and the config when their files change.
    pub watch: bool,
    /// Deliveries of one request (by the quorum queue's `x-delivery-count`) after which it is
    /// dead-lettered instead of run again.
    pub max_deliveries: u32,
    /// Where poison requests and crashed casts go (a topic exchange and a queue of that name);
    /// `None`: they are answered with a failure or logged, then acked.
    pub dead_letter_exchange: Option<String>,
    /// The broker users (the `user_id` RabbitMQ validates) who may use the admin topic;
    /// `None`: anyone who may publish to the exchange, `Some([])`: no one.
    pub admin_users: Option<Vec<String>>,
}

/// One `[[handler]]`.
#[derive(Debug, Clone)]
pub struct Handler {
    /// The topic it serves (queue names derive from it).
    pub topic: String,
    /// Absolute path to the module.
    pub module: PathBuf,
    /// Sandbox limits.
    pub limits: Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    broker: BrokerFile,
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    handler: Vec<HandlerFile>,
    metrics: Option<MetricsFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    address: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BrokerFile {
    url: Option<String>,
    exchange: Option<Spanned<String>>,
    heartbeat: Option<u16>,
    durable: Option<bool>,
    quorum: Option<bool>,
    reconnect_initial_ms: Option<Spanned<u64>>,
    reconnect_max_ms: Option<Spanned<u64>>,
    password_file: Option<Spanned<PathBuf>>,
    tls_ca_file: Option<Spanned<PathBuf>>,
    tls_cert_file: Option<Spanned<PathBuf>>,
    tls_key_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    name: Option<Spanned<String>>,
    prefetch: Option<Spanned<u16>>,
    concurrency: Option<Spanned<usize>>,
    shutdown_timeout_secs: Option<u64>,
    dedup_window: Option<usize>,
    max_message_bytes: Option<usize>,
    cache_dir: Option<PathBuf>,
    watch: Option<bool>,
    max_deliveries: Option<Spanned<u32>>,
    dead_letter_exchange: Option<Spanned<String>>,
    admin_users: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandlerFile {
    topic: Spanned<String>,
    module: Spanned<PathBuf>,
    timeout_ms: Option<Spanned<u64>>,
    memory_mib: Option<Spanned<u64>>,
    max_result_bytes: Option<usize>,
    max_args_bytes: Option<usize>,
    log_stdio: Option<bool>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    dirs: Vec<Spanned<DirFile>>,
    call: Option<Spanned<Vec<String>>>,
    cast: Option<Spanned<Vec<String>>>,
    notify: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirFile {
    host: PathBuf,
    guest: String,
    #[serde(default)]
    writable: bool,
}

impl Config {
    /// Read and validate `path`, then apply environment overrides (`WARREN_BROKER_URL`,
    /// `WARREN_EXCHANGE`, `WARREN_SERVER_NAME`, `WARREN_BROKER_PASSWORD`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: 0,
            column: 0,
            key: "-".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text, |k| std::env::var(k).ok())
    }

    /// Parse `text` as if read from `path`; `env` supplies overrides (a seam for tests).
    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>, key: &str, message: String| {
            let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
            ConfigError {
                path: path.to_owned(),
                line,
                column,
                key: key.to_owned(),
                message,
            }
        };
        let file: File = toml::from_str(text).map_err(|e| {
            at(
                e.span(),
                &key_of(e.message()),
                e.message().trim().to_owned(),
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));

        let exchange = env("WARREN_EXCHANGE")
            .or_else(|| file.broker.exchange.as_ref().map(|e| e.get_ref().clone()))
            .unwrap_or_else(|| DEFAULT_EXCHANGE.to_owned());
        if exchange.is_empty() {
            let span = file.broker.exchange.as_ref().map(|e| e.span());
            return Err(at(span, "broker.exchange", "must not be empty".into()));
        }
        let read = |f: &Spanned<PathBuf>, key: &str| {
            let path = base.join(f.get_ref());
            std::fs::read(&path).map_err(|e| {
                at(
                    Some(f.span()),
                    key,
                    format!("cannot read {}: {e}", path.display()),
                )
            })
        };
        let mut url = env("WARREN_BROKER_URL")
            .or(file.broker.url)
            .unwrap_or_else(|| DEFAULT_BROKER_URL.to_owned());
        // The password may live apart from the URL, so the config can be shared and the secret
        // kept in a file only the daemon reads (or in the environment).
        let password = match (env("WARREN_BROKER_PASSWORD"), &file.broker.password_file) {
            (Some(p), _) => Some(p),
            (None, Some(f)) => {
                let bytes = read(f, "broker.password_file")?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    at(
                        Some(f.span()),
                        "broker.password_file",
                        "is not UTF-8".into(),
                    )
                })?;
                Some(text.trim_end_matches(['\r', '\n']).to_owned())
            }
            (None, None) => None,
        };
        if let Some(password) = password {
            let mut parsed = url::Url::parse(&url)
                .map_err(|e| at(None, "broker.url", format!("not a valid AMQP URL: {e}")))?;
            if parsed.set_password(Some(&password)).is_err() {
                return Err(at(None, "broker.url", "cannot carry a password".into()));
            }
            url = parsed.to_string();
        }
        let tls = crate::amqp::Tls {
            ca_pem: match &file.broker.tls_ca_file {
                Some(f) => Some(String::from_utf8(read(f, "broker.tls_ca_file")?).map_err(
                    |_| {
                        at(
                            Some(f.span()),
                            "broker.tls_ca_file",
                            "is not PEM text".into(),
                        )
                    },
                )?),
                None => None,
            },
            client: match (&file.broker.tls_cert_file, &file.broker.tls_key_file) {
                (Some(c), Some(k)) => Some((
                    read(c, "broker.tls_cert_file")?,
                    read(k, "broker.tls_key_file")?,
                )),
                (None, None) => None,
                (Some(c), None) => {
                    return Err(at(
                        Some(c.span()),
                        "broker.tls_key_file",
                        "tls_cert_file needs tls_key_file too".into(),
                    ));
                }
                (None, Some(k)) => {
                    return Err(at(
                        Some(k.span()),
                        "broker.tls_cert_file",
                        "tls_key_file needs tls_cert_file too".into(),
                    ));
                }
            },
        };
        let broker = Broker {
            url,
            exchange,
            heartbeat: file.broker.heartbeat.unwrap_or(15),
            durable: file.broker.durable.unwrap_or(false) || file.broker.quorum.unwrap_or(false),
            quorum: file.broker.quorum.unwrap_or(false),
            reconnect_initial: Duration::from_millis(
                file.broker
                    .reconnect_initial_ms
                    .as_ref()
                    .map_or(100, |v| *v.get_ref()),
            ),
            reconnect_max: Duration::from_millis(
                file.broker
                    .reconnect_max_ms
                    .as_ref()
                    .map_or(5000, |v| *v.get_ref()),
            ),
            tls,
        };
        if broker.reconnect_initial.is_zero() || broker.reconnect_max < broker.reconnect_initial {
            let span = file
                .broker
                .reconnect_max_ms
                .as_ref()
                .or(file.broker.reconnect_initial_ms.as_ref())
                .map(|v| v.span());
            return Err(at(
                span,
                "broker.reconnect_max_ms",
                "reconnect_initial_ms must be at least 1 and at most reconnect_max_ms".into(),
            ));
        }
        if let Err(e) = url::Url::parse(&broker.url) {
            return Err(at(None, "broker.url", format!("not a valid AMQP URL: {e}")));
        }

        let name = match env("WARREN_SERVER_NAME")
            .or_else(|| file.server.name.as_ref().map(|n| n.get_ref().clone()))
        {
            Some(name) => name,
            None => hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".to_owned()),
        };
        if !valid_name(&name) {
            let span = file.server.name.as_ref().map(|n| n.span());
            return Err(at(
                span,
                "server.name",
                format!("'{name}' must be 1-100 characters of letters, digits, '-', '_' or '.'"),
            ));
        }
        let prefetch = file.server.prefetch.as_ref().map_or(64, |p| *p.get_ref());
        if prefetch == 0 {
            let span = file.server.prefetch.as_ref().map(|p| p.span());
            return Err(at(
                span,
                "server.prefetch",
                "must be at least 1 (0 would mean unbounded)".into(),
            ));
        }
        let concurrency = file
            .server
            .concurrency
            .as_ref()
            .map_or(16, |c| *c.get_ref());
        if !(1..=4096).contains(&concurrency) {
            let span = file.server.concurrency.as_ref().map(|c| c.span());
            return Err(at(
                span,
                "server.concurrency",
                "must be between 1 and 4096".into(),
            ));
        }
        let server = Server {
            name,
            prefetch,
            concurrency,
            shutdown_timeout: Duration::from_secs(file.server.shutdown_timeout_secs.unwrap_or(30)),
            dedup_window: file.server.dedup_window.unwrap_or(4096),
            max_message_bytes: file.server.max_message_bytes.unwrap_or(1 << 20),
            cache_dir: match file.server.cache_dir {
                Some(dir) if dir.as_os_str().is_empty() => None,
                Some(dir) => Some(base.join(dir)),
                None => default_cache_dir(&env),
            },
            watch: file.server.watch.unwrap_or(true),
            max_deliveries: file
                .server
                .max_deliveries
                .as_ref()
                .map_or(5, |m| *m.get_ref()),
            dead_letter_exchange: file
                .server
                .dead_letter_exchange
                .as_ref()
                .map(|d| d.get_ref().clone()),
            admin_users: file
                .server
                .admin_users
                .as_ref()
                .map(|u| u.get_ref().clone()),
        };
        if let Some(users) = &file.server.admin_users
            && let Some(bad) = users
                .get_ref()
                .iter()
                .find(|u| u.is_empty() || u.len() > 255)
        {
            return Err(at(
                Some(users.span()),
                "server.admin_users",
                format!("'{bad}' is not a broker user name (1-255 characters)"),
            ));
        }
        if server.max_deliveries == 0 {
            let span = file.server.max_deliveries.as_ref().map(|m| m.span());
            return Err(at(
                span,
                "server.max_deliveries",
                "must be at least 1".into(),
            ));
        }
        if let Some(dlx) = &file.server.dead_letter_exchange
            && !valid_name(dlx.get_ref())
        {
            return Err(at(
                Some(dlx.span()),
                "server.dead_letter_exchange",
                format!(
                    "'{}' must be 1-100 characters of letters, digits, '-', '_' or '.'",
                    dlx.get_ref()
                ),
            ));
        }
        let metrics = match &file.metrics {
            None => None,
            Some(m) => match m.address.get_ref().parse() {
                Ok(address) => Some(Metrics { address }),
                Err(e) => {
                    return Err(at(
                        Some(m.address.span()),
                        "metrics.address",
                        format!(
                            "'{}' is not an address like 127.0.0.1:9464: {e}",
                            m.address.get_ref()
                        ),
                    ));
                }
            },
        };

        let mut handlers: Vec<Handler> = Vec::with_capacity(file.handler.len());
        for (i, h) in file.handler.into_iter().enumerate() {
            let topic = h.topic.get_ref();
            if !valid_name(topic) {
                return Err(at(
                    Some(h.topic.span()),
                    &format!("handler[{i}].topic"),
                    format!(
                        "'{topic}' must be 1-100 characters of letters, digits, '-', '_' or '.'"
                    ),
                ));
            }
            if handlers.iter().any(|o| &o.topic == topic) {
                return Err(at(
                    Some(h.topic.span()),
                    &format!("handler[{i}].topic"),
                    format!("topic '{topic}' is configured twice"),
                ));
            }
            let mut limits = Limits::DEFAULT;
            if let Some(t) = &h.timeout_ms {
                if *t.get_ref() == 0 {
                    return Err(at(
                        Some(t.span()),
                        &format!("handler[{i}].timeout_ms"),
                        "must be at least 1".into(),
                    ));
                }
                limits.timeout = Duration::from_millis(*t.get_ref());
            }
            if let Some(m) = &h.memory_mib {
                if *m.get_ref() == 0 || *m.get_ref() > 4096 {
                    return Err(at(
                        Some(m.span()),
                        &format!("handler[{i}].memory_mib"),
                        "must be between 1 and 4096".into(),
                    ));
                }
                limits.memory_bytes = (*m.get_ref() as usize) << 20;
            }
            if let Some(r) = h.max_result_bytes {
                limits.max_result_bytes = r;
            }
            if let Some(a) = h.max_args_bytes {
                limits.max_args_bytes = a;
            }
            if let Some(l) = h.log_stdio {
                limits.log_stdio = l;
            }
            let mut grants = Grants {
                env: h.env.into_iter().collect(),
                dirs: Vec::new(),
            };
            for (j, dir) in h.dirs.iter().enumerate() {
                let d = dir.get_ref();
                let host = base.join(&d.host);
                if !host.is_dir() {
                    return Err(at(
                        Some(dir.span()),
                        &format!("handler[{i}].dirs[{j}].host"),
                        format!("{} is not a directory", host.display()),
                    ));
                }
                if d.guest.is_empty() {
                    return Err(at(
                        Some(dir.span()),
                        &format!("handler[{i}].dirs[{j}].guest"),
                        "must not be empty".into(),
                    ));
                }
                grants.dirs.push(Preopen {
                    host,
                    guest: d.guest.clone(),
                    writable: d.writable,
                });
            }
            if grants != Grants::default() {
                limits.grants = Some(std::sync::Arc::new(grants));
            }
            for (key, list) in [("call", &h.call), ("cast", &h.cast), ("notify", &h.notify)] {
                let Some(list) = list else { continue };
                if let Some(bad) = list.get_ref().iter().find(|t| *t != "*" && !valid_name(t)) {
                    return Err(at(
                        Some(list.span()),
                        &format!("handler[{i}].{key}"),
                        format!(
                            "'{bad}' must be \"*\" or a topic of 1-100 letters, digits, '-', '_' or '.'"
                        ),
                    ));
                }
            }
            let rpc = RpcGrants {
                call: h.call.map(Spanned::into_inner).unwrap_or_default(),
                cast: h.cast.map(Spanned::into_inner).unwrap_or_default(),
                notify: h.notify.map(Spanned::into_inner).unwrap_or_default(),
            };
            if rpc != RpcGrants::default() {
                limits.rpc = Some(std::sync::Arc::new(rpc));
            }
            handlers.push(Handler {
                topic: topic.clone(),
                module: base.join(h.module.get_ref()),
                limits,
            });
        }
        Ok(Config {
            path: path.to_owned(),
            broker,
            server,
            handlers,
            metrics,
        })
    }
}

/// `$XDG_CACHE_HOME/warren/modules`, else `$HOME/.cache/warren/modules`.
fn default_cache_dir(env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".cache")))
        .map(|d| d.join("warren/modules"))
}

/// Topic and server names end up in queue names, routing keys and consumer tags, which AMQP caps
/// at 255 bytes and which combine two of them (`warren-<server>-<topic>.<server>`); 100 each keeps
/// every combination legal.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// toml names the offending key in backticks ("unknown field `x`", "missing field `topic`").
fn key_of(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .map(str::to_owned)
        .unwrap_or_else(|| "-".to_owned())
}

/// The URL with its password replaced, for logs. Credentials never reach a log line.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/warren/w.toml"), text, |_| None)
    }

    #[test]
    fn minimal_config_resolves_defaults_and_relative_module() {
        let c = parse("[[handler]]\ntopic = \"echo\"\nmodule = \"echo.wasm\"\n").expect("valid");
        assert_eq!(c.broker.url, DEFAULT_BROKER_URL);
        assert_eq!(c.broker.exchange, "openstack");
        assert_eq!(c.handlers[0].module, Path::new("/etc/warren/echo.wasm"));
        assert_eq!(c.handlers[0].limits, Limits::DEFAULT);
        assert!(!c.server.name.is_empty());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse("[broker]\nurl = \"amqp://x\"\n\n[[handler]]\ntopic = \"a\"\nmodule = \"a.wasm\"\ntimout_ms = 5\n")
            .expect_err("unknown key");
        assert_eq!(e.line, 7, "{e}");
        assert_eq!(e.key, "timout_ms");
        assert!(e.to_string().starts_with("/etc/warren/w.toml:7:"), "{e}");
    }

    #[test]
    fn missing_and_invalid_values_are_located() {
        let e = parse("[[handler]]\ntopic = \"a\"\n").expect_err("missing module");
        assert_eq!(e.key, "module", "{e}");
        let e =
            parse("[[handler]]\ntopic = \"a b\"\nmodule = \"a.wasm\"\n").expect_err("bad topic");
        assert_eq!((e.line, e.key.as_str()), (2, "handler[0].topic"), "{e}");
        let e = parse("[[handler]]\ntopic = \"a\"\nmodule = \"a.wasm\"\n[[handler]]\ntopic = \"a\"\nmodule = \"b.wasm\"\n")
            .expect_err("duplicate");
        assert_eq!(e.line, 5, "{e}");
        let e = parse("[server]\nprefetch = 0\n").expect_err("prefetch 0");
        assert_eq!((e.line, e.key.as_str()), (2, "server.prefetch"));
        let e = parse("[[handler]]\ntopic = \"a\"\nmodule = \"a.wasm\"\ntimeout_ms = \"slow\"\n")
            .expect_err("type");
        assert_eq!(e.line, 4, "{e}");
    }

    #[test]
    fn admin_users_are_optional_and_checked() {
        let c = parse("[server]\nname = \"n\"\n").expect("valid");
        assert_eq!(c.server.admin_users, None, "open unless listed");
        let c = parse("[server]\nadmin_users = [\"ops\", \"deploy\"]\n").expect("valid");
        assert_eq!(
            c.server.admin_users,
            Some(vec!["ops".to_owned(), "deploy".to_owned()])
        );
        let c = parse("[server]\nadmin_users = []\n").expect("valid");
        assert_eq!(
            c.server.admin_users,
            Some(vec![]),
            "an empty list admits no one"
        );
        let e = parse("[server]\nname = \"n\"\nadmin_users = [\"ops\", \"\"]\n")
            .expect_err("empty name");
        assert_eq!((e.line, e.key.as_str()), (3, "server.admin_users"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::parse(
            Path::new("w.toml"),
            "[broker]\nurl = \"amqp://a\"\n",
            |k| match k {
                "WARREN_BROKER_URL" => Some("amqp://u:secret@b:5672/%2f".into()),
                "WARREN_SERVER_NAME" => Some("node-7".into()),
                _ => None,
            },
        )
        .expect("valid");
        assert_eq!(c.broker.url, "amqp://u:secret@b:5672/%2f");
        assert_eq!(c.server.name, "node-7");
    }

    #[test]
    fn grants_are_parsed_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("w.toml");
        std::fs::create_dir(dir.path().join("data")).expect("mkdir");
        let text = "[[handler]]\ntopic = \"f\"\nmodule = \"f.wasm\"\nenv = { GREETING = \"hi\" }\ndirs = [{ host = \"data\", guest = \"/data\" }]\n";
        let c = Config::parse(&config, text, |_| None).expect("valid");
        let grants = c.handlers[0].limits.grants.clone().expect("granted");
        assert_eq!(grants.env, [("GREETING".to_owned(), "hi".to_owned())]);
        assert_eq!(grants.dirs[0].host, dir.path().join("data"));
        assert!(!grants.dirs[0].writable, "read-only unless stated");
        assert!(
            parse("[[handler]]\ntopic = \"a\"\nmodule = \"a.wasm\"\n")
                .expect("valid")
                .handlers[0]
                .limits
                .grants
                .is_none(),
            "nothing by default"
        );

        let c = parse("[[handler]]\ntopic = \"api\"\nmodule = \"a.wasm\"\ncall = [\"echo\", \"calc\"]\nnotify = [\"*\"]\n")
            .expect("valid");
        let rpc = c.handlers[0].limits.rpc.clone().expect("granted");
        assert_eq!(rpc.call, ["echo", "calc"]);
        assert!(rpc.cast.is_empty(), "nothing unless listed");
        assert_eq!(rpc.notify, ["*"]);
        let e = parse(
            "[[handler]]\ntopic = \"api\"\nmodule = \"a.wasm\"\n\ncast = [\"ok\", \"not ok\"]\n",
        )
        .expect_err("bad topic");
        assert_eq!((e.line, e.key.as_str()), (5, "handler[0].cast"), "{e}");

        let missing = text.replace("\"data\"", "\"nope\"");
        let e = Config::parse(&config, &missing, |_| None).expect_err("missing dir");
        assert_eq!(
            (e.line, e.key.as_str()),
            (5, "handler[0].dirs[0].host"),
            "{e}"
        );
    }

    #[test]
    fn redaction_hides_the_password() {
        let r = redact_url("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("guest"), "{r}");
    }
}
