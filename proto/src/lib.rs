//! The graywatch.v1 wire contract: agent → aggregator `NodeSummary` stream, aggregator → agent
//! `Directive` stream. See `proto/graywatch/v1/graywatch.proto` for the compatibility rules.

/// Generated code for package `graywatch.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("graywatch.v1");
}

pub use graywatch_detect::Family;

/// The wire value of a family: the one place the shared [`Family`] and the wire enum meet.
impl From<Family> for v1::Family {
    fn from(family: Family) -> Self {
        match family {
            Family::CpuSteal => v1::Family::CpuSteal,
            Family::CpuContention => v1::Family::CpuContention,
            Family::NetworkLatency => v1::Family::NetworkLatency,
            Family::PacketLoss => v1::Family::PacketLoss,
            Family::MemoryPressure => v1::Family::MemoryPressure,
        }
    }
}

/// The family of a wire value; `None` for `FAMILY_UNSPECIFIED` and for a newer agent's family
/// this build does not know (ignored, never an error).
#[must_use]
pub fn family_from_wire(raw: i32) -> Option<Family> {
    Family::ALL
        .into_iter()
        .find(|&family| v1::Family::from(family) as i32 == raw)
}

/// The protocol version this build speaks (written in every message).
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest protocol version this build accepts.
pub const MIN_SUPPORTED_PROTOCOL_VERSION: u32 = 1;
/// Largest encoded message either side accepts (bytes); larger ones are refused with
/// `OUT_OF_RANGE`/`RESOURCE_EXHAUSTED` by tonic before decoding.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Whether `version` is one this build accepts.
#[must_use]
pub fn version_supported(version: u32) -> bool {
    (MIN_SUPPORTED_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::{Family, FamilyFigures, NodeIdentity, NodeSummary, Window};
    use super::*;

    #[test]
    fn summary_round_trips_and_unknown_family_survives() {
        let s = NodeSummary {
            protocol_version: PROTOCOL_VERSION,
            node: Some(NodeIdentity {
                node_name: "n1".into(),
                ..Default::default()
            }),
            window: Some(Window {
                seq: 7,
                start_unix_ms: 1,
                end_unix_ms: 2,
            }),
            families: vec![FamilyFigures {
                family: 99,
                value: 1.5,
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = s.encode_to_vec();
        let back = NodeSummary::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, s);
        // A newer agent's family is kept as a raw number, not an error.
        assert!(Family::try_from(back.families[0].family).is_err());
    }

    #[test]
    fn every_family_goes_over_the_wire_and_back() {
        for family in super::Family::ALL {
            let wire = Family::from(family);
            assert_ne!(wire, Family::Unspecified);
            assert_eq!(family_from_wire(wire as i32), Some(family));
        }
        assert_eq!(family_from_wire(Family::Unspecified as i32), None);
        assert_eq!(family_from_wire(99), None);
    }

    #[test]
    fn version_window() {
        assert!(version_supported(PROTOCOL_VERSION));
        assert!(!version_supported(0));
        assert!(!version_supported(PROTOCOL_VERSION + 1));
    }
}
