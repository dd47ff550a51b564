//! `graywatch-aggregator`: thin entry point (config, logging, signals); see `run.rs`, and
//! `cleanup.rs` for the `cleanup` subcommand.

use clap::Parser;
use graywatch_aggregator::config::{Args, Command, FileConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_json);
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

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
