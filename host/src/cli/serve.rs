//! `warren serve`: run the daemon until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use warren::config::Config;

use super::usage_error;

/// Run the daemon: consume the handlers' topics and answer RPC with their Wasm modules.
///
/// It declares the same exchanges and queues as an oslo.messaging RPC server (`<topic>`,
/// `<topic>.<server>`, `<topic>_fanout`), so oslo clients and servers share the broker with it.
/// SIGINT or SIGTERM stops intake, lets in-flight invocations finish and reply, then exits.
#[derive(Args)]
#[command(
    after_help = "Example:\n  warren serve --config config/warren.toml\n\n\
Environment: WARREN_BROKER_URL, WARREN_BROKER_PASSWORD, WARREN_EXCHANGE and WARREN_SERVER_NAME \
override the config; \
WARREN_LOG sets the log filter (e.g. `info,warren=debug`); WARREN_LOG_FORMAT=json logs JSON."
)]
pub struct ServeArgs {
    /// The TOML config file (see config/warren.toml for every key).
    #[arg(long, short)]
    config: PathBuf,
}

/// `warren serve`.
pub fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return usage_error(e.into()),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return usage_error(e.into()),
    };
    match runtime.block_on(warren::server::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
