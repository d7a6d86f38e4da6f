//! Command-line interface: parses arguments, calls the library, prints, and picks exit codes.

mod bench;
mod local;
mod new;
mod remote;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code when a handler or remote call failed (the error JSON is printed on stderr).
pub const EXIT_FAILED: u8 = 1;
/// Exit code for usage errors, unreadable or invalid modules, bad config.
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about = "Serve RPC over RabbitMQ with WebAssembly handlers (oslo.messaging / nova.rpc wire format)",
    long_about = "Warren serves RPC over RabbitMQ (AMQP 0-9-1) in the wire format of OpenStack's \
nova.rpc and oslo.messaging. Each handler is a WebAssembly module: every exported function is an \
RPC method, invoked by name with JSON args in a fresh sandbox with time and memory limits.\n\n\
Start with `warren invoke` to run a handler locally, without a broker.",
    after_help = "Examples:\n  warren inspect plugins/out/echo.wasm\n  warren invoke plugins/out/echo.wasm echo '{\"value\": 42}'"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Serve(serve::ServeArgs),
    Invoke(local::InvokeArgs),
    Inspect(local::InspectArgs),
    New(new::NewArgs),
    Call(remote::CallArgs),
    Multicall(remote::MulticallArgs),
    Cast(remote::CastArgs),
    Fanout(remote::FanoutArgs),
    Notify(remote::NotifyArgs),
    Status(remote::StatusArgs),
    Reload(remote::ReloadArgs),
    Rollback(remote::RollbackArgs),
    Bench(bench::BenchArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs at info; one-shot commands only warn, and lapin's own chatter (returned
    // messages we already handle, probe channels we close on purpose) stays out of the way.
    let default_filter = match cli.command {
        Command::Serve(_) => "info,lapin=warn,lapin::returned_messages=off",
        Command::Invoke(_) | Command::Inspect(_) => "info",
        _ => "warn,lapin=off",
    };
    init_tracing(default_filter);
    match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Invoke(args) => local::invoke(args),
        Command::Inspect(args) => local::inspect(args),
        Command::New(args) => new::new(args),
        Command::Call(args) => remote::call(args, false),
        Command::Multicall(args) => remote::call(args.call, true),
        Command::Cast(args) => remote::cast(args),
        Command::Fanout(args) => remote::fanout(args),
        Command::Notify(args) => remote::notify(args),
        Command::Status(args) => remote::status(args),
        Command::Reload(args) => remote::reload(args),
        Command::Rollback(args) => remote::rollback(args),
        Command::Bench(args) => bench::bench(args),
    }
}

fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("WARREN_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if std::env::var("WARREN_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder
            .json()
            .fmt_fields(warren::log::JsonSpanFields)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// Print an error for the operator and return the usage exit code.
pub fn usage_error(err: anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(EXIT_USAGE)
}
