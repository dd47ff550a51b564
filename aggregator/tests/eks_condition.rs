//! Issue 16.4: a `NetworkingReady` another field manager writes (the EKS node monitoring agent)
//! is never ours. With `mirror_eks = true` the aggregator neither writes True over its False
//! while the node's agent reports healthy figures, nor False over its True while degraded, nor
//! takes ownership of any of its fields. A `NetworkingReady` nobody else writes is ours only
//! while the network families are degraded.

mod common;

use common::*;
use graywatch_aggregator::cluster::{FIELD_MANAGER, condition_managers};

const NR: &str = "NetworkingReady";
const EKS_AGENT: &str = "eks-node-monitoring-agent";

/// node i's `NetworkingReady` status and the field managers that own any of it.
async fn networking_ready(cluster: &Cluster, i: usize) -> (Option<String>, Vec<String>) {
    let n = cluster.node(i).await;
    let managers = condition_managers(&n, NR).into_iter().map(str::to_string).collect();
    (condition(&n, NR), managers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networking_ready_of_another_manager_is_never_taken() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start(10, 5).await? else {
        return Ok(());
    };
    // The node's own agent found a networking fault on node-2.
    apply_conditions(&cluster, 2, EKS_AGENT, &[cond(NR, "False")]).await?;
    let agg = Aggregator::spawn(&cluster, "agg-0", &config("taint_mode = \"nrc\"\nmirror_eks = true"));
    let fleet = Fleet::start(10, vec![agg.endpoint()]);
    // Our overall condition goes in the same apply as a NetworkingReady of ours would: once it
    // is there, so would be a True of ours.
    for i in 0..10 {
        eventually(30, &format!("node-{i} Healthy=True"), || async {
            (cluster.overall(i).await.as_deref() == Some("True")).then_some(())
        })
        .await;
    }
    let theirs_false = (Some("False".to_string()), vec![EKS_AGENT.to_string()]);
    assert_eq!(networking_ready(&cluster, 2).await, theirs_false, "their False kept");
    assert_eq!(
        networking_ready(&cluster, 3).await,
        (None, vec![]),
        "healthy: no vouching"
    );

    // node-3 (nobody else writes its NetworkingReady) and node-2 degrade.
    fleet.set_bad(&[2, 3]);
    eventually(30, "node-3 NetworkingReady=False of ours", || async {
        (networking_ready(&cluster, 3).await == (Some("False".to_string()), vec![FIELD_MANAGER.to_string()]))
            .then_some(())
    })
    .await;
    eventually(30, "node-2 Healthy=False", || async {
        (cluster.overall(2).await.as_deref() == Some("False")).then_some(())
    })
    .await;
    assert_eq!(networking_ready(&cluster, 2).await, theirs_false);

    // Their agent says node-2 is fine again while we still see it degraded: theirs to say.
    apply_conditions(&cluster, 2, EKS_AGENT, &[cond(NR, "True")]).await?;
    // Recovery: a condition write on every node; ours goes from node-3, theirs stays.
    fleet.set_bad(&[]);
    eventually(40, "node-3 NetworkingReady removed", || async {
        (networking_ready(&cluster, 3).await == (None, vec![])).then_some(())
    })
    .await;
    eventually(30, "node-2 Healthy=True", || async {
        (cluster.overall(2).await.as_deref() == Some("True")).then_some(())
    })
    .await;
    assert_eq!(
        networking_ready(&cluster, 2).await,
        (Some("True".to_string()), vec![EKS_AGENT.to_string()])
    );
    Ok(())
}
