//! What every daemon binary does the same way: structured logs and clean shutdown on signals.
//!
//! Kept in the library so `kvd` and `mrd` behave identically.

use tracing_subscriber::EnvFilter;

/// The tokio runtime every binary runs on. If it cannot start (no threads, no file descriptors) the
/// reason is printed as `PROGRAM: ...` and the caller exits with the returned status 2, the one every
/// binary gives for an environment it cannot work in.
pub fn runtime(program: &str) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("{program}: cannot start the async runtime: {e}");
        std::process::ExitCode::from(2)
    })
}

/// Log to stderr, filtered by `RUST_LOG` (default `info`). Spans carry the node id (`raft{node=..}`,
/// `kv{node=..}`) and role changes log the term and role, so interleaved logs of a cluster stay readable.
pub fn init_logging() {
    init_logging_with("info");
}

/// [`init_logging`] with another default filter for when `RUST_LOG` is unset (MapReduce workers log
/// less by default: they run many).
pub fn init_logging_with(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Resolves on the first SIGTERM or SIGINT: what process supervisors and Ctrl-C send.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
