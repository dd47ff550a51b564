//! graywatch-traffic: TCP request/response and bulk load between bench nodes.
//!
//!   graywatch-traffic server --listen [::]:7000
//!   graywatch-traffic client --connect 10.231.1.2:7000 --count 200            # transactions
//!   graywatch-traffic client --connect 10.231.1.2:7000 --bulk 20000000        # bytes
//!
//!   graywatch-traffic swarm --connect [`fd00::1`]:7000 --first-source `fd00:77::1` --count 5000
//!
//!   graywatch-traffic leak --mib-per-second 2                                  # memory leak
//!
//!   graywatch-traffic client --connect 10.231.1.2:7000 --rate 50 --duration 2h --request-timeout 1s
//!
//! The client prints one JSON report line. With `--hold` it then prints `holding` and keeps
//! the connection open until its stdin closes, so tests can inspect the live socket (ss).

use std::{
    io::{BufRead, Write},
    net::SocketAddr,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use graywatch_testbench::traffic::{
    RrLoad, connect, raise_nofile_limit, run_bulk, run_rr, run_rr_reconnecting, serve, sink, swarm,
};

#[derive(Parser)]
#[command(name = "graywatch-traffic", about = "TCP load for the graywatch bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve request/response and bulk clients.
    Server {
        #[arg(long, default_value = "[::]:7000")]
        listen: SocketAddr,
    },
    /// Accept any number of connections on one thread and discard what they send (for `swarm`s
    /// of tens of thousands of connections; `server` runs a thread per connection).
    Sink {
        #[arg(long, default_value = "[::]:7001")]
        listen: SocketAddr,
    },
    /// Generate load against a server.
    Client(ClientArgs),
    /// Many connections from as many IPv6 source addresses, each sending a byte per interval.
    Swarm {
        #[arg(long)]
        connect: SocketAddr,
        /// The first source address; the i-th connection comes from this + i.
        #[arg(long)]
        first_source: std::net::Ipv6Addr,
        #[arg(long, default_value_t = 5000)]
        count: u32,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
        interval: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        duration: Duration,
    },
    /// Send `count` 64-byte UDP datagrams to an address where nothing listens: the receiving
    /// kernel drops each one (`skb:kfree_skb`, reason `NO_SOCKET`), a drop load at line rate.
    Unreachable {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
    },
    /// Leak memory slowly: allocate and touch this many MiB per second (in ten steps a second)
    /// and keep it all, until killed (by a cgroup limit's OOM killer) or `--max-mib` is held.
    Leak {
        #[arg(long, default_value_t = 2.0)]
        mib_per_second: f64,
        /// Stop growing (and keep holding) at this many MiB.
        #[arg(long)]
        max_mib: Option<u64>,
    },
}

/// What a client does (see `graywatch-traffic client --help`).
#[derive(clap::Args, Clone, Copy)]
struct ClientArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// Number of transactions (request/response mode).
    #[arg(long)]
    count: Option<u64>,
    /// Run for this long, e.g. 10s (request/response mode).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Transactions per second per connection (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 64)]
    request: u32,
    #[arg(long, default_value_t = 64)]
    response: u32,
    /// Send this many bytes in one bulk transfer instead of transactions.
    #[arg(long)]
    bulk: Option<u64>,
    /// Keep the connection open after the report until stdin closes.
    #[arg(long)]
    hold: bool,
    /// Connect timeout (with --request-timeout, that deadline applies to connecting as well).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    connect_timeout: Duration,
    /// Give up a transaction or a connection attempt after this long and connect again, as a
    /// service client with a deadline does (request/response mode): a peer that stops
    /// answering keeps seeing new attempts. Without it, one connection waits as long as TCP
    /// retries.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["bulk", "hold"])]
    request_timeout: Option<Duration>,
}

/// The `leak` subcommand: never returns while below `max_mib`.
fn leak(mib_per_second: f64, max_mib: Option<u64>) -> ExitCode {
    const STEP: Duration = Duration::from_millis(100);
    if !(mib_per_second.is_finite() && mib_per_second > 0.0) {
        eprintln!("graywatch-traffic leak: --mib-per-second must be a positive number");
        return ExitCode::FAILURE;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive finite rate; `as` saturates"
    )]
    let step_bytes = ((mib_per_second * 1024.0 * 1024.0 / 10.0) as usize).max(4096);
    let limit = max_mib.map_or(usize::MAX, |m| usize::try_from(m << 20).unwrap_or(usize::MAX));
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut total = 0usize;
    let started = std::time::Instant::now();
    let mut next = started;
    loop {
        if total < limit {
            // Non-zero bytes: every page is written, so resident, not a lazily mapped zero page.
            held.push(std::hint::black_box(vec![0xa5; step_bytes]));
            total += step_bytes;
        }
        next += STEP;
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
}

/// A run's JSON report line, then `holding` when a client keeps its connection open.
fn print_report(report: &impl serde::Serialize, hold: bool) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, report);
    let _ = writeln!(out);
    if hold {
        let _ = writeln!(out, "holding");
    }
    let _ = out.flush();
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Leak {
            mib_per_second,
            max_mib,
        } => leak(mib_per_second, max_mib),
        Cmd::Swarm {
            connect,
            first_source,
            count,
            interval,
            duration,
        } => match swarm(connect, first_source, count, interval, duration) {
            Ok(report) => {
                print_report(&report, false);
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("graywatch-traffic swarm {connect}: {error}");
                ExitCode::FAILURE
            }
        },
        Cmd::Sink { listen } => match raise_nofile_limit().and_then(|()| sink(listen)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("graywatch-traffic sink {listen}: {error}");
                ExitCode::FAILURE
            }
        },
        Cmd::Server { listen } => match raise_nofile_limit().and_then(|()| serve(listen)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("graywatch-traffic server {listen}: {error}");
                ExitCode::FAILURE
            }
        },
        Cmd::Client(args) => client(args),
        Cmd::Unreachable { connect, count } => match unreachable(connect, count) {
            Ok(report) => {
                print_report(&report, false);
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("graywatch-traffic unreachable {connect}: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The `unreachable` subcommand's report (the client report's fields: one datagram is one
/// transaction).
#[derive(serde::Serialize)]
struct UnreachableReport {
    transactions: u64,
    bytes: u64,
    elapsed_seconds: f64,
}

fn unreachable(to: SocketAddr, count: u64) -> std::io::Result<UnreachableReport> {
    let bind: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Unconnected: the ICMP port-unreachable answers are not turned into send errors.
    let socket = std::net::UdpSocket::bind(bind)?;
    let payload = [0x5a_u8; 64];
    let started = std::time::Instant::now();
    let mut sent = 0;
    while sent < count {
        match socket.send_to(&payload, to) {
            Ok(_) => sent += 1,
            // A full queue on the sending side: try again, nothing was sent.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::yield_now();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(UnreachableReport {
        transactions: sent,
        bytes: sent * payload.len() as u64,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
}

/// The `client` subcommand.
fn client(args: ClientArgs) -> ExitCode {
    let ClientArgs {
        connect: addr,
        count,
        duration,
        rate,
        request,
        response,
        bulk,
        hold,
        connect_timeout,
        request_timeout,
    } = args;
    // Request/response mode: 100 transactions unless a count or a duration is given.
    let load = RrLoad {
        request,
        response,
        count: count.or(duration.is_none().then_some(100)),
        duration,
        rate,
    };
    if let Some(deadline) = request_timeout {
        print_report(&run_rr_reconnecting(addr, &load, deadline), false);
        return ExitCode::SUCCESS;
    }
    let mut stream = match connect(addr, connect_timeout) {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("graywatch-traffic: connect {addr}: {error}");
            return ExitCode::from(3);
        }
    };
    let result = if let Some(bytes) = bulk {
        run_bulk(&mut stream, bytes)
    } else {
        run_rr(&mut stream, &load)
    };
    match result {
        Ok(report) => {
            print_report(&report, hold);
            if hold {
                // Wait for the test to close stdin; the socket stays open meanwhile.
                let _ = std::io::stdin().lock().lines().count();
            }
            drop(stream);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("graywatch-traffic: {addr}: {error}");
            ExitCode::FAILURE
        }
    }
}
