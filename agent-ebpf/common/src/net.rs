//! Network latency and loss: keys and values of the `FLOWS` and `DROPS` maps.

/// Number of RTT buckets: exact below 8 µs, then 8 linear sub-buckets per power of two up to
/// 2^29 µs (~9 minutes). The widest bucket is 1/8 of its lower bound, so a bucket's midpoint is
/// within ~6% of any value in it: fine enough to tell 20 ms from 23 ms.
pub const RTT_BUCKETS: usize = 216;
const SUB_BUCKET_BITS: u32 = 3;
const SUB_BUCKETS: u32 = 1 << SUB_BUCKET_BITS;

/// One (local cgroup, remote address) pair: the unit the kernel aggregates network samples by.
///
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so both families share one key type.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// cgroup v2 id (the cgroup directory's inode number) of the socket's owner.
    pub cgroup_id: u64,
    pub remote_addr: [u8; 16],
    pub family: u16,
    /// Who opened the connection, see [`flow_direction`].
    pub direction: u8,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding, public so both sides build the value; kernel and user layouts match byte for byte"
    )]
    pub _pad: [u8; 5],
}

/// The connection's direction is not known (both or neither port is ephemeral).
pub const DIRECTION_UNKNOWN: u8 = 0;
/// This side connected out (its local port is ephemeral, the remote's is not).
pub const DIRECTION_OUTBOUND: u8 = 1;
/// This side accepted the connection (the remote port is ephemeral).
pub const DIRECTION_INBOUND: u8 = 2;

/// Classifies a connection by its ports. The distinction matters for RTT: on an accepted
/// request/response connection the ACK of each response rides on the client's next request (or
/// its delayed-ACK timer), so the server side's smoothed RTT includes the client's think time;
/// the connecting side's RTT is the network's.
#[expect(
    clippy::inline_always,
    reason = "called from kernel programs: inlined so the verifier sees each program as one function"
)]
#[inline(always)]
pub fn flow_direction(local_port: u16, remote_port: u16, ephemeral_port_min: u16) -> u8 {
    let local_ephemeral = local_port >= ephemeral_port_min;
    let remote_ephemeral = remote_port >= ephemeral_port_min;
    if local_ephemeral && !remote_ephemeral {
        DIRECTION_OUTBOUND
    } else if remote_ephemeral && !local_ephemeral {
        DIRECTION_INBOUND
    } else {
        DIRECTION_UNKNOWN
    }
}

/// Cumulative counters for one [`FlowKey`]; the agent turns them into per-window deltas.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowStats {
    /// Data segments sent (`tcp_sock.data_segs_out` deltas seen at ACK time, retransmissions
    /// included): the denominator of the retransmit ratio. Pure ACKs are left out on purpose:
    /// they are never retransmitted, so counting them (`segs_out`) would dilute the ratio by the
    /// share of ACKs in the traffic (about half of a request-response flow's segments).
    pub data_segs_out: u64,
    /// Segments retransmitted (`tcp:tcp_retransmit_skb` events weighted by the skb's segment
    /// count, as the kernel's `TcpRetransSegs` counts them).
    pub retransmits: u64,
    /// Connection attempts nobody answered (see [`connect_unanswered`]): each sent a SYN and got
    /// neither a SYN-ACK nor a refusal, so towards a blackholed peer they are the loss that
    /// retransmits cannot show (a connection that never opened has nothing to retransmit once
    /// its client gives up, and its SYN retransmission races the client's deadline).
    pub unanswered_connects: u64,
    /// When the kernel created this entry (`bpf_ktime_get_ns`; 0 until set): tells an entry the
    /// agent evicted and the kernel recreated apart from counters that wrapped. The u32 RTT
    /// buckets do wrap on long-lived flows; the agent takes wrapping deltas unless this changed.
    pub created_ns: u64,
    /// Log-linear histogram of smoothed RTT in µs, see [`rtt_bucket`]. The sample count and the
    /// mean come from it: two fewer shared atomic adds per ACK (~30 ns each).
    pub rtt_buckets: [u32; RTT_BUCKETS],
}

impl FlowStats {
    pub const ZERO: FlowStats = FlowStats {
        data_segs_out: 0,
        retransmits: 0,
        unanswered_connects: 0,
        created_ns: 0,
        rtt_buckets: [0; RTT_BUCKETS],
    };
}

/// What the latency program remembers per socket (keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// The flow the socket's figures go to: its owner's cgroup (fixed at socket creation), its
    /// peer and its direction, all resolved the first time the socket is seen.
    pub flow: FlowKey,
    /// The `struct sock` address, to read `tcp_sock.data_segs_out` without the tracepoint record.
    pub sk: u64,
    /// The scheduler tick (`bpf_jiffies64`) in which the socket last added an RTT sample: a
    /// socket adds at most one per tick (1 ms at `HZ=1000`, 4 ms at 250, 10 ms at 100).
    ///
    /// `tcp:tcp_probe` fires for every segment received: over a million times a second per
    /// busy connection, while the smoothed RTT it reports moves by at most 1/8 per ACK. One
    /// sample per tick keeps every change that lasts longer than that, weights the histogram by
    /// time instead of by packet rate, and makes the common case (an ACK within the tick) a
    /// read of the tick counter and a compare, with no clock read, no kernel read and no update
    /// of the shared flow entry. Segments sent lose nothing: the kernel's counter is
    /// cumulative, so each sample (and the socket leaving ESTABLISHED) adds everything sent
    /// since the previous one.
    pub last_sample_tick: u64,
    /// `tcp_sock.data_segs_out` when the flow's `data_segs_out` was last brought up to date: at
    /// the previous RTT sample (or the socket leaving ESTABLISHED, `sock:inet_sock_set_state`).
    pub data_segs_out: u32,
    #[expect(
        clippy::pub_underscore_fields,
        reason = "explicit padding, public so both sides build the value; kernel and user layouts match byte for byte"
    )]
    pub _pad: u32,
}

/// A socket first seen with at most this many data segments sent is new: what it sent before
/// its first sample is counted (see [`SocketState::first_data_segs`]).
///
/// `tcp:tcp_probe` first fires for a socket when a segment arrives on it ESTABLISHED, so a new
/// connection has sent at most its first flight by then (the initial window: 10 segments by
/// default). A socket with more was there before the agent: its history is not this window's.
pub const NEW_SOCKET_MAX_DATA_SEGS: u32 = 64;

impl SocketState {
    /// At a socket's first sample, given the kernel's cumulative `data_segs_out`: the data
    /// segments to count now, and the value to count from afterwards. A new connection's first
    /// flight (a short request-response connection's whole request, often) would otherwise
    /// never be counted.
    #[expect(
        clippy::inline_always,
        reason = "called from kernel programs: inlined so the verifier sees each program as one function"
    )]
    #[inline(always)]
    #[must_use]
    pub fn first_data_segs(data_segs_out: Option<u32>) -> (u32, u32) {
        match data_segs_out {
            Some(now) if now <= NEW_SOCKET_MAX_DATA_SEGS => (now, now),
            Some(now) => (0, now),
            None => (0, 0),
        }
    }

    /// Data segments sent since the previous call, given the kernel's cumulative `data_segs_out`
    /// now (`None` if it could not be read: nothing is counted, the next read catches up).
    #[expect(
        clippy::inline_always,
        reason = "called from kernel programs: inlined so the verifier sees each program as one function"
    )]
    #[inline(always)]
    pub fn take_data_segs_sent(&mut self, data_segs_out: Option<u32>) -> u32 {
        let Some(now) = data_segs_out else { return 0 };
        // The counter wraps; a cookie never names another socket, so a smaller value is a wrap.
        let sent = now.wrapping_sub(self.data_segs_out);
        self.data_segs_out = now;
        sent
    }
}

/// A connection attempt the application abandoned after this long without an answer counts as
/// unanswered: the kernel's minimum retransmission timeout (`TCP_RTO_MIN`, 200 ms). A handshake
/// across a cluster takes well under a millisecond, and TCP itself would retransmit a data segment
/// unacknowledged for that long; an attempt given up sooner (a happy-eyeballs race lost to
/// another address) says nothing about the path.
pub const UNANSWERED_CONNECT_MIN_NS: u64 = 200_000_000;

/// `ECONNREFUSED`: the peer answered the SYN with a reset (nothing listens on that port). The
/// path works; this is no loss.
pub const ECONNREFUSED: i32 = 111;

/// Whether a connection attempt that closed from `SYN_SENT` went unanswered: the kernel failed it
/// with an error other than a refusal (its SYN retries ran out, or an ICMP error said the peer is
/// unreachable), or, with no error (the application closed it), it waited at least
/// [`UNANSWERED_CONNECT_MIN_NS`].
#[expect(
    clippy::inline_always,
    reason = "called from kernel programs: inlined so the verifier sees each program as one function"
)]
#[inline(always)]
pub fn connect_unanswered(sk_err: i32, waited_ns: u64) -> bool {
    match sk_err {
        0 => waited_ns >= UNANSWERED_CONNECT_MIN_NS,
        ECONNREFUSED => false,
        _ => true,
    }
}

/// A kernel packet drop, keyed by who (cgroup, remote) and why (the kernel's drop reason).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DropKey {
    /// cgroup v2 id of the socket the packet belonged to; 0 when it had none (e.g. no listener).
    pub cgroup_id: u64,
    /// The far end: the socket's peer, else the packet's source address.
    pub remote_addr: [u8; 16],
    pub family: u16,
    /// Layer-3 protocol (ethertype, host order) as the tracepoint reports it.
    pub protocol: u16,
    /// `enum skb_drop_reason` value; names come from the tracepoint's format file.
    pub reason: u32,
}

impl DropKey {
    /// The key as four words (it has no padding): what the drop program compares a slot's key
    /// with, and what its slot index is computed from.
    #[expect(
        clippy::inline_always,
        reason = "called from kernel programs: inlined so the verifier sees each program as one function"
    )]
    #[inline(always)]
    #[must_use]
    pub const fn words(&self) -> [u64; 4] {
        // SAFETY: 32 bytes of plain integers, no padding (checked by a test), into [u64; 4].
        unsafe { core::mem::transmute::<Self, [u64; 4]>(*self) }
    }
}

/// log2 of the number of [`DropSlot`]s.
pub const DROP_SLOT_BITS: u32 = 9;
/// Slots of the direct-mapped `DROP_SLOTS` array: a few times the (workload, remote, reason)
/// keys a node drops packets for in a couple of minutes.
pub const DROP_SLOT_COUNT: u32 = 1 << DROP_SLOT_BITS;
/// [`DropSlot::state`] of a slot no key holds.
pub const DROP_SLOT_FREE: u64 = 0;
/// [`DropSlot::state`] while the program that claimed the slot writes its key.
pub const DROP_SLOT_CLAIMING: u64 = 1;
/// [`DropSlot::state`] of a slot whose `key` and `count` are in use.
pub const DROP_SLOT_HELD: u64 = 2;
/// [`DropSlot::state`] while the agent clears a slot it took back.
pub const DROP_SLOT_RELEASING: u64 = 3;

/// One slot of the direct-mapped drop-count array: the count of the key that holds it.
///
/// Why not only a hash: on a lossy node the drop program runs for every dropped packet, and the
/// `DROPS` hash update (hashing a 32-byte key) was 35–50 ns of it. A slot at a fixed index is
/// found with a multiply and an inlined bounds check. The program claims a free slot
/// (compare-and-swap of `state` to [`DROP_SLOT_CLAIMING`]), writes the key and its first drop,
/// then publishes it with an atomic exchange to [`DROP_SLOT_HELD`] (ordered after those writes
/// on every architecture); a key whose slot another holds, or is being claimed or cleared,
/// falls back to the `DROPS` hash, so no drop goes uncounted. The agent takes back the slots of
/// idle keys: [`DROP_SLOT_RELEASING`], key and count zeroed, then [`DROP_SLOT_FREE`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropSlot {
    /// [`DROP_SLOT_FREE`], [`DROP_SLOT_CLAIMING`], [`DROP_SLOT_HELD`] or [`DROP_SLOT_RELEASING`].
    pub state: u64,
    pub key: DropKey,
    /// Drops counted for `key` since the slot was claimed.
    pub count: u64,
}

impl DropSlot {
    pub const FREE: Self = Self {
        state: DROP_SLOT_FREE,
        key: DropKey {
            cgroup_id: 0,
            remote_addr: [0; 16],
            family: 0,
            protocol: 0,
            reason: 0,
        },
        count: 0,
    };
}

/// Whether two keys' words are equal, without branches: `==` on the arrays (or a chain of `&&`,
/// which LLVM merges) becomes a call to a byte-by-byte `memcmp` in a kernel program.
#[expect(
    clippy::inline_always,
    reason = "called from kernel programs: inlined so the verifier sees each program as one function"
)]
#[inline(always)]
#[must_use]
pub const fn same_words(a: &[u64; 4], b: &[u64; 4]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}

/// The slot of a drop key (its [`DropKey::words`]) in `DROP_SLOTS`: the words folded, then
/// mixed (splitmix64's finalizer: keys differ in a byte or two, often in the middle of a word,
/// which a single multiply leaves crowded onto few slots).
#[expect(
    clippy::inline_always,
    reason = "called from kernel programs: inlined so the verifier sees each program as one function"
)]
#[inline(always)]
#[must_use]
pub const fn drop_slot_index(words: &[u64; 4]) -> u32 {
    let mut z = words[0] ^ words[1] ^ words[2].rotate_left(29) ^ words[3].rotate_left(47);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // The shift leaves DROP_SLOT_BITS bits: the cast keeps them all.
    (z >> (64 - DROP_SLOT_BITS)) as u32
}

/// Index of the histogram bucket for an RTT of `us` microseconds.
///
/// Written without `leading_zeros` so the BPF backend never has to expand `ctlz`.
#[expect(
    clippy::inline_always,
    reason = "called from kernel programs: inlined so the verifier sees each program as one function"
)]
#[inline(always)]
pub fn rtt_bucket(us: u32) -> usize {
    if us < SUB_BUCKETS {
        return us as usize;
    }
    let msb = most_significant_bit(us);
    let sub = (us >> (msb - SUB_BUCKET_BITS)) & (SUB_BUCKETS - 1);
    let index = ((msb - SUB_BUCKET_BITS + 1) * SUB_BUCKETS + sub) as usize;
    if index < RTT_BUCKETS { index } else { RTT_BUCKETS - 1 }
}

/// Lowest value (µs) that falls into bucket `index`, and the bucket's width.
pub fn rtt_bucket_bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    let sub_buckets = u64::from(SUB_BUCKETS);
    if index < sub_buckets {
        return (index, 1);
    }
    let msb = index / sub_buckets + u64::from(SUB_BUCKET_BITS) - 1;
    let sub = index % sub_buckets;
    let shift = msb - u64::from(SUB_BUCKET_BITS);
    ((sub_buckets + sub) << shift, 1 << shift)
}

#[expect(
    clippy::inline_always,
    reason = "called from kernel programs: inlined so the verifier sees each program as one function"
)]
#[inline(always)]
fn most_significant_bit(mut v: u32) -> u32 {
    let mut msb = 0;
    if v >= 1 << 16 {
        v >>= 16;
        msb += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        msb += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        msb += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        msb += 2;
    }
    if v >= 1 << 1 {
        msb += 1;
    }
    msb
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and arrays with explicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::DropSlot {}
    unsafe impl aya::Pod for super::SocketState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_key_is_four_words_and_a_slot_six() {
        assert_eq!(core::mem::size_of::<DropKey>(), 32);
        assert_eq!(core::mem::size_of::<DropSlot>(), 48);
        let key = DropKey {
            cgroup_id: 7,
            remote_addr: [1; 16],
            family: 2,
            protocol: 0x0800,
            reason: 2,
        };
        assert_eq!(key.words()[0], 7);
        assert_ne!(key.words(), DropSlot::FREE.key.words());
        assert!(same_words(&key.words(), &key.words()));
        assert!(!same_words(&key.words(), &DropKey { reason: 3, ..key }.words()));
    }

    #[test]
    fn drop_slot_indices_spread_keys_that_differ_in_one_field() {
        let base = DropKey {
            cgroup_id: 5_000,
            remote_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 0, 0],
            family: 2,
            protocol: 0x0800,
            reason: 2,
        };
        let distinct = |keys: &mut dyn Iterator<Item = DropKey>| {
            let mut used = [false; DROP_SLOT_COUNT as usize];
            let mut n = 0;
            for key in keys {
                let index = drop_slot_index(&key.words()) as usize;
                assert!(index < DROP_SLOT_COUNT as usize);
                n += usize::from(!used[index]);
                used[index] = true;
            }
            n
        };
        // 128 keys at random in 512 slots leave ~113 distinct; each family of keys must not do worse.
        let by_source = distinct(&mut (0..128u8).map(|i| {
            let mut key = base;
            key.remote_addr[15] = i;
            key
        }));
        let by_subnet = distinct(&mut (0..128u8).map(|i| {
            let mut key = base;
            key.remote_addr[14] = i;
            key
        }));
        let by_cgroup = distinct(&mut (0..128u64).map(|i| DropKey {
            cgroup_id: 5_000 + i * 48,
            ..base
        }));
        let by_reason = distinct(&mut (0..128u32).map(|i| DropKey { reason: i, ..base }));
        for (what, n) in [
            ("source", by_source),
            ("subnet", by_subnet),
            ("cgroup", by_cgroup),
            ("reason", by_reason),
        ] {
            assert!(n >= 105, "{what}: {n} distinct slots of 128 keys");
        }
    }

    #[test]
    fn segments_sent_are_counted_once_across_reads_wraps_and_failed_reads() {
        let mut state = SocketState {
            data_segs_out: u32::MAX - 2,
            ..SocketState::default()
        };
        assert_eq!(state.take_data_segs_sent(None), 0);
        assert_eq!(state.take_data_segs_sent(Some(u32::MAX)), 2);
        assert_eq!(state.take_data_segs_sent(Some(4)), 5, "wraps past u32::MAX");
        assert_eq!(
            state.take_data_segs_sent(None),
            0,
            "an unreadable counter counts nothing now…"
        );
        assert_eq!(
            state.take_data_segs_sent(Some(10)),
            6,
            "…and is caught up by the next read"
        );
        assert_eq!(state.take_data_segs_sent(Some(10)), 0);
    }

    #[test]
    fn a_new_sockets_first_flight_is_counted_and_an_old_sockets_history_is_not() {
        assert_eq!(SocketState::first_data_segs(Some(1)), (1, 1));
        assert_eq!(
            SocketState::first_data_segs(Some(NEW_SOCKET_MAX_DATA_SEGS)),
            (NEW_SOCKET_MAX_DATA_SEGS, NEW_SOCKET_MAX_DATA_SEGS)
        );
        assert_eq!(SocketState::first_data_segs(Some(1_000_000)), (0, 1_000_000));
        assert_eq!(
            SocketState::first_data_segs(None),
            (0, 0),
            "unreadable: the next read catches up"
        );
    }

    #[test]
    fn small_values_are_exact() {
        for us in 0..8u32 {
            assert_eq!(rtt_bucket(us), us as usize);
            assert_eq!(rtt_bucket_bounds(us as usize), (u64::from(us), 1));
        }
    }

    #[test]
    fn every_value_falls_inside_its_bucket_bounds() {
        let mut us = 1u32;
        while us < (1 << 29) {
            let (low, width) = rtt_bucket_bounds(rtt_bucket(us));
            assert!(
                u64::from(us) >= low && u64::from(us) < low + width,
                "{us} -> [{low}, +{width})"
            );
            // Relative width stays at most 1/8 of the lower bound.
            assert!(width * 8 <= low.max(8), "bucket too wide at {us}");
            us = us + us / 7 + 1;
        }
    }

    #[test]
    fn buckets_are_monotonic_and_clamped() {
        let mut last = 0;
        for us in (0..2_000_000u32).step_by(97) {
            let b = rtt_bucket(us);
            assert!(b >= last);
            last = b;
        }
        assert_eq!(rtt_bucket(u32::MAX), RTT_BUCKETS - 1);
    }

    #[test]
    fn directions_follow_the_ephemeral_range() {
        assert_eq!(flow_direction(40_000, 7000, 32_768), DIRECTION_OUTBOUND);
        assert_eq!(flow_direction(7000, 40_000, 32_768), DIRECTION_INBOUND);
        assert_eq!(flow_direction(40_000, 50_000, 32_768), DIRECTION_UNKNOWN);
        assert_eq!(flow_direction(80, 443, 32_768), DIRECTION_UNKNOWN);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 32);
        assert_eq!(core::mem::size_of::<DropKey>(), 32);
        assert_eq!(core::mem::size_of::<FlowStats>(), 32 + 4 * RTT_BUCKETS);
    }
}
