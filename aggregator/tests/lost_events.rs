//! Issue 16.6: events the agent's kernel programs could not record never reached the
//! aggregator. A node whose agent is losing events now says so on its overall condition's
//! message, without changing its status (it is no verdict about the node).

mod common;

use common::*;

const N: usize = 4;
const LOSING: usize = 2;

fn overall_message(n: &k8s_openapi::api::core::v1::Node) -> Option<(String, String)> {
    let c = n
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == OVERALL)?;
    Some((c.status.clone(), c.message.clone().unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_agent_loses_events_says_so_on_its_condition() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(N, 2).await? else {
        return Ok(());
    };
    let agg = Aggregator::spawn(&cluster, "agg-0", &config(""));
    let _fleet = Fleet::start_shaped(N, vec![agg.endpoint()], |i, seq, s| {
        // Cumulative since the agent started: node-2's agent loses events every window.
        let lost = if i == LOSING { seq * 10 } else { 0 };
        s.lost_events.insert("flow_map_full".into(), lost);
    });

    let (status, message) = eventually(30, "node-2's condition names the lost events", || async {
        overall_message(&cluster.node(LOSING).await).filter(|(_, m)| m.contains("losing kernel events"))
    })
    .await;
    assert_eq!(status, "True", "losing events is no verdict: {message}");
    assert!(message.contains("flow_map_full"), "{message}");
    for i in (0..N).filter(|i| *i != LOSING) {
        let (status, message) = eventually(30, &format!("node-{i} Healthy"), || async {
            overall_message(&cluster.node(i).await).filter(|(s, _)| s == "True")
        })
        .await;
        assert_eq!(status, "True");
        assert!(!message.contains("losing"), "node-{i}: {message}");
    }
    Ok(())
}
