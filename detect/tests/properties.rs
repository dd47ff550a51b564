//! Property tests: no panic and scores in [0, 1] on hostile input, no allocation per sample
//! (hence bounded memory), and the state machine's invariants.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use graywatch_detect::detectors::{CusumConfig, HalfSpaceTreesConfig, HoltConfig, PageHinkleyConfig, RobustZConfig};
use graywatch_detect::{
    Cusum, Detector, GrayDetector, GrayDetectorConfig, HalfSpaceTrees, Holt, PageHinkley, RobustZ, SignalScorer,
    SignalScorerConfig,
};
use proptest::prelude::*;

/// Counts allocations made by the current thread (tests run on several threads).
struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only bumps a thread-local counter.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations() -> u64 {
    ALLOCS.with(Cell::get)
}

fn all_detectors() -> Vec<Box<dyn Detector>> {
    let hst = HalfSpaceTreesConfig {
        trees: 5,
        depth: 6,
        window: 16,
        ..HalfSpaceTreesConfig::default()
    };
    vec![
        Box::new(RobustZ::new(RobustZConfig::default()).expect("config")),
        Box::new(Cusum::new(CusumConfig::default()).expect("config")),
        Box::new(PageHinkley::new(PageHinkleyConfig::default()).expect("config")),
        Box::new(HalfSpaceTrees::new(hst).expect("config")),
        Box::new(Holt::new(HoltConfig::default()).expect("config")),
        Box::new(GrayDetector::new(GrayDetectorConfig::default()).expect("config")),
        Box::new(SignalScorer::new(SignalScorerConfig::default()).expect("config")),
    ]
}

/// Values that break naive arithmetic, mixed with ordinary ones.
fn hostile_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1e3..1e3f64,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(f64::MAX),
        1 => Just(-f64::MAX),
        1 => Just(f64::MIN_POSITIVE),
        1 => Just(0.0),
        1 => prop::num::f64::ANY,
    ]
}

/// Time steps, sometimes backwards, sometimes non-finite.
fn hostile_dt() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => 0.0..10.0f64,
        1 => -100.0..0.0f64,
        1 => Just(f64::NAN),
        1 => Just(1e12),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn detectors_never_panic_and_scores_stay_in_unit_interval(
        samples in prop::collection::vec((hostile_dt(), hostile_value()), 1..400)
    ) {
        for mut d in all_detectors() {
            let mut t = 0.0;
            for &(dt, x) in &samples {
                t += dt;
                let o = d.update(t, x);
                prop_assert!(o.score.is_finite(), "{}: score {}", d.name(), o.score);
                prop_assert!((0.0..=1.0).contains(&o.score), "{}: score {}", d.name(), o.score);
                prop_assert!(o.z.is_finite(), "{}: z {}", d.name(), o.z);
            }
        }
    }

    #[test]
    fn an_onset_is_the_held_score_of_its_sample_or_nothing(
        samples in prop::collection::vec((hostile_dt(), hostile_value()), 1..400)
    ) {
        let mut s = SignalScorer::new(SignalScorerConfig::default()).expect("config");
        let mut t = 0.0;
        for &(dt, x) in &samples {
            t += dt;
            let score = s.update(t, x);
            let onset = s.onset();
            // Exactly the sample's score, not a near value: the onset is that score, passed on.
            prop_assert!(
                onset.to_bits() == 0.0f64.to_bits() || (onset.to_bits() == score.to_bits() && s.is_ready()),
                "onset {} score {}",
                onset,
                score
            );
        }
    }

    #[test]
    fn detectors_recover_after_hostile_input(
        junk in prop::collection::vec(hostile_value(), 1..50)
    ) {
        // After garbage, a long stretch of normal data followed by a big step is still seen.
        for mut d in all_detectors() {
            let mut t = 0.0;
            for &x in &junk {
                t += 1.0;
                d.update(t, x);
            }
            d.reset();
            for i in 0..600 {
                t += 1.0;
                d.update(t, 10.0 + f64::from(i % 7) * 0.1);
            }
            let o = d.update(t + 1.0, 10.0 + 1e4);
            prop_assert!((0.0..=1.0).contains(&o.score));
        }
    }
}

#[test]
fn updates_do_not_allocate() {
    // Bounded memory follows: after construction nothing grows.
    let mut dets = all_detectors();
    let mut t = 0.0;
    for d in &mut dets {
        d.update(0.0, 1.0);
    }
    let before = allocations();
    for i in 0..20_000u32 {
        t += 1.0;
        let x = match i % 97 {
            0 => f64::NAN,
            1 => 1e300,
            2 => -1e9,
            _ => f64::from(i % 13),
        };
        let t_i = if i % 101 == 0 { t - 50.0 } else { t };
        for d in &mut dets {
            d.update(t_i, x);
        }
    }
    assert_eq!(allocations() - before, 0, "update allocated");
}
