//! The metrics endpoints of real processes, scraped and parsed: what they report matches
//! what the admin commands say, before and after a leader failover.

mod common;

use common::{numbered_lines, sample, wait_for, Cluster};
use herald::types::TopicName;

fn lag_in_list(cluster: &Cluster, topic: &str, sub: &str) -> (f64, f64) {
    let list: serde_json::Value =
        serde_json::from_str(&cluster.cli_ok(&["subscription", "list", topic, "--json"], None)).unwrap();
    let s = list.as_array().unwrap().iter().find(|s| s["name"] == sub).unwrap().clone();
    (s["lag"].as_f64().unwrap(), s["lag_bytes"].as_f64().unwrap())
}

/// The leader's metrics agree with `subscription list` and `topic describe`.
fn check_leader_metrics(cluster: &Cluster, leader: u64, produced: f64) {
    let text = cluster.scrape(Some(leader));
    let topic = r#"topic="metered""#;
    let sub = r#"topic="metered",subscription="s""#;
    let (lag, lag_bytes) = lag_in_list(cluster, "metered", "s");
    assert_eq!(sample(&text, "herald_subscription_lag_records", sub), Some(lag), "{text}");
    assert_eq!(sample(&text, "herald_subscription_lag_bytes", sub), Some(lag_bytes));
    let described = cluster.describe("metered");
    for (metric, field) in
        [("herald_log_end", "log_end"), ("herald_commit_offset", "commit"), ("herald_log_start", "log_start")]
    {
        assert_eq!(sample(&text, metric, topic), described[field].as_f64(), "{metric}");
    }
    assert_eq!(sample(&text, "herald_log_end", topic), Some(produced));
    assert_eq!(sample(&text, "herald_leader", topic), Some(1.0));
    assert_eq!(sample(&text, "herald_subscription_cursor", sub), Some(produced - lag));
    // Both followers are reported, and have caught up.
    let followers: Vec<&str> =
        text.lines().filter(|l| l.starts_with("herald_replica_lag_records{")).collect();
    assert_eq!(followers.len(), 2, "{text}");
    assert!(sample(&text, "herald_storage_commit_seconds_count", "").unwrap() >= 1.0);
    assert!(sample(&text, "herald_open_connections", "").unwrap() >= 1.0);
    assert!(text.ends_with("# EOF\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_admin_commands_before_and_after_failover() {
    let mut cluster = Cluster::start(3).await;
    let topic: TopicName = cluster.create_topic("metered");
    cluster.cli_ok(&["subscription", "create", "metered", "s"], None);
    cluster.cli_ok(&["subscription", "create", "metered", "keep"], None);
    cluster.cli_ok(&["produce", "metered"], Some(&numbered_lines("m", 100)));
    cluster.cli_ok(&["consume", "metered", "--subscription", "s", "--count", "30"], None);

    let leader = cluster.leader_of(&topic).await;
    check_leader_metrics(&cluster, leader, 100.0);
    let text = cluster.scrape(Some(leader));
    assert!(sample(&text, "herald_records_appended_total", r#"topic="metered""#).unwrap() >= 100.0);
    assert!(sample(&text, "herald_requests_total", r#"operation="Produce",result="ok""#).unwrap() >= 1.0);
    // Followers report their log, not the subscriptions.
    let follower = cluster.servers.iter().map(|s| s.0).find(|s| *s != leader).unwrap();
    let text = cluster.scrape(Some(follower));
    assert_eq!(sample(&text, "herald_leader", r#"topic="metered""#), Some(0.0));
    assert!(!text.contains("herald_subscription_lag_records{"));
    let naming = cluster.scrape(None);
    assert_eq!(sample(&naming, "herald_topic_servers", r#"state="alive""#), Some(3.0));
    assert_eq!(sample(&naming, "herald_topics", ""), Some(1.0));

    // A refused request is counted by its error.
    let out = cluster.cli(&["subscription", "delete", "metered", "ghost"], None);
    assert!(!out.status.success());
    let text = cluster.scrape(Some(leader));
    assert!(
        sample(
            &text,
            "herald_requests_total",
            r#"operation="DeleteSubscription",result="unknown_subscription""#
        )
        .is_some(),
        "{text}"
    );

    // After a failover the new leader reports the same figures.
    cluster.server(leader).kill();
    let new_leader = wait_for("a new leader", || async {
        let l = cluster.leader_of(&topic).await;
        (l != leader).then_some(l)
    })
    .await;
    wait_for("the new leader to report the subscription", || async {
        let text = cluster.scrape(Some(new_leader));
        sample(&text, "herald_subscription_lag_records", r#"topic="metered",subscription="s""#).map(|_| ())
    })
    .await;
    check_leader_metrics(&cluster, new_leader, 100.0);
    let naming = cluster.scrape(None);
    assert!(sample(&naming, "herald_elections_total", "").unwrap() >= 1.0);
}
