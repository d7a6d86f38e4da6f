//! The process-wide `Engine` and the epoch ticker that bounds every invocation's wall time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances while a guest runs through ticks: it yields its thread and has
/// its deadline checked at each. A fraction of the shortest sensible timeout keeps timeouts
/// precise without waking too often.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// How often the epoch advances while no guest has run through the last tick. Nearly every call
/// ends within a tick and needs none, but a guest that has just started must still be
/// interrupted, to yield and to have its deadline checked: at most this long after it started,
/// at most this long again for its second interruption (the ticker learns of the first one
/// tick late, see `tick`), then every [`EPOCH_TICK`]. Under a load of short calls that is five
/// times fewer wake-ups of the ticker's thread, which on a VM can cost more CPU per call at one
/// caller than any one part of the daemon's own code.
pub const SLOW_TICK: Duration = Duration::from_millis(10);

/// Most bytes of each memory slot reset in place after every call (copied back from the module's
/// image) instead of decommitted, where the kernel has PAGEMAP_SCAN (Linux 6.7+): only the
/// pages the call dirtied are copied, so this bounds the work and the resident memory of a slot
/// rather than setting them. 2 MiB covers a guest that touches a megabyte-sized stack or heap
/// (Rust's default stack, an AssemblyScript or Python runtime) without a page fault per page on
/// every call.
const KEEP_RESIDENT: usize = 2 << 20;

/// [`KEEP_RESIDENT`] where the kernel lacks PAGEMAP_SCAN: then every byte kept resident is
/// copied back on every call, touched or not, so only a small guest's stack (64 KiB as the
/// repository builds guests), data and first heap pages, with room for a 128 KiB stack; the
/// rest of a larger memory is decommitted and faulted in again by the next call that touches
/// it.
const KEEP_RESIDENT_WITHOUT_SCAN: usize = 256 << 10;

/// Engine-wide settings, fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Largest linear memory any handler may have; the pooling allocator sizes its slots to it.
    pub max_memory_bytes: usize,
    /// How many instances may be alive at once (pool slots). Invocations beyond it are refused
    /// by the pool, so the daemon bounds concurrency below this.
    pub max_instances: u32,
    /// How many sandboxes may be made ahead of their calls at once (see
    /// [`super::Next::prepare`]); each holds one of the `max_instances` slots while it waits.
    pub max_prepared: u32,
}

impl EngineSettings {
    /// Settings for a process that runs a few invocations at a time (the CLI, tests).
    pub fn small() -> Self {
        Self {
            max_memory_bytes: 64 << 20,
            max_instances: 64,
            max_prepared: 4,
        }
    }
}

/// Which instance allocator the engine ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    /// Pre-reserved slots with copy-on-write memory images: instantiation in microseconds. After
    /// a call only the pages it dirtied are reset (found with PAGEMAP_SCAN).
    Pooling,
    /// The same pool on a kernel without PAGEMAP_SCAN (before Linux 6.7): after a call the
    /// first [`KEEP_RESIDENT_WITHOUT_SCAN`] bytes of its memory are copied back whole.
    PoolingWithoutScan,
    /// mmap per instance; used where the pool's virtual-memory reservation is refused.
    OnDemand,
}

fn base_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // Handlers are independent and short-lived; parallel compilation only helps start-up.
    config.parallel_compilation(true);
    config.memory_init_cow(true);
    config
}

/// Build the engine, preferring the pooling allocator and falling back to on-demand allocation
/// when the pool cannot be reserved (small `ulimit -v`, some containers), as Spin does.
pub fn build_engine(settings: &EngineSettings) -> anyhow::Result<(Engine, Allocator)> {
    // A component instance is made of several core instances (a Python component built by
    // componentize-py has 14, JavaScript 4, Rust 3), each possibly with its own tables, but one
    // linear memory so far. `max_instances` counts invocations, so the core-instance and table
    // slots are sized for components (they cost address space only: ~1 MiB and ~160 KiB
    // each); memory slots, the expensive ones, stay one per invocation. A component past the
    // per-component counts fails to instantiate, and one that finds the pool full is
    // `Overloaded`, as a module is. Core modules keep their limits (one memory, one table).
    let per = super::component::COUNTS;
    let component_core_instances = u32::try_from(per.instances / 2).unwrap_or(u32::MAX);
    let scan = PoolingAllocationConfig::is_pagemap_scan_available();
    let mut pool = PoolingAllocationConfig::default();
    pool.total_memories(settings.max_instances)
        .total_tables(settings.max_instances.saturating_mul(4))
        .total_core_instances(
            settings
                .max_instances
                .saturating_mul(component_core_instances),
        )
        .total_component_instances(settings.max_instances)
        .max_core_instances_per_component(u32::try_from(per.instances).unwrap_or(u32::MAX))
        .max_memories_per_component(u32::try_from(per.memories).unwrap_or(u32::MAX))
        .max_tables_per_component(u32::try_from(per.tables).unwrap_or(u32::MAX))
        .max_memory_size(settings.max_memory_bytes)
        // An invocation runs on a fiber (so a long one can yield its thread, see
        // `Runtime::invoke_async`); one stack per instance slot, each reused as it is.
        .total_stacks(settings.max_instances)
        // A fresh instance per call would take a page fault on every page the guest touches,
        // and an madvise to drop them afterwards; keeping pages resident and copying the image
        // back over them costs less. With Linux's PAGEMAP_SCAN wasmtime finds the pages a call
        // dirtied, present or swapped out, and copies only those. (48.0.8 counted only present
        // ones, so a page the kernel was swapping or migrating escaped the reset and the next
        // call in the slot read it; hence 48.0.11 and vendor/README.md.)
        .pagemap_scan(if scan {
            wasmtime::Enabled::Yes
        } else {
            wasmtime::Enabled::No
        })
        .linear_memory_keep_resident(if scan {
            KEEP_RESIDENT
        } else {
            KEEP_RESIDENT_WITHOUT_SCAN
        })
        .table_keep_resident(64 << 10);
    let mut config = base_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&config) {
        Ok(engine) if scan => Ok((engine, Allocator::Pooling)),
        Ok(engine) => Ok((engine, Allocator::PoolingWithoutScan)),
        Err(err) => {
            tracing::warn!(error = %err, "pooling allocator unavailable, using on-demand allocation");
            let engine = Engine::new(&base_config())
                .map_err(|e| anyhow::anyhow!("cannot create wasm engine: {e}"))?;
            Ok((engine, Allocator::OnDemand))
        }
    }
}

/// How long nothing must have run before the ticker slows down.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// How often an idle ticker looks again, should an invocation start without waking it (a race
/// it can lose); this bounds how late such an invocation's first tick can be.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// Advances the engine's epoch from a dedicated OS thread. A tokio task would share a worker
/// with the guests it is meant to stop and could be starved by one of them (wado PR #1146).
///
/// It ticks every [`SLOW_TICK`] while any guest code may run: an invocation, or a sandbox
/// being made ahead of its call (each holds a [`Running`] while it does), and every
/// [`EPOCH_TICK`] while a guest runs through ticks. Once nothing has run for [`IDLE_AFTER`] it
/// sleeps instead (an idle daemon would otherwise wake 100 times a second), and
/// [`EpochTicker::enter`] brings it back. A sandbox made ahead of its call runs
/// nothing while it waits and needs no ticks, which is why this counts runs (sandboxes that
/// may run guest code, spent ones until they are dropped) rather than the pool's live
/// instances.
pub struct EpochTicker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    idle: AtomicBool,
    /// Guest runs in progress; bounded by the pool's slots (each run holds an instance).
    running: AtomicUsize,
    /// A guest was interrupted by the last tick (it ran through it): tick fast.
    through: AtomicBool,
    /// Ticks so far, for [`EpochTicker::ticks`].
    ticks: AtomicU64,
}

/// One guest run in progress, as far as the ticker is concerned; it ticks until every one is
/// dropped.
pub struct Running {
    shared: Arc<Shared>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Running {
    /// What the run's epoch callback tells the ticker with; see [`Ticks::ran_through`].
    pub fn ticks(&self) -> Ticks {
        Ticks {
            shared: self.shared.clone(),
        }
    }
}

/// A guest's line to the ticker, held by its store's epoch callback.
pub struct Ticks {
    shared: Arc<Shared>,
}

impl Ticks {
    /// The guest was interrupted by a tick, so it ran through one: the ticker ticks every
    /// [`EPOCH_TICK`] until a tick interrupts no guest.
    pub fn ran_through(&self) {
        self.shared.through.store(true, Ordering::Relaxed);
    }
}

impl EpochTicker {
    /// Start ticking `engine` (see [`EpochTicker`]).
    pub fn start(engine: Engine) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            through: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
        });
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("warren-epoch".into())
            .spawn(move || tick(&engine, &state))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Make sure the ticker ticks while the returned guard lives: taken before guest code
    /// runs. Costs an atomic add and a load unless the ticker is idle.
    pub fn enter(&self) -> Running {
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        // SeqCst, as the ticker's store of `idle` and its second look at `running` are: either
        // it sees this run or this sees it idle.
        if self.shared.idle.load(Ordering::SeqCst)
            && self.shared.idle.swap(false, Ordering::SeqCst)
            && let Some(thread) = &self.thread
        {
            thread.thread().unpark();
        }
        Running {
            shared: self.shared.clone(),
        }
    }

    /// Whether the ticker is asleep (nothing has run for a while).
    pub fn is_idle(&self) -> bool {
        self.shared.idle.load(Ordering::SeqCst)
    }

    /// How many times the epoch has advanced since the ticker started.
    pub fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }
}

fn tick(engine: &Engine, shared: &Shared) {
    let busy = || shared.running.load(Ordering::SeqCst) > 0;
    let mut period = SLOW_TICK;
    let mut empty_for = Duration::ZERO;
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.idle.load(Ordering::SeqCst) {
            std::thread::park_timeout(IDLE_TICK);
            if busy() {
                shared.idle.store(false, Ordering::SeqCst);
            }
            if shared.idle.load(Ordering::SeqCst) {
                continue;
            }
            empty_for = Duration::ZERO;
        } else {
            std::thread::sleep(period);
        }
        let slept = period;
        // Read before this tick, so it tells whether the previous one interrupted a guest,
        // which had a whole period to say so. A guest interrupted by this tick tells the next
        // look, so its second interruption may still be a slow period away.
        let through = shared.through.swap(false, Ordering::Relaxed);
        engine.increment_epoch();
        shared.ticks.fetch_add(1, Ordering::Relaxed);
        period = if through { EPOCH_TICK } else { SLOW_TICK };
        if busy() {
            empty_for = Duration::ZERO;
        } else {
            empty_for += slept;
        }
        if empty_for >= IDLE_AFTER {
            shared.idle.store(true, Ordering::SeqCst);
            // A run that started between the count and the store would find the ticker
            // asleep without waking it: look once more.
            if busy() {
                shared.idle.store(false, Ordering::SeqCst);
            }
            empty_for = Duration::ZERO;
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Allocator, EngineSettings, KEEP_RESIDENT, KEEP_RESIDENT_WITHOUT_SCAN, build_engine,
    };

    /// Pages a call dirtied must be back to the module's image for the next call in the same
    /// pool slot, wherever they lie and even if the kernel moved them out of memory meanwhile:
    /// one in the kept-resident part with zeroes in the image, one holding the image's data,
    /// one past the kept-resident part. Each is paged out (`MADV_PAGEOUT`) before its instance
    /// is dropped, which is where wasmtime 48.0.8's PAGEMAP_SCAN reset lost it; only a machine
    /// with swap the process may use can page them out, elsewhere the pages stay and this
    /// checks the reset as it always runs (with the scan where the kernel has it).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn dirty_pages_are_back_to_the_image_for_the_next_call_even_if_paged_out() {
        // SAFETY: sysconf reads a constant of the system and has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page");
        let zeroes = 3 * page;
        let data = 2 * page;
        let settings = EngineSettings {
            max_memory_bytes: 4 << 20,
            // One memory slot: the second instance reuses the first one's.
            max_instances: 1,
            max_prepared: 0,
        };
        let (engine, allocator) = build_engine(&settings).expect("engine");
        let kept = match allocator {
            Allocator::Pooling => KEEP_RESIDENT,
            Allocator::PoolingWithoutScan => KEEP_RESIDENT_WITHOUT_SCAN,
            Allocator::OnDemand => panic!("the pool was refused"),
        };
        let beyond = kept + 2 * page;
        let wasm_pages = beyond / 65536 + 1;
        let wat = format!(
            r#"(module (memory (export "m") {wasm_pages})
                 (data (i32.const {data}) "\2a")
                 (func (export "put") (param i32 i32) local.get 0 local.get 1 i32.store)
                 (func (export "get") (param i32) (result i32) local.get 0 i32.load))"#
        );
        let module = wasmtime::Module::new(&engine, wat).expect("module");
        let addresses = [zeroes, data, beyond];
        let mut paged_out = Vec::new();
        {
            let (mut store, instance) = fresh(&engine, &module).await;
            let put = instance
                .get_typed_func::<(i32, i32), ()>(&mut store, "put")
                .expect("put");
            let memory = instance.get_memory(&mut store, "m").expect("memory");
            for at in addresses {
                let at32 = i32::try_from(at).expect("address");
                put.call_async(&mut store, (at32, 0x5ec7e7))
                    .await
                    .expect("put runs");
                // SAFETY: the page lies inside the instance's accessible memory, which lives as
                // long as `store`; MADV_PAGEOUT only moves it, the contents stay the same.
                let (rc, swapped) = unsafe {
                    let ptr = memory.data_ptr(&store).add(at);
                    let rc = libc::madvise(ptr.cast(), page, libc::MADV_PAGEOUT);
                    (rc, swapped_out(ptr as usize / page))
                };
                assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
                paged_out.push(swapped);
            }
        }
        let (mut store, instance) = fresh(&engine, &module).await;
        let get = instance
            .get_typed_func::<i32, i32>(&mut store, "get")
            .expect("get");
        let mut seen = Vec::new();
        for at in addresses {
            let at32 = i32::try_from(at).expect("address");
            seen.push(get.call_async(&mut store, at32).await.expect("get runs"));
        }
        assert_eq!(
            seen,
            [0, 0x2a, 0],
            "the next call read the previous call's memory (pages paged out: {paged_out:?})"
        );
    }

    async fn fresh(
        engine: &wasmtime::Engine,
        module: &wasmtime::Module,
    ) -> (wasmtime::Store<()>, wasmtime::Instance) {
        let mut store = wasmtime::Store::new(engine, ());
        // No ticker here: the epoch stays at 0, so one tick is as good as forever.
        store.set_epoch_deadline(1);
        let instance = wasmtime::Instance::new_async(&mut store, module, &[])
            .await
            .expect("instance");
        (store, instance)
    }

    /// Whether the page numbered `page` of this process is in swap, from `/proc/self/pagemap`
    /// (bit 62 of its entry); `None` if that cannot be read.
    fn swapped_out(page: usize) -> Option<bool> {
        use std::io::{Read, Seek, SeekFrom};
        let mut map = std::fs::File::open("/proc/self/pagemap").ok()?;
        map.seek(SeekFrom::Start(u64::try_from(page).ok()? * 8))
            .ok()?;
        let mut entry = [0u8; 8];
        map.read_exact(&mut entry).ok()?;
        Some(u64::from_le_bytes(entry) & (1 << 62) != 0)
    }
}
