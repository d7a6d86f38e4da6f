//! The daemon's own RPC topic, `warren.<server>`: `status`, `reload` and `rollback`, answered
//! natively (no Wasm) through the same decode, reply and ack path as every handler.
//!
//! Who may use it is `[server] admin_users`: the broker users whose `user_id` RabbitMQ
//! validated on the request. Unset, it is anyone who may publish to the exchange.

use std::sync::Weak;

use serde_json::{Value, json};

use crate::dispatch::{Answer, Dispatcher, Service, USER_ID_KEY};
use crate::metrics::TopicSeries;
use crate::registry::Reloaded;
use crate::runtime::outbound::classes::FORBIDDEN;
use crate::runtime::{Failure, Spent, class};
use crate::server::Daemon;
use crate::wire::Request;

/// The admin service of one daemon.
pub(crate) struct Admin {
    /// Weak: the admin consumer must not keep a stopping daemon alive.
    pub(crate) daemon: Weak<Daemon>,
    pub(crate) topic: String,
}

impl Service for Admin {
    type Snapshot = ();

    fn topic(&self) -> &str {
        &self.topic
    }

    fn snapshot(&self) {}

    fn version((): &()) -> Option<u64> {
        None
    }

    fn method_label<'a>(&self, (): &(), method: &'a str) -> &'a str {
        match method {
            "status" | "reload" | "rollback" => method,
            _ => "-",
        }
    }

    async fn serve(
        &self,
        _: &Dispatcher,
        (): &(),
        request: &Request,
        _: &TopicSeries,
    ) -> (Answer, Spent) {
        (self.answer(request).await, Spent::none())
    }
}

impl Admin {
    async fn answer(&self, request: &Request) -> Answer {
        let Some(daemon) = self.daemon.upgrade() else {
            return Err(Failure::new(class::OVERLOADED, "daemon is shutting down"));
        };
        let user = request.context.get(USER_ID_KEY).and_then(Value::as_str);
        if let Some(allowed) = &daemon.config.lock().await.server.admin_users
            && !user.is_some_and(|u| allowed.iter().any(|a| a == u))
        {
            let who = user.map_or_else(
                || "a request without a broker-validated user_id".to_owned(),
                |u| format!("broker user '{}'", u.chars().take(64).collect::<String>()),
            );
            crate::in_span!(
                tracing::Level::WARN,
                user,
                "admin request refused: not in server.admin_users"
            );
            return Err(Failure::new(
                FORBIDDEN,
                format!("{who} may not use the admin topic (server.admin_users)"),
            ));
        }
        let args: Value = serde_json::from_str(request.args.get())
            .map_err(|e| Failure::new(class::INVALID_ARGS, e.to_string()))?;
        let topic = args.get("topic").and_then(Value::as_str);
        let value = match request.method.as_str() {
            "status" => {
                let name = daemon.config.lock().await.server.name.clone();
                json!({"server": name, "handlers": daemon.registry.all().iter().map(|h| h.status()).collect::<Vec<_>>()})
            }
            "reload" => {
                if topic.is_none() {
                    daemon.reload_config().await;
                }
                let mut outcomes = serde_json::Map::new();
                for handler in daemon.registry.all() {
                    if topic.is_some_and(|t| t != handler.topic) {
                        continue;
                    }
                    let outcome = match daemon.reload_handler(handler.clone()).await {
                        Reloaded::Unchanged => {
                            json!({"outcome": "unchanged", "version": handler.current().id})
                        }
                        Reloaded::Swapped { id } => json!({"outcome": "reloaded", "version": id}),
                        Reloaded::Failed(reason) => json!({"outcome": "failed", "error": reason}),
                    };
                    outcomes.insert(handler.topic.clone(), outcome);
                }
                if let Some(t) = topic.filter(|t| !outcomes.contains_key(*t)) {
                    return Err(Failure::new(
                        "NoSuchHandler",
                        format!("no handler serves topic '{t}'"),
                    ));
                }
                Value::Object(outcomes)
            }
            "rollback" => {
                let Some(t) = topic else {
                    return Err(Failure::new(
                        class::INVALID_ARGS,
                        "rollback needs {\"topic\": ...}",
                    ));
                };
                let handler = daemon.registry.get(t).ok_or_else(|| {
                    Failure::new("NoSuchHandler", format!("no handler serves topic '{t}'"))
                })?;
                let version = handler
                    .rollback()
                    .map_err(|e| Failure::new("NoPreviousVersion", e))?;
                let v = handler.current();
                daemon
                    .metrics
                    .handler_version(t, Some((v.id, &v.module.hash_prefix())));
                crate::in_span!(tracing::Level::INFO, topic = %t, version, "handler rolled back");
                json!({"topic": t, "version": version})
            }
            other => {
                return Err(Failure::new(
                    class::NO_SUCH_METHOD,
                    format!(
                        "admin topic has no method '{}' (status, reload, rollback)",
                        other.chars().take(64).collect::<String>()
                    ),
                ));
            }
        };
        let raw = serde_json::value::to_raw_value(&value)
            .map_err(|e| Failure::new(class::INTERNAL, e.to_string()))?;
        Ok(vec![raw])
    }
}
