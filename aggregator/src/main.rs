//! `graywatch-aggregator`: thin entry point (config, logging, signals); see `run.rs`, and
//! `cleanup.rs` for the `cleanup` subcommand.

use clap::Parser;
use graywatch_aggregator::config::{Args, Command, FileConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_json);
    #[cfg(target_env = "gnu")]
    fix_mmap_threshold();
    let cfg = match FileConfig::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("graywatch-aggregator: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API (KUBECONFIG or in-cluster): {e}"))?;
    if let Some(Command::Cleanup(cleanup)) = &args.command {
        let report = graywatch_aggregator::cleanup::run(client, &cfg, cleanup).await;
        println!("{}", report.summary());
        if !report.ok() {
            std::process::exit(1);
        }
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    graywatch_aggregator::run::run(cfg, client, shutdown).await
}

/// Keeps glibc's mmap threshold at its 128 KiB default. Large transient tables (the tick's
/// address book of every node's pod IPs: tens of MiB at 10,000 nodes) are then mmapped and
/// given back to the kernel when freed. By default glibc raises the threshold after the first
/// such free (up to 32 MiB), so later tables come from the heap and its high-water mark stays in
/// RSS: 330 MiB vs 281 MiB at 10,000 agents (BENCHMARKS.md, "fleet", 2026-12-06).
#[cfg(target_env = "gnu")]
fn fix_mmap_threshold() {
    const THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only sets a malloc tunable; this parameter and value are valid.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) } != 1 {
        tracing::warn!(
            threshold = THRESHOLD,
            "mallopt(M_MMAP_THRESHOLD) refused: RSS may keep transient peaks"
        );
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: `kubectl logs` and log shippers read stderr from a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// One shutdown signal (SIGTERM or SIGINT) fans out to every task through the token.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    shutdown.cancel();
}
