//! The library examples (`examples/produce.rs`, `examples/consume.rs`) run against a real
//! cluster and do what their docs say, so they cannot rot.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{Cluster, BIN};

/// An example's binary, beside the `herald` binary: `make test` builds them (`cargo build
/// --examples`) before the tests; `cargo test` alone builds examples only as test harnesses.
fn example(name: &str) -> PathBuf {
    let path = PathBuf::from(BIN).parent().unwrap().join("examples").join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --examples` (make test does)", path.display());
    path
}

fn run(cluster: &Cluster, name: &str, args: &[&str]) -> Output {
    let out = Command::new(example(name))
        .args(args)
        .env("HERALD_NAMING", &cluster.naming_list)
        .env("HERALD_CERTS", &cluster.certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_produce_and_consume_through_a_durable_subscription() {
    let cluster = Cluster::start(1).await;
    cluster.create_topic("greetings");
    let out = run(&cluster, "produce", &["greetings", "250"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "250 records committed to greetings\n");
    let out = run(&cluster, "consume", &["greetings", "reader"]);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let expected: Vec<String> = (0..250).map(|i| format!("{i} hello {i}")).collect();
    assert_eq!(lines, expected, "every record, in order, once");
    // The subscription resumes at its cursor: nothing is read twice.
    let again = run(&cluster, "consume", &["greetings", "reader"]);
    assert!(again.stdout.is_empty(), "{}", String::from_utf8_lossy(&again.stdout));
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 records read"));
}
