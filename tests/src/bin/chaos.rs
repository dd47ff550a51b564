//! graywatch-chaos: inject gray failures into a node (a network namespace) to check that the
//! pipeline notices, and how fast. No netem needed.
//!
//!   graywatch-chaos link --netns NS --local 10.231.1.1 --to 10.231.1.2 --fault delay=30ms,loss=1%
//!   graywatch-chaos drop --netns NS --match "ip daddr 10.231.1.2" --percent 5
//!   graywatch-chaos rate --netns NS --rate 10mbit
//!
//! Each runs until SIGINT/SIGTERM (or --duration) and then removes the fault.

use std::{net::Ipv4Addr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use graywatch_testbench::fault::{LinkEmulator, LinkSpec, NftDrop, RateLimit};
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
#[command(
    name = "graywatch-chaos",
    about = "Inject delay, jitter, loss, drops or bandwidth limits into a network namespace"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Remove the fault after this long (default: until SIGINT/SIGTERM).
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exact delay/jitter/loss on the node's IPv4 packets towards some peers (userspace TUN emulator).
    Link {
        #[arg(long)]
        netns: String,
        /// The node's own IPv4 address (source of the diverted packets).
        #[arg(long)]
        local: Ipv4Addr,
        /// Peers whose traffic is affected (repeatable).
        #[arg(long = "to", required = true)]
        targets: Vec<Ipv4Addr>,
        /// e.g. delay=30ms,jitter=2ms,loss=1%
        #[arg(long, value_parser = LinkSpec::parse)]
        fault: LinkSpec,
        /// The node's interface the emulated packets leave by.
        #[arg(long, default_value = "eth0")]
        egress: String,
    },
    /// Randomly drop a share of matching packets with nftables.
    Drop {
        #[arg(long)]
        netns: String,
        /// nft match expression, e.g. "ip daddr 10.231.1.2 tcp dport 7000".
        #[arg(long = "match")]
        matcher: String,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
        percent: u8,
        #[arg(long, default_value = "output", value_parser = ["output", "input"])]
        hook: String,
    },
    /// Limit the node's egress bandwidth with tbf.
    Rate {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        rate: String,
        #[arg(long, default_value = "eth0")]
        device: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Block the stop signals before starting threads, then wait for one synchronously.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(error) = signals.thread_block() {
        eprintln!("graywatch-chaos: cannot block signals: {error}");
        return ExitCode::FAILURE;
    }
    let guard: Box<dyn std::any::Any> = match cli.command {
        Cmd::Link {
            netns,
            local,
            targets,
            fault,
            egress,
        } => match LinkEmulator::start(&netns, local, &egress, &targets, fault) {
            Ok(emulator) => Box::new(emulator),
            Err(error) => return fail(&error),
        },
        Cmd::Drop {
            netns,
            matcher,
            percent,
            hook,
        } => match NftDrop::start(&netns, &hook, &matcher, percent) {
            Ok(drop) => Box::new(drop),
            Err(error) => return fail(&error),
        },
        Cmd::Rate { netns, rate, device } => match RateLimit::start(&netns, &device, &rate) {
            Ok(limit) => Box::new(limit),
            Err(error) => return fail(&error),
        },
    };
    eprintln!("graywatch-chaos: fault active");
    match cli.duration {
        Some(duration) => {
            // Wake on a stop signal or when the duration is up, whichever comes first.
            std::thread::spawn(move || {
                std::thread::sleep(duration);
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
            });
            let _ = signals.wait();
        }
        None => {
            let _ = signals.wait();
        }
    }
    drop(guard);
    eprintln!("graywatch-chaos: fault removed");
    ExitCode::SUCCESS
}

fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("graywatch-chaos: {error}");
    ExitCode::FAILURE
}
