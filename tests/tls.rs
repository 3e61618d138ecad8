//! G8: every link is QUIC + TLS 1.3 with mutual authentication against the cluster CA.
//! Foreign certificates, missing certificates, an untrusted server and a wrong ALPN all fail
//! at the handshake with a clear error, and the servers keep serving good clients.

mod common;

use std::sync::Arc;

use common::{sample, wait_for, Cluster};
use herald::certs::{self, CertRole, Identity};
use herald::client::Client;
use herald::transport::{self, Connection};
use herald::wire::{Request, Response};
use herald::Error;

fn foreign_certs(cluster: &Cluster) -> std::path::PathBuf {
    let dir = cluster.dir.path().join("foreign-certs");
    certs::generate(&dir, &certs::default_hosts(), false).unwrap();
    dir
}

async fn connect_with(cluster: &Cluster, config: quinn::ClientConfig) -> Result<Connection, Error> {
    let endpoint = transport::client_endpoint(cluster.naming_addr, config).unwrap();
    Connection::connect(&endpoint, cluster.naming_addr).await
}

fn assert_refused(result: Result<Connection, Error>, what: &str) {
    match result {
        Err(Error::Unauthorized { detail }) => assert!(detail.contains("TLS"), "{what}: {detail}"),
        Err(other) => panic!("{what}: expected a TLS failure, got {other}"),
        Ok(_) => panic!("{what}: the connection was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_from_the_cluster_ca_get_in() {
    let cluster = Cluster::start(1).await;
    let ours = certs::load(&cluster.certs, CertRole::Client).unwrap();
    let foreign_dir = foreign_certs(&cluster);
    let foreign = certs::load(&foreign_dir, CertRole::Client).unwrap();

    // A client certificate from another CA (while trusting ours) is refused by the server.
    let mixed = Identity { ca: ours.ca.clone(), chain: foreign.chain.clone(), key: foreign.key.clone_key() };
    assert_refused(
        connect_with(&cluster, transport::client_config(&mixed).unwrap()).await,
        "foreign client cert",
    );

    // The naming server counts the failed handshake.
    let failures = wait_for("the handshake failure to be counted", || async {
        sample(&cluster.scrape(None), "herald_tls_handshake_failures_total", "").filter(|n| *n >= 1.0)
    })
    .await;
    assert!(failures >= 1.0);

    // A client that trusts another CA refuses our server.
    let distrust = Identity { ca: foreign.ca.clone(), chain: ours.chain.clone(), key: ours.key.clone_key() };
    assert_refused(
        connect_with(&cluster, transport::client_config(&distrust).unwrap()).await,
        "untrusted server",
    );

    // The wrong application protocol is refused.
    let h3 = transport::client_config_with_alpn(&ours, b"h3").unwrap();
    assert_refused(connect_with(&cluster, h3).await, "wrong ALPN");

    // A client presenting no certificate at all is refused.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ours.ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![transport::ALPN.to_vec()];
    let anonymous =
        quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    assert_refused(connect_with(&cluster, anonymous).await, "no client certificate");

    // The CLI with the foreign certificates says what failed.
    let out = std::process::Command::new(common::BIN)
        .args(["topic", "list"])
        .env("HERALD_NAMING", cluster.naming_addr.to_string())
        .env("HERALD_CERTS", &foreign_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS") && stderr.contains("belong to another cluster"), "{stderr}");
    assert!(!stderr.contains("retrying"), "a refused certificate is final, not retried: {stderr}");

    // Without certificates, it says where it looked and warns against a new CA.
    let missing = cluster.dir.path().join("no-certs-here");
    let out = std::process::Command::new(common::BIN)
        .args(["topic", "list"])
        .env("HERALD_NAMING", cluster.naming_addr.to_string())
        .env("HERALD_CERTS", &missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("looked for in {}", missing.display())), "{stderr}");
    assert!(stderr.contains("a running cluster will not accept"), "{stderr}");

    // The naming server still serves a proper client.
    let client = Client::with_identity(cluster.naming_addr, &ours).unwrap();
    assert_eq!(client.list_servers().await.unwrap().len(), 1);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_cannot_register_as_a_topic_server() {
    let cluster = Cluster::start(1).await;
    let ours = certs::load(&cluster.certs, CertRole::Client).unwrap();
    let conn = connect_with(&cluster, transport::client_config(&ours).unwrap()).await.unwrap();
    let err =
        conn.call(&Request::Register { server: 99, addr: "127.0.0.1:1".parse().unwrap() }).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    let servers = match conn.call(&Request::ListServers).await.unwrap() {
        Response::Servers(s) => s,
        other => panic!("{other:?}"),
    };
    assert!(servers.iter().all(|s| s.id != 99), "the impostor was not registered");
}
