//! Warren example plugin for the fault tests: `record` appends the request's id to
//! `/receipts/log` (a writable directory the `[[handler]]` grants), so a test can check which
//! requests ran and how often; `poison` always traps.
//!
//! ```toml
//! [[handler]]
//! topic = "receipt"
//! module = "receipt.wasm"
//! dirs = [{ host = "receipts", guest = "/receipts", writable = true }]
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use serde::Deserialize;
use warren_guest::{Error, Value};

/// Where receipts go, one decimal id per line.
const LOG: &str = "/receipts/log";

#[derive(Deserialize)]
struct Record {
    id: u64,
    /// Busy-wait this long before recording (guests cannot sleep: `poll_oneoff` is forbidden).
    #[serde(default)]
    spin_ms: u64,
}

/// Spin for `spin_ms` (saying so in the log), then append `id\n` to the receipts file and return `id`. The line is one
/// `O_APPEND` write, so concurrent invocations never interleave or overwrite each other.
fn record(args: Record) -> Result<u64, Error> {
    if args.spin_ms > 0 {
        // Tells a test the request is in flight (a quick one logs nothing: floods stay quiet).
        warren_guest::info!("receipt {} spinning {} ms", args.id, args.spin_ms);
    }
    let until = Instant::now() + Duration::from_millis(args.spin_ms);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(LOG)
        .map_err(|e| Error::new("IOError", format!("cannot open {LOG}: {e}")))?;
    file.write_all(format!("{}\n", args.id).as_bytes())
        .map_err(|e| Error::new("IOError", format!("cannot append to {LOG}: {e}")))?;
    Ok(args.id)
}

/// Always traps: the poison message of the fault tests.
fn poison(_args: Value) -> Result<Value, Error> {
    panic!("poison: this handler always traps");
}

warren_guest::export!(record, poison);
