//! Engine scenarios on a simulated fleet (plans are applied to the simulated cluster between
//! steps), plus property tests of the guardrails and the state machine.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use graywatch_proto::LossSpan;
use proptest::prelude::*;

use super::{
    engine::{Engine, FamilyState, Phase, Settling, UnknownReason, advance, blast_allowance, overall_phase},
    karpenter::edit_list,
    model::{
        CondStatus, Family, Input, NodeReport, NodeView, ObservedCondition, PeerObservation, PoolEdits, PoolSnapshot,
        PoolView, Prediction,
    },
    plan::{EventTarget, Plan, PoolChange},
    policy::{Policy, TaintMode},
};

const ZONE: &str = "topology.kubernetes.io/zone";

/// A simulated cluster + fleet of agents.
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent switches of the simulated fleet, each set by the tests that need it"
)]
struct Sim {
    input: Input,
    round: u64,
    events: Vec<(EventTarget, String)>,
    /// Bad nodes also report a local detector score of 1.
    local_bad: bool,
    /// NodePool patches fail (after the snapshot is saved), as a rejected write would.
    fail_pool_patches: bool,
    /// Nodes whose hypervisor steals CPU: node → steal figure (%); their agent's own steal
    /// detector scores 1 (the other nodes report 0.5 % and no local steal score).
    stolen: BTreeMap<usize, f64>,
    /// The stolen nodes' agents report the steal figure only: their own detector has no score
    /// (it learnt the level as normal, or is still warming up).
    steal_figure_only: bool,
    /// Every node reports a healthy memory PSI figure (0.2 %).
    memory_figures: bool,
    /// Nodes whose agent forecasts a memory failure.
    predicted: BTreeMap<usize, Prediction>,
    /// Nodes that lose 0.45 % of their segments steadily: their one-window loss figures jump
    /// between 0 and 1.25 %, and their agent's own sustained-loss detector scores 1.
    light_loss: BTreeSet<usize>,
    /// Sustained loss spans the nodes report (10 windows), if any: the lossy nodes lose 0.45 %
    /// of what they sent, the others 0.05 % of 4,000 segments.
    loss_span_sent: Option<u64>,
}

fn zone_of(i: usize, per_zone: usize) -> String {
    format!(
        "zone-{}",
        char::from(b'a' + u8::try_from(i / per_zone).expect("under 26 zones"))
    )
}

fn ip(i: usize) -> IpAddr {
    let octet = |v: usize| u8::try_from(v).expect("test fleets have under 62 500 nodes");
    IpAddr::from([10, 0, octet(i / 250), octet(i % 250) + 1])
}

impl Sim {
    fn new(n: usize, per_zone: usize) -> Self {
        let mut input = Input::default();
        for i in 0..n {
            let name = format!("node-{i}");
            let labels = BTreeMap::from([
                (ZONE.to_string(), zone_of(i, per_zone)),
                ("karpenter.sh/nodepool".to_string(), "default".to_string()),
                ("node.kubernetes.io/instance-type".to_string(), "m5.large".to_string()),
            ]);
            input.nodes.insert(
                name.clone(),
                NodeView {
                    name,
                    labels,
                    internal_ips: vec![ip(i)],
                    ..Default::default()
                },
            );
        }
        input.pools.insert(
            "default".into(),
            PoolView {
                name: "default".into(),
                requirements: serde_json::json!([{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]),
                // Karpenter's CRD default.
                budgets: serde_json::json!([{"nodes": "10%"}]),
                snapshot: None,
                snapshot_refused: None,
            },
        );
        Self {
            input,
            round: 0,
            events: Vec::new(),
            local_bad: false,
            fail_pool_patches: false,
            stolen: BTreeMap::new(),
            steal_figure_only: false,
            memory_figures: false,
            predicted: BTreeMap::new(),
            light_loss: BTreeSet::new(),
            loss_span_sent: None,
        }
    }

    /// One round: every node in `reporting` reports a window; nodes in `bad` are slow and lossy.
    fn round(&mut self, bad: &BTreeSet<usize>, reporting: impl Fn(usize) -> bool) {
        self.round += 1;
        self.input.now_ms = i64::try_from(self.round).expect("round fits i64") * 1000;
        let n = self.input.nodes.len();
        for i in (0..n).filter(|i| reporting(*i)) {
            let peers = (0..n)
                .filter(|j| *j != i)
                .map(|j| {
                    let slow = bad.contains(&i) || bad.contains(&j);
                    PeerObservation {
                        addr: ip(j),
                        rtt_samples: 50,
                        rtt_p99_us: if slow { 8000.0 } else { 300.0 + (j % 7) as f64 * 5.0 },
                        segments_out: 1000,
                        retransmits: if slow { 60 } else { 1 },
                        unanswered_connects: 0,
                    }
                })
                .collect();
            let slow = bad.contains(&i);
            let mut report = NodeReport {
                seq: self.round,
                boot_id: "b".into(),
                agent_started_ns: 1,
                received_ms: self.input.now_ms,
                figures: BTreeMap::from([
                    (
                        Family::NetworkLatency,
                        if slow { 8000.0 } else { 300.0 + (i % 5) as f64 * 7.0 },
                    ),
                    (Family::PacketLoss, if slow { 6.0 } else { 0.1 }),
                    (Family::CpuSteal, self.stolen.get(&i).copied().unwrap_or(0.5)),
                ]),
                local: if slow && self.local_bad {
                    BTreeMap::from([(Family::NetworkLatency, (1.0, "local detector".to_string()))])
                } else if let Some(steal) = self.stolen.get(&i).filter(|_| !self.steal_figure_only) {
                    let reason = format!("cpu steal {steal} % vs baseline 0.50 %, z=40.0, for 3 s");
                    BTreeMap::from([(Family::CpuSteal, (1.0, reason))])
                } else {
                    BTreeMap::new()
                },
                peers,
                predictions: self
                    .predicted
                    .get(&i)
                    .map(|pr| BTreeMap::from([(Family::MemoryPressure, pr.clone())]))
                    .unwrap_or_default(),
                ..Default::default()
            };
            if self.memory_figures {
                report.figures.insert(Family::MemoryPressure, 0.2);
            }
            let light = self.light_loss.contains(&i);
            if light {
                let per_window = [0.0, 1.25, 0.25, 0.5][usize::try_from(self.round % 4).expect("under 4")];
                report.figures.insert(Family::PacketLoss, per_window);
                let reason =
                    "sustained loss (last 10 windows, towards nodes) 0.45 % vs baseline 0.05 %, z=12.0, for 3 s";
                report.local.insert(Family::PacketLoss, (1.0, reason.into()));
            }
            if let Some(sent) = self.loss_span_sent {
                report.sustained_loss = Some(if light {
                    LossSpan {
                        lost: sent * 45 / 10_000,
                        sent,
                        windows: 10,
                    }
                } else {
                    LossSpan {
                        lost: 2,
                        sent: 4_000,
                        windows: 10,
                    }
                });
            }
            self.input.reports.insert(format!("node-{i}"), report.into());
        }
    }

    /// Applies a plan the way the actuators would.
    fn apply(&mut self, plan: &Plan) {
        for w in &plan.conditions {
            let v = self.input.nodes.get_mut(&w.node).expect("node exists");
            // Server-side apply: a condition of ours left out of the write goes.
            let foreign = v.foreign_conditions.clone();
            v.conditions
                .retain(|ty, _| foreign.contains(ty) || !(ty.starts_with("graywatch.io/") || ty == "NetworkingReady"));
            for c in &w.conditions {
                v.conditions.insert(
                    c.type_.clone(),
                    ObservedCondition {
                        status: c.status,
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                        last_transition_ms: c.last_transition_ms,
                    },
                );
            }
        }
        for t in &plan.taints {
            self.input.nodes.get_mut(&t.node).expect("node exists").tainted = t.add;
        }
        for p in &plan.pools {
            self.apply_pool(p);
        }
        self.events
            .extend(plan.events.iter().map(|e| (e.target.clone(), e.reason.clone())));
    }

    /// Applies a NodePool change the way the actuator does: snapshot of what may be ours
    /// first, then the pool's lists edited (unless patches fail), then the final snapshot.
    fn apply_pool(&mut self, change: &PoolChange) {
        let crate::core::plan::PoolChangeParts {
            pool,
            remove,
            add,
            excluded,
        } = change.parts();
        let fail = self.fail_pool_patches;
        let pv = self.input.pools.get_mut(pool).expect("pool");
        let (reqs, added_reqs) = edit_list(&pv.requirements, &remove.requirements, &add.requirements);
        let (budgets, added_budgets) = edit_list(&pv.budgets, &remove.budgets, &add.budgets);
        let added = PoolEdits {
            requirements: added_reqs,
            budgets: added_budgets,
        };
        if let Some(excluded) = &excluded {
            let mut maybe = added.clone();
            maybe.requirements.extend(remove.requirements.iter().cloned());
            maybe.budgets.extend(remove.budgets.iter().cloned());
            pv.snapshot = Some(PoolSnapshot {
                excluded: excluded.to_vec(),
                added: maybe,
            });
        }
        if fail {
            return;
        }
        pv.requirements = serde_json::Value::Array(reqs);
        pv.budgets = serde_json::Value::Array(budgets);
        pv.snapshot = excluded.map(|excluded| PoolSnapshot {
            excluded: excluded.to_vec(),
            added,
        });
    }

    fn run(&mut self, eng: &mut Engine, bad: &BTreeSet<usize>, rounds: usize) -> Vec<Plan> {
        (0..rounds)
            .map(|_| {
                self.round(bad, |_| true);
                let plan = eng.step(&self.input);
                self.apply(&plan);
                plan
            })
            .collect()
    }

    fn overall(&self, p: &Policy, i: usize) -> Option<CondStatus> {
        self.input.nodes[&format!("node-{i}")]
            .conditions
            .get(&p.overall_condition())
            .map(|c| c.status)
    }

    fn tainted(&self) -> BTreeSet<String> {
        self.input
            .nodes
            .values()
            .filter(|v| v.tainted)
            .map(|v| v.name.clone())
            .collect()
    }

    fn count(&self, reason: &str) -> usize {
        self.events.iter().filter(|(_, r)| r == reason).count()
    }
}

fn set(xs: &[usize]) -> BTreeSet<usize> {
    xs.iter().copied().collect()
}

/// A 10-node fleet in two zones whose first steps were healthy (the view settled).
fn settled(p: &Policy) -> (Engine, Sim) {
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[]), 2);
    (eng, sim)
}

/// [`settled`], then 3 of zone-a's 5 nodes degraded long enough for a zone verdict.
fn zone_a_degraded(p: &Policy) -> (Engine, Sim) {
    let (mut eng, mut sim) = settled(p);
    sim.run(&mut eng, &set(&[0, 1, 2]), 8);
    (eng, sim)
}

/// A healthy node's condition message says that nothing stands out, not a bare
/// "confidence 0.00: ".
#[test]
fn a_healthy_nodes_condition_says_nothing_stands_out() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    // One node (no peer group, no observers), whose own detector has no score.
    let mut sim = Sim::new(1, 1);
    sim.run(&mut eng, &set(&[]), 2);
    let c = &sim.input.nodes["node-0"].conditions[&p.family_condition(Family::CpuSteal)];
    assert_eq!(c.status, CondStatus::True, "{}", c.message);
    assert_eq!(
        c.message,
        "confidence 0.00: nothing stands out (own detector, peer group and observers)"
    );
}

/// A node's own steal detector moves its `CpuSteal` condition under the rules of every family:
/// alone it is evidence below the degrade confidence (the condition stays True), with its steal
/// standing out from its peer group it goes False after `degrade_windows`; the run-queue family
/// (`CpuContention`) is not touched by steal evidence.
#[test]
fn a_nodes_own_steal_score_moves_cpu_steal_and_nothing_else() {
    let p = Policy::default();
    let (mut eng, mut sim) = settled(&p);
    let steal = |sim: &Sim| sim.input.nodes["node-4"].conditions[&p.family_condition(Family::CpuSteal)].clone();
    // The local score alone (its steal figure is the fleet's) is evidence, not a verdict: below
    // the degrade confidence, the condition stays True.
    sim.stolen.insert(4, 0.5);
    sim.run(&mut eng, &set(&[]), p.degrade_windows as usize + 2);
    assert_eq!(steal(&sim).status, CondStatus::True);
    let fs = &eng.node_state("node-4").expect("state").families[&Family::CpuSteal];
    assert!((fs.confidence - p.weight_local).abs() < 1e-9, "{}", fs.detail);
    assert!(fs.detail.contains("local 1.00 (cpu steal"), "{}", fs.detail);
    // Local and peer evidence together: False, like any other family.
    sim.stolen.insert(4, 30.0);
    sim.run(&mut eng, &set(&[]), p.degrade_windows as usize);
    let c = steal(&sim);
    assert_eq!(c.status, CondStatus::False, "{}", c.message);
    assert!(c.message.contains("local 1.00 (cpu steal 30 %"), "{}", c.message);
    let node = &sim.input.nodes["node-4"].conditions;
    assert_ne!(
        node[&p.family_condition(Family::CpuContention)].status,
        CondStatus::False
    );
    assert_eq!(
        node[&p.family_condition(Family::NetworkLatency)].status,
        CondStatus::True
    );
    for i in (0..10).filter(|i| *i != 4) {
        assert_eq!(sim.overall(&p, i), Some(CondStatus::True), "node-{i}");
    }
}

/// A node far above its peers with nothing else saying so (its own detector sees no change,
/// and CPU steal has no vantage) is Degraded only once that has lasted
/// `peer_only_degrade_windows`: a few windows of shared load that lift one node above the
/// median are not acted on (the 2026-12-06 soak's false taints), a node that stays worse is.
#[test]
fn a_peer_group_outlier_alone_degrades_only_after_it_lasts() {
    let p = Policy {
        peer_only_degrade_windows: 10,
        ..Policy::default()
    };
    let (mut eng, mut sim) = settled(&p);
    let steal = |sim: &Sim| sim.input.nodes["node-4"].conditions[&p.family_condition(Family::CpuSteal)].clone();
    sim.stolen.insert(4, 30.0);
    sim.steal_figure_only = true;
    sim.run(&mut eng, &set(&[]), p.peer_only_degrade_windows as usize - 1);
    let fs = &eng.node_state("node-4").expect("state").families[&Family::CpuSteal];
    assert!(
        fs.confidence >= p.degrade_confidence,
        "each window is bad: {}",
        fs.detail
    );
    assert_eq!(fs.phase, Phase::Suspect, "{}", fs.detail);
    assert_eq!(steal(&sim).status, CondStatus::True);
    assert!(sim.tainted().is_empty());
    sim.run(&mut eng, &set(&[]), 1);
    let c = steal(&sim);
    assert_eq!(c.status, CondStatus::False, "lasted: {}", c.message);
    // Backed by its own detector, the same figure degrades after `degrade_windows`.
    let (mut eng, mut sim) = settled(&p);
    sim.stolen.insert(4, 30.0);
    sim.run(&mut eng, &set(&[]), p.degrade_windows as usize);
    assert_eq!(steal(&sim).status, CondStatus::False);
}

/// A node that loses 0.45 % of its segments steadily (the matrix's 0.5 % loss) is degraded
/// through its sustained loss, which stands out from its peers' where each window's figure
/// (0–1.25 %) does not enough; a span too quiet to judge (1,500 segments) says nothing.
#[test]
fn a_light_steady_loss_degrades_through_the_sustained_figure() {
    let p = Policy::default();
    let (mut eng, mut sim) = settled(&p);
    let loss = |sim: &Sim| sim.input.nodes["node-3"].conditions[&p.family_condition(Family::PacketLoss)].clone();
    let rounds = 4 * p.degrade_windows as usize;
    sim.light_loss.insert(3);
    // Its own detector and its one-window figures alone: not enough, however long.
    sim.run(&mut eng, &set(&[]), rounds);
    assert_eq!(loss(&sim).status, CondStatus::True, "{}", loss(&sim).message);
    // A span too quiet to tell a rate from chance is not judged.
    sim.loss_span_sent = Some(1_500);
    sim.run(&mut eng, &set(&[]), rounds);
    assert_eq!(loss(&sim).status, CondStatus::True, "{}", loss(&sim).message);
    // Counted over 4,000 segments, 0.45 % against peers at 0.05 % is the node.
    sim.loss_span_sent = Some(4_000);
    sim.run(&mut eng, &set(&[]), p.degrade_windows as usize);
    let c = loss(&sim);
    assert_eq!(c.status, CondStatus::False, "{}", c.message);
    assert!(
        c.message
            .contains("sustained loss 0.45 % over 10 windows vs peer median 0.05 %"),
        "{}",
        c.message
    );
    for i in (0..10).filter(|i| *i != 3) {
        assert_eq!(sim.overall(&p, i), Some(CondStatus::True), "node-{i}");
    }
    // The loss stops: its span and detector clear, and so does the condition.
    sim.light_loss.clear();
    sim.run(&mut eng, &set(&[]), rounds);
    assert_eq!(loss(&sim).status, CondStatus::True, "{}", loss(&sim).message);
}

/// An agent's forecast (a pod's working set reaching its limit in 2 minutes) sets the memory
/// condition False with reason `PredictedFailure` and an Event, and nothing else: the overall
/// condition stays True, nothing is tainted, no verdict. Below the policy's confidence or
/// beyond its horizon it does not show; a forecast that comes and goes does not flap it; it
/// clears `predict_clear_windows` windows after the forecast goes; a restarted aggregator that
/// finds it on the Node does not take it for a degradation.
#[test]
fn a_prediction_is_advice_on_the_family_condition_only() {
    let p = Policy::default();
    let (mut eng, mut sim) = settled(&p);
    sim.memory_figures = true;
    let memory = |sim: &Sim| sim.input.nodes["node-4"].conditions[&p.family_condition(Family::MemoryPressure)].clone();
    let forecast = |eta_secs: f64, confidence: f64| Prediction {
        eta_secs,
        confidence,
        reason: "shop/cart-0: working set 138 MiB rising 2.00 MiB/s towards its 256 MiB limit".into(),
    };
    sim.predicted.insert(4, forecast(120.0, p.predict_confidence / 2.0));
    sim.run(&mut eng, &set(&[]), 2);
    assert_eq!(memory(&sim).status, CondStatus::True, "below the policy's confidence");
    sim.predicted
        .insert(4, forecast(p.predict_horizon_ms as f64 / 1000.0 + 1.0, 0.99));
    sim.run(&mut eng, &set(&[]), 2);
    assert_eq!(memory(&sim).status, CondStatus::True, "beyond the policy's horizon");

    sim.predicted.insert(4, forecast(120.0, 0.97));
    sim.run(&mut eng, &set(&[]), p.degrade_windows as usize + 3);
    let c = memory(&sim);
    assert_eq!((c.status, c.reason.as_str()), (CondStatus::False, "PredictedFailure"));
    assert!(
        c.message
            .starts_with("predicted failure in 120 s (confidence 0.97): shop/cart-0"),
        "{}",
        c.message
    );
    assert_eq!(sim.count("PredictedFailure"), 1, "one Event on the transition");
    assert_eq!(sim.overall(&p, 4), Some(CondStatus::True));
    let overall = &sim.input.nodes["node-4"].conditions[&p.overall_condition()];
    assert!(
        overall.message.contains("predicted failure: MemoryPressure in 120 s"),
        "{}",
        overall.message
    );
    assert!(sim.tainted().is_empty());
    assert_eq!(sim.count("GrayFailureDetected"), 0);
    assert!(eng.verdicts().is_empty());

    // A new aggregator finds it on the Node: Healthy, nothing inherited, nothing to act on.
    let mut fresh = Engine::new(p.clone());
    let plan = fresh.step(&sim.input);
    assert!(plan.taints.is_empty());
    let st = fresh.node_state("node-4").expect("state");
    assert_eq!(st.families[&Family::MemoryPressure].phase, Phase::Healthy);
    assert_eq!(st.suppressed, None);

    // A forecast that comes and goes (at the edge of the agent's confidence floor) does not
    // flap the condition.
    for _ in 0..6 {
        sim.predicted.clear();
        sim.run(&mut eng, &set(&[]), 1);
        sim.predicted.insert(4, forecast(110.0, 0.97));
        sim.run(&mut eng, &set(&[]), 1);
    }
    assert_eq!(memory(&sim).reason, "PredictedFailure");
    assert_eq!(sim.count("PredictedFailure"), 1);
    assert_eq!(sim.count("PredictedFailureCleared"), 0);

    // Gone for good (the trend reversed): cleared after predict_clear_windows windows.
    sim.predicted.clear();
    sim.run(&mut eng, &set(&[]), p.predict_clear_windows as usize - 1);
    assert_eq!(memory(&sim).reason, "PredictedFailure");
    sim.run(&mut eng, &set(&[]), 1);
    let c = memory(&sim);
    assert_eq!((c.status, c.reason.as_str()), (CondStatus::True, "Healthy"));
    assert_eq!(sim.count("PredictedFailureCleared"), 1);
}

/// A real degradation takes precedence over a prediction: the family shows `GrayFailure`.
#[test]
fn a_degradation_takes_precedence_over_a_prediction() {
    let p = Policy::default();
    let (mut eng, mut sim) = settled(&p);
    sim.predicted.insert(
        3,
        Prediction {
            eta_secs: 60.0,
            confidence: 0.99,
            reason: "leak".into(),
        },
    );
    sim.memory_figures = true;
    sim.run(&mut eng, &set(&[]), 1);
    let memory = p.family_condition(Family::MemoryPressure);
    assert_eq!(sim.input.nodes["node-3"].conditions[&memory].reason, "PredictedFailure");
    let st = eng.node_state("node-3").expect("state");
    let mut degraded = st.families[&Family::MemoryPressure].clone();
    degraded.phase = Phase::Degraded;
    assert_eq!(crate::core::prediction::in_force(&degraded, &p), None);
    degraded.phase = Phase::Recovering;
    assert_eq!(crate::core::prediction::in_force(&degraded, &p), None);
    degraded.phase = Phase::Unknown;
    degraded.unknown_reason = UnknownReason::AgentStale;
    assert_eq!(
        crate::core::prediction::in_force(&degraded, &p),
        None,
        "a stale agent's forecast"
    );
    // Off by policy: never shown.
    let off = Policy {
        predict_failures: false,
        ..p.clone()
    };
    let (mut eng, mut sim) = settled(&off);
    sim.predicted = BTreeMap::from([(
        3,
        Prediction {
            eta_secs: 60.0,
            confidence: 0.99,
            reason: "leak".into(),
        },
    )]);
    sim.run(&mut eng, &set(&[]), 2);
    assert_ne!(sim.input.nodes["node-3"].conditions[&memory].reason, "PredictedFailure");
}

#[test]
fn one_slow_node_is_flagged_tainted_and_released_after_hysteresis() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[]), 3);
    assert!((0..10).all(|i| sim.overall(&p, i) == Some(CondStatus::True)));
    assert!(sim.events.is_empty(), "{:?}", sim.events);

    // Suspect first, Degraded only after degrade_windows bad windows.
    sim.run(&mut eng, &set(&[3]), p.degrade_windows as usize - 1);
    assert_eq!(sim.overall(&p, 3), Some(CondStatus::True));
    assert!(sim.tainted().is_empty());
    sim.run(&mut eng, &set(&[3]), 1);
    assert_eq!(sim.overall(&p, 3), Some(CondStatus::False));
    let nl = &sim.input.nodes["node-3"].conditions[&p.family_condition(Family::NetworkLatency)];
    assert_eq!(nl.status, CondStatus::False);
    assert!(nl.message.contains("peers see it degraded"), "{}", nl.message);
    assert_eq!(
        sim.input.nodes["node-3"].conditions[&p.family_condition(Family::CpuSteal)].status,
        CondStatus::True
    );
    assert_eq!(sim.tainted(), BTreeSet::from(["node-3".to_string()]));
    assert_eq!(sim.count("GrayFailureDetected"), 1);
    assert_eq!(sim.count("GrayFailureTaint"), 1);
    for i in (0..10).filter(|i| *i != 3) {
        assert_eq!(sim.overall(&p, i), Some(CondStatus::True), "node-{i}");
    }
    // Staying bad repeats nothing.
    sim.run(&mut eng, &set(&[3]), 5);
    assert_eq!(sim.count("GrayFailureTaint"), 1);
    assert!(eng.verdicts().is_empty());

    // Recovery: Recovering (still False, still tainted) until recover_windows good windows.
    sim.run(&mut eng, &set(&[]), p.recover_windows as usize - 1);
    assert_eq!(sim.overall(&p, 3), Some(CondStatus::False));
    assert_eq!(sim.tainted().len(), 1);
    sim.run(&mut eng, &set(&[]), 1);
    assert_eq!(sim.overall(&p, 3), Some(CondStatus::True));
    assert!(sim.tainted().is_empty());
    assert_eq!(sim.count("GrayFailureUntaint"), 1);
    assert_eq!(sim.count("GrayFailureCleared"), 1);
}

/// A zone-wide fault whose nodes cross into Degraded a window apart: the first is not tainted
/// while most of its zone is unhealthy (Suspect counts), and the zone gets its verdict instead.
/// A single degraded node in a healthy zone is still tainted.
#[test]
fn the_first_node_of_a_zone_wide_fault_waits_for_the_zone_verdict() {
    let p = Policy::default();
    let (mut eng, mut sim) = settled(&p);
    sim.run(&mut eng, &set(&[0]), 1);
    let plans = sim.run(&mut eng, &set(&[0, 1, 2]), 8);
    assert!(eng.verdicts().contains(&(ZONE.to_string(), "zone-a".to_string())));
    assert!(sim.tainted().is_empty(), "tainted {:?}", sim.tainted());
    let held: Vec<&str> = plans
        .iter()
        .flat_map(|plan| &plan.events)
        .filter(|e| e.target == EventTarget::Node("node-0".into()) && e.reason == "ActionSuppressed")
        .map(|e| e.note.as_str())
        .collect();
    assert!(
        held.first()
            .is_some_and(|note| note.contains("waiting to see whether the group as a whole gets a verdict")),
        "{held:?}"
    );
    // After recovery, one node alone in its zone is acted on.
    sim.run(&mut eng, &set(&[]), 10);
    assert!(eng.verdicts().is_empty());
    sim.run(&mut eng, &set(&[3]), p.degrade_windows as usize + 1);
    assert_eq!(sim.tainted(), BTreeSet::from(["node-3".to_string()]));
}

#[test]
fn zone_wide_degradation_is_one_verdict_and_restores_pool_exactly() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    let original = sim.input.pools["default"].requirements.clone();
    sim.run(&mut eng, &set(&[]), 2);
    sim.run(&mut eng, &set(&[0, 1, 2]), 8);
    assert!(eng.verdicts().contains(&(ZONE.to_string(), "zone-a".to_string())));
    let zone_a_tainted = sim.tainted().len();
    assert!(
        zone_a_tainted <= blast_allowance(p.blast_radius, 5),
        "tainted {zone_a_tainted}"
    );
    let original_budgets = serde_json::json!([{"nodes": "10%"}]);
    let pool = &sim.input.pools["default"];
    let snap = pool.snapshot.as_ref().expect("snapshot saved");
    assert_eq!(snap.excluded, vec![(ZONE.to_string(), "zone-a".to_string())]);
    // The drift budget: one NodeClaim at a time (within 20% of the pool's 10 nodes).
    let budget = serde_json::json!({"nodes": "1", "reasons": ["Drifted"]});
    assert_eq!(snap.added.budgets, vec![budget.clone()]);
    assert_eq!(pool.budgets, serde_json::json!([{"nodes": "10%"}, budget]));
    let reqs = pool.requirements.as_array().expect("array");
    assert!(
        reqs.iter()
            .any(|r| r["key"] == ZONE && r["operator"] == "NotIn" && r["values"][0] == "zone-a")
    );
    assert_eq!(sim.count("NodePoolExcluded"), 1);
    // Conditions still tell the truth per node.
    for i in 0..3 {
        assert_eq!(sim.overall(&p, i), Some(CondStatus::False));
    }
    // Recovery.
    sim.run(&mut eng, &set(&[]), 10);
    assert!(eng.verdicts().is_empty());
    assert_eq!(sim.input.pools["default"].requirements, original);
    assert_eq!(sim.input.pools["default"].budgets, original_budgets);
    assert!(sim.input.pools["default"].snapshot.is_none());
    assert_eq!(sim.count("NodePoolRestored"), 1);
    assert!(sim.tainted().is_empty());
}

#[test]
fn stale_agent_goes_unknown_never_false() {
    let p = Policy {
        stale_after_ms: 3000,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(6, 6);
    sim.run(&mut eng, &set(&[]), 2);
    for _ in 0..6 {
        sim.round(&set(&[]), |i| i != 4);
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
        assert_ne!(sim.overall(&p, 4), Some(CondStatus::False));
    }
    let c = &sim.input.nodes["node-4"].conditions;
    assert_eq!(c[&p.overall_condition()].status, CondStatus::Unknown);
    assert_eq!(c[&p.overall_condition()].reason, "AgentStale");
    assert!(
        Family::ALL
            .iter()
            .all(|f| c[&p.family_condition(*f)].status == CondStatus::Unknown)
    );
}

/// Marks node `i`'s latest report as followed by its agent's stop notice, received now.
fn stop_notice(sim: &mut Sim, i: usize) {
    let now = sim.input.now_ms;
    let report = sim.input.reports.get_mut(&format!("node-{i}")).expect("node reported");
    std::sync::Arc::make_mut(report).stopped_ms = Some(now);
}

/// An agent that stops on purpose (a rollout) says so: its node's conditions hold for
/// `restart_grace_ms`, past `stale_after_ms`, and its successor takes over from there. The same
/// silence without a notice is `AgentStale` after `stale_after_ms`; a successor that never comes
/// is `AgentStopped` after the grace. Before the notice, a rollout slower than `stale_after_ms`
/// (a kubelet that deleted the old pod a minute late) made the node Unknown.
#[test]
fn a_stopping_agent_holds_its_conditions_until_its_successor_reports() {
    let p = Policy {
        stale_after_ms: 3000,
        restart_grace_ms: 10_000,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(6, 6);
    sim.run(&mut eng, &set(&[]), 4);
    assert_eq!(sim.overall(&p, 4), Some(CondStatus::True));
    stop_notice(&mut sim, 4);
    // 8 s without node-4 (stopped on purpose) and node-5 (silent): past the stale timeout,
    // inside the grace.
    for _ in 0..8 {
        sim.round(&set(&[]), |i| i < 4);
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
        assert_eq!(sim.overall(&p, 4), Some(CondStatus::True), "held");
    }
    let reason = |sim: &Sim, i: usize| {
        sim.input.nodes[&format!("node-{i}")].conditions[&p.overall_condition()]
            .reason
            .clone()
    };
    assert_eq!(sim.overall(&p, 5), Some(CondStatus::Unknown));
    assert_eq!(reason(&sim, 5), "AgentStale");
    // The successor: a later incarnation, its seq from 1 again, the same node's windows.
    let successor_round = |sim: &mut Sim, eng: &mut Engine, bad: &BTreeSet<usize>, seq: u64| {
        sim.round(bad, |i| i != 5);
        let report = std::sync::Arc::make_mut(sim.input.reports.get_mut("node-4").expect("reported"));
        report.agent_started_ns = 2;
        report.seq = seq;
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
    };
    for seq in 1..=3 {
        successor_round(&mut sim, &mut eng, &set(&[]), seq);
        assert_eq!(sim.overall(&p, 4), Some(CondStatus::True));
    }
    // The successor's own windows are taken in: a fault on it degrades it as usual.
    sim.local_bad = true;
    for seq in 4..=8 {
        successor_round(&mut sim, &mut eng, &set(&[4]), seq);
    }
    assert_eq!(
        sim.overall(&p, 4),
        Some(CondStatus::False),
        "the successor's windows count"
    );
    // It stops too, and nothing follows: Unknown once the grace has passed, saying why.
    stop_notice(&mut sim, 4);
    let stopped = sim.input.now_ms;
    while sim.input.now_ms - stopped <= p.restart_grace_ms {
        assert_ne!(sim.overall(&p, 4), Some(CondStatus::Unknown), "held within the grace");
        sim.round(&set(&[]), |i| i < 4);
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
    }
    assert_eq!(sim.overall(&p, 4), Some(CondStatus::Unknown));
    assert_eq!(reason(&sim, 4), "AgentStopped");
    let family = &sim.input.nodes["node-4"].conditions[&p.family_condition(Family::NetworkLatency)];
    assert_eq!(family.reason, "AgentStopped");
    assert!(family.message.contains("within 10 s"), "{}", family.message);
}

/// With `restart_grace_ms` 0, a stop notice holds nothing: Unknown after `stale_after_ms`.
#[test]
fn a_zero_restart_grace_holds_nothing() {
    let p = Policy {
        stale_after_ms: 3000,
        restart_grace_ms: 0,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(6, 6);
    sim.run(&mut eng, &set(&[]), 4);
    stop_notice(&mut sim, 4);
    for _ in 0..4 {
        sim.round(&set(&[]), |i| i != 4);
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
    }
    assert_eq!(sim.overall(&p, 4), Some(CondStatus::Unknown));
}

#[test]
fn restart_reads_existing_state_and_does_not_repeat_actions() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[7]), 6);
    assert_eq!(sim.count("GrayFailureTaint"), 1);
    // A new engine (restart / new leader) sees the same cluster.
    let mut eng2 = Engine::new(p.clone());
    let plans = sim.run(&mut eng2, &set(&[7]), 4);
    assert_eq!(sim.count("GrayFailureTaint"), 1);
    assert_eq!(sim.count("GrayFailureDetected"), 1);
    assert!(plans.iter().all(|pl| pl.taints.is_empty()));
    assert_eq!(sim.overall(&p, 7), Some(CondStatus::False));
    // It still recovers the node.
    sim.run(&mut eng2, &set(&[]), 4);
    assert!(sim.tainted().is_empty());
}

#[test]
fn dry_run_writes_nothing_but_events() {
    let p = Policy {
        dry_run: true,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    let plans = sim.run(&mut eng, &set(&[2]), 6);
    assert!(plans.iter().all(|pl| !pl.writes()));
    assert_eq!(sim.count("DryRunGrayFailureTaint"), 1);
    assert_eq!(sim.count("DryRunGrayFailureDetected"), 1);
    assert!(sim.events.iter().all(|(_, r)| r.starts_with("DryRun")));
    let plans = sim.run(&mut eng, &set(&[0, 1, 2]), 8);
    assert!(plans.iter().all(|pl| !pl.writes()));
    assert_eq!(sim.count("DryRunNodePoolExcluded"), 1);
}

#[test]
fn breaker_blocks_actions_when_most_of_the_fleet_degrades() {
    // Fleet-wide slowness is no gray failure: peer and vantage evidence see nothing odd.
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[0, 1, 2, 3, 5, 6, 7, 8]), 8);
    assert!(sim.tainted().is_empty());
    // If the local detectors alone are trusted enough to degrade most of the fleet, the breaker
    // opens and nothing disruptive happens.
    let p = Policy {
        weight_local: 1.0,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.local_bad = true;
    let plans = sim.run(&mut eng, &set(&[0, 1, 2, 3, 5, 6, 7, 8]), 8);
    assert!(plans.last().is_some_and(|pl| pl.breaker_open));
    assert_eq!(sim.overall(&p, 0), Some(CondStatus::False));
    assert!(sim.tainted().is_empty());
    assert_eq!(sim.count("NodePoolExcluded"), 0);
}

#[test]
fn breaker_opens_on_actuator_failures() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.input.actuator_failures = p.breaker_failures;
    let plans = sim.run(&mut eng, &set(&[3]), 6);
    assert!(plans.iter().all(|pl| pl.breaker_open));
    assert!(sim.tainted().is_empty());
    sim.input.actuator_failures = 0;
    sim.run(&mut eng, &set(&[3]), 1);
    assert_eq!(sim.tainted().len(), 1);
}

#[test]
fn nrc_mode_writes_conditions_but_no_taints() {
    let p = Policy {
        taint_mode: TaintMode::Nrc,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[3]), 5);
    assert_eq!(sim.overall(&p, 3), Some(CondStatus::False));
    assert!(sim.tainted().is_empty());
}

#[test]
fn eks_mirror_condition_follows_network_families() {
    let p = Policy {
        mirror_eks: true,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[3]), 5);
    assert_eq!(
        sim.input.nodes["node-3"].conditions["NetworkingReady"].status,
        CondStatus::False
    );
    // Healthy: we add evidence to node repair, we do not vouch for a node.
    assert!(!sim.input.nodes["node-4"].conditions.contains_key("NetworkingReady"));
}

#[test]
fn rate_limit_caps_new_taints() {
    // 40 nodes, 4 zones; 4 slow nodes in different zones, rate limit 2.
    let p = Policy {
        rate_limit: 2,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(40, 10);
    sim.run(&mut eng, &set(&[1, 11, 21, 31]), 6);
    assert_eq!(sim.tainted().len(), 2);
    assert!(sim.count("ActionSuppressed") >= 2);
}

#[test]
fn unchanged_conditions_are_rewritten_at_most_once_per_refresh_period() {
    let p = Policy {
        condition_refresh_ms: 10_000,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(6, 6);
    let plans = sim.run(&mut eng, &set(&[]), 25);
    // 1 s per round: first write, then at most one per 10 s.
    let times = write_times(&plans, 1_000, "node-0");
    assert!(times.len() >= 2, "{times:?}");
    assert!(times.windows(2).all(|w| w[1] - w[0] >= 10_000), "{times:?}");
}

/// The steps (in ms) at which `node` got a condition write.
fn write_times(plans: &[Plan], first_ms: i64, node: &str) -> Vec<i64> {
    (first_ms..)
        .step_by(1000)
        .zip(plans)
        .filter(|(_, pl)| pl.conditions.iter().any(|w| w.node == node))
        .map(|(t, _)| t)
        .collect()
}

/// Issue 18 point 2: an idle fleet costs at most one Node status write per node per 5 minutes
/// (the kubelet's `nodeStatusReportFrequency`), and nothing else: no Event, no taint.
#[test]
fn an_idle_node_is_written_once_per_five_minutes_by_default() {
    let p = Policy::default();
    assert_eq!(p.condition_refresh_ms, 300_000);
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(6, 6);
    // 30 minutes at 1 s.
    let plans = sim.run(&mut eng, &set(&[]), 1_800);
    let mut first_refreshes = BTreeSet::new();
    for i in 0..6 {
        let node = format!("node-{i}");
        let times = write_times(&plans, 1_000, &node);
        let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(times[0], 1_000, "{node}: first sight");
        // The first refresh at the node's phase (4.5 to 9.5 min), then every 5 min exactly.
        assert!((270_000..570_000).contains(&gaps[0]), "{node}: {times:?}");
        assert!(gaps[1..].iter().all(|g| *g == 300_000), "{node}: {times:?}");
        assert!(times.len() >= 5, "{node}: {times:?}");
        first_refreshes.insert(times[1]);
    }
    assert!(
        first_refreshes.len() > 1,
        "nodes written together are refreshed at their own phases, not in one burst"
    );
    assert!(plans.iter().all(|pl| pl.events.is_empty() && pl.taints.is_empty()));
    assert!(
        plans
            .iter()
            .all(|pl| pl.pools.is_empty() && pl.claim_deletions.is_empty())
    );
}

/// Someone else changes one of our conditions: put back once the watch had time to show our own
/// last write, not at the next refresh, and not again while the watch may still lag.
#[test]
fn a_condition_changed_by_someone_else_is_put_back_before_the_refresh() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(6, 6);
    sim.run(&mut eng, &set(&[]), 60);
    let tamper = |sim: &mut Sim| {
        let c = sim
            .input
            .nodes
            .get_mut("node-2")
            .and_then(|v| v.conditions.get_mut(&p.overall_condition()))
            .expect("our condition");
        c.status = CondStatus::False;
        c.reason = "Tampered".into();
    };
    tamper(&mut sim);
    // Step at 61 s: our last write (1 s) is older than the watch's grace.
    let plans = sim.run(&mut eng, &set(&[]), 1);
    assert_eq!(write_times(&plans, 61_000, "node-2"), [61_000]);
    assert_eq!(sim.overall(&p, 2), Some(CondStatus::True), "put back");
    assert_eq!(plans[0].conditions.len(), 1, "the other nodes wait for their refresh");
    assert!(plans[0].events.is_empty(), "our own status did not change: no Event");
    // The watch still shows the tampered condition (it lags our write): wait for the grace.
    tamper(&mut sim);
    let mut steps = Vec::new();
    for _ in 0..40 {
        sim.round(&set(&[]), |_| true);
        let plan = eng.step(&sim.input);
        if !plan.conditions.is_empty() {
            sim.apply(&plan);
        }
        steps.push(plan);
    }
    assert_eq!(write_times(&steps, 62_000, "node-2"), [91_000]);
    // Removed altogether: put back as well.
    sim.input
        .nodes
        .get_mut("node-2")
        .expect("node")
        .conditions
        .remove(&p.overall_condition());
    let plans = sim.run(&mut eng, &set(&[]), 31);
    assert_eq!(write_times(&plans, 102_000, "node-2"), [121_000]);
}

/// Dry-run writes no conditions, so the Node never shows them: not a reason to write (or to
/// plan anything) each step.
#[test]
fn dry_run_never_sees_its_conditions_and_does_not_repair_them() {
    let p = Policy {
        dry_run: true,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(6, 6);
    let plans = sim.run(&mut eng, &set(&[]), 120);
    assert!(plans.iter().all(|pl| pl.conditions.is_empty() && pl.events.is_empty()));
    assert_eq!(eng.node_state("node-0").and_then(|s| s.last_write_ms), Some(1_000));
}

#[test]
fn policy_validation_names_the_field() {
    let bad = Policy {
        blast_radius: 0.5,
        ..Policy::default()
    };
    assert_eq!(bad.validate().map_err(|e| e.field), Err("blast_radius"));
    let bad = Policy {
        recover_confidence: 0.9,
        ..Policy::default()
    };
    assert_eq!(bad.validate().map_err(|e| e.field), Err("recover_confidence"));
    let bad = Policy {
        condition_refresh_ms: 0,
        ..Policy::default()
    };
    assert_eq!(bad.validate().map_err(|e| e.field), Err("condition_refresh_ms"));
    let bad = Policy {
        predict_confidence: 1.2,
        ..Policy::default()
    };
    assert_eq!(bad.validate().map_err(|e| e.field), Err("predict_confidence"));
    let bad = Policy {
        predict_horizon_ms: 0,
        ..Policy::default()
    };
    assert_eq!(bad.validate().map_err(|e| e.field), Err("predict_horizon_ms"));
    let bad = Policy {
        predict_clear_windows: 0,
        ..Policy::default()
    };
    assert_eq!(bad.validate().map_err(|e| e.field), Err("predict_clear_windows"));
    let bad = Policy {
        degrade_windows: 5,
        peer_only_degrade_windows: 4,
        ..Policy::default()
    };
    assert_eq!(bad.validate().map_err(|e| e.field), Err("peer_only_degrade_windows"));
    assert!(Policy::default().validate().is_ok());
}

/// `liars` report `victim` at 20 ms with 10% retransmits; with `low_base` they also report
/// everyone else at 10 µs (dragging the fleet baseline down so honest observers abstain). With
/// `sparse` no honest node exchanges traffic with the victim (its own report lists no node).
fn lie(sim: &mut Sim, liars: &BTreeSet<usize>, victim: usize, low_base: bool, sparse: bool) {
    if sparse {
        for (name, r) in &mut sim.input.reports {
            let r = std::sync::Arc::make_mut(r);
            if *name == format!("node-{victim}") {
                r.peers.clear();
            } else {
                r.peers.retain(|p| p.addr != ip(victim));
            }
        }
        for l in liars {
            if let Some(r) = sim
                .input
                .reports
                .get_mut(&format!("node-{l}"))
                .map(std::sync::Arc::make_mut)
            {
                r.peers.push(PeerObservation {
                    addr: ip(victim),
                    rtt_samples: 50,
                    rtt_p99_us: 300.0,
                    segments_out: 1000,
                    retransmits: 0,
                    unanswered_connects: 0,
                });
            }
        }
    }
    for l in liars {
        let Some(r) = sim
            .input
            .reports
            .get_mut(&format!("node-{l}"))
            .map(std::sync::Arc::make_mut)
        else {
            continue;
        };
        for peer in &mut r.peers {
            if peer.addr == ip(victim) {
                peer.rtt_p99_us = 20_000.0;
                peer.retransmits = 100;
            } else if low_base {
                peer.rtt_p99_us = 10.0;
                peer.retransmits = 0;
            }
        }
    }
}

/// Runs `rounds` rounds with `liars` lying about `victim`; returns the worst overall status the
/// victim ever had and whether it was ever tainted.
#[allow(clippy::too_many_arguments, reason = "one knob per dimension of the liars proptest")]
fn run_with_liars(
    sim: &mut Sim,
    eng: &mut Engine,
    p: &Policy,
    liars: &BTreeSet<usize>,
    victim: usize,
    low_base: bool,
    sparse: bool,
    rounds: usize,
) -> (bool, bool) {
    let mut ever_false = false;
    let mut ever_tainted = false;
    for _ in 0..rounds {
        sim.round(&BTreeSet::new(), |_| true);
        lie(sim, liars, victim, low_base, sparse);
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
        ever_false |= sim.overall(p, victim) == Some(CondStatus::False)
            || sim.input.nodes[&format!("node-{victim}")]
                .conditions
                .values()
                .any(|c| c.status == CondStatus::False);
        ever_tainted |= sim.tainted().contains(&format!("node-{victim}"));
    }
    (ever_false, ever_tainted)
}

#[test]
fn three_liars_about_a_healthy_node_raise_suspect_and_an_event_only() {
    for mode in [TaintMode::Direct, TaintMode::Nrc] {
        let p = Policy {
            taint_mode: mode,
            mirror_eks: true,
            ..Policy::default()
        };
        let mut eng = Engine::new(p.clone());
        let mut sim = Sim::new(10, 5);
        sim.run(&mut eng, &set(&[]), 3);
        let liars = set(&[0, 1, 2]);
        let (ever_false, ever_tainted) = run_with_liars(&mut sim, &mut eng, &p, &liars, 9, false, true, 12);
        assert!(!ever_false, "{mode:?}: liars made node-9 False");
        assert!(!ever_tainted, "{mode:?}: liars got node-9 tainted");
        let nl = &sim.input.nodes["node-9"].conditions[&p.family_condition(Family::NetworkLatency)];
        assert_eq!(
            (nl.status, nl.reason.as_str()),
            (CondStatus::True, "Suspect"),
            "{mode:?}"
        );
        assert!(nl.message.contains("not corroborated"), "{}", nl.message);
        let st = eng.node_state("node-9").expect("victim state");
        assert_eq!(
            st.families[&Family::NetworkLatency].uncorroborated,
            ["node-0", "node-1", "node-2"]
        );
        // One Event per family naming the observers, not one per window.
        assert_eq!(sim.count("UncorroboratedVantage"), 2, "{mode:?}: {:?}", sim.events);
        assert!(eng.verdicts().is_empty());
        assert!(sim.input.pools["default"].snapshot.is_none());
    }
}

#[test]
fn three_liars_cannot_exclude_a_zone_through_suspects() {
    // Liars accuse three of zone-b's five nodes (a verdict's fraction): Suspect at most, which
    // counts towards no group verdict.
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[]), 3);
    let liars = set(&[0, 1, 2]);
    for _ in 0..10 {
        sim.round(&BTreeSet::new(), |_| true);
        for v in 5..8 {
            lie(&mut sim, &liars, v, false, true);
        }
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
    }
    assert!(eng.verdicts().is_empty(), "{:?}", eng.verdicts());
    assert!(sim.input.pools["default"].snapshot.is_none());
    assert!(sim.tainted().is_empty());
    assert_eq!(sim.count("UncorroboratedVantage"), 6, "{:?}", sim.events);
}

#[test]
fn corroborated_vantage_still_degrades() {
    // The node's own figures agree with its observers: tainted as before.
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[]), 3);
    sim.run(&mut eng, &set(&[4]), 4);
    assert_eq!(sim.overall(&p, 4), Some(CondStatus::False));
    assert_eq!(sim.tainted(), BTreeSet::from(["node-4".to_string()]));
    assert_eq!(sim.count("UncorroboratedVantage"), 0);
}

/// node-1 ↔ node-2 broken (each end sees only the other slow and lossy, its own detector fires,
/// every other node sees both fine): neither end is False or tainted, each is Suspect with the
/// link named, and each gets one `LinkDegraded` Event per network family, not one per window.
#[test]
fn a_broken_link_acts_on_neither_end() {
    for mode in [TaintMode::Direct, TaintMode::Nrc] {
        let p = Policy {
            taint_mode: mode,
            ..Policy::default()
        };
        let mut eng = Engine::new(p.clone());
        let mut sim = Sim::new(10, 5);
        sim.run(&mut eng, &set(&[]), 3);
        for _ in 0..8 {
            sim.round(&BTreeSet::new(), |_| true);
            break_link(&mut sim, 1, 2);
            let plan = eng.step(&sim.input);
            sim.apply(&plan);
            for end in [1, 2] {
                assert_ne!(sim.overall(&p, end), Some(CondStatus::False), "{mode:?}: node-{end}");
            }
            assert!(sim.tainted().is_empty(), "{mode:?}: {:?}", sim.tainted());
        }
        for (end, other) in [(1, 2), (2, 1)] {
            let nl = &sim.input.nodes[&format!("node-{end}")].conditions[&p.family_condition(Family::NetworkLatency)];
            assert_eq!(
                (nl.status, nl.reason.as_str()),
                (CondStatus::True, "Suspect"),
                "{mode:?}"
            );
            assert!(
                nl.message.contains(&format!("explained by its link to node-{other}")),
                "{}",
                nl.message
            );
        }
        assert_eq!(sim.count("LinkDegraded"), 4, "{mode:?}: {:?}", sim.events);
        let plan = eng.step(&sim.input);
        assert_eq!(plan.degraded_links, [("node-1".to_string(), "node-2".to_string())]);
        assert!(eng.verdicts().is_empty());
    }
}

/// Breaks the link between `end` and `other` in this round's reports (both directions), with
/// both ends' detectors firing.
fn break_link(sim: &mut Sim, a: usize, b: usize) {
    for (end, other) in [(a, b), (b, a)] {
        let r = sim
            .input
            .reports
            .get_mut(&format!("node-{end}"))
            .map(std::sync::Arc::make_mut)
            .expect("report");
        for peer in r.peers.iter_mut().filter(|peer| peer.addr == ip(other)) {
            peer.rtt_p99_us = 8000.0;
            peer.retransmits = 60;
        }
        r.figures.insert(Family::NetworkLatency, 8000.0);
        r.figures.insert(Family::PacketLoss, 6.0);
        r.local = BTreeMap::from([
            (Family::NetworkLatency, (1.0, format!("rtt p99 to node-{other}"))),
            (Family::PacketLoss, (1.0, format!("retransmits to node-{other}"))),
        ]);
    }
}

/// node-1 weakly bad towards everyone: in each window a different one of its links stands out
/// from both ends. That is no broken link (a link is the same peer every window): Degraded.
#[test]
fn a_different_link_every_window_is_the_node() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[]), 3);
    for round in 0..8 {
        sim.round(&BTreeSet::new(), |_| true);
        break_link(&mut sim, 1, 2 + round % 7);
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
    }
    assert_eq!(sim.overall(&p, 1), Some(CondStatus::False));
    assert_eq!(sim.count("LinkDegraded"), 0, "{:?}", sim.events);
}

#[test]
fn a_new_engine_inherits_the_spent_action_budget() {
    // rate_limit 1: one node tainted by the first engine uses the whole budget.
    let p = Policy {
        rate_limit: 1,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[]), 3);
    sim.run(&mut eng, &set(&[1]), 4);
    assert_eq!(sim.tainted(), BTreeSet::from(["node-1".to_string()]));
    let taint_at = sim.input.now_ms - 1000;
    // Failover / restart: a fresh engine, told what was done (as read back from our Events).
    let mut fresh = Engine::new(p.clone());
    sim.input.past_actions = vec![super::model::PastAction {
        at_ms: taint_at,
        node: Some("node-1".into()),
        claim_deletion: false,
    }];
    sim.run(&mut fresh, &set(&[1, 6]), 8);
    assert!(
        !sim.tainted().contains("node-6"),
        "fresh budget granted: {:?}",
        sim.tainted()
    );
    assert!(
        sim.events
            .iter()
            .any(|(t, r)| *t == EventTarget::Node("node-6".into()) && r == "ActionSuppressed"),
        "{:?}",
        sim.events
    );
    // Once the window has passed, the budget is back.
    let mut later = Engine::new(p.clone());
    sim.input.now_ms = taint_at + p.rate_window_ms;
    sim.round = u64::try_from(sim.input.now_ms / 1000).expect("time is after the epoch");
    sim.run(&mut later, &set(&[1, 6]), 8);
    assert!(sim.tainted().contains("node-6"), "{:?}", sim.tainted());
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (1u32..5, 1u32..5, 0.05f64..=0.2).prop_map(|(d, r, b)| Policy {
        degrade_windows: d,
        recover_windows: r,
        blast_radius: b,
        ..Policy::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the refresh period (from 10 ticks), an unchanged node is written at its first
    /// step, then at its phase of the period (0.9 to 1.9 periods later, up to a tick), then once
    /// per period exactly.
    #[test]
    fn unchanged_nodes_are_written_once_per_refresh_period(refresh_s in 10i64..200, rounds in 1usize..700) {
        let refresh = refresh_s * 1000;
        let p = Policy { condition_refresh_ms: refresh, ..Policy::default() };
        let mut eng = Engine::new(p);
        let mut sim = Sim::new(4, 4);
        let plans = sim.run(&mut eng, &set(&[]), rounds);
        let end = i64::try_from(rounds).expect("rounds < 700") * 1000;
        for i in 0..4 {
            let times = write_times(&plans, 1_000, &format!("node-{i}"));
            prop_assert_eq!(times[0], 1_000);
            let last = *times.last().expect("a write");
            prop_assert!(end - last < 2 * refresh, "{:?}", times);
            for (k, w) in times.windows(2).enumerate() {
                let gap = w[1] - w[0];
                if k == 0 {
                    // Written at the first step (1 s apart) at or after the phase point.
                    prop_assert!(gap >= refresh - refresh / 10 && gap < 2 * refresh - refresh / 10 + 1_000, "{:?}", times);
                } else {
                    prop_assert_eq!(gap, refresh);
                }
            }
        }
    }

    /// A node's refresh is due 0.9 to 1.9 periods after its last write, at its phase.
    #[test]
    fn refresh_is_due_within_one_to_two_periods(name in "[a-z0-9.-]{1,40}", last in 0i64..1 << 45, refresh in 1i64..1 << 30) {
        let due = super::conditions::refresh_due_at(&name, last, refresh);
        let earliest = last + refresh - refresh / 10;
        prop_assert!(due >= earliest && due < earliest + refresh);
        // The same phase whatever the last write.
        prop_assert_eq!((due - super::conditions::refresh_due_at(&name, 0, refresh)).rem_euclid(refresh), 0);
    }

    /// Degraded needs `degrade_windows` consecutive bad windows; Healthy after Degraded needs
    /// `recover_windows` consecutive good ones.
    #[test]
    fn state_machine_hysteresis(p in arb_policy(), confs in proptest::collection::vec(0.0f64..=1.0, 1..60)) {
        let mut st = FamilyState::new(Phase::Healthy);
        let mut bad_run = 0u32;
        let mut good_run = 0u32;
        for c in confs {
            let before = st.phase;
            advance(&mut st, c, true, &p);
            if c >= p.degrade_confidence { bad_run += 1; good_run = 0; } else if c < p.recover_confidence { good_run += 1; bad_run = 0; } else { bad_run = 0; }
            if st.phase == Phase::Degraded && !matches!(before, Phase::Degraded | Phase::Recovering) {
                prop_assert!(bad_run >= p.degrade_windows);
            }
            if st.phase == Phase::Healthy && matches!(before, Phase::Degraded | Phase::Recovering) {
                prop_assert!(good_run >= p.recover_windows);
            }
        }
    }

    /// Whatever degrades, direct taints never exceed the blast radius of any zone or the pool,
    /// and a node without fresh data is never False.
    #[test]
    fn guardrails_hold_on_random_fleets(
        p in arb_policy(),
        bad in proptest::collection::btree_set(0usize..20, 0..10),
        silent in proptest::collection::btree_set(0usize..20, 0..4),
        rounds in 4usize..10,
    ) {
        let p = Policy { stale_after_ms: 2500, ..p };
        let mut eng = Engine::new(p.clone());
        let mut sim = Sim::new(20, 5);
        sim.run(&mut eng, &BTreeSet::new(), 2);
        for _ in 0..rounds {
            sim.round(&bad, |i| !silent.contains(&i));
            let plan = eng.step(&sim.input);
            sim.apply(&plan);
            let tainted = sim.tainted();
            for z in ["zone-a", "zone-b", "zone-c", "zone-d"] {
                let in_zone = tainted.iter().filter(|n| sim.input.nodes[*n].labels[ZONE] == z).count();
                prop_assert!(in_zone <= blast_allowance(p.blast_radius, 5), "zone {} has {} tainted", z, in_zone);
            }
            prop_assert!(tainted.len() <= blast_allowance(p.blast_radius, 20));
        }
        for i in &silent {
            // Silent for >= 3 rounds at 1 s per round with a 2.5 s stale timeout.
            if rounds >= 3 {
                prop_assert_eq!(sim.overall(&p, *i), Some(CondStatus::Unknown));
            }
            prop_assert_ne!(sim.overall(&p, *i), Some(CondStatus::False));
        }
        let _ = overall_phase;
    }

    /// The bound: with k liars among a healthy node's h = 19 - k honest traffic partners, no
    /// k <= 9 (k <= h) makes it False or tainted, whether or not the liars also drag the fleet
    /// baseline down to make honest observers abstain; and when no honest node exchanges
    /// traffic with it (`sparse`, its own report lists none), any number of liars changes
    /// nothing.
    #[test]
    fn liars_short_of_a_partner_majority_change_nothing(
        liars in proptest::collection::btree_set(0usize..19, 0..=9),
        low_base in any::<bool>(),
        sparse in any::<bool>(),
        nrc in any::<bool>(),
    ) {
        let p = Policy { taint_mode: if nrc { TaintMode::Nrc } else { TaintMode::Direct }, mirror_eks: nrc, ..Policy::default() };
        let mut eng = Engine::new(p.clone());
        let mut sim = Sim::new(20, 5);
        sim.run(&mut eng, &BTreeSet::new(), 2);
        let (ever_false, ever_tainted) = run_with_liars(&mut sim, &mut eng, &p, &liars, 19, low_base, sparse, 8);
        prop_assert!(!ever_false);
        prop_assert!(!ever_tainted);
        for i in 0..19 {
            prop_assert_ne!(sim.overall(&p, i), Some(CondStatus::False), "node-{}", i);
        }
    }

    /// Pool snapshots restore exactly, whatever the original requirements were.
    #[test]
    fn pool_restore_is_exact(extra in proptest::collection::vec(("[a-z]{1,8}", "[a-z0-9]{1,6}"), 0..4)) {
        let p = Policy::default();
        let mut eng = Engine::new(p.clone());
        let mut sim = Sim::new(10, 5);
        let reqs: Vec<serde_json::Value> = extra.iter().map(|(k, v)| serde_json::json!({"key": format!("example.com/{k}"), "operator": "In", "values": [v]})).collect();
        sim.input.pools.get_mut("default").expect("pool").requirements = serde_json::Value::Array(reqs);
        let original = sim.input.pools["default"].requirements.clone();
        sim.run(&mut eng, &set(&[5, 6, 7]), 8);
        prop_assert!(sim.input.pools["default"].snapshot.is_some());
        prop_assert_ne!(&sim.input.pools["default"].requirements, &original);
        sim.run(&mut eng, &set(&[]), 10);
        prop_assert_eq!(&sim.input.pools["default"].requirements, &original);
    }
}

#[test]
fn instance_type_wide_degradation_excludes_the_type() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(12, 6);
    // Nodes 0..4 are c5.xlarge across both zones, the rest m5.large.
    for i in [0usize, 1, 6, 7] {
        sim.input
            .nodes
            .get_mut(&format!("node-{i}"))
            .expect("node")
            .labels
            .insert("node.kubernetes.io/instance-type".into(), "c5.xlarge".into());
    }
    sim.run(&mut eng, &set(&[0, 1, 6, 7]), 8);
    let it = "node.kubernetes.io/instance-type".to_string();
    assert!(
        eng.verdicts().contains(&(it.clone(), "c5.xlarge".to_string())),
        "{:?}",
        eng.verdicts()
    );
    assert!(
        !eng.verdicts().iter().any(|(l, _)| l == ZONE),
        "not a zone problem: {:?}",
        eng.verdicts()
    );
    let reqs = sim.input.pools["default"]
        .requirements
        .as_array()
        .expect("array")
        .clone();
    assert!(
        reqs.iter()
            .any(|r| r["key"] == it.as_str() && r["operator"] == "NotIn" && r["values"][0] == "c5.xlarge")
    );
}

#[test]
fn lagging_watch_does_not_duplicate_a_taint() {
    let p = Policy::default();
    let (mut eng, mut sim) = settled(&p);
    let mut taints = 0;
    for _ in 0..8 {
        sim.round(&set(&[3]), |_| true);
        let plan = eng.step(&sim.input);
        taints += plan.taints.iter().filter(|t| t.add).count();
        // Apply everything but the taint: the watch has not delivered it yet.
        let mut lagged = plan.clone();
        lagged.taints.clear();
        sim.apply(&lagged);
    }
    assert_eq!(taints, 1);
}

#[test]
fn restart_with_empty_fleet_view_keeps_state_until_stale_timeout() {
    let p = Policy {
        stale_after_ms: 5000,
        ..Policy::default()
    };
    let (_, mut sim) = zone_a_degraded(&p);
    assert!(sim.input.pools["default"].snapshot.is_some());
    let events_before = sim.events.len();
    // Restart: a new engine, and the aggregator has not heard from any agent yet.
    let mut eng2 = Engine::new(p.clone());
    sim.input.reports.clear();
    for _ in 0..3 {
        sim.input.now_ms += 1000;
        let plan = eng2.step(&sim.input);
        assert!(
            plan.pools.is_empty(),
            "no NodePool restore on restart: {:?}",
            plan.pools
        );
        assert!(plan.taints.is_empty());
        assert!(
            plan.conditions.is_empty(),
            "no rewrite of what is there: {:?}",
            plan.conditions
        );
        sim.apply(&plan);
    }
    assert_eq!(sim.events.len(), events_before);
    assert_eq!(sim.overall(&p, 0), Some(CondStatus::False));
    // Agents back, still degraded: nothing changes; then recovery restores the pool once.
    sim.run(&mut eng2, &set(&[0, 1, 2]), 3);
    assert!(sim.input.pools["default"].snapshot.is_some());
    sim.run(&mut eng2, &set(&[]), 10);
    assert!(sim.input.pools["default"].snapshot.is_none());
    assert_eq!(sim.count("NodePoolRestored"), 1);
    assert_eq!(sim.count("NodePoolExcluded"), 1);
}

#[test]
fn restart_with_agents_returning_one_by_one_acts_only_on_the_settled_view() {
    let p = Policy::default();
    let (_, mut sim) = zone_a_degraded(&p);
    assert!(sim.input.pools["default"].snapshot.is_some());
    let events_before = sim.events.clone();
    // Restart while zone-a is still degraded; agents reconnect in an unlucky order: zone-a's
    // healthy nodes first (zone-a looks recovered), then its bad nodes (most of what reports is
    // degraded), then everyone.
    let mut eng2 = Engine::new(p.clone());
    sim.input.reports.clear();
    let bad = set(&[0, 1, 2]);
    let waves: [&dyn Fn(usize) -> bool; 3] = [&|i| i == 3 || i == 4, &|i| i < 5, &|_| true];
    let mut plans = Vec::new();
    for wave in waves {
        sim.round(&bad, wave);
        let plan = eng2.step(&sim.input);
        sim.apply(&plan);
        plans.push(plan);
    }
    assert_ne!(
        eng2.settling(),
        Settling::Settled,
        "a window from each node after the view was complete is due"
    );
    plans.extend(sim.run(&mut eng2, &bad, 6));
    assert_eq!(eng2.settling(), Settling::Settled);
    assert!(
        plans.iter().all(|pl| !pl.breaker_open),
        "breaker judged on a partial view"
    );
    assert!(plans.iter().all(|pl| pl.pools.is_empty() && pl.taints.is_empty()));
    assert!(eng2.verdicts().contains(&(ZONE.to_string(), "zone-a".to_string())));
    assert_eq!(sim.events, events_before, "a restart repeats no Event");
    for i in 0..3 {
        assert_eq!(sim.overall(&p, i), Some(CondStatus::False));
    }
}

#[test]
fn fresh_engine_waits_for_silent_nodes_only_until_the_stale_timeout() {
    let p = Policy {
        stale_after_ms: 5000,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    // node-9 never reports: the view never completes, so the engine settles on the timeout.
    let mut settled_at = None;
    for r in 1..=10 {
        sim.round(&set(&[7]), |i| i != 9);
        let plan = eng.step(&sim.input);
        sim.apply(&plan);
        if plan.settled && settled_at.is_none() {
            settled_at = Some(r);
        }
        if !plan.settled {
            assert!(plan.taints.is_empty() && plan.events.iter().all(|e| e.reason != "ActionSuppressed"));
        }
    }
    // Round 1 is the first step (t = 1 s); 5 s later the view is settled.
    assert_eq!(settled_at, Some(6));
    assert_eq!(sim.tainted(), BTreeSet::from(["node-7".to_string()]));
}

// Issue 16 point 4: conditions owned by others.

/// Another field manager's `NetworkingReady` (the EKS node monitoring agent's) is never written
/// by us, healthy or degraded; ours is added only while the network families are not healthy
/// and removed after.
#[test]
fn networking_ready_of_another_manager_is_never_ours() {
    let p = Policy {
        mirror_eks: true,
        ..Policy::default()
    };
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    let theirs = ObservedCondition {
        status: CondStatus::False,
        reason: "NetworkingFault".into(),
        message: "the node's own agent".into(),
        last_transition_ms: 1,
    };
    for i in [2, 3] {
        let v = sim.input.nodes.get_mut(&format!("node-{i}")).expect("node");
        v.conditions.insert("NetworkingReady".into(), theirs.clone());
        v.foreign_conditions.insert("NetworkingReady".into());
    }
    let writes_eks = |plans: &[Plan], node: &str| {
        plans.iter().any(|pl| {
            pl.conditions
                .iter()
                .any(|w| w.node == node && w.conditions.iter().any(|c| c.type_ == "NetworkingReady"))
        })
    };
    // Healthy everywhere: their False stays, and we vouch for no one.
    let plans = sim.run(&mut eng, &set(&[]), 4);
    assert!(!writes_eks(&plans, "node-2"));
    assert_eq!(sim.input.nodes["node-2"].conditions["NetworkingReady"], theirs);
    assert!(!sim.input.nodes["node-4"].conditions.contains_key("NetworkingReady"));
    // Degraded: ours gets our evidence, theirs is left as it is.
    let plans = sim.run(&mut eng, &set(&[3, 4]), 5);
    assert!(!writes_eks(&plans, "node-3"));
    assert_eq!(sim.input.nodes["node-3"].conditions["NetworkingReady"], theirs);
    assert_eq!(sim.overall(&p, 4), Some(CondStatus::False));
    assert_eq!(
        sim.input.nodes["node-4"].conditions["NetworkingReady"].status,
        CondStatus::False
    );
    // Recovered: ours goes, theirs stays.
    sim.run(&mut eng, &set(&[]), 8);
    assert_eq!(sim.overall(&p, 4), Some(CondStatus::True));
    assert!(!sim.input.nodes["node-4"].conditions.contains_key("NetworkingReady"));
    assert_eq!(sim.input.nodes["node-3"].conditions["NetworkingReady"], theirs);
}

/// A restarted engine does not take another manager's `NetworkingReady` for one it wrote.
#[test]
fn a_fresh_engine_does_not_adopt_another_managers_condition() {
    let p = Policy {
        mirror_eks: true,
        ..Policy::default()
    };
    let mut sim = Sim::new(10, 5);
    let v = sim.input.nodes.get_mut("node-1").expect("node");
    v.conditions.insert(
        "NetworkingReady".into(),
        ObservedCondition {
            status: CondStatus::True,
            reason: "NetworkingHealthy".into(),
            message: String::new(),
            last_transition_ms: 1,
        },
    );
    v.foreign_conditions.insert("NetworkingReady".into());
    let mut eng = Engine::new(p);
    sim.run(&mut eng, &set(&[]), 2);
    let st = eng.node_state("node-1").expect("state");
    assert!(!st.written.contains_key("NetworkingReady"), "{:?}", st.written);
}

// Issue 16 point 3: NodePool exclusion guardrails.

/// One bad window on 3 of zone-a's 5 nodes makes them Suspect, not Degraded: no group verdict,
/// no NodePool change.
#[test]
fn one_bad_window_on_most_of_a_zone_excludes_nothing() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.run(&mut eng, &set(&[]), 3);
    assert_eq!(eng.settling(), Settling::Settled);
    let mut plans = sim.run(&mut eng, &set(&[0, 1, 2]), 1);
    assert_eq!(
        eng.node_state("node-0").map(overall_phase),
        Some(Phase::Suspect),
        "the window was bad"
    );
    plans.extend(sim.run(&mut eng, &set(&[]), 5));
    assert!(plans.iter().all(|pl| pl.verdicts.is_empty() && pl.pools.is_empty()));
    assert_eq!(sim.count("NodePoolExcluded"), 0);
    assert!(sim.input.pools["default"].snapshot.is_none());
}

/// Degraded nodes below `min_action_confidence` make no group verdict and no exclusion.
#[test]
fn exclusion_needs_degraded_nodes_with_action_confidence() {
    let p = Policy {
        min_action_confidence: 1.0,
        ..Policy::default()
    };
    let (mut eng, mut sim) = settled(&p);
    let plans = sim.run(&mut eng, &set(&[0, 1, 2]), 8);
    assert_eq!(sim.overall(&p, 0), Some(CondStatus::False), "degraded");
    assert!(eng.node_state("node-0").is_some_and(|s| s.confidence() < 1.0));
    assert!(eng.verdicts().is_empty(), "{:?}", eng.verdicts());
    assert!(plans.iter().all(|pl| pl.pools.is_empty()));
}

/// The drift budget of an exclusion is `exclude_drift_budget`, at most the pool's blast radius
/// allowance, and stated in the Event.
#[test]
fn exclusion_drift_budget_stays_within_the_blast_radius() {
    let p = Policy {
        exclude_drift_budget: 5,
        ..Policy::default()
    };
    let (mut eng, mut sim) = settled(&p);
    let plans = sim.run(&mut eng, &set(&[0, 1, 2]), 8);
    // 20% of the pool's 10 nodes.
    let budget = serde_json::json!({"nodes": "2", "reasons": ["Drifted"]});
    let snap = sim.input.pools["default"].snapshot.clone().expect("excluded");
    assert_eq!(snap.added.budgets, vec![budget]);
    let note = plans
        .iter()
        .flat_map(|pl| &pl.events)
        .find(|e| e.reason == "NodePoolExcluded")
        .map(|e| e.note.clone())
        .expect("event");
    assert!(note.contains("at most 2 NodeClaims"), "{note}");
}

/// A NodePool patch that failed after its snapshot was saved is tried again: the core compares
/// the snapshot with the pool, not with what it planned.
#[test]
fn failed_pool_patch_is_retried() {
    let p = Policy::default();
    let (mut eng, mut sim) = settled(&p);
    sim.fail_pool_patches = true;
    sim.run(&mut eng, &set(&[0, 1, 2]), 8);
    let not_in = |sim: &Sim| {
        sim.input.pools["default"]
            .requirements
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["operator"] == "NotIn"))
    };
    assert!(sim.input.pools["default"].snapshot.is_some(), "snapshot saved first");
    assert!(!not_in(&sim), "the patch failed");
    sim.fail_pool_patches = false;
    let plans = sim.run(&mut eng, &set(&[0, 1, 2]), 1);
    assert_eq!(plans[0].pools.len(), 1, "retried");
    assert!(not_in(&sim));
    // In effect now: nothing more to do, one action counted, one Event.
    let plans = sim.run(&mut eng, &set(&[0, 1, 2]), 3);
    assert!(plans.iter().all(|pl| pl.pools.is_empty()));
    assert_eq!(sim.count("NodePoolExcluded"), 1);
    // Recovery removes exactly what was added.
    sim.run(&mut eng, &set(&[]), 10);
    assert!(!not_in(&sim));
    assert!(sim.input.pools["default"].snapshot.is_none());
}

/// A snapshot the shell refused (not ours alone, digest mismatch) leaves the pool alone, with
/// one Event, whatever the verdicts say.
#[test]
fn refused_snapshot_leaves_the_pool_alone() {
    let p = Policy::default();
    let mut eng = Engine::new(p.clone());
    let mut sim = Sim::new(10, 5);
    sim.input.pools.get_mut("default").expect("pool").snapshot_refused =
        Some("written by \"kubectl-edit\" too, not by us alone".into());
    sim.run(&mut eng, &set(&[]), 2);
    let plans = sim.run(&mut eng, &set(&[0, 1, 2]), 8);
    assert!(eng.verdicts().contains(&(ZONE.to_string(), "zone-a".to_string())));
    assert!(plans.iter().all(|pl| pl.pools.is_empty()));
    assert_eq!(sim.count("NodePoolSnapshotRefused"), 1);
    assert_eq!(sim.count("NodePoolExcluded"), 0);
}

/// A NodePool or NodeClaim read error holds back only the Karpenter part: conditions are written
/// and taints removed; no restore on a view without the pools.
#[test]
fn karpenter_read_error_degrades_only_karpenter() {
    let p = Policy::default();
    let (mut eng, mut sim) = settled(&p);
    sim.run(&mut eng, &set(&[0, 1, 2, 7]), 8);
    assert!(sim.input.pools["default"].snapshot.is_some());
    assert_eq!(sim.tainted(), BTreeSet::from(["node-7".to_string()]));
    let pools = std::mem::take(&mut sim.input.pools);
    sim.input.pools_unreadable = true;
    sim.input.claims_unreadable = true;
    let plans = sim.run(&mut eng, &set(&[]), 10);
    assert!(plans.iter().all(|pl| pl.pools.is_empty()));
    assert!(sim.tainted().is_empty(), "untainted");
    assert_eq!(sim.overall(&p, 7), Some(CondStatus::True));
    // Readable again: the restore happens.
    sim.input.pools = pools;
    sim.input.pools_unreadable = false;
    sim.input.claims_unreadable = false;
    sim.run(&mut eng, &set(&[]), 1);
    assert!(sim.input.pools["default"].snapshot.is_none());
    assert_eq!(sim.count("NodePoolRestored"), 1);
}

/// A fresh engine whose first steps cannot read the pools still takes over the verdicts our
/// snapshots record once it can: no restore of a zone that is still degraded.
#[test]
fn verdicts_are_taken_over_from_snapshots_once_readable() {
    let p = Policy::default();
    let (_, mut sim) = zone_a_degraded(&p);
    assert!(sim.input.pools["default"].snapshot.is_some());
    let mut eng2 = Engine::new(p.clone());
    let pools = std::mem::take(&mut sim.input.pools);
    sim.input.pools_unreadable = true;
    sim.run(&mut eng2, &set(&[0, 1, 2]), 2);
    sim.input.pools = pools;
    sim.input.pools_unreadable = false;
    let plans = sim.run(&mut eng2, &set(&[0, 1, 2]), 3);
    assert!(plans.iter().all(|pl| pl.pools.is_empty()), "kept excluded");
    assert!(sim.input.pools["default"].snapshot.is_some());
}

/// Restoring removes only our entries: edits others made to the pool meanwhile stay.
#[test]
fn restore_keeps_edits_others_made_meanwhile() {
    let p = Policy::default();
    let (mut eng, mut sim) = zone_a_degraded(&p);
    let theirs_req = serde_json::json!({"key": "example.com/team", "operator": "In", "values": ["a"]});
    let theirs_budget = serde_json::json!({"nodes": "0", "schedule": "@daily", "duration": "1h"});
    let pool = sim.input.pools.get_mut("default").expect("pool");
    let mut expected_reqs =
        vec![serde_json::json!({"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]})];
    expected_reqs.push(theirs_req.clone());
    pool.requirements.as_array_mut().expect("array").push(theirs_req);
    pool.budgets.as_array_mut().expect("array").push(theirs_budget.clone());
    sim.run(&mut eng, &set(&[]), 10);
    let pool = &sim.input.pools["default"];
    assert!(pool.snapshot.is_none());
    assert_eq!(pool.requirements, serde_json::Value::Array(expected_reqs));
    assert_eq!(pool.budgets, serde_json::json!([{"nodes": "10%"}, theirs_budget]));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Adding our entries and removing them again leaves the list as others left it, whatever
    /// they had and added meanwhile, and never removes an equal entry that was theirs first.
    #[test]
    fn edit_list_removes_only_ours(
        before in proptest::collection::vec(0u8..6, 0..6),
        ours in proptest::collection::vec(0u8..6, 0..4),
        meanwhile in proptest::collection::vec(0u8..6, 0..4),
    ) {
        let v = |xs: &[u8]| xs.iter().map(|x| serde_json::json!({"k": x})).collect::<Vec<_>>();
        let before = v(&before);
        let (with_ours, added) = edit_list(&serde_json::Value::Array(before.clone()), &[], &v(&ours));
        for a in &added {
            prop_assert!(!before.contains(a), "an entry already there is not ours");
        }
        let mut edited = with_ours;
        edited.extend(v(&meanwhile));
        let (restored, _) = edit_list(&serde_json::Value::Array(edited), &added, &[]);
        let mut expected = before;
        expected.extend(v(&meanwhile));
        let sorted = |mut xs: Vec<serde_json::Value>| { xs.sort_by_key(ToString::to_string); xs };
        prop_assert_eq!(sorted(restored), sorted(expected));
    }
}
