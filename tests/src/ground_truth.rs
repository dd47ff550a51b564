//! The kernel's own view of a node's TCP state, to check the agent against: `ss -tin` smoothed
//! RTT and segment counts per connection, `nstat` counters, and a qdisc's drops (`tc -s`).

use std::net::IpAddr;

use crate::netns::{BenchError, exec_in};

/// Smoothed RTTs (ms) of the established TCP connections in `netns` towards `peer`.
pub fn ss_srtt_ms(netns: &str, peer: IpAddr) -> Result<Vec<f64>, BenchError> {
    let output = exec_in(netns, "ss", &["-tin", "state", "established", "dst", &peer.to_string()])?;
    Ok(parse_ss_rtts(&String::from_utf8_lossy(&output.stdout)))
}

/// Extracts every `rtt:<srtt>/<rttvar>` from `ss -i` output.
pub fn parse_ss_rtts(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .filter_map(|word| word.strip_prefix("rtt:"))
        .filter_map(|value| value.split('/').next())
        .filter_map(|srtt| srtt.parse().ok())
        .collect()
}

/// A connection's segment counts as `ss -i` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentCounts {
    /// `segs_out`: every segment sent, pure ACKs included.
    pub all: u64,
    /// `data_segs_out`: segments with payload, retransmissions included.
    pub data: u64,
}

/// Segment counts of each established TCP connection in `netns` towards `peer`.
pub fn ss_segments(netns: &str, peer: IpAddr) -> Result<Vec<SegmentCounts>, BenchError> {
    let output = exec_in(netns, "ss", &["-tin", "state", "established", "dst", &peer.to_string()])?;
    Ok(parse_ss_segments(&String::from_utf8_lossy(&output.stdout)))
}

/// Extracts `segs_out:` and `data_segs_out:` of every connection from `ss -i` output (a
/// connection without both is left out).
pub fn parse_ss_segments(text: &str) -> Vec<SegmentCounts> {
    text.lines()
        .filter_map(|line| {
            let value = |key: &str| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
            };
            Some(SegmentCounts {
                all: value("segs_out:")?,
                data: value("data_segs_out:")?,
            })
        })
        .collect()
}

/// The namespace's cumulative `TcpRetransSegs` counter.
pub fn nstat_retrans_segs(netns: &str) -> Result<u64, BenchError> {
    nstat_counter(netns, "TcpRetransSegs")
}

/// The kernel's absolute value of an `nstat` counter (e.g. `TcpOutSegs`) in `netns`.
pub fn nstat_counter(netns: &str, counter: &str) -> Result<u64, BenchError> {
    // -a: absolute values, -s: don't touch nstat's history file, -z: print zero counters too.
    let output = exec_in(netns, "nstat", &["-asz", counter])?;
    parse_nstat(&String::from_utf8_lossy(&output.stdout), counter).ok_or_else(|| BenchError::Command {
        command: format!("nstat -asz {counter}"),
        stderr: format!("no {counter} line"),
    })
}

pub fn parse_nstat(text: &str, counter: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(counter))
            .then(|| words.next().and_then(|v| v.parse().ok()))
            .flatten()
    })
}

/// Packets the root qdisc of `device` in `netns` has dropped (`tc -s qdisc show`).
pub fn qdisc_dropped(netns: &str, device: &str) -> Result<u64, BenchError> {
    let output = exec_in(netns, "tc", &["-s", "qdisc", "show", "dev", device, "root"])?;
    parse_qdisc_dropped(&String::from_utf8_lossy(&output.stdout)).ok_or_else(|| BenchError::Command {
        command: format!("tc -s qdisc show dev {device} root"),
        stderr: "no `dropped` figure".into(),
    })
}

/// The first qdisc's `(dropped N, …)` in `tc -s qdisc show` output.
pub fn parse_qdisc_dropped(text: &str) -> Option<u64> {
    let (_, rest) = text.split_once("(dropped ")?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_and_nstat() {
        let ss = "Recv-Q Send-Q Local Address:Port Peer Address:Port\n0 0 10.0.0.1:4000 10.0.0.2:7000\n\t cubic wscale:7,7 rto:224 rtt:20.512/0.31 ato:40 mss:1448\n";
        assert_eq!(parse_ss_rtts(ss), vec![20.512]);
        let counts = "0 0 10.0.0.1:4000 10.0.0.2:7000\n\t cubic rtt:0.1/0.05 segs_out:411 segs_in:206 data_segs_out:400 data_segs_in:200\n";
        assert_eq!(parse_ss_segments(counts), vec![SegmentCounts { all: 411, data: 400 }]);
        let nstat = "#kernel\nTcpRetransSegs                  42                 0.0\n";
        assert_eq!(parse_nstat(nstat, "TcpRetransSegs"), Some(42));
        assert_eq!(parse_nstat("#kernel\n", "TcpRetransSegs"), None);
        let tc = "qdisc tbf 8001: root refcnt 2 rate 8Kbit burst 4Kb lat 400ms \n Sent 5 bytes 1 pkt (dropped 1234, overlimits 7 requeues 0) \n backlog 0b 0p requeues 0\n";
        assert_eq!(parse_qdisc_dropped(tc), Some(1234));
        assert_eq!(parse_qdisc_dropped("qdisc noqueue 0: root refcnt 2\n"), None);
    }
}
