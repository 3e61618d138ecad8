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
    certs::generate(&dir, &certs::default_hosts(), 1, false).unwrap();
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

/// A server acts only as the identity its certificate names: a client certificate cannot
/// register, heartbeat or replicate; server 2's cannot register as server 3 or move server
/// 1's address; a certificate naming no identity gets nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_acts_only_as_the_identity_it_names() {
    let cluster = Cluster::start(1).await;
    let connect = |role| {
        let identity = certs::load(&cluster.certs, role).unwrap();
        connect_with(&cluster, transport::client_config(&identity).unwrap())
    };
    let impostor = |server| Request::Register { server, addr: "127.0.0.1:1".parse().unwrap() };
    let refused = |result: Result<Response, Error>, what: &str| match result {
        Err(Error::Unauthorized { detail }) => {
            assert!(detail.contains("needs the certificate of"), "{what}: {detail}")
        }
        other => panic!("{what}: expected Unauthorized, got {other:?}"),
    };

    let client = connect(CertRole::Client).await.unwrap();
    refused(client.call(&impostor(99)).await, "a client registering");
    let beat = Request::Heartbeat {
        server: 1,
        known_version: 0,
        applied_version: 0,
        wait_ms: 0,
        reports: Default::default(),
    };
    refused(client.call(&beat).await, "a client heartbeating");
    let server2 = connect(CertRole::Node(2)).await.unwrap();
    refused(server2.call(&impostor(3)).await, "server 2 registering as 3");
    refused(server2.call(&impostor(1)).await, "server 2 moving server 1");
    // Server 1's own certificate is not enough to replicate as another follower.
    let server1 = herald::transport::client_endpoint(cluster.server_addr(1), {
        let identity = certs::load(&cluster.certs, CertRole::Node(2)).unwrap();
        transport::client_config(&identity).unwrap()
    })
    .unwrap();
    let to_server1 = Connection::connect(&server1, cluster.server_addr(1)).await.unwrap();
    let promise =
        Request::Promise { topic: herald::types::TopicName::new("t").unwrap(), topic_id: 1, epoch: 9 };
    refused(to_server1.call(&promise).await, "server 2 asking for a promise");

    let servers = match client.call(&Request::ListServers).await.unwrap() {
        Response::Servers(s) => s,
        other => panic!("{other:?}"),
    };
    let ids: Vec<u64> = servers.iter().map(|s| s.id).collect();
    assert_eq!(ids, [1], "no impostor registered");
    assert_eq!(servers[0].addr, cluster.server_addr(1), "server 1's address unchanged");

    // A certificate from the cluster CA that names nobody is refused right after the handshake.
    let nobody_dir = cluster.dir.path().join("nobody");
    std::fs::create_dir_all(&nobody_dir).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(cluster.certs.join("ca/ca.key")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(cluster.certs.join("ca.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ours = certs::load(&cluster.certs, CertRole::Client).unwrap();
    let nobody = Identity {
        ca: ours.ca.clone(),
        chain: vec![cert.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    };
    match connect_with(&cluster, transport::client_config(&nobody).unwrap()).await {
        Err(Error::Unauthorized { detail }) => {
            assert!(detail.contains("names no Herald identity"), "{detail}")
        }
        Err(other) => panic!("expected Unauthorized, got {other}"),
        Ok(_) => panic!("a certificate naming nobody got in"),
    }
}
