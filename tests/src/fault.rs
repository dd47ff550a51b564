//! Fault injection for a bench node, without netem (this kernel has none):
//!
//! - [`LinkEmulator`]: exact per-link delay, jitter and loss. The node's packets towards chosen
//!   peers are routed into a TUN device; a userspace emulator holds each packet for its delay (or
//!   drops it with probability `loss`) and re-sends it through a raw socket whose firewall mark
//!   selects a routing table that bypasses the TUN, out of the node's real interface.
//! - [`NftDrop`]: nftables random drop (`numgen random`) of matching packets.
//! - [`RateLimit`]: a tbf bandwidth limit on the node's interface, with a bounded queue.
//!
//! Every fault is undone when its guard is dropped.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fs::{File, OpenOptions},
    io::Read,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sched::{CloneFlags, setns},
    sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, setsockopt, socket, sockopt},
};
use rand::Rng;

use crate::netns::{BenchError, ip_in, run};

/// Firewall mark and routing table the emulator's re-sent packets use to bypass the TUN.
const BYPASS_MARK: u32 = 0x6777;
const BYPASS_TABLE: &str = "6777";

/// How a link misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    /// Added one-way delay (netem semantics on egress: the RTT grows by this much).
    pub delay: Duration,
    /// Uniform jitter: each packet's delay is `delay ± jitter`.
    pub jitter: Duration,
    /// Probability in [0, 1] that a packet is dropped.
    pub loss: f64,
}

impl LinkSpec {
    /// Parses `delay=20ms,jitter=2ms,loss=1%` (any subset, any order).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut link = LinkSpec {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            match key {
                "delay" => link.delay = humantime::parse_duration(value).map_err(|e| format!("delay={value}: {e}"))?,
                "jitter" => {
                    link.jitter = humantime::parse_duration(value).map_err(|e| format!("jitter={value}: {e}"))?;
                }
                "loss" => {
                    let percent = value
                        .strip_suffix('%')
                        .ok_or_else(|| format!("loss={value}: write it as a percentage, e.g. 2%"))?;
                    let percent: f64 = percent.parse().map_err(|e| format!("loss={value}: {e}"))?;
                    if !(0.0..=100.0).contains(&percent) {
                        return Err(format!("loss={value}: must be between 0% and 100%"));
                    }
                    link.loss = percent / 100.0;
                }
                other => {
                    return Err(format!(
                        "unknown fault parameter `{other}` (expected delay, jitter, loss)"
                    ));
                }
            }
        }
        if link.jitter > link.delay {
            return Err("jitter must not exceed delay".into());
        }
        Ok(link)
    }
}

/// Packets the emulator handled.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub send_errors: AtomicU64,
}

/// A running link emulator; dropping it restores the node's routing.
pub struct LinkEmulator {
    netns: String,
    device: String,
    targets: Vec<Ipv4Addr>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<LinkStats>,
}

impl std::fmt::Debug for LinkEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkEmulator")
            .field("netns", &self.netns)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl LinkEmulator {
    /// Applies `spec` to IPv4 packets leaving namespace `netns` (source `local`) for `targets`,
    /// re-sent through `egress` (the node's real interface).
    pub fn start(
        netns: &str,
        local: Ipv4Addr,
        egress: &str,
        targets: &[Ipv4Addr],
        spec: LinkSpec,
    ) -> Result<Self, BenchError> {
        let device = format!("gwt{}", std::process::id() % 100_000);
        let (tun, raw) = open_in_netns(netns, &device)?;
        let mut emulator = LinkEmulator {
            netns: netns.to_owned(),
            device: device.clone(),
            targets: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            stats: Arc::new(LinkStats::default()),
        };
        ip_in(netns, &["link", "set", &device, "up"])?;
        ip_in(
            netns,
            &[
                "rule",
                "add",
                "fwmark",
                &BYPASS_MARK.to_string(),
                "lookup",
                BYPASS_TABLE,
                "pref",
                "100",
            ],
        )?;
        for target in targets {
            let dst = format!("{target}/32");
            ip_in(netns, &["route", "add", &dst, "dev", egress, "table", BYPASS_TABLE])?;
            ip_in(
                netns,
                &["route", "add", &dst, "dev", &device, "src", &local.to_string()],
            )?;
            emulator.targets.push(*target);
        }

        let (to_writer, from_reader) = mpsc::channel::<(Instant, Vec<u8>)>();
        let (stop, stats) = (emulator.stop.clone(), emulator.stats.clone());
        emulator.threads.push(std::thread::spawn(move || {
            read_loop(tun, spec, &stop, &stats, &to_writer);
        }));
        let (stop, stats) = (emulator.stop.clone(), emulator.stats.clone());
        emulator.threads.push(std::thread::spawn(move || {
            write_loop(&raw, &stop, &stats, &from_reader);
        }));
        Ok(emulator)
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // Closing the TUN removed the device and its routes; remove the bypass table and rule.
        for target in &self.targets {
            let _ = ip_in(
                &self.netns,
                &["route", "del", &format!("{target}/32"), "table", BYPASS_TABLE],
            );
        }
        let _ = ip_in(
            &self.netns,
            &[
                "rule",
                "del",
                "fwmark",
                &BYPASS_MARK.to_string(),
                "lookup",
                BYPASS_TABLE,
            ],
        );
        let _ = ip_in(&self.netns, &["link", "del", &self.device]);
    }
}

nix::ioctl_write_ptr_bad!(tun_set_iff, 0x4004_54ca, [u8; 40]);

/// Creates the TUN device and the raw socket inside `netns`, from a helper thread (setns only
/// moves the calling thread).
fn open_in_netns(netns: &str, device: &str) -> Result<(File, OwnedFd), BenchError> {
    let netns_path = Path::new("/run/netns").join(netns);
    let netns_file = File::open(&netns_path).map_err(|source| BenchError::Io {
        what: format!("open {}", netns_path.display()),
        source,
    })?;
    let device = device.to_owned();
    let io = |what: &str, source: std::io::Error| BenchError::Io {
        what: what.to_owned(),
        source,
    };
    std::thread::spawn(move || -> Result<(File, OwnedFd), BenchError> {
        setns(netns_file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| io("setns", e.into()))?;
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| io("open /dev/net/tun", e))?;
        let mut ifreq = [0u8; 40];
        ifreq[..device.len()].copy_from_slice(device.as_bytes());
        // IFF_TUN | IFF_NO_PI: raw IP packets, no packet-info header.
        ifreq[16..18].copy_from_slice(&(0x0001u16 | 0x1000).to_ne_bytes());
        // SAFETY: TUNSETIFF reads a 40-byte struct ifreq that lives across the call.
        unsafe { tun_set_iff(tun.as_raw_fd(), &raw const ifreq) }.map_err(|e| io("TUNSETIFF", e.into()))?;
        let raw = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )
        .map_err(|e| io("raw socket", e.into()))?;
        setsockopt(&raw, sockopt::Mark, &BYPASS_MARK).map_err(|e| io("SO_MARK", e.into()))?;
        Ok((tun, raw))
    })
    .join()
    .map_err(|_| BenchError::Command {
        command: "netns helper thread".into(),
        stderr: "panicked".into(),
    })?
}

fn read_loop(
    mut tun: File,
    spec: LinkSpec,
    stop: &AtomicBool,
    stats: &LinkStats,
    to_writer: &mpsc::Sender<(Instant, Vec<u8>)>,
) {
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(tun.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(50u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        let Ok(n) = tun.read(&mut buf) else { return };
        // Only IPv4 is routed into the TUN; anything else (e.g. IPv6 link-local chatter) is ignored.
        if n < 20 || buf[0] >> 4 != 4 {
            continue;
        }
        if spec.loss > 0.0 && rng.random::<f64>() < spec.loss {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut delay = spec.delay;
        if !spec.jitter.is_zero() {
            let offset = rng.random_range(-spec.jitter.as_secs_f64()..=spec.jitter.as_secs_f64());
            delay = Duration::from_secs_f64((spec.delay.as_secs_f64() + offset).max(0.0));
        }
        if to_writer.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

fn write_loop(raw: &OwnedFd, stop: &AtomicBool, stats: &LinkStats, from_reader: &mpsc::Receiver<(Instant, Vec<u8>)>) {
    // Ordered by due time; the sequence number keeps equal deadlines in arrival order.
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            let Some(Reverse((_, _, packet))) = queue.pop() else {
                break;
            };
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            match sendto(
                raw.as_raw_fd(),
                &packet,
                &SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0)),
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(_) => stats.forwarded.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.send_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
        let wait = queue.peek().map_or(Duration::from_millis(50), |Reverse((due, _, _))| {
            due.saturating_duration_since(Instant::now())
        });
        match from_reader.recv_timeout(wait) {
            Ok((due, packet)) => {
                queue.push(Reverse((due, sequence, packet)));
                sequence += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if queue.is_empty() {
                    return;
                }
            }
        }
    }
}

/// An nftables rule dropping a share of matching packets in a node; removed on drop.
#[derive(Debug)]
pub struct NftDrop {
    netns: String,
    table: String,
}

impl NftDrop {
    /// Drops `percent`% of packets matching `matcher` (nft syntax, e.g. `ip daddr 10.0.0.2 tcp
    /// dport 7000`) at `hook` (`output` or `input`) inside `netns`.
    pub fn start(netns: &str, hook: &str, matcher: &str, percent: u8) -> Result<Self, BenchError> {
        let table = format!("graywatch_fault_{}", std::process::id());
        let verdict = if percent >= 100 {
            "drop".to_owned()
        } else {
            format!("numgen random mod 100 < {percent} drop")
        };
        let nft = |args: &str| run("ip", ["netns", "exec", netns, "nft", args]);
        nft(&format!("add table inet {table}"))?;
        // From here on, Drop removes the table even if a later step fails.
        let guard = Self {
            netns: netns.to_owned(),
            table,
        };
        nft(&format!(
            "add chain inet {} c {{ type filter hook {hook} priority 0; policy accept; }}",
            guard.table
        ))?;
        nft(&format!("add rule inet {} c {matcher} {verdict}", guard.table))?;
        Ok(guard)
    }
}

impl Drop for NftDrop {
    fn drop(&mut self) {
        let _ = run(
            "ip",
            [
                "netns",
                "exec",
                &self.netns,
                "nft",
                "delete",
                "table",
                "inet",
                &self.table,
            ],
        );
    }
}

/// A tbf bandwidth limit on a node's interface; removed on drop.
#[derive(Debug)]
pub struct RateLimit {
    netns: String,
    device: String,
}

impl RateLimit {
    /// Limits egress of `device` in `netns` to `rate` (tc syntax, e.g. `10mbit`), with a queue
    /// of 400 ms at that rate.
    pub fn start(netns: &str, device: &str, rate: &str) -> Result<Self, BenchError> {
        Self::with_queue(netns, device, rate, "400ms")
    }

    /// [`Self::start`] with a queue of `latency` at the rate (tc syntax, e.g. `20ms`): what
    /// does not fit is dropped (`QDISC_DROP`).
    pub fn with_queue(netns: &str, device: &str, rate: &str, latency: &str) -> Result<Self, BenchError> {
        ip_netns_tc(
            netns,
            &[
                "qdisc", "add", "dev", device, "root", "tbf", "rate", rate, "burst", "32kbit", "latency", latency,
            ],
        )?;
        Ok(Self {
            netns: netns.to_owned(),
            device: device.to_owned(),
        })
    }
}

impl Drop for RateLimit {
    fn drop(&mut self) {
        let _ = ip_netns_tc(&self.netns, &["qdisc", "del", "dev", &self.device, "root"]);
    }
}

fn ip_netns_tc(netns: &str, args: &[&str]) -> Result<(), BenchError> {
    run("ip", ["netns", "exec", netns, "tc"].iter().chain(args)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fault_specs() {
        let spec = LinkSpec::parse("delay=30ms, loss=1%").expect("valid");
        assert_eq!(
            spec,
            LinkSpec {
                delay: Duration::from_millis(30),
                jitter: Duration::ZERO,
                loss: 0.01
            }
        );
        assert!(LinkSpec::parse("loss=2").expect_err("no %").contains("percentage"));
        assert!(LinkSpec::parse("loss=200%").is_err());
        assert!(
            LinkSpec::parse("delay=1ms,jitter=2ms")
                .expect_err("jitter")
                .contains("jitter")
        );
        assert!(LinkSpec::parse("latency=1ms").expect_err("unknown").contains("latency"));
    }
}
