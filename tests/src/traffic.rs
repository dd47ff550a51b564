//! A small TCP load generator with a server: request/response transactions (latency) and bulk
//! transfers (throughput, loss), so the bench drives real traffic without extra packages.
//!
//! Wire protocol: the client's first byte picks the mode. `R`: repeated transactions, each an
//! 8-byte header (request length, response length; big-endian u32) and the request bytes,
//! answered with response-length bytes. `B`: bulk bytes until EOF, answered with the total
//! received as a big-endian u64.

use std::{
    io::{self, BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde::Serialize;

const MAX_MESSAGE: u32 = 16 << 20;

/// Serves connections until the process is killed; prints `listening <addr>` when ready.
pub fn serve(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("accept: {error}");
                continue;
            }
        };
        std::thread::spawn(move || {
            if let Err(error) = handle(stream)
                && error.kind() != io::ErrorKind::UnexpectedEof
                && error.kind() != io::ErrorKind::ConnectionReset
            {
                eprintln!("connection: {error}");
            }
        });
    }
    Ok(())
}

/// Accepts any number of connections on one thread and discards what they send; answers each
/// with the byte count at its end (the bulk protocol). For swarms of tens of thousands of
/// connections, where [`serve`]'s thread per connection runs out of memory mappings.
pub fn sink(listen: SocketAddr) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("listening {}", listener.local_addr()?);
        io::stdout().flush()?;
        loop {
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, typically: let connections end before accepting more.
                    eprintln!("accept: {error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = stream.write_all(&total.to_be_bytes()).await;
            });
        }
    })
}

fn handle(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode)?;
    match mode[0] {
        b'R' => {
            let mut header = [0u8; 8];
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stream.read_exact(&mut header) {
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    other => other?,
                }
                let request = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
                let response = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                if request > MAX_MESSAGE || response > MAX_MESSAGE {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "message too large"));
                }
                discard(&mut stream, u64::from(request), &mut buf)?;
                send_zeros(&mut stream, u64::from(response), &buf)?;
            }
        }
        b'B' => {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_be_bytes())
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown mode byte {other}"),
        )),
    }
}

fn discard(stream: &mut TcpStream, mut remaining: u64, buf: &mut [u8]) -> io::Result<()> {
    while remaining > 0 {
        let want = usize::try_from(remaining.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        remaining -= n as u64;
    }
    Ok(())
}

fn send_zeros(stream: &mut TcpStream, mut remaining: u64, zeros: &[u8]) -> io::Result<()> {
    while remaining > 0 {
        let n = usize::try_from(remaining.min(zeros.len() as u64)).unwrap_or(zeros.len());
        stream.write_all(&zeros[..n])?;
        remaining -= n as u64;
    }
    Ok(())
}

/// What a client run did.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    pub transactions: u64,
    pub bytes: u64,
    pub elapsed_seconds: f64,
    pub transactions_per_second: f64,
    /// Transactions and connection attempts given up at their deadline or on an error (with
    /// [`run_rr_reconnecting`]; 0 otherwise).
    pub failures: u64,
}

/// Request/response load on one connection.
#[derive(Debug, Clone)]
pub struct RrLoad {
    pub request: u32,
    pub response: u32,
    /// Stop after this many transactions…
    pub count: Option<u64>,
    /// …or after this long.
    pub duration: Option<Duration>,
    /// Transactions per second (None: as fast as possible).
    pub rate: Option<f64>,
}

pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub fn run_rr(stream: &mut TcpStream, load: &RrLoad) -> io::Result<ClientReport> {
    stream.write_all(b"R")?;
    let mut transactions = Transactions::new(load);
    let started = Instant::now();
    let pace = load.pace();
    while !load.is_done(transactions.done, started) {
        transactions.one(stream)?;
        if let Some(pace) = pace {
            // Open-loop pacing of the load itself (not test synchronisation).
            let due = pace.mul_f64(transactions.done as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(report(transactions.done, transactions.bytes, started))
}

/// Request/response load as a service client with a deadline runs it: a transaction or a
/// connection attempt that takes longer than `deadline`, or fails, is given up and the client
/// connects again, until `load` is done. A peer that stops answering keeps seeing new attempts
/// (SYNs, first requests) every `deadline`, as it would from real clients, instead of one
/// connection whose retransmissions back off to minutes apart.
///
/// Pacing skips the slots a failure took rather than bursting to catch up afterwards.
pub fn run_rr_reconnecting(addr: SocketAddr, load: &RrLoad, deadline: Duration) -> ClientReport {
    /// Between two failed attempts at least this long, so a refused connection does not spin.
    const MIN_RETRY: Duration = Duration::from_millis(100);
    let started = Instant::now();
    let pace = load.pace();
    let mut transactions = Transactions::new(load);
    let mut failures = 0u64;
    let mut next_due = started;
    while !load.is_done(transactions.done, started) {
        let attempt = Instant::now();
        let result = connect(addr, deadline).and_then(|mut stream| {
            stream.set_read_timeout(Some(deadline))?;
            stream.set_write_timeout(Some(deadline))?;
            stream.write_all(b"R")?;
            while !load.is_done(transactions.done, started) {
                transactions.one(&mut stream)?;
                if let Some(pace) = pace {
                    // Open-loop pacing of the load itself (not test synchronisation); a slot
                    // more than one interval late is skipped, not caught up in a burst.
                    let now = Instant::now();
                    next_due = (next_due + pace).max(now.checked_sub(pace).unwrap_or(now));
                    std::thread::sleep(next_due.saturating_duration_since(now));
                }
            }
            Ok(())
        });
        if result.is_err() {
            failures += 1;
            let wait = pace.unwrap_or(Duration::ZERO).max(MIN_RETRY);
            std::thread::sleep((attempt + wait).saturating_duration_since(Instant::now()));
            next_due = Instant::now();
        }
    }
    ClientReport {
        failures,
        ..report(transactions.done, transactions.bytes, started)
    }
}

impl RrLoad {
    fn is_done(&self, transactions: u64, started: Instant) -> bool {
        self.count.is_some_and(|c| transactions >= c) || self.duration.is_some_and(|d| started.elapsed() >= d)
    }

    fn pace(&self) -> Option<Duration> {
        self.rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(1.0 / r))
    }
}

/// Request/response transactions on a connection, and what they moved so far.
struct Transactions {
    header: [u8; 8],
    request: u64,
    response: u64,
    buf: Vec<u8>,
    done: u64,
    bytes: u64,
}

impl Transactions {
    fn new(load: &RrLoad) -> Self {
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&load.request.to_be_bytes());
        header[4..].copy_from_slice(&load.response.to_be_bytes());
        Self {
            header,
            request: u64::from(load.request),
            response: u64::from(load.response),
            buf: vec![0u8; (load.request.max(load.response) as usize).clamp(1, 1 << 20)],
            done: 0,
            bytes: 0,
        }
    }

    fn one(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        stream.write_all(&self.header)?;
        send_zeros(stream, self.request, &self.buf)?;
        discard(stream, self.response, &mut self.buf)?;
        self.done += 1;
        self.bytes += self.request + self.response;
        Ok(())
    }
}

pub fn run_bulk(stream: &mut TcpStream, total: u64) -> io::Result<ClientReport> {
    stream.write_all(b"B")?;
    let chunk = vec![0u8; 256 << 10];
    let started = Instant::now();
    send_zeros(stream, total, &chunk)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack)?;
    let received = u64::from_be_bytes(ack);
    if received != total {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("server got {received} of {total} bytes"),
        ));
    }
    Ok(report(1, total, started))
}

fn report(transactions: u64, bytes: u64, started: Instant) -> ClientReport {
    let elapsed = started.elapsed().as_secs_f64();
    ClientReport {
        transactions,
        bytes,
        elapsed_seconds: elapsed,
        transactions_per_second: if elapsed > 0.0 {
            transactions as f64 / elapsed
        } else {
            0.0
        },
        failures: 0,
    }
}

/// Reads lines from `reader` until one starts with `prefix`; returns it.
pub fn await_line(reader: &mut impl BufRead, prefix: &str) -> io::Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended before `{prefix}`"),
            ));
        }
        if line.starts_with(prefix) {
            return Ok(line.trim_end().to_owned());
        }
    }
}

/// Raises this process' open-file limit: as root to the kernel's most (`nr_open`), else to its
/// hard limit (a swarm holds thousands of sockets).
pub fn raise_nofile_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Root may raise the hard limit too (to the kernel's nr_open): a swarm of 20,000
        // connections needs more than a container's usual hard limit of 20,000.
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|v| v.trim().parse::<libc::rlim_t>().ok());
        if let Some(most) = nr_open.filter(|most| *most > limit.rlim_max) {
            let raised = libc::rlimit {
                rlim_cur: most,
                rlim_max: most,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) == 0 {
                return Ok(());
            }
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A TCP connection from source address `source` (any port) to `target`. The source must be
/// local: an address of an interface, or of a `local` route (`ip -6 route add local P dev lo`
/// makes a whole prefix bindable without adding its addresses one by one).
pub fn connect_from(source: std::net::IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let domain = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let stream = TcpStream::from(fd);
    let bind = |addr: SocketAddr| -> io::Result<()> {
        let (storage, len) = sockaddr(addr);
        // SAFETY: `storage` is a valid sockaddr of `len` bytes.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                (&raw const storage).cast(),
                len,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    bind(SocketAddr::new(source, 0))?;
    let (storage, len) = sockaddr(target);
    // SAFETY: as for bind; a blocking connect.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            (&raw const storage).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits sa_family_t"),
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6 fits sa_family_t"),
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, libc::socklen_t::try_from(len).unwrap_or(0))
}

/// What a swarm did.
#[derive(Debug, Clone, Serialize)]
pub struct SwarmReport {
    pub connections: usize,
    pub writes: u64,
}

/// `count` connections to `target`, the i-th from `first_source + i` (IPv6), each in bulk mode
/// sending one byte per `interval` until `duration` has passed. Prints `connected <n>` once
/// every connection is up.
pub fn swarm(
    target: SocketAddr,
    first_source: std::net::Ipv6Addr,
    count: u32,
    interval: Duration,
    duration: Duration,
) -> io::Result<SwarmReport> {
    raise_nofile_limit()?;
    let base = u128::from(first_source);
    let mut streams = Vec::with_capacity(count as usize);
    for i in 0..count {
        let source = std::net::Ipv6Addr::from(base + u128::from(i));
        let mut stream = connect_from(source.into(), target)?;
        stream.write_all(b"B")?;
        streams.push(stream);
    }
    println!("connected {}", streams.len());
    io::stdout().flush()?;
    let started = Instant::now();
    let mut writes = 0u64;
    let mut next = started;
    while started.elapsed() < duration {
        for stream in &mut streams {
            stream.write_all(b"x")?;
            writes += 1;
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(SwarmReport {
        connections: streams.len(),
        writes,
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A peer that stops answering mid-connection: the transaction is given up at its deadline
    /// and the client connects again and carries on.
    #[test]
    fn a_stalled_transaction_is_given_up_and_the_client_reconnects() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = std::thread::spawn(move || {
            // The first connection is accepted and never answered; the second is served.
            let (stalled, _) = listener.accept().expect("first connection");
            let (served, _) = listener.accept().expect("second connection");
            handle(served).expect("serve the second connection");
            drop(stalled);
        });
        let load = RrLoad {
            request: 64,
            response: 64,
            count: Some(3),
            duration: None,
            rate: None,
        };
        let report = run_rr_reconnecting(addr, &load, Duration::from_millis(200));
        assert_eq!((report.transactions, report.failures), (3, 1), "{report:?}");
        server.join().expect("server thread");
    }
}
