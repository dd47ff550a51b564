//! Predicted failures: a [`CrossingForecast`] per figure that has a failure threshold, and a
//! prediction when the forecast crosses it within the horizon at the forecast's confidence
//! floor. Per workload with a memory limit: its working set towards the limit (the OOM kill).
//! Per node: CPU steal towards [`Thresholds::steal_pct`] and the worst workload's run-queue p99
//! towards [`Thresholds::run_queue_p99_us`] (levels past which workloads suffer; there is no
//! kernel limit to cross). Pure over window summaries, like [`crate::scoring`]; the aggregator
//! decides what a prediction becomes (a family condition False with reason `PredictedFailure`).

use std::collections::HashMap;

use graywatch_detect::{Crossing, CrossingConfig, CrossingForecast, Family};

use crate::summary::{Prediction, WindowSummary};

/// Forget a series' forecast after this many windows without a reading (the workload went
/// away; a new one at the same path starts over).
const IDLE_WINDOWS: u32 = 5;

/// At most this many forecasts (a node runs at most a few hundred pods).
const MAX_SERIES: usize = 4_096;

const MIB: f64 = 1024.0 * 1024.0;

/// The node-level failure thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// CPU steal, % of the node's CPU time: past it every workload runs visibly slower.
    pub steal_pct: f64,
    /// The worst workload's run-queue p99, µs: 50 ms of waiting for a CPU is a stall a latency-
    /// sensitive service shows in its own p99.
    pub run_queue_p99_us: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            steal_pct: 10.0,
            run_queue_p99_us: 50_000.0,
        }
    }
}

struct Series {
    forecast: CrossingForecast,
    /// The limit the forecast is for: a changed limit (a resized pod) starts over.
    limit: f64,
    idle_windows: u32,
}

/// Per-node forecasting state.
pub struct Predictor {
    config: CrossingConfig,
    thresholds: Thresholds,
    series: HashMap<String, Series>,
}

impl Default for Predictor {
    fn default() -> Self {
        Self::new(CrossingConfig::default(), Thresholds::default())
    }
}

impl Predictor {
    /// A predictor with `config` (an invalid one falls back to the default, which the detect
    /// crate's tests validate).
    pub fn new(config: CrossingConfig, thresholds: Thresholds) -> Self {
        let config = if CrossingForecast::new(config).is_ok() {
            config
        } else {
            CrossingConfig::default()
        };
        Self {
            config,
            thresholds,
            series: HashMap::new(),
        }
    }

    /// Feeds `value` at `t` to the series `key` forecast towards `limit`; its crossing, if any.
    fn forecast(&mut self, key: &str, limit: f64, t: f64, value: f64) -> Option<Crossing> {
        if !self.series.contains_key(key) && self.series.len() >= MAX_SERIES {
            return None;
        }
        let config = self.config;
        let fresh = |limit| Series {
            forecast: CrossingForecast::new(config).unwrap_or_else(|_| default_forecast()),
            limit,
            idle_windows: 0,
        };
        let series = self.series.entry(key.to_owned()).or_insert_with(|| fresh(limit));
        if series.limit.to_bits() != limit.to_bits() {
            *series = fresh(limit);
        }
        series.idle_windows = 0;
        series.forecast.update(t, value);
        series.forecast.predict(limit)
    }

    /// Feeds one window (at `t` seconds) and returns the predictions, soonest first. `pod_name`
    /// turns a pod UID into `namespace/name` where the agent knows it.
    pub fn observe(
        &mut self,
        t: f64,
        summary: &WindowSummary,
        pod_name: impl Fn(&str) -> Option<String>,
    ) -> Vec<Prediction> {
        for series in self.series.values_mut() {
            series.idle_windows = series.idle_windows.saturating_add(1);
        }
        let mut out = Vec::new();
        for cgroup in &summary.pressure.cgroups {
            // No limit, no figure: nothing to forecast (never a zero or an invented limit).
            let (Some(working_set), Some(limit)) = (cgroup.memory_working_set_bytes, cgroup.memory_limit_bytes) else {
                continue;
            };
            let (working_set, limit) = (working_set as f64, limit as f64);
            let Some(crossing) = self.forecast(&cgroup.path, limit, t, working_set) else {
                continue;
            };
            let workload = cgroup.pod_uid.as_deref().map_or_else(
                || cgroup.path.clone(),
                |uid| pod_name(uid).unwrap_or_else(|| format!("pod {uid}")),
            );
            out.push(prediction(
                Family::MemoryPressure,
                workload,
                Some(cgroup.path.clone()),
                &crossing,
                (working_set, limit, "bytes"),
            ));
        }
        // No steal column, no run-queue figures: nothing fed, nothing forecast.
        let thresholds = self.thresholds;
        if let Some(steal) = &summary.cpu.steal
            && let Some(crossing) = self.forecast("node: cpu steal", thresholds.steal_pct, t, steal.node_pct)
        {
            out.push(prediction(
                Family::CpuSteal,
                "node".into(),
                None,
                &crossing,
                (steal.node_pct, thresholds.steal_pct, "%"),
            ));
        }
        if let Some(runq) = summary.cpu.worst_run_queue_p99_us()
            && let Some(crossing) = self.forecast("node: run-queue p99", thresholds.run_queue_p99_us, t, runq)
        {
            out.push(prediction(
                Family::CpuContention,
                "node".into(),
                None,
                &crossing,
                (runq, thresholds.run_queue_p99_us, "us"),
            ));
        }
        self.series.retain(|_, s| s.idle_windows < IDLE_WINDOWS);
        out.sort_by(|a, b| a.eta_seconds.total_cmp(&b.eta_seconds));
        out
    }
}

/// A prediction with its reason in words: "<who>: <figure> rising <rate> towards its <limit>".
fn prediction(
    family: Family,
    workload: String,
    cgroup_path: Option<String>,
    crossing: &Crossing,
    (value, limit, unit): (f64, f64, &'static str),
) -> Prediction {
    let what = match family {
        Family::MemoryPressure => format!(
            "working set {:.0} MiB rising {:.2} MiB/s towards its {:.0} MiB limit",
            value / MIB,
            crossing.trend_per_sec / MIB,
            limit / MIB
        ),
        Family::CpuSteal => format!(
            "cpu steal {value:.1} % rising {:.3} %/s towards {limit:.0} %",
            crossing.trend_per_sec
        ),
        _ => format!(
            "run-queue p99 (worst workload) {value:.0} µs rising {:.0} µs/s towards {limit:.0} µs",
            crossing.trend_per_sec
        ),
    };
    Prediction {
        family,
        reason: format!(
            "{workload}: {what}, reached in {:.0} s (confidence {:.2})",
            crossing.eta_secs, crossing.confidence
        ),
        workload,
        cgroup_path,
        eta_seconds: crossing.eta_secs,
        confidence: crossing.confidence,
        value,
        limit,
        unit,
    }
}

/// The default config is valid (the detect crate's tests build it).
fn default_forecast() -> CrossingForecast {
    CrossingForecast::new(CrossingConfig::default()).expect("the default forecast config is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::CgroupWindow;

    fn window(cgroups: Vec<CgroupWindow>) -> WindowSummary {
        let mut w = crate::scoring::tests::window_with(std::net::Ipv4Addr::new(10, 0, 0, 1), 100, 1, 1, 0);
        w.pressure.cgroups = cgroups;
        w
    }

    fn cgroup(path: &str, pod_uid: Option<&str>, working_set: Option<u64>, limit: Option<u64>) -> CgroupWindow {
        CgroupWindow {
            path: path.into(),
            pod_uid: pod_uid.map(str::to_owned),
            memory_working_set_bytes: working_set,
            memory_limit_bytes: limit,
            ..CgroupWindow::default()
        }
    }

    /// A pod leaking 2 MiB/s under a 256 MiB limit is predicted, named, with a sane ETA; a
    /// flat neighbour, one without a limit and one without a reading are not.
    #[test]
    fn a_leaking_pod_is_predicted_and_its_neighbours_are_not() {
        let mut predictor = Predictor::default();
        let limit = 256u64 << 20;
        let mut last = Vec::new();
        for i in 0..60u64 {
            let leak = (20u64 << 20) + i * (2 << 20);
            let w = window(vec![
                cgroup("kubepods/pod1", Some("uid-1"), Some(leak), Some(limit)),
                cgroup("kubepods/pod2", Some("uid-2"), Some(100 << 20), Some(limit)),
                cgroup("kubepods/pod3", None, Some(leak), None),
                cgroup("kubepods/pod4", None, None, Some(limit)),
            ]);
            #[expect(clippy::cast_precision_loss, reason = "small test counts")]
            let t = i as f64;
            last = predictor.observe(t, &w, |uid| (uid == "uid-1").then(|| "shop/cart-0".to_owned()));
            if i < 29 {
                assert!(last.is_empty(), "warming up: {last:?}");
            }
        }
        assert_eq!(last.len(), 1, "{last:?}");
        let p = &last[0];
        assert_eq!((p.family, p.workload.as_str()), (Family::MemoryPressure, "shop/cart-0"));
        // At sample 59 the working set is 138 MiB: 59 s to go at 2 MiB/s.
        assert!((p.eta_seconds - 59.0).abs() < 5.0, "{p:?}");
        assert!(p.reason.starts_with("shop/cart-0: working set 138 MiB"), "{}", p.reason);
    }

    /// Steal rising 0.1 %/s from 1 % is forecast to reach the 10 % threshold; steady steal at 3 %
    /// (with noise) is not; a host without a steal column feeds nothing.
    #[test]
    fn rising_steal_is_predicted_towards_its_threshold() {
        let with_steal = |pct: Option<f64>| {
            let mut w = window(Vec::new());
            w.cpu.steal = pct.map(|node_pct| crate::summary::StealWindow {
                node_pct,
                node_seconds: 0.0,
                per_cpu_pct: Vec::new(),
            });
            w
        };
        let (mut rising, mut steady, mut blind) = (Predictor::default(), Predictor::default(), Predictor::default());
        let (mut last, mut calm) = (Vec::new(), Vec::new());
        for i in 0..50u32 {
            let t = f64::from(i);
            last = rising.observe(t, &with_steal(Some(1.0 + 0.1 * t)), |_| None);
            let noise = f64::from(i % 3) * 0.2;
            calm.extend(steady.observe(t, &with_steal(Some(3.0 + noise)), |_| None));
            assert!(blind.observe(t, &with_steal(None), |_| None).is_empty());
        }
        assert!(calm.is_empty(), "{calm:?}");
        assert!(blind.series.is_empty());
        assert_eq!(last.len(), 1, "{last:?}");
        let p = &last[0];
        assert_eq!((p.family, p.workload.as_str(), p.unit), (Family::CpuSteal, "node", "%"));
        // 5.9 % at t = 49: 41 s to 10 % at 0.1 %/s.
        assert!((p.eta_seconds - 41.0).abs() < 4.0, "{p:?}");
        assert!(
            p.reason
                .starts_with("node: cpu steal 5.9 % rising 0.100 %/s towards 10 %"),
            "{}",
            p.reason
        );
    }

    /// A resized limit starts the forecast over; a workload that stops reporting is forgotten.
    #[test]
    fn a_changed_limit_starts_over() {
        let mut predictor = Predictor::default();
        let feed = |predictor: &mut Predictor, from: u64, limit: u64| {
            let mut out = Vec::new();
            for i in from..from + 40 {
                let w = window(vec![cgroup("c", None, Some((20 << 20) + i * (2 << 20)), Some(limit))]);
                #[expect(clippy::cast_precision_loss, reason = "small test counts")]
                let t = i as f64;
                out = predictor.observe(t, &w, |_| None);
            }
            out
        };
        assert_eq!(feed(&mut predictor, 0, 256 << 20).len(), 1);
        let mut first = Vec::new();
        let w = window(vec![cgroup("c", None, Some(120 << 20), Some(512 << 20))]);
        first.extend(predictor.observe(40.0, &w, |_| None));
        assert!(first.is_empty(), "a new limit warms up again");
        for i in 0..IDLE_WINDOWS {
            predictor.observe(41.0 + f64::from(i), &window(Vec::new()), |_| None);
        }
        assert!(predictor.series.is_empty());
    }
}
