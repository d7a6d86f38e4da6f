//! `warren bench`: a load generator in the oslo wire format, and `--compare`, which measures
//! Warren against a native Rust baseline and a real oslo.messaging server on the same broker.
//!
//! - `load.rs`: the callers and the cast flood (through `amqp.rs` and `wire`).
//! - `native.rs`: the native baseline server (`warren bench --serve-native`, hidden).
//! - `peers.rs`: the servers as child processes: readiness, pause/resume, RSS, clean stop.
//! - `broker.rs`: queue depth and clean-up (lapin directly; bench-only).
//! - `report.rs`: the table, the JSON, the SVG chart and the targets.
//!
//! How a server is measured: start it and wait for its readiness line; read its idle RSS; run
//! the call phases (1, then 16 callers: a warm-up, then timed windows); pause it with SIGSTOP,
//! publish the flood of casts into its queue (all confirmed), resume it and time until the
//! queue is empty, sampling its RSS; stop it; delete its queues. Every run uses fresh topic
//! names, so leftovers of an earlier run never meet this one. `--compare` runs its servers
//! side by side (`measure_together`): the call phases are cut into rounds the servers take
//! in turn, each with the others paused, so the machine's drifts fall on all of them alike.

mod broker;
mod load;
mod native;
mod peers;
mod report;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use warren::config::{DEFAULT_BROKER_URL, DEFAULT_EXCHANGE};

use self::broker::Admin;
use self::load::{CallSamples, LoadGen};
use self::peers::{Peer, Ready, RssSampler};
use self::report::{FloodStats, Report, ServerResult, Startup};

/// Measure call throughput and latency, and cast drain rate, in the oslo wire format.
///
/// Against a running server: `warren bench --topic echo` calls `echo` with 1 and then 16
/// concurrent callers and floods the topic with casts. With `--compare` it starts, on the
/// same broker, a native Rust baseline, an oslo.messaging server (from the repository's
/// .venv) and Warren serving plugins/out/echo.wasm, measures them side by side (each call
/// phase in rounds they take in turn, the others paused), then Warren's memory and start-up
/// time, and prints one table with the ratios.
/// Progress goes to stderr, the table (or `--json`) to stdout. See BENCHMARKS.md.
#[derive(Args)]
#[command(
    after_help = "Examples:\n  warren bench --compare --chart docs/bench.svg      # the full comparison (minutes)\n  \
warren bench --compare --quick                      # a short run that proves it works\n  \
warren bench --topic echo --callers 1,4,16          # against a server already running"
)]
pub struct BenchArgs {
    /// Topic of a running server to load (its `echo` method). Not with --compare.
    #[arg(long, required_unless_present = "compare", conflicts_with = "compare")]
    topic: Option<String>,
    /// Start the native baseline, oslo.messaging and Warren, measure them side by side, compare.
    #[arg(long)]
    compare: bool,
    /// Short measurements (2 s windows, a 2,000-cast flood, 10 handlers for start-up): proves
    /// the benchmark works, measures nothing worth quoting.
    #[arg(long)]
    quick: bool,
    /// Broker URL [default: WARREN_BROKER_URL, else amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long)]
    broker: Option<String>,
    /// Control exchange.
    #[arg(long, default_value = DEFAULT_EXCHANGE)]
    exchange: String,
    /// Caller counts, one call phase each (0 skips the calls).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    callers: Vec<usize>,
    /// Measured window of each call phase, seconds [default: 10, quick 2].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Casts in the flood [default: 100000, quick 2000]; 0 skips the flood.
    #[arg(long)]
    casts: Option<u64>,
    /// With --compare: each call phase is cut into this many windows, taken in turn by the
    /// servers (in a rotating order), so that a slow minute on a shared machine falls on all
    /// of them alike [default: 5, quick 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// Size of the string sent as `value`, bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Handlers for the start-up measurement [default: 100, quick 10].
    #[arg(long)]
    startup_handlers: Option<usize>,
    /// The echo plugin Warren serves (`make example-plugins` builds it).
    #[arg(long, default_value = "plugins/out/echo.wasm")]
    echo_module: PathBuf,
    /// Python with oslo.messaging (`make venv` creates it).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The oslo.messaging peer script.
    #[arg(long, default_value = "tests/interop/oslo_bench_server.py")]
    oslo_server: PathBuf,
    /// Leave oslo.messaging out of --compare.
    #[arg(long)]
    skip_oslo: bool,
    /// Prefetch of every server under test (Warren's default).
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    /// Write an SVG chart of the results here.
    #[arg(long, value_name = "FILE")]
    chart: Option<PathBuf>,
    /// Print the results as JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Run the native baseline server on --topic (used by --compare).
    #[arg(long, hide = true, requires = "topic")]
    serve_native: bool,
}

/// The settings every measurement shares.
struct Plan {
    url: String,
    exchange: String,
    callers: Vec<usize>,
    warmup: Duration,
    window: Duration,
    rounds: u32,
    casts: u64,
    payload_bytes: usize,
    prefetch: u16,
    quick: bool,
    /// Queues of servers this run started and has not deleted yet: deleted at the end
    /// however the run ends (an error, Ctrl-C), so a flood never stays behind on the broker.
    undeleted: std::sync::Mutex<Vec<String>>,
}

impl Plan {
    fn created(&self, queues: &[String]) {
        if let Ok(mut q) = self.undeleted.lock() {
            q.extend_from_slice(queues);
        }
    }

    async fn delete(&self, admin: &mut Admin, queues: &[String]) {
        admin.delete(queues).await;
        if let Ok(mut q) = self.undeleted.lock() {
            q.retain(|name| !queues.contains(name));
        }
    }
}

/// `warren bench`.
pub fn bench(args: BenchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::usage_error(e.into()),
    };
    let url = args
        .broker
        .clone()
        .or_else(|| std::env::var("WARREN_BROKER_URL").ok())
        .unwrap_or_else(|| DEFAULT_BROKER_URL.to_owned());
    if args.serve_native {
        let topic = args.topic.clone().unwrap_or_default();
        return match runtime.block_on(native::serve(&url, &args.exchange, &topic, args.prefetch)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("native baseline: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let quick = args.quick;
    let plan = Plan {
        url,
        exchange: args.exchange.clone(),
        callers: args.callers.clone(),
        warmup: Duration::from_secs_f64(if quick { 0.5 } else { 2.0 }),
        window: Duration::from_secs_f64(args.duration.unwrap_or(if quick { 2.0 } else { 10.0 })),
        rounds: args.rounds.unwrap_or(if quick { 2 } else { 5 }),
        casts: args.casts.unwrap_or(if quick { 2_000 } else { 100_000 }),
        payload_bytes: args.payload_bytes,
        prefetch: args.prefetch,
        quick,
        undeleted: std::sync::Mutex::default(),
    };
    // Dropping the run (Ctrl-C, SIGTERM) drops every Peer, which kills its process.
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(&args, &plan) => r,
            _ = peers::stop_signal() => Err(anyhow::anyhow!("interrupted; servers stopped")),
        }
    });
    let undeleted = plan.undeleted.lock().map(|q| q.clone()).unwrap_or_default();
    if !undeleted.is_empty() {
        runtime.block_on(async {
            let cleanup = async {
                if let Ok(mut admin) = Admin::connect(&plan.url).await {
                    admin.delete(&undeleted).await;
                    admin.close().await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), cleanup).await;
        });
    }
    match outcome {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => return super::usage_error(e.into()),
                }
            } else {
                print!("{}", report.table());
            }
            if let Some(path) = &args.chart {
                if let Err(e) = std::fs::write(path, report.svg()) {
                    return super::usage_error(
                        anyhow::Error::from(e).context(format!("cannot write {}", path.display())),
                    );
                }
                eprintln!("chart written to {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(super::EXIT_FAILED)
        }
    }
}

async fn run(args: &BenchArgs, plan: &Plan) -> anyhow::Result<Report> {
    let rounds = args.topic.is_none().then_some(plan.rounds);
    let mut report = Report::new(
        plan.quick,
        plan.window,
        rounds,
        plan.casts,
        plan.payload_bytes,
    );
    let mut admin = Admin::connect(&plan.url).await?;
    let id = warren::wire::new_id()[..12].to_owned();
    let result = match &args.topic {
        Some(topic) => {
            let name = format!("topic {topic}");
            report
                .servers
                .push(measure_running(plan, &mut admin, &name, topic).await?);
            Ok(())
        }
        None => compare(args, plan, &mut admin, &id, &mut report).await,
    };
    admin.close().await;
    result.map(|()| report)
}

/// The three servers side by side, then Warren's scale figures.
async fn compare(
    args: &BenchArgs,
    plan: &Plan,
    admin: &mut Admin,
    id: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let echo = std::fs::canonicalize(&args.echo_module).with_context(|| {
        format!(
            "{} not found: build it with `make example-plugins` or pass --echo-module",
            args.echo_module.display()
        )
    })?;
    let workdir = TempDir::new(&format!("warren-bench-{id}"))?;
    let server_name = format!("bench{id}");

    let mut contenders = Vec::new();
    // Native baseline.
    let topic = format!("bench_{id}_native");
    let mut native = peers::this_binary()?;
    native.args(["bench", "--serve-native", "--topic", &topic, "--exchange"]);
    native.args([&plan.exchange, "--broker", &plan.url, "--prefetch"]);
    native.arg(plan.prefetch.to_string());
    let spawn = Spawn {
        command: native,
        ready: Ready::StdoutLine("READY"),
        queues: vec![topic.clone()],
    };
    contenders.push(Contender::start(plan, "native", &topic, spawn).await?);

    // oslo.messaging.
    let have_oslo = args.python.exists() && args.oslo_server.exists();
    if args.skip_oslo {
        report
            .notes
            .push("oslo.messaging skipped (--skip-oslo)".into());
    } else if !have_oslo {
        let note = format!(
            "oslo.messaging skipped: {} or {} is missing (run `make venv`)",
            args.python.display(),
            args.oslo_server.display()
        );
        eprintln!("{note}");
        report.notes.push(note);
    } else {
        let topic = format!("bench_{id}_oslo");
        let mut oslo = Command::new(&args.python);
        oslo.arg(&args.oslo_server);
        oslo.args(["--topic", &topic, "--server", &server_name, "--exchange"]);
        oslo.args([&plan.exchange, "--url", &oslo_url(&plan.url), "--prefetch"]);
        oslo.arg(plan.prefetch.to_string());
        let spawn = Spawn {
            command: oslo,
            ready: Ready::StdoutLine("READY"),
            queues: vec![topic.clone(), format!("{topic}.{server_name}")],
        };
        contenders.push(Contender::start(plan, "oslo.messaging", &topic, spawn).await?);
    }

    // Warren with 10 handlers: the measured topic and nine idle ones.
    let topic = format!("bench_{id}_warren");
    let topics: Vec<String> = std::iter::once(topic.clone())
        .chain((1..10).map(|i| format!("bench_{id}_idle{i}")))
        .collect();
    let cache = workdir.path.join("cache");
    let config = warren_config(plan, &server_name, &topics, &echo, Some(&cache));
    let config_path = workdir.path.join("warren.toml");
    std::fs::write(&config_path, config)?;
    // Compile the module into the cache once, so the measured process starts as any restart
    // does. (The first start ever compiles, and its RSS stays higher; the start-up figures
    // below show both.)
    plan.created(&server_queues(&topics, &server_name));
    let priming = Peer::start(
        "warren",
        warren_command(&config_path)?,
        Ready::StderrContains(WARREN_READY),
        Duration::from_secs(300),
    )
    .await?;
    priming.stop(Duration::from_secs(15)).await;
    let spawn = Spawn {
        command: warren_command(&config_path)?,
        ready: Ready::StderrContains(WARREN_READY),
        queues: server_queues(&topics, &server_name),
    };
    contenders.push(Contender::start(plan, "warren", &topic, spawn).await?);

    let measured = measure_together(plan, admin, &mut contenders).await;
    for contender in contenders {
        // A failure can leave a server paused; it must run to stop.
        let _ = contender.peer.signal("CONT");
        if measured.is_err() {
            eprintln!(
                "{}: last output:\n{}",
                contender.name,
                contender.peer.tail()
            );
        }
        contender.peer.stop(Duration::from_secs(15)).await;
        plan.delete(admin, &contender.queues).await;
        report.servers.push(contender.result);
    }
    measured?;

    // Start-up with many handlers: no cache, then a cold cache, then the warm one.
    let handlers = args
        .startup_handlers
        .unwrap_or(if plan.quick { 10 } else { 100 });
    let topics: Vec<String> = (0..handlers)
        .map(|i| format!("bench_{id}_start{i}"))
        .collect();
    let queues = server_queues(&topics, &server_name);
    plan.created(&queues);
    let cache = workdir.path.join("startup-cache");
    let mut startup = Startup {
        handlers,
        ..Startup::default()
    };
    let runs = [
        ("no cache", None),
        ("cold cache", Some(&cache)),
        ("warm cache", Some(&cache)),
    ];
    for (label, cache) in runs {
        let config_path = workdir.path.join("startup.toml");
        std::fs::write(
            &config_path,
            warren_config(
                plan,
                &server_name,
                &topics,
                &echo,
                cache.map(|c| c.as_path()),
            ),
        )?;
        let peer = Peer::start(
            "warren",
            warren_command(&config_path)?,
            Ready::StderrContains(WARREN_READY),
            Duration::from_secs(300),
        )
        .await?;
        let ms = peer.ready_after.as_secs_f64() * 1000.0;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = peer.rss_kib();
        eprintln!(
            "warren: start with {handlers} handlers, {label}: {ms:.0} ms to ready, RSS {}",
            report::mib(rss)
        );
        match label {
            "no cache" => (startup.no_cache_ms, startup.no_cache_rss_kib) = (Some(ms), rss),
            "cold cache" => (startup.cold_cache_ms, startup.cold_cache_rss_kib) = (Some(ms), rss),
            _ => (startup.warm_cache_ms, startup.warm_cache_rss_kib) = (Some(ms), rss),
        }
        peer.stop(Duration::from_secs(15)).await;
    }
    plan.delete(admin, &queues).await;
    report.startup = Some(startup);
    Ok(())
}

/// A server of a comparison, running for the whole of it.
struct Contender {
    name: &'static str,
    topic: String,
    peer: Peer,
    queues: Vec<String>,
    result: ServerResult,
}

impl Contender {
    async fn start(
        plan: &Plan,
        name: &'static str,
        topic: &str,
        spawn: Spawn,
    ) -> anyhow::Result<Contender> {
        eprintln!("{name}: starting");
        plan.created(&spawn.queues);
        let peer = Peer::start(name, spawn.command, spawn.ready, Duration::from_secs(120)).await?;
        eprintln!(
            "{name}: ready after {:.0} ms",
            peer.ready_after.as_secs_f64() * 1000.0
        );
        // Idle RSS once start-up has settled.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut result = ServerResult::new(name);
        result.rss_idle_kib = peer.rss_kib();
        eprintln!("{name}: idle RSS {}", report::mib(result.rss_idle_kib));
        Ok(Contender {
            name,
            topic: topic.to_owned(),
            peer,
            queues: spawn.queues,
            result,
        })
    }
}

/// Measure servers that all run at once. Each call phase is cut into `plan.rounds` windows
/// that the servers take in turn, the order rotating every round, so that the machine's
/// drifts (other tenants, the broker's own housekeeping) fall on every server alike rather
/// than on whichever ran last. During a server's window the others are paused (SIGSTOP), so
/// none pays for another's idle timers. A server's first window has the full warm-up, later
/// ones a short settle. Then each server's flood, one after another.
async fn measure_together(
    plan: &Plan,
    admin: &mut Admin,
    contenders: &mut [Contender],
) -> anyhow::Result<()> {
    let load =
        Arc::new(LoadGen::connect(&plan.url, &plan.exchange, "echo", plan.payload_bytes).await?);
    let rounds = plan.rounds.max(1);
    let window = plan.window / rounds;
    let settle = plan.warmup.min(Duration::from_millis(500));
    for &callers in plan.callers.iter().filter(|&&n| n > 0) {
        let mut samples: Vec<CallSamples> = contenders
            .iter()
            .map(|_| CallSamples::new(callers))
            .collect();
        for round in 0..rounds as usize {
            let warmup = if round == 0 { plan.warmup } else { settle };
            for turn in 0..contenders.len() {
                let i = (turn + round) % contenders.len();
                // The others are paused: each server has the machine as it would alone.
                for (j, c) in contenders.iter().enumerate() {
                    c.peer.signal(if i == j { "CONT" } else { "STOP" })?;
                }
                let taken = load
                    .calls(&contenders[i].topic, callers, warmup, window)
                    .await;
                samples[i].merge(taken);
            }
            eprintln!(
                "{callers} caller{}: round {} of {rounds} done",
                plural(callers),
                round + 1
            );
        }
        for c in contenders.iter() {
            c.peer.signal("CONT")?;
        }
        for (contender, samples) in contenders.iter_mut().zip(samples) {
            let stats = samples.stats();
            eprintln!("{}: {}", contender.name, describe(&stats));
            contender.result.calls.push(stats);
        }
    }
    if plan.casts > 0 {
        for i in 0..contenders.len() {
            for (j, c) in contenders.iter().enumerate() {
                if i != j {
                    c.peer.signal("STOP")?;
                }
            }
            let c = &mut contenders[i];
            let stats = flood(
                plan,
                admin,
                c.name,
                &c.topic,
                Some(&c.peer),
                &load,
                &mut c.result,
            )
            .await?;
            c.result.flood = Some(stats);
        }
        for c in contenders.iter() {
            c.peer.signal("CONT")?;
        }
    }
    load.close().await;
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One call phase's figures, for progress lines.
fn describe(stats: &load::CallStats) -> String {
    format!(
        "{} caller{} ... {:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms{}",
        stats.callers,
        plural(stats.callers),
        stats.rate,
        stats.p50_ms,
        stats.p99_ms,
        stats.max_ms,
        if stats.errors > 0 {
            format!(", {} errors", stats.errors)
        } else {
            String::new()
        },
    )
}

/// How to start a server under test, and the queues to delete afterwards.
struct Spawn {
    command: Command,
    ready: Ready,
    queues: Vec<String>,
}

/// Warren's JSON log line for the `ready` event.
const WARREN_READY: &str = r#""message":"ready""#;

/// Measure a server already running on `topic` (`warren bench --topic`): the call phases one
/// after another, then the flood, published while it consumes.
async fn measure_running(
    plan: &Plan,
    admin: &mut Admin,
    name: &str,
    topic: &str,
) -> anyhow::Result<ServerResult> {
    let mut result = ServerResult::new(name);
    let load =
        Arc::new(LoadGen::connect(&plan.url, &plan.exchange, "echo", plan.payload_bytes).await?);
    for &callers in plan.callers.iter().filter(|&&n| n > 0) {
        let stats = load
            .calls(topic, callers, plan.warmup, plan.window)
            .await
            .stats();
        eprintln!("{name}: {}", describe(&stats));
        result.calls.push(stats);
    }
    if plan.casts > 0 {
        let stats = flood(plan, admin, name, topic, None, &load, &mut result).await?;
        result.flood = Some(stats);
    }
    load.close().await;
    Ok(result)
}

/// The flood. With a server of ours: paused while the casts queue up, then timed from its
/// resumption until the queue is empty. Against a server already running: published while it
/// consumes, so it measures the slower of the publisher and the server.
async fn flood(
    plan: &Plan,
    admin: &mut Admin,
    name: &str,
    topic: &str,
    peer: Option<&Peer>,
    load: &LoadGen,
    result: &mut ServerResult,
) -> anyhow::Result<FloodStats> {
    let casts = plan.casts;
    result.rss_before_flood_kib = peer.and_then(Peer::rss_kib);
    if let Some(peer) = peer {
        peer.signal("STOP")?;
    }
    let publish_started = Instant::now();
    let published = load.flood(topic, casts).await;
    let publish_secs = publish_started.elapsed().as_secs_f64();
    let sampler = peer.map(|p| RssSampler::start(p.pid()));
    let drain_started = match peer {
        Some(peer) => {
            peer.signal("CONT")?;
            Instant::now()
        }
        None => publish_started,
    };
    published?;
    eprintln!(
        "{name}: {casts} casts published in {publish_secs:.1} s ({:.0}/s){}",
        casts as f64 / publish_secs,
        if peer.is_some() {
            " while it was paused; draining"
        } else {
            ""
        }
    );
    let limit = Duration::from_secs(900);
    let mut last_note = Instant::now();
    loop {
        let depth = admin.depth(topic).await?;
        if depth == 0 {
            break;
        }
        if drain_started.elapsed() > limit {
            anyhow::bail!("{name}: {depth} casts still queued after {limit:?}");
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            eprintln!("{name}: {depth} casts left");
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    result.rss_flood_peak_kib = sampler.map(RssSampler::stop);
    let stats = FloodStats {
        casts,
        publish_secs,
        drain_secs,
        rate: casts as f64 / drain_secs,
    };
    eprintln!(
        "{name}: flood of {casts} casts drained in {drain_secs:.2} s ({:.0} casts/s){}",
        stats.rate,
        match (result.rss_before_flood_kib, result.rss_flood_peak_kib) {
            (Some(before), Some(peak)) => format!(
                "; RSS {} before, peak {} while draining",
                report::mib(Some(before)),
                report::mib(Some(peak))
            ),
            _ => String::new(),
        }
    );
    Ok(stats)
}

/// A Warren config serving `echo` on each topic.
fn warren_config(
    plan: &Plan,
    server: &str,
    topics: &[String],
    echo: &std::path::Path,
    cache: Option<&std::path::Path>,
) -> String {
    let toml = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let cache = cache.map_or_else(String::new, |c| c.display().to_string());
    let mut text = format!(
        "[broker]\nurl = {}\nexchange = {}\nheartbeat = 60\n\n\
[server]\nname = {}\nprefetch = {}\nconcurrency = 16\nwatch = false\ncache_dir = {}\n",
        toml(&plan.url),
        toml(&plan.exchange),
        toml(server),
        plan.prefetch,
        toml(&cache),
    );
    for topic in topics {
        text.push_str(&format!(
            "\n[[handler]]\ntopic = {}\nmodule = {}\n",
            toml(topic),
            toml(&echo.display().to_string())
        ));
    }
    text
}

fn warren_command(config: &std::path::Path) -> anyhow::Result<Command> {
    let mut command = peers::this_binary()?;
    command.arg("serve").arg("--config").arg(config);
    command
        .env("WARREN_LOG_FORMAT", "json")
        .env("WARREN_LOG", "info,lapin=warn")
        .env_remove("WARREN_BROKER_URL")
        .env_remove("WARREN_BROKER_PASSWORD")
        .env_remove("WARREN_EXCHANGE")
        .env_remove("WARREN_SERVER_NAME");
    Ok(command)
}

/// The shared queues a Warren or oslo server declares for `topics` (fanout queues expire).
fn server_queues(topics: &[String], server: &str) -> Vec<String> {
    topics
        .iter()
        .flat_map(|t| [t.clone(), format!("{t}.{server}")])
        .collect()
}

/// oslo's transport URL for an AMQP URL: `rabbit://` and the vhost `/` written as empty.
fn oslo_url(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
    let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let vhost = if vhost.eq_ignore_ascii_case("%2f") {
        ""
    } else {
        vhost
    };
    format!("rabbit://{authority}/{vhost}")
}

/// A scratch directory removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(name: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::oslo_url;

    #[test]
    fn oslo_url_rewrites_scheme_and_default_vhost() {
        assert_eq!(
            oslo_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "rabbit://guest:guest@127.0.0.1:5672/"
        );
        assert_eq!(
            oslo_url("amqp://u:p@h:5672/nova?heartbeat=5"),
            "rabbit://u:p@h:5672/nova"
        );
        assert_eq!(oslo_url("amqp://h"), "rabbit://h/");
    }
}
