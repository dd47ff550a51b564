//! Bounded fuzzing (proptest, fixed case counts so it runs in `cargo xtask test`) of the path
//! from bytes on the wire to the fleet view: protobuf decoding of a `NodeSummary` (arbitrary
//! bytes, and mutations of a valid encoding), `ingest::validate`, the node binding and limits
//! of the gate, and `FleetStore`; plus the aggregator's TOML config. No input may panic, and
//! whatever is accepted keeps the invariants the decision core relies on.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on anything unexpected")]

use std::sync::Arc;

use graywatch_aggregator::{
    config::FileConfig,
    gate::Gate,
    ingest::{FleetStore, Stored, validate},
    limits::{Limits, LimitsConfig},
    metrics::Metrics,
};
use graywatch_proto::{
    PROTOCOL_VERSION,
    v1::{Family, FamilyFigures, LocalScore, NodeIdentity, NodeSummary, PeerStats, Window},
};
use proptest::prelude::*;
use prost::Message;

const CASES: u32 = 3000;

/// `GRAYWATCH_FUZZ_CASES` (set by `cargo xtask fuzz`) overrides [`CASES`].
fn cases() -> u32 {
    std::env::var("GRAYWATCH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}
const MAX_PEERS: usize = 64;

fn valid() -> NodeSummary {
    NodeSummary {
        protocol_version: PROTOCOL_VERSION,
        node: Some(NodeIdentity {
            node_name: "node-1".into(),
            boot_id: "boot".into(),
            addresses: vec!["10.0.0.1".into()],
            agent_version: "t".into(),
            agent_started_ns: 1,
        }),
        window: Some(Window {
            seq: 7,
            start_unix_ms: 1000,
            end_unix_ms: 2000,
        }),
        families: vec![FamilyFigures {
            family: Family::NetworkLatency as i32,
            value: 300.0,
            unit: "us".into(),
            samples: 10,
            ..Default::default()
        }],
        peers: vec![PeerStats {
            remote_addr: "10.0.0.2".into(),
            rtt_samples: 3,
            rtt_p50_us: 200.0,
            rtt_p99_us: 300.0,
            segments_out: 100,
            retransmits: 1,
            ..Default::default()
        }],
        scores: vec![LocalScore {
            family: Family::PacketLoss as i32,
            score: 0.5,
            reason: "r".into(),
        }],
        ..Default::default()
    }
}

/// Decode → validate → store, checking what the decision core relies on.
fn ingest(bytes: &[u8], store: &FleetStore) -> Result<(), TestCaseError> {
    let Ok(s) = NodeSummary::decode(bytes) else {
        return Ok(());
    };
    let Ok((name, report)) = validate(&s, MAX_PEERS, 42) else {
        return Ok(());
    };
    prop_assert!(!name.is_empty() && name.len() <= 253);
    prop_assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    );
    prop_assert!(report.seq >= 1);
    prop_assert!(report.peers.len() <= MAX_PEERS);
    prop_assert!(report.figures.values().all(|v| v.is_finite() && *v >= 0.0));
    prop_assert!(
        report
            .local
            .values()
            .all(|(sc, r)| (0.0..=1.0).contains(sc) && r.chars().count() <= 256)
    );
    prop_assert!(
        report
            .peers
            .iter()
            .all(|p| p.rtt_p99_us.is_finite() && p.rtt_p99_us >= 0.0)
    );
    let seq = report.seq;
    let first = store.store(&name, report.clone());
    prop_assert_eq!(
        store.store(&name, report),
        Stored::Replay,
        "same window twice is a replay"
    );
    let snap = store.snapshot();
    prop_assert!(snap.get(&name).is_some_and(|r| first == Stored::Replay || r.seq == seq));
    Ok(())
}

/// Mostly plausible figures, sometimes anything (NaN, infinities, negatives).
fn figure() -> impl Strategy<Value = f64> {
    prop_oneof![8 => 0.0f64..1e7, 1 => any::<f64>()]
}

/// Mostly valid IPv4/IPv6 addresses, sometimes garbage.
fn addr() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
        5 => any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
        1 => "[0-9.:a-f]{0,16}|\\PC{0,8}",
    ]
}

fn summary_strategy() -> impl Strategy<Value = NodeSummary> {
    (
        prop_oneof![3 => Just(PROTOCOL_VERSION), 1 => any::<u32>()],
        "[a-z0-9.\\-]{0,12}|\\PC{0,12}",
        any::<u64>(),
        prop_oneof![3 => (0i64..1 << 42).prop_map(|t| (t, t + 1000)), 1 => (any::<i64>(), any::<i64>())],
        proptest::collection::vec((any::<i32>(), figure()), 0..4),
        proptest::collection::vec(
            (addr(), figure(), figure(), any::<u64>(), any::<u64>()),
            0..(MAX_PEERS + 4),
        ),
        proptest::collection::vec(
            (
                any::<i32>(),
                prop_oneof![4 => 0.0f64..=1.0, 1 => any::<f64>()],
                "\\PC{0,300}",
            ),
            0..3,
        ),
    )
        .prop_map(|(version, name, seq, (start, end), fams, peers, scores)| NodeSummary {
            protocol_version: version,
            node: Some(NodeIdentity {
                node_name: name,
                boot_id: "b".into(),
                ..Default::default()
            }),
            window: Some(Window {
                seq,
                start_unix_ms: start,
                end_unix_ms: end,
            }),
            families: fams
                .into_iter()
                .map(|(family, value)| FamilyFigures {
                    family,
                    value,
                    ..Default::default()
                })
                .collect(),
            peers: peers
                .into_iter()
                .map(|(remote_addr, p50, p99, seg, re)| PeerStats {
                    remote_addr,
                    rtt_p50_us: p50,
                    rtt_p99_us: p99,
                    segments_out: seg,
                    retransmits: re,
                    ..Default::default()
                })
                .collect(),
            scores: scores
                .into_iter()
                .map(|(family, score, reason)| LocalScore { family, score, reason })
                .collect(),
            ..Default::default()
        })
}

fn limits() -> Limits {
    Limits::new(LimitsConfig {
        max_streams_per_identity: 2,
        summaries_per_second: 10.0,
        summary_burst: 5,
        auth_attempts_per_second: 10.0,
        auth_attempt_burst: 5,
        max_identities: 3,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        ingest(&bytes, &FleetStore::default())?;
    }

    #[test]
    fn mutated_valid_encodings_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = valid().encode_to_vec();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        ingest(&bytes, &FleetStore::default())?;
    }

    #[test]
    fn structured_summaries_keep_invariants(s in summary_strategy()) {
        ingest(&s.encode_to_vec(), &FleetStore::default())?;
    }

    /// A stream's identity is fixed by its first accepted node; limits never admit more
    /// streams than allowed, whatever the order of opens and closes.
    #[test]
    fn stream_slots_never_exceed_the_limit(ops in proptest::collection::vec((0usize..3, any::<bool>()), 0..60)) {
        let l = limits();
        let mut open: Vec<Vec<graywatch_aggregator::limits::StreamSlot>> = (0..3).map(|_| Vec::new()).collect();
        let now = std::time::Instant::now();
        for (who, opening) in ops {
            if opening {
                match l.open_stream(&format!("pod-{who}"), now) {
                    Ok(slot) => open[who].push(slot),
                    Err(e) => prop_assert_eq!(open[who].len(), 2, "{}", e),
                }
            } else {
                open[who].pop();
            }
            prop_assert!(open.iter().all(|v| v.len() <= 2));
        }
    }

    /// Even without authentication, a stream is bound to the first node it reports for: any
    /// other node name later on that stream is PERMISSION_DENIED.
    #[test]
    fn a_stream_stays_bound_to_its_first_node(claims in proptest::collection::vec(0usize..3, 1..20)) {
        let cfg = LimitsConfig {
            max_streams_per_identity: 4,
            summaries_per_second: 1.0,
            summary_burst: 1000,
            auth_attempts_per_second: 1.0,
            auth_attempt_burst: 10,
            max_identities: 8,
        };
        let gate = Gate::insecure(cfg, Arc::new(Metrics::default()));
        let mut adm = futures::executor::block_on(gate.admit(&tonic::Request::new(()))).unwrap();
        let first = claims[0];
        for c in claims {
            let r = gate.check(&mut adm, &format!("node-{c}"));
            if c == first {
                prop_assert!(r.is_ok());
            } else {
                prop_assert_eq!(r.map_err(|s| s.code()), Err(tonic::Code::PermissionDenied));
            }
        }
    }

    #[test]
    fn config_text_never_panics(text in "\\PC{0,300}") {
        if let Ok(cfg) = FileConfig::from_toml(&text) {
            let _ = cfg.validate();
        }
    }

    #[test]
    fn config_values_never_panic_and_errors_name_a_field(
        section in "(|\\[ingest\\]|\\[leader\\]|\\[policy\\]|\\[security\\])",
        key in "(tick_ms|namespace|max_peers|max_message_bytes|lease_duration_ms|renew_interval_ms|blast_radius|dry_run|auth|token_audience|allowed_service_accounts|max_streams_per_identity|summaries_per_second|summary_burst|tls_cert_file|tls_client_ca_file|bogus)",
        value in "(-?[0-9]{1,12}|-?[0-9]\\.[0-9]{1,3}|true|\"[a-z\\-:]{0,20}\"|\\[\"[a-z:]{0,10}\"\\]|nan|inf)",
    ) {
        let text = format!("{section}\n{key} = {value}\n");
        if let Ok(cfg) = FileConfig::from_toml(&text)
            && let Err(e) = cfg.validate()
        {
            let msg = e.to_string();
            prop_assert!(msg.contains(':') && !msg.starts_with(':'), "{}", msg);
        }
    }
}
