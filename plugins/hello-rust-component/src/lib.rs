//! The polyglot contract (plugins/polyglot.md) as a Rust component, written directly against
//! the `warren:handler` WIT world with `wit-bindgen`.

wit_bindgen::generate!({
    path: "../../guest-sdk/wit",
    world: "handler-world",
});

use exports::warren::handler::handler::Guest;
use warren::handler::host::{emit, log};
use warren::handler::types::{Error, Level};

use serde_json::Value;

struct Hello;

const METHODS: &[&str] = &["count", "echo", "fail", "whoami"];

#[cfg(feature = "hostile")]
const HOSTILE: &[&str] = &[
    "calls",
    "env",
    "grow",
    "read_file",
    "relay",
    "sleep",
    "spin",
    "write_file",
];
#[cfg(not(feature = "hostile"))]
const HOSTILE: &[&str] = &[];

fn error(class: &str, message: &str, data: Option<Value>) -> Error {
    Error {
        class: class.to_owned(),
        message: message.to_owned(),
        data: data.map(|d| d.to_string()),
    }
}

fn invalid(message: &str) -> Error {
    error("InvalidArgs", message, None)
}

impl Guest for Hello {
    fn methods() -> Vec<String> {
        METHODS
            .iter()
            .chain(HOSTILE)
            .map(|m| (*m).to_owned())
            .collect()
    }

    fn call(method: String, args: String, context: String) -> Result<Option<String>, Error> {
        let args: Value = serde_json::from_str(&args).map_err(|e| invalid(&e.to_string()))?;
        match method.as_str() {
            "echo" => match args.get("value") {
                Some(v) => Ok(Some(v.to_string())),
                None => Err(invalid("missing field: value")),
            },
            "fail" => {
                let message = args
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("failed");
                Err(error(
                    "PluginError",
                    message,
                    Some(serde_json::json!({"code": 42})),
                ))
            }
            "count" => {
                let n = args
                    .get("n")
                    .and_then(Value::as_i64)
                    .filter(|n| (0..=1000).contains(n))
                    .ok_or_else(|| invalid("n must be an integer from 0 to 1000"))?;
                log(Level::Info, &format!("counting to {n}"));
                for i in 1..=n {
                    emit(&i.to_string());
                }
                Ok(None)
            }
            "whoami" => {
                let context: Value = serde_json::from_str(&context).unwrap_or(Value::Null);
                let user = context.get("user_id").cloned().unwrap_or(Value::Null);
                Ok(Some(user.to_string()))
            }
            #[cfg(feature = "hostile")]
            other if HOSTILE.contains(&other) => hostile::call(other, &args),
            _ => Err(error(
                "NoSuchMethod",
                &format!("no method '{method}'"),
                None,
            )),
        }
    }
}

#[cfg(feature = "hostile")]
mod hostile {
    use super::{Error, Value, error};

    pub fn call(method: &str, args: &Value) -> Result<Option<String>, Error> {
        let text = |s: String| Ok(Some(Value::String(s).to_string()));
        match method {
            // How many calls this instance has served, this one included: 1 in a fresh one.
            "calls" => {
                use std::sync::atomic::{AtomicU32, Ordering};
                static CALLS: AtomicU32 = AtomicU32::new(0);
                Ok(Some(
                    (CALLS.fetch_add(1, Ordering::Relaxed) + 1).to_string(),
                ))
            }
            // Never returns: only the host's time limit stops it.
            "spin" => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            // Allocates `mib` MiB and touches it.
            "grow" => {
                let mib = args.get("mib").and_then(Value::as_u64).unwrap_or(1024) as usize;
                let mut v: Vec<u8> = Vec::new();
                for _ in 0..mib {
                    v.extend(std::iter::repeat_n(1u8, 1 << 20));
                }
                Ok(Some(v.len().to_string()))
            }
            "read_file" => {
                let path = args
                    .get("path")
                    .and_then(Value::as_str)
                    .unwrap_or("/etc/passwd");
                std::fs::read_to_string(path)
                    .map_err(|e| error("IoError", &e.to_string(), None))
                    .and_then(text)
            }
            "write_file" => {
                let path = args.get("path").and_then(Value::as_str).unwrap_or("/tmp/x");
                std::fs::write(path, b"written")
                    .map_err(|e| error("IoError", &e.to_string(), None))
                    .map(|()| None)
            }
            "env" => {
                let name = args.get("name").and_then(Value::as_str).unwrap_or("HOME");
                match std::env::var(name) {
                    Ok(v) => text(v),
                    Err(_) => Ok(None),
                }
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(30));
                Ok(None)
            }
            // Outbound RPC: `{"kind": "call", "request": {...}}` sends `request` as it is.
            "relay" => {
                use crate::warren::handler::host::send;
                use crate::warren::handler::types::OutboundKind;
                let kind = match args.get("kind").and_then(Value::as_str) {
                    Some("cast") => OutboundKind::Cast,
                    Some("fanout_cast") => OutboundKind::FanoutCast,
                    Some("notify") => OutboundKind::Notify,
                    _ => OutboundKind::Call,
                };
                let request = args.get("request").cloned().unwrap_or(Value::Null);
                send(kind, &request.to_string()).map(Some)
            }
            _ => unreachable!("only hostile methods are routed here"),
        }
    }
}

export!(Hello);
