//! Host side of guest ABI v1 (`guest-sdk/ABI.md`): the `warren_v1` imports and the per-invocation
//! state they read and write.

use std::sync::Arc;

use serde_json::value::RawValue;
use wasmtime::{Caller, Extern, Linker, Memory, ResourceLimiter};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::stdio::CappedPipe;

use super::Grants;
use super::error::{Failure, class};
use super::outbound::Kind;

/// The import module name. A future ABI gets a new name, so old modules never link against it.
pub const IMPORT_MODULE: &str = "warren_v1";
/// The marker export and the value it must return.
pub const ABI_MARKER: &str = "warren_abi_version";
/// The ABI version this host speaks.
pub const ABI_VERSION: i32 = 1;

/// Guest log lines kept per invocation; the rest are counted and reported once. Bounds what one
/// chatty or hostile guest can push into the operator's log.
pub(crate) const MAX_LOG_LINES: usize = 256;
pub(crate) const MAX_LOG_LINE_BYTES: usize = 4096;

/// WASI preview 1 with nothing granted and stdio captured. Built on the guest's first WASI call:
/// most invocations make none, and building it is a good part of a small call's cost.
pub(crate) struct Wasi {
    ctx: WasiP1Ctx,
    stdout: CappedPipe,
    stderr: CappedPipe,
}

impl Wasi {
    fn new(max_stdio_bytes: usize, grants: Option<&Grants>) -> Self {
        let stdout = CappedPipe::new(max_stdio_bytes);
        let stderr = CappedPipe::new(max_stdio_bytes);
        let ctx = wasi_builder(&stdout, &stderr, grants).build_p1();
        Self {
            ctx,
            stdout,
            stderr,
        }
    }
}

/// The WASI configuration both loaders use (preview 1 for modules, preview 2 for components):
/// captured stdio and exactly what `grants` lists.
pub(crate) fn wasi_builder(
    stdout: &CappedPipe,
    stderr: &CappedPipe,
    grants: Option<&Grants>,
) -> WasiCtxBuilder {
    // Nothing but the captured stdio unless the handler's config grants it: no args or
    // sockets ever, environment variables and directories only as listed.
    let mut builder = WasiCtxBuilder::new();
    builder
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    if let Some(grants) = grants {
        for (name, value) in &grants.env {
            builder.env(name, value);
        }
        for dir in &grants.dirs {
            let perms = if dir.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            // Checked to exist when the config was loaded; if it vanished since, the guest
            // simply does not see it, as if it had not been granted.
            if let Err(e) = builder.preopened_dir(&dir.host, &dir.guest, perms) {
                crate::in_span!(tracing::Level::WARN, host = %dir.host.display(), error = %e, "granted directory cannot be opened");
            }
        }
    }
    builder
}

/// Everything one invocation owns. It lives in the `Store`, so it dies with it.
pub(crate) struct State {
    pub wasi: Option<Wasi>,
    /// WASI preview 2 and its resource table, for components; built on first use like `wasi`.
    pub p2: Option<super::component::Wasi2>,
    pub max_stdio_bytes: usize,
    pub grants: Option<Arc<Grants>>,
    pub limiter: Limiter,
    pub input: Vec<u8>,
    pub context: Arc<[u8]>,
    pub outputs: Vec<Box<RawValue>>,
    pub output_bytes: usize,
    pub max_output_bytes: usize,
    pub error: Option<Vec<u8>>,
    /// Set by an import just before it traps, so the trap is reported as this failure.
    pub host_failure: Option<Failure>,
    pub handler: Arc<str>,
    pub log_lines: usize,
    pub logs_dropped: usize,
    /// Outbound RPC: grants, the sender, the deadline and the count sent.
    pub outbound: super::outbound::Session,
    /// The last outbound request's reply (a result, or an error JSON), for `reply_read`.
    pub reply: Vec<u8>,
    /// The instance's `memory`, once instantiated: the imports copy through it several times
    /// per call, and finding an export by name hashes the name each time.
    pub memory: Option<Memory>,
    /// When the invocation's time is up, and whether its guest yields its thread at each epoch
    /// tick; read by the store's epoch callback.
    pub deadline: std::time::Instant,
    pub yields: bool,
}

/// Caps linear memory and tables, and remembers that the cap was hit so the resulting trap is
/// reported as `MemoryLimitExceeded` rather than a generic trap.
pub(crate) struct Limiter {
    /// Cap on the total size of all linear memories of the invocation.
    pub memory_bytes: usize,
    pub table_elements: usize,
    pub hit: Option<String>,
    /// Bytes of linear memory created so far, across all memories.
    pub memory_used: usize,
    /// How many memories, tables and core instances the invocation may create: `CORE_COUNTS`
    /// for a core module, `component::COUNTS` for a component.
    pub counts: Counts,
}

/// Per-invocation counts of memories, tables and core instances.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    pub memories: usize,
    pub tables: usize,
    pub instances: usize,
}

/// One memory and a couple of tables per instance: the caps above are per table, so a module
/// declaring many of them must not multiply its allowance (the pooling allocator enforces this
/// too, the on-demand fallback does not).
pub(crate) const CORE_COUNTS: Counts = Counts {
    memories: 1,
    tables: 2,
    instances: 1,
};

impl ResourceLimiter for Limiter {
    fn memories(&self) -> usize {
        self.counts.memories
    }

    fn tables(&self) -> usize {
        self.counts.tables
    }

    fn instances(&self) -> usize {
        self.counts.instances
    }

    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The cap is on all memories together (a component has several; a module has one, so
        // for it this is `desired > cap`). Every memory starts with a call from 0 bytes.
        let total = self
            .memory_used
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.memory_bytes {
            let msg = format!(
                "linear memory tried to grow from {current} to {desired} bytes, over the cap of {} bytes",
                self.memory_bytes
            );
            self.hit = Some(msg.clone());
            // An error (not `Ok(false)`) traps at once: a guest allocator that sees a failed
            // grow would otherwise abort with a message that hides the cause.
            return Err(wasmtime::Error::msg(msg));
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            let msg = format!(
                "table tried to grow from {current} to {desired} elements, over the cap of {}",
                self.table_elements
            );
            self.hit = Some(msg.clone());
            return Err(wasmtime::Error::msg(msg));
        }
        Ok(true)
    }
}

impl State {
    /// The WASI context, built on first use.
    pub fn wasi(&mut self) -> &mut WasiP1Ctx {
        let (cap, grants) = (self.max_stdio_bytes, self.grants.as_deref());
        &mut self.wasi.get_or_insert_with(|| Wasi::new(cap, grants)).ctx
    }

    /// What the guest wrote to stdout and stderr (if it used WASI at all), each with the
    /// number of bytes dropped over the cap. The WASI context stays: a sandbox made ahead has
    /// its stdio taken once it is up and still serves its call.
    pub fn take_stdio(&mut self) -> ((Vec<u8>, usize), (Vec<u8>, usize)) {
        match (self.wasi.as_ref(), self.p2.as_ref()) {
            (Some(w), _) => (w.stdout.take(), w.stderr.take()),
            (None, Some(w)) => (w.stdout.take(), w.stderr.take()),
            (None, None) => ((Vec::new(), 0), (Vec::new(), 0)),
        }
    }

    /// Record one result (JSON text), bounded by the result cap.
    pub fn push_output(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.output_bytes += bytes.len();
        if self.output_bytes > self.max_output_bytes {
            let msg = format!("results exceed the cap of {} bytes", self.max_output_bytes);
            return Err(Failure::new(class::RESULT_TOO_LARGE, msg));
        }
        match serde_json::from_slice::<Box<RawValue>>(bytes) {
            Ok(value) => {
                self.outputs.push(value);
                Ok(())
            }
            Err(e) => {
                let msg = format!("result #{} is not valid JSON: {e}", self.outputs.len() + 1);
                Err(Failure::new(class::INVALID_RESULT, msg))
            }
        }
    }
}

fn memory(caller: &mut Caller<'_, State>) -> wasmtime::Result<Memory> {
    if let Some(memory) = caller.data().memory {
        return Ok(memory);
    }
    // Called before the runtime could note it (from a start function).
    match caller.get_export("memory") {
        Some(Extern::Memory(memory)) => Ok(memory),
        _ => Err(wasmtime::Error::msg("guest does not export `memory`")),
    }
}

/// Bounds-checked `[ptr, ptr + len)` of guest memory; wasm pointers are unsigned.
fn range(ptr: i32, len: usize, mem_len: usize) -> wasmtime::Result<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    match start.checked_add(len) {
        Some(end) if end <= mem_len => Ok(start..end),
        _ => Err(wasmtime::Error::msg(format!(
            "guest passed an out-of-bounds range: {len} bytes at {start} (memory is {mem_len} bytes)"
        ))),
    }
}

fn copy_in(
    caller: &mut Caller<'_, State>,
    dst: i32,
    which: fn(&State) -> &[u8],
) -> wasmtime::Result<()> {
    let memory = memory(caller)?;
    let (mem, state) = memory.data_and_store_mut(caller);
    let src = which(state);
    let range = range(dst, src.len(), mem.len())?;
    mem[range].copy_from_slice(src);
    Ok(())
}

fn read_out(
    caller: &mut Caller<'_, State>,
    src: i32,
    len: i32,
) -> wasmtime::Result<(Memory, std::ops::Range<usize>)> {
    let memory = memory(caller)?;
    let range = range(src, len as u32 as usize, memory.data_size(&*caller))?;
    Ok((memory, range))
}

pub(crate) fn fail(state: &mut State, failure: Failure) -> wasmtime::Error {
    let err = wasmtime::Error::msg(failure.message.clone());
    state.host_failure = Some(failure);
    err
}

/// Replace WASI's `poll_oneoff` (call after linking WASI). Epoch interruption stops wasm code,
/// not a host call: a guest that sleeps (`std::thread::sleep`) would block its thread past its
/// time limit, holding an invocation slot. Handlers may not block, so the call fails the
/// invocation at once with a clear message.
pub(crate) fn forbid_blocking(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        |mut caller: Caller<'_, State>, _: i32, _: i32, _: i32, _: i32| -> wasmtime::Result<i32> {
            let msg = "handlers may not block: WASI poll_oneoff (sleeping, waiting on a clock or a file) is not available";
            Err(fail(caller.data_mut(), Failure::new(class::GUEST_TRAP, msg)))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Register the `warren_v1` imports on `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.func_wrap(IMPORT_MODULE, "input_len", |caller: Caller<'_, State>| {
        caller.data().input.len() as i32
    })?;
    linker.func_wrap(
        IMPORT_MODULE,
        "input_read",
        |mut caller: Caller<'_, State>, dst: i32| copy_in(&mut caller, dst, |s| &s.input),
    )?;
    linker.func_wrap(IMPORT_MODULE, "context_len", |caller: Caller<'_, State>| {
        caller.data().context.len() as i32
    })?;
    linker.func_wrap(
        IMPORT_MODULE,
        "context_read",
        |mut caller: Caller<'_, State>, dst: i32| copy_in(&mut caller, dst, |s| &s.context),
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "output_write",
        |mut caller: Caller<'_, State>, src: i32, len: i32| -> wasmtime::Result<()> {
            let (memory, range) = read_out(&mut caller, src, len)?;
            let (mem, state) = memory.data_and_store_mut(&mut caller);
            match state.push_output(&mem[range]) {
                Ok(()) => Ok(()),
                Err(failure) => Err(fail(state, failure)),
            }
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "error_write",
        |mut caller: Caller<'_, State>, src: i32, len: i32| -> wasmtime::Result<()> {
            let (memory, range) = read_out(&mut caller, src, len)?;
            // Bounded like results: an error is a result too.
            let (mem, state) = memory.data_and_store_mut(&mut caller);
            if range.len() > state.max_output_bytes {
                let msg = format!("error exceeds the cap of {} bytes", state.max_output_bytes);
                return Err(fail(state, Failure::new(class::RESULT_TOO_LARGE, msg)));
            }
            state.error = Some(mem[range].to_vec());
            Ok(())
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "log",
        |mut caller: Caller<'_, State>, level: i32, src: i32, len: i32| -> wasmtime::Result<()> {
            let (memory, range) = read_out(&mut caller, src, len)?;
            let (mem, state) = memory.data_and_store_mut(&mut caller);
            if state.log_lines >= MAX_LOG_LINES {
                state.logs_dropped += 1;
                return Ok(());
            }
            state.log_lines += 1;
            let bytes = &mem[range];
            let line = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LOG_LINE_BYTES)]);
            guest_log(level, &state.handler, &line);
            Ok(())
        },
    )?;
    for kind in [Kind::Call, Kind::Cast, Kind::FanoutCast, Kind::Notify] {
        linker.func_wrap(
            IMPORT_MODULE,
            kind.as_str(),
            move |mut caller: Caller<'_, State>, src: i32, len: i32| -> wasmtime::Result<i32> {
                let (memory, range) = read_out(&mut caller, src, len)?;
                let (mem, state) = memory.data_and_store_mut(&mut caller);
                if range.len() > state.max_output_bytes {
                    let msg = format!(
                        "{} request exceeds the cap of {} bytes",
                        kind.as_str(),
                        state.max_output_bytes
                    );
                    return Err(fail(state, Failure::new(class::RESULT_TOO_LARGE, msg)));
                }
                let request = mem[range].to_vec();
                let (status, reply) = match state.send_outbound(kind, &request) {
                    Ok(result) => (0, result.into_bytes()),
                    Err(failure) => (1, serde_json::to_vec(&failure).unwrap_or_default()),
                };
                state.reply = reply;
                Ok(status)
            },
        )?;
    }
    linker.func_wrap(IMPORT_MODULE, "reply_len", |caller: Caller<'_, State>| {
        caller.data().reply.len() as i32
    })?;
    linker.func_wrap(
        IMPORT_MODULE,
        "reply_read",
        |mut caller: Caller<'_, State>, dst: i32| copy_in(&mut caller, dst, |s| &s.reply),
    )?;
    Ok(())
}

impl State {
    /// Run one outbound request for the guest (both loaders): the result JSON (`null` for all
    /// but a call), or the failure, logged.
    pub(crate) fn send_outbound(&mut self, kind: Kind, request: &[u8]) -> Result<String, Failure> {
        let outcome = self
            .outbound
            .request(kind, &self.handler, &self.context, request);
        match outcome {
            Ok(result) => Ok(result.map_or_else(|| "null".to_owned(), |r| r.get().to_owned())),
            Err(failure) => {
                // A remote handler's message can be as long as its result cap; the log gets a
                // bounded prefix (the guest gets all of it).
                let shown: String = failure.message.chars().take(512).collect();
                let class: String = failure.class.chars().take(64).collect();
                crate::in_span!(tracing::Level::INFO,
                    handler = %self.handler,
                    kind = kind.as_str(),
                    %class,
                    error = %shown,
                    "outbound request failed"
                );
                Err(failure)
            }
        }
    }
}

/// Emit a guest's log line as a tracing event in the current span (the invocation's), with
/// target `warren::guest` so operators can filter guest output apart from the daemon's.
pub(crate) fn guest_log(level: i32, handler: &str, line: &str) {
    match level {
        0 => crate::in_span!(target: "warren::guest", tracing::Level::TRACE, handler, "{line}"),
        1 => crate::in_span!(target: "warren::guest", tracing::Level::DEBUG, handler, "{line}"),
        3 => crate::in_span!(target: "warren::guest", tracing::Level::WARN, handler, "{line}"),
        4 => crate::in_span!(target: "warren::guest", tracing::Level::ERROR, handler, "{line}"),
        _ => crate::in_span!(target: "warren::guest", tracing::Level::INFO, handler, "{line}"),
    }
}
