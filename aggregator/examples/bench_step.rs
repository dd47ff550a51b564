//! Decision-core throughput: N simulated nodes reporting once per round (1 Hz in production),
//! each with per-peer stats towards `PEERS` other nodes (pod IPs, so the pod-CIDR lookup is
//! exercised). Prints the time and the heap allocations per decision step, those of the other
//! per-tick work over the fleet (the store's snapshot, the address book the agents' lookups are answered from), and the
//! validate+store cost per summary.
//!
//!     cargo run --release -p graywatch-aggregator --example bench_step -- 10000

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// The system allocator, counting allocations (and reallocations) and the bytes they asked for.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f`, returning its result with the allocations and bytes it asked for.
fn counted<T>(f: impl FnOnce() -> T) -> (T, u64, u64) {
    let (a, b) = (ALLOCATIONS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
    let out = f();
    (
        out,
        ALLOCATIONS.load(Ordering::Relaxed) - a,
        BYTES.load(Ordering::Relaxed) - b,
    )
}

use graywatch_aggregator::{
    core::{
        engine::Engine,
        model::{Family, Input, NodeReport, NodeView, PeerObservation, PoolView},
        policy::Policy,
    },
    ingest::{FleetStore, validate},
};
use graywatch_proto::v1;

const PEERS: usize = 20;

#[expect(
    clippy::cast_possible_truncation,
    reason = "the index's low bytes are the address octets"
)]
fn ip(i: usize) -> IpAddr {
    IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "the index's low bytes are the address octets"
)]
fn pod_ip(i: usize) -> IpAddr {
    IpAddr::from([100, (i >> 8) as u8 & 0x3f, i as u8, 7])
}

#[expect(clippy::too_many_lines, reason = "one benchmark scenario, read top to bottom")]
fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rounds = 10;
    let mut input = Input::default();
    for i in 0..n {
        let name = format!("node-{i}");
        let labels = BTreeMap::from([
            ("topology.kubernetes.io/zone".to_string(), format!("zone-{}", i % 3)),
            ("karpenter.sh/nodepool".to_string(), format!("pool-{}", i % 4)),
            (
                "node.kubernetes.io/instance-type".to_string(),
                format!("type-{}", i % 5),
            ),
        ]);
        let cidr = ipnet::IpNet::new(pod_ip(i), 24).expect("cidr").trunc();
        input.nodes.insert(
            name.clone(),
            NodeView {
                name,
                labels,
                internal_ips: vec![ip(i)],
                pod_cidrs: vec![cidr],
                ..Default::default()
            },
        );
    }
    for p in 0..4 {
        input.pools.insert(
            format!("pool-{p}"),
            PoolView {
                name: format!("pool-{p}"),
                requirements: serde_json::json!([]),
                budgets: serde_json::json!([]),
                snapshot: None,
                snapshot_refused: None,
            },
        );
    }
    let mut engine = Engine::new(Policy::default());
    let mut steps = Vec::new();
    let mut allocs = Vec::new();
    for round in 1..=rounds {
        input.now_ms = round * 1000;
        for i in 0..n {
            let bad = i.is_multiple_of(997);
            let peers = (1..=PEERS)
                .map(|k| {
                    let j = (i + k * 7919) % n;
                    PeerObservation {
                        addr: pod_ip(j),
                        rtt_samples: 50,
                        rtt_p99_us: if bad || j.is_multiple_of(997) { 8000.0 } else { 300.0 },
                        segments_out: 1000,
                        retransmits: 1,
                        unanswered_connects: 0,
                    }
                })
                .collect();
            input.reports.insert(
                format!("node-{i}"),
                std::sync::Arc::new(NodeReport {
                    seq: u64::try_from(round).expect("rounds count up from 1"),
                    boot_id: "b".into(),
                    agent_started_ns: 1,
                    received_ms: input.now_ms,
                    figures: BTreeMap::from([
                        (Family::NetworkLatency, if bad { 8000.0 } else { 300.0 }),
                        (Family::PacketLoss, 0.1),
                        (Family::CpuSteal, 0.5),
                    ]),
                    local: BTreeMap::new(),
                    peers,
                    ..Default::default()
                }),
            );
        }
        let t = Instant::now();
        let (plan, count, bytes) = counted(|| engine.step(&input));
        steps.push(t.elapsed());
        allocs.push((count, bytes));
        std::hint::black_box(plan);
    }
    steps.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "decision step, {n} nodes x {PEERS} peers: median {:.1} ms, max {:.1} ms over {rounds} rounds (budget at 1 Hz: 1000 ms)",
        ms(steps[steps.len() / 2]),
        ms(steps[steps.len() - 1])
    );
    // The first steps take every node over and write every condition: the last is the steady state.
    let (count, bytes) = allocs[allocs.len() - 1];
    println!(
        "decision step allocations (steady state): {count} ({:.1} per node), {:.1} MiB asked for",
        count as f64 / n as f64,
        bytes as f64 / f64::from(1 << 20)
    );
    let store = FleetStore::default();
    for (name, report) in &input.reports {
        store.store(name, NodeReport::clone(report));
    }
    let (snapshot, count, bytes) = counted(|| store.snapshot());
    println!(
        "fleet store snapshot: {count} allocations ({:.1} per node), {:.1} MiB",
        count as f64 / n as f64,
        bytes as f64 / f64::from(1 << 20)
    );
    drop(snapshot);
    let (book, count, bytes) = counted(|| graywatch_aggregator::core::evidence::AddressBook::new(input.nodes.values()));
    println!(
        "address book of the node views (answers the agents' lookups): {count} allocations ({:.1} per node), {:.1} MiB",
        count as f64 / n as f64,
        bytes as f64 / f64::from(1 << 20)
    );
    drop(book);

    // Ingest: validate + store one summary (what each gRPC message costs before the step).
    let summary = v1::NodeSummary {
        protocol_version: graywatch_proto::PROTOCOL_VERSION,
        node: Some(v1::NodeIdentity {
            node_name: "node-1".into(),
            boot_id: "b".into(),
            ..Default::default()
        }),
        window: Some(v1::Window {
            seq: 1,
            start_unix_ms: 0,
            end_unix_ms: 1000,
        }),
        families: vec![v1::FamilyFigures {
            family: v1::Family::NetworkLatency as i32,
            value: 300.0,
            ..Default::default()
        }],
        peers: (0..PEERS)
            .map(|j| v1::PeerStats {
                remote_addr: pod_ip(j).to_string(),
                rtt_samples: 5,
                rtt_p99_us: 300.0,
                ..Default::default()
            })
            .collect(),
        scores: vec![],
        ..Default::default()
    };
    let store = FleetStore::default();
    let t = Instant::now();
    let count = 100_000u64;
    for k in 0..count {
        let mut s = summary.clone();
        if let Some(w) = s.window.as_mut() {
            w.seq = k + 1;
        }
        let (name, report) = validate(&s, 4096, 0).expect("valid");
        store.store(&name, report);
    }
    let per = t.elapsed().as_secs_f64() / count as f64;
    println!(
        "ingest validate+store: {:.1} us per summary ({:.0} summaries/s on one core)",
        per * 1e6,
        1.0 / per
    );
}
