//! Who may do what (issue 12): a client certificate issued after the cluster started may do
//! nothing until granted, then exactly what was granted, on the topics of the prefix; a
//! revoke takes effect within about a heartbeat; grants survive a restart of everything.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{sample, wait_for, Cluster, BIN};
use herald::client::Client;
use herald::types::{StartFrom, SubscriptionName, TopicName};
use herald::wire::{Record, TopicConfig};
use herald::Error;

async fn produce_one(client: &Arc<Client>, topic: &TopicName) -> Result<(), Error> {
    let producer = client.producer(topic.clone(), 1);
    let sent = producer.send(vec![Record { payload: b"hello".to_vec(), ..Record::default() }]).await;
    let result = match sent {
        Ok(ack) => ack.await.map_err(Error::internal).and_then(|r| r.map(|_| ())),
        Err(e) => Err(e),
    };
    producer.close().await;
    result
}

async fn consume_all(client: &Arc<Client>, topic: &TopicName) -> Result<usize, Error> {
    let sub = SubscriptionName::new("bobs").unwrap();
    let mut consumer = client.consumer(topic.clone(), sub, StartFrom::Earliest).await?;
    let got = consumer.poll(100, Duration::from_millis(200), None).await;
    consumer.release().await;
    got.map(|r| r.len())
}

fn refused(result: Result<impl std::fmt::Debug, Error>, operation: &str, topic: &str) -> String {
    match result {
        Err(e @ Error::NotAuthorized { .. }) => {
            let Error::NotAuthorized { principal, operation: op, topic: t, .. } = &e else { unreachable!() };
            assert_eq!((principal.as_str(), op.as_str(), t.as_str()), ("bob", operation, topic), "{e}");
            e.to_string()
        }
        other => panic!("expected NotAuthorized for {operation} on {topic}, got {other:?}"),
    }
}

/// `herald certs issue client bob` against the cluster's CA; returns bob's certs directory.
fn issue_bob(cluster: &Cluster) -> std::path::PathBuf {
    let out = Command::new(BIN)
        .args(["certs", "issue", "client", "bob", "--dir"])
        .arg(&cluster.certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.certs.join("client-bob")
}

fn client_of(cluster: &Cluster, certs: &std::path::Path) -> Arc<Client> {
    Client::new(cluster.naming_list.parse::<herald::types::NamingAddrs>().unwrap(), certs).unwrap()
}

fn acl(cluster: &Cluster, args: &[&str]) {
    let mut all = vec!["acl"];
    all.extend_from_slice(args);
    cluster.cli_ok(&all, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_may_do_nothing_until_granted_then_exactly_what_was_granted() {
    let mut cluster = Cluster::start(1).await;
    let admin = cluster.client();
    let orders = TopicName::new("orders.eu").unwrap();
    let other = TopicName::new("other").unwrap();
    for t in [&orders, &other] {
        admin.create_topic(t, 1, TopicConfig::default()).await.unwrap();
    }
    // A certificate for bob, issued with the running cluster's CA.
    let bob_dir = issue_bob(&cluster);
    let bob = client_of(&cluster, &bob_dir);

    // Nothing at all before a grant: not even a look-up, nor a topic in the list.
    refused(bob.lookup(&orders).await, "describe", "orders.eu");
    refused(produce_one(&bob, &orders).await, "describe", "orders.eu");
    refused(
        bob.create_topic(&TopicName::new("orders.new").unwrap(), 1, TopicConfig::default()).await,
        "admin",
        "orders.new",
    );
    assert!(bob.list_topics().await.unwrap().is_empty());
    assert!(matches!(bob.list_grants().await, Err(Error::NotAuthorized { .. })));

    // Describe on the prefix: orders.eu may be looked up (not `other`), and produce is refused
    // by the topic server with the grant that is missing.
    acl(&cluster, &["grant", "bob", "describe", "--topic", "orders."]);
    bob.lookup(&orders).await.unwrap();
    refused(bob.lookup(&other).await, "describe", "other");
    let names: Vec<String> =
        bob.list_topics().await.unwrap().into_iter().map(|t| t.name.to_string()).collect();
    assert_eq!(names, ["orders.eu"]);
    let message = wait_for("the topic server to hear the grants", || async {
        match produce_one(&bob, &orders).await {
            Err(e @ Error::NotAuthorized { .. }) => Some(e.to_string()),
            _ => None,
        }
    })
    .await;
    assert_eq!(
        message,
        "bob may not produce to orders.eu (no grant for produce on a prefix of it; herald acl grant bob produce --topic orders.)"
    );

    // Produce granted: it works within about a heartbeat; consume is still refused.
    acl(&cluster, &["grant", "bob", "produce", "consume", "--topic", "orders."]);
    acl(&cluster, &["revoke", "bob", "consume", "--topic", "orders."]);
    wait_for("bob's produce grant to reach the topic server", || async {
        produce_one(&bob, &orders).await.ok()
    })
    .await;
    refused(produce_one(&bob, &other).await, "describe", "other");
    refused(consume_all(&bob, &orders).await, "consume", "orders.eu");
    // Reading without a subscription is consuming too.
    refused(bob.reader(orders.clone(), 0).poll(10, Duration::ZERO).await, "consume", "orders.eu");
    // Admin operations stay refused; so does changing grants.
    refused(bob.delete_topic(&orders).await, "admin", "orders.eu");
    assert!(matches!(bob.change_acl(vec![], vec![]).await, Err(Error::NotAuthorized { .. })));
    let out = cluster.cli(&["acl", "list"], None);
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listed.contains("superusers: admin") && listed.contains("produce"), "{listed}");

    // Consume granted: bob reads what it produced. Produce revoked: refused again.
    acl(&cluster, &["grant", "bob", "consume", "--topic", "orders.eu"]);
    let read = wait_for("bob's consume grant", || async { consume_all(&bob, &orders).await.ok() }).await;
    assert!(read >= 1, "read {read}");
    assert!(!bob.reader(orders.clone(), 0).poll(10, Duration::ZERO).await.unwrap().is_empty());
    acl(&cluster, &["revoke", "bob", "produce", "--topic", "orders."]);
    wait_for("the revoke to reach the topic server", || async {
        matches!(produce_one(&bob, &orders).await, Err(Error::NotAuthorized { .. })).then_some(())
    })
    .await;
    let text = cluster.scrape(Some(1));
    let refusals = sample(&text, "herald_requests_total", r#"operation="Produce",result="not_authorized""#);
    assert!(refusals.unwrap_or(0.0) >= 2.0, "{refusals:?}");
    // Refusals are logged with who, what and where.
    let log = cluster.server(1).log_text();
    let line =
        log.lines().find(|l| l.contains("refused") && l.contains("bob")).expect("a refusal in the log");
    assert!(line.contains("produce") && line.contains("orders.eu"), "{line}");

    // Grants survive a restart of everything.
    bob.close().await;
    admin.close().await;
    cluster.restart_naming();
    cluster.restart_server(1);
    cluster.wait_alive(1).await;
    let bob = client_of(&cluster, &bob_dir);
    wait_for("bob to consume after the restart", || async { consume_all(&bob, &orders).await.ok() }).await;
    refused(produce_one(&bob, &orders).await, "produce", "orders.eu");
    bob.close().await;
}

/// Grants are in the replicated book: a new naming leader enforces the same ones, and takes
/// changes to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_survive_a_naming_failover() {
    let mut cluster =
        Cluster::start_with(1, common::Options { naming_members: 3, ..common::Options::default() }).await;
    let admin = cluster.client();
    let topic = TopicName::new("x.t").unwrap();
    admin.create_topic(&topic, 1, TopicConfig::default()).await.unwrap();
    admin.close().await;
    let bob_dir = issue_bob(&cluster);
    acl(&cluster, &["grant", "bob", "describe", "--topic", "x."]);

    let leader = cluster.naming_leader().await;
    cluster.naming_member(leader).kill();
    let bob = client_of(&cluster, &bob_dir);
    wait_for("a new naming leader to answer bob's look-up", || async { bob.lookup(&topic).await.ok() }).await;
    assert_ne!(cluster.naming_leader().await, leader);
    acl(&cluster, &["revoke", "bob", "describe", "--topic", "x."]);
    refused(bob.lookup(&topic).await, "describe", "x.t");
    bob.close().await;
}
