//! Behaviour of each detector, filter and the combiner on small scripted series.

use graywatch_detect::detectors::{
    CusumConfig, Direction, HalfSpaceTreesConfig, HoltConfig, PageHinkleyConfig, RobustZConfig,
};
use graywatch_detect::filters::{Persistence, WarmUp, WarmUpConfig};
use graywatch_detect::{
    Cusum, Detector, Family, FamilyScore, GrayDetector, GrayDetectorConfig, HalfSpaceTrees, Holt, PageHinkley, RobustZ,
    SignalScorer, SignalScorerConfig,
};

/// Deterministic noise in [-1, 1].
fn noise(i: u32) -> f64 {
    let x = (f64::from(i) * 12.9898).sin() * 43_758.545_3;
    2.0 * (x - x.floor()) - 1.0
}

/// Feed `n` noisy samples around `level`; returns the max score seen.
fn feed(d: &mut dyn Detector, t: &mut f64, n: u32, level: f64, amp: f64) -> f64 {
    let mut max = 0.0f64;
    for i in 0..n {
        *t += 1.0;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "t counts up from 0 in whole steps"
        )]
        let o = d.update(*t, level + amp * noise(i + (*t as u32)));
        max = max.max(o.score);
    }
    max
}

#[test]
fn robust_z_flags_a_step_and_not_noise() {
    let mut d = RobustZ::new(RobustZConfig::default()).expect("config");
    let mut t = 0.0;
    let quiet = feed(&mut d, &mut t, 500, 100.0, 1.0);
    assert!(quiet < 0.3, "noise scored {quiet}");
    let o = d.update(t + 1.0, 130.0);
    assert!(o.score > 0.8 && o.z > 10.0, "{o:?}");
    assert!((d.baseline() - 100.0).abs() < 1.0);
}

#[test]
fn robust_z_direction_up_ignores_drops() {
    let cfg = RobustZConfig {
        direction: Direction::Up,
        ..RobustZConfig::default()
    };
    let mut d = RobustZ::new(cfg).expect("config");
    let mut t = 0.0;
    feed(&mut d, &mut t, 300, 100.0, 1.0);
    assert!(d.update(t + 1.0, 50.0).score < 1e-9);
    assert!(d.update(t + 2.0, 150.0).score > 0.8);
}

#[test]
fn cusum_catches_a_small_sustained_drift_that_z_misses() {
    let mut c = Cusum::new(CusumConfig::default()).expect("config");
    let mut z = RobustZ::new(RobustZConfig::default()).expect("config");
    let mut t = 0.0;
    feed(&mut c, &mut t, 400, 10.0, 1.0);
    let mut t2 = 0.0;
    feed(&mut z, &mut t2, 400, 10.0, 1.0);
    // +1.5 σ shift (σ of uniform noise ≈ 0.58): too small for a single-sample z alarm.
    let c_max = feed(&mut c, &mut t, 60, 10.9, 1.0);
    let z_max = feed(&mut z, &mut t2, 60, 10.9, 1.0);
    assert!(c_max > 0.5, "cusum {c_max}");
    assert!(z_max < 0.5, "z {z_max}");
}

#[test]
fn page_hinkley_detects_a_mean_shift() {
    let mut d = PageHinkley::new(PageHinkleyConfig::default()).expect("config");
    let mut t = 0.0;
    let before = feed(&mut d, &mut t, 500, 5.0, 1.0);
    let after = feed(&mut d, &mut t, 100, 8.0, 1.0);
    assert!(before < 0.5, "{before}");
    assert!(after > 0.5, "{after}");
}

#[test]
fn half_space_trees_score_novel_points_higher() {
    let mut d = HalfSpaceTrees::new(HalfSpaceTreesConfig::default()).expect("config");
    let mut t = 0.0;
    feed(&mut d, &mut t, 1000, 0.0, 1.0);
    let mut normal = 0.0;
    for i in 0..50 {
        t += 1.0;
        normal += d.update(t, noise(i + 7)).score / 50.0;
    }
    let novel = d.update(t + 1.0, 40.0).score;
    assert!(novel > normal + 0.3, "novel {novel} normal {normal}");
}

#[test]
fn holt_predicts_time_to_threshold_on_a_ramp() {
    let mut h = Holt::new(HoltConfig::default()).expect("config");
    // 0.5 units per second, sampled every 2 s.
    for i in 0..100 {
        let t = f64::from(i) * 2.0;
        h.update(t, 10.0 + 0.5 * t);
    }
    // Last sample at t = 198 → value 109; 150 is 41 units ahead → 82 s.
    let eta = h.time_to_cross(150.0).expect("rising towards threshold");
    assert!((eta - 82.0).abs() < 2.0, "eta {eta}");
    assert!(h.time_to_cross(50.0).is_none(), "moving away from a lower threshold");
    assert!((h.trend_per_sec() - 0.5).abs() < 0.02);
}

#[test]
fn persistence_needs_k_of_n() {
    let mut p = Persistence::new(3, 5).expect("config");
    assert!(!p.push(true));
    assert!(!p.push(false));
    assert!(!p.push(true));
    assert!(p.push(true));
    assert_eq!(p.run_length(), 2);
    // The oldest elevated sample leaves the window after five more pushes.
    for _ in 0..3 {
        p.push(false);
    }
    assert!(!p.holds());
    assert!(Persistence::new(6, 5).is_err());
    assert!(Persistence::new(1, 65).is_err());
}

#[test]
fn warm_up_needs_samples_and_seconds_and_restarts() {
    let mut w = WarmUp::new(WarmUpConfig {
        samples: 3,
        seconds: 10.0,
    });
    assert!(!w.observe(100.0));
    assert!(!w.observe(101.0));
    assert!(!w.observe(102.0), "3 samples but only 2 s");
    assert!(w.observe(110.0));
    w.restart(200.0);
    assert!(!w.observe(215.0), "pod restarted: samples count again");
}

fn scorer() -> SignalScorer {
    SignalScorer::new(SignalScorerConfig {
        warmup: WarmUpConfig {
            samples: 30,
            seconds: 30.0,
        },
        ..SignalScorerConfig::default()
    })
    .expect("config")
}

/// A spike scores on its own sample only (the aggregator ignores a lone bad window); a rise
/// that starts soon after a spike of its size still scores, and keeps scoring while it lasts.
#[test]
fn signal_scorer_scores_a_spike_once_and_a_sustained_rise_throughout() {
    let mut s = scorer();
    let mut t = 0.0;
    for i in 0..200 {
        t += 1.0;
        s.update(t, 0.4 + 0.02 * noise(i));
    }
    assert!(s.is_ready());
    t += 1.0;
    let spike = s.update(t, 8.0);
    assert!(spike > 0.7, "spike scored {spike}");
    let mut after = Vec::new();
    for i in 0..5 {
        t += 1.0;
        after.push(s.update(t, 0.4 + 0.02 * noise(i + 300)));
    }
    assert!(after.iter().all(|a| *a < 0.3), "back to normal: {after:?}");
    let mut rise = Vec::new();
    for _ in 0..6 {
        t += 1.0;
        rise.push(s.update(t, 8.1));
    }
    // Frozen baselines: the score holds for as long as the rise lasts (the first sample of an
    // anomaly widens the long-memory scale a little, hence not 1).
    assert!(rise.iter().all(|r| *r > 0.7), "sustained rise scored {rise:?}");
    assert!(rise[5] >= rise[1], "held, not absorbed: {rise:?}");
    let reason = s.reason("rtt p99 to 10.0.2.7", "ms");
    assert!(
        reason.starts_with("rtt p99 to 10.0.2.7 8.1 ms vs baseline 0.4"),
        "{reason}"
    );
    // Anomalous since the first elevated sample of the rise.
    assert!(reason.ends_with(", for 5 s"), "{reason}");
}

/// The shipped pipeline with a smallest change that matters (`min_delta`).
fn scorer_with_min_delta(min_delta: f64) -> SignalScorer {
    SignalScorer::new(SignalScorerConfig {
        min_delta,
        ..SignalScorerConfig::default()
    })
    .expect("config")
}

/// Onsets: one per event. A fault that flaps (5 s on, 5 s off) is one event; a step that lasts
/// starts one anomaly, not one per sample or per half-life of the onset level; once the level
/// has decayed, the fault coming back is a new one.
#[test]
fn signal_scorer_reports_one_onset_per_event() {
    let mut s = scorer();
    let mut t = 0.0;
    let mut run = |s: &mut SignalScorer, n: u32, level: f64| -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                t += 1.0;
                let score = s.update(t, level + 0.02 * noise(i + 7 * n));
                (score, s.onset())
            })
            .collect()
    };
    let onsets = |v: &[(f64, f64)]| v.iter().filter(|(_, o)| *o > 0.0).count();
    let quiet = run(&mut s, 200, 0.4);
    assert_eq!(onsets(&quiet[60..]), 0, "noise after warm-up: {:?}", &quiet[60..]);
    // Flapping: one event, started by its first sample.
    let mut flapping = Vec::new();
    for _ in 0..6 {
        flapping.extend(run(&mut s, 5, 4.0));
        flapping.extend(run(&mut s, 5, 0.4));
    }
    assert_eq!(onsets(&flapping), 1, "{flapping:?}");
    assert!(
        flapping[0].1 > 0.7 && (flapping[0].1 - flapping[0].0).abs() < 1e-12,
        "{:?}",
        flapping[0]
    );
    // Quiet for an hour (12 onset half-lives), then ten minutes of a step (longer than the
    // 600 s freeze, so it ends learnt as the new normal): one onset.
    run(&mut s, 3600, 0.4);
    let step = run(&mut s, 600, 4.0);
    assert_eq!(onsets(&step), 1, "{:?}", &step[..5]);
    assert!(step[0].1 > 0.7, "{:?}", step[0]);
    // Back to normal, then the fault again an hour later: a new event.
    run(&mut s, 3600, 0.4);
    let back = run(&mut s, 30, 4.0);
    assert_eq!(onsets(&back), 1, "{:?}", &back[..5]);
}

/// A fault that grows while it lasts (a link that loses more and more) starts a new onset when
/// its score rises past the first one's by the margin; a warming-up scorer reports none.
#[test]
fn signal_scorer_reports_an_onset_when_the_fault_grows() {
    let mut s = scorer_with_min_delta(0.5);
    let mut t = 0.0;
    for _ in 0..29 {
        t += 1.0;
        s.update(t, if t > 20.0 { 50.0 } else { 0.0 });
        assert!(s.onset() < 1e-12, "warming up at {t}");
    }
    s.restart(t);
    for i in 0..200 {
        t += 1.0;
        s.update(t, 10.0 + noise(i));
    }
    // Under `min_delta`: capped, at most an onset too weak for the agent to count (under
    // `elevated`).
    t += 1.0;
    s.update(t, 10.4);
    assert!(
        s.onset() <= SignalScorerConfig::default().transient_cap,
        "{}",
        s.onset()
    );
    // A moderate anomaly, then it grows.
    let mut onsets = Vec::new();
    for x in [15.5, 15.5, 15.5, 60.0, 60.0, 60.0] {
        t += 1.0;
        s.update(t, x);
        onsets.push(s.onset());
    }
    assert!(onsets[0] > 0.5 && onsets[1..3].iter().all(|o| *o < 1e-12), "{onsets:?}");
    assert!(
        onsets[3] > onsets[0] + 0.1 && onsets[4..].iter().all(|o| *o < 1e-12),
        "{onsets:?}"
    );
}

/// A series that sits at 0 has no scale: `min_delta` keeps a tiny first deviation transient.
#[test]
fn signal_scorer_ignores_changes_below_min_delta() {
    let mut s = scorer_with_min_delta(0.5);
    let mut t = 0.0;
    for _ in 0..200 {
        t += 1.0;
        s.update(t, 0.0);
    }
    for _ in 0..5 {
        t += 1.0;
        assert!(s.update(t, 0.1) <= 0.3);
    }
    t += 1.0;
    assert!(s.update(t, 3.0) > 0.7);
    // A baseline learnt from (nearly) zeros is a tiny positive number and the z enormous: the
    // reason says 0.00 and >100, not 5.49e-4 and 997.2.
    let reason = s.reason("retransmits to node node-e", "%");
    assert_eq!(
        reason,
        "retransmits to node node-e 3.0 % vs baseline 0.00 %, z=>100, for 0 s"
    );
}

/// The bad side only: a drop of an up-is-bad signal is no evidence.
#[test]
fn signal_scorer_ignores_the_good_side() {
    let mut s = scorer();
    let mut t = 0.0;
    for i in 0..200 {
        t += 1.0;
        s.update(t, 5.0 + 0.1 * noise(i));
    }
    for _ in 0..10 {
        t += 1.0;
        assert!(s.update(t, 0.1) < 1e-12);
    }
}

#[test]
fn signal_scorer_keeps_the_baseline_frozen_during_a_long_fault() {
    let mut s = scorer();
    let mut t = 0.0;
    for i in 0..200 {
        t += 1.0;
        s.update(t, 1.0 + 0.05 * noise(i));
    }
    // Five minutes of a 5× latency: still as anomalous at the end as at its start (baseline not
    // absorbed).
    // (The first fault sample is scored before it is learnt; it widens the long-memory scale a
    // little, so the held score is the second sample's.)
    t += 2.0;
    s.update(t - 1.0, 5.0);
    let held = s.update(t, 5.0);
    let mut last = 0.0;
    for _ in 0..300 {
        t += 1.0;
        last = s.update(t, 5.0);
    }
    assert!(held > 0.8 && last >= held, "{held} → {last}");
}

#[test]
fn signal_scorer_reports_nothing_while_warming_up() {
    let mut s = scorer();
    for i in 0..20 {
        assert!(s.update(f64::from(i), 1000.0 * f64::from(i % 2)) < 1e-12);
    }
    assert!(!s.is_ready());
}

#[test]
fn family_score_is_the_worst_ready_signal_and_none_without_data() {
    let mut a = scorer();
    let mut b = scorer();
    let cold = scorer();
    let mut t = 0.0;
    for i in 0..200 {
        t += 1.0;
        a.update(t, 1.0 + 0.05 * noise(i));
        b.update(t, 2.0 + 0.05 * noise(i + 1000));
    }
    for _ in 0..5 {
        t += 1.0;
        a.update(t, 1.0);
        b.update(t, 20.0);
    }
    let signals = [a, b, cold];
    let f = FamilyScore::combine(Family::NetworkLatency, &signals);
    assert_eq!(f.worst, Some(1));
    let score = f
        .to_score(&signals, |i| (["rtt to a", "rtt to b", "rtt to c"][i], "ms"))
        .expect("score");
    assert!(score.value > 0.7, "{}", score.value);
    assert!(score.reason.starts_with("rtt to b 20.0 ms"), "{}", score.reason);
    let none = FamilyScore::combine(Family::PacketLoss, &signals[2..]);
    assert_eq!(none.value, None);
}

#[test]
fn configs_deserialize_with_defaults() {
    let cfg: GrayDetectorConfig = serde_json::from_str(r#"{"z_half": 5.0}"#).expect("partial config");
    assert!((cfg.z_half - 5.0).abs() < f64::EPSILON);
    assert_eq!(cfg.warmup, GrayDetectorConfig::default().warmup);
    assert!(serde_json::from_str::<GrayDetectorConfig>(r#"{"nope": 1}"#).is_err());
    let s: SignalScorerConfig = serde_json::from_str("{}").expect("empty config");
    assert_eq!(s, SignalScorerConfig::default());
}

#[test]
fn gray_detector_alarms_once_per_event() {
    let mut d = GrayDetector::new(GrayDetectorConfig::default()).expect("config");
    let mut t = 0.0;
    for i in 0..2000 {
        t += 300.0;
        d.update(t, 50.0 + 5.0 * noise(i));
    }
    // A plateau: the first sample alarms, the following ones are damped.
    t += 300.0;
    let first = d.update(t, 120.0).score;
    t += 300.0;
    let second = d.update(t, 121.0).score;
    assert!(first > 0.5, "{first}");
    assert!(second < first * 0.5, "second {second} vs first {first}");
}

#[test]
fn gray_detector_discounts_values_inside_the_range_already_seen() {
    let run = |in_range_factor: f64, last: f64| {
        let cfg = GrayDetectorConfig {
            in_range_factor,
            seasonal: false,
            refractory_half_life: 0.0,
            ..GrayDetectorConfig::default()
        };
        let mut d = GrayDetector::new(cfg).expect("config");
        let mut t = 0.0;
        for i in 0..2000 {
            t += 60.0;
            // One early excursion to 140 sets the range.
            let x = if i == 300 { 140.0 } else { 50.0 + 5.0 * noise(i) };
            d.update(t, x);
        }
        d.update(t + 60.0, last).score
    };
    // 110 is inside the range (below the decayed max of the early excursion): discounted.
    let (full, half) = (run(1.0, 110.0), run(0.5, 110.0));
    assert!(full > 0.3, "{full}");
    assert!((half - 0.5 * full).abs() < 1e-9, "full {full} half {half}");
    // 200 is a new extreme: no discount.
    let (full, half) = (run(1.0, 200.0), run(0.5, 200.0));
    assert!((full - half).abs() < 1e-12, "full {full} half {half}");
}

/// A fault that comes back (a noisy neighbour's CPU hogs, twice, two minutes apart) scores as
/// high the second time: the first one must not be learnt as a range the series visits.
#[test]
fn signal_scorer_scores_a_fault_that_comes_back() {
    let mut s = SignalScorer::new(SignalScorerConfig {
        min_delta: Family::CpuContention.min_change(),
        ..SignalScorerConfig::default()
    })
    .expect("config");
    let mut t = 0.0;
    let mut feed_level = |s: &mut SignalScorer, n: u32, level: f64, seed: u32| -> Vec<f64> {
        (0..n)
            .map(|i| {
                t += 1.0;
                s.update(t, level + 60.0 * noise(i + seed))
            })
            .collect()
    };
    feed_level(&mut s, 200, 400.0, 0);
    // The window the fault starts in is half faulty.
    let mut first = feed_level(&mut s, 1, 1700.0, 1000);
    first.extend(feed_level(&mut s, 20, 3000.0, 2000));
    feed_level(&mut s, 120, 400.0, 3000);
    // Scattered spikes in between (other faults' retry storms): each a window alone.
    for k in 0..60 {
        feed_level(&mut s, 4, 400.0, 6000 + 10 * k);
        feed_level(&mut s, 1, 2500.0 + 25.0 * f64::from(k), 7000 + k);
    }
    let mut second = feed_level(&mut s, 1, 1700.0, 4000);
    second.extend(feed_level(&mut s, 20, 3000.0, 5000));
    // High enough for the aggregator on its own (its single-node weight is 1; the default
    // degrade confidence 0.75), both times: a value inside the range seen before is no less a
    // fault.
    let high = |v: &[f64]| v.iter().filter(|x| **x >= 0.9).count();
    assert!(high(&first) >= 18, "first: {first:?}");
    assert!(high(&second) >= 18, "second: {second:?}");
}

/// The node was busy while the agent warmed up (images unpacking: memory PSI at 15 % for a few
/// windows), then quiet; a later memory thrash at that level is a fault, scored as one.
#[test]
fn signal_scorer_scores_a_fault_at_a_level_seen_during_warm_up() {
    let mut s = SignalScorer::new(SignalScorerConfig {
        min_delta: Family::MemoryPressure.min_change(),
        robust_floor: true,
        ..SignalScorerConfig::default()
    })
    .expect("config");
    let mut t = 0.0;
    for i in 0..300 {
        t += 1.0;
        let busy = (5..10).contains(&i);
        s.update(t, if busy { 15.0 } else { 0.0 });
    }
    let thrash: Vec<f64> = (0..10)
        .map(|_| {
            t += 1.0;
            s.update(t, 14.6)
        })
        .collect();
    assert!(thrash.iter().skip(1).all(|x| *x >= 0.9), "{thrash:?}");
}
