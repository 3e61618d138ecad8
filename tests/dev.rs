//! `herald dev`, the first thing a new user runs: it makes certificates, starts a naming
//! server and three topic servers, prints how to use them, serves the README's commands, and
//! stops cleanly on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{free_port, numbered_lines, BIN};

#[test]
fn the_dev_cluster_serves_the_readme_commands_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    // Four consecutive free ports: naming, then servers at +1..+3.
    let port = loop {
        let p = free_port();
        if (1..=3).all(|i| std::net::UdpSocket::bind(("127.0.0.1", p + i)).is_ok()) {
            break p;
        }
    };
    let naming = format!("127.0.0.1:{port}");
    let certs = dir.path().join("certs");
    let mut dev = Command::new(BIN)
        .args(["dev", "--dir"])
        .arg(dir.path().join("data"))
        .env("HERALD_NAMING", &naming)
        .env("HERALD_CERTS", &certs)
        .env("HERALD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The banner comes once every server has registered.
    let mut stderr = BufReader::new(dev.stderr.take().unwrap());
    let mut banner = String::new();
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "dev exited early: {banner}");
        banner.push_str(&line);
        if line.contains("Ctrl-C stops") {
            break;
        }
    }
    assert!(banner.contains("herald topic create demo"), "{banner}");
    assert!(certs.join("ca.pem").exists(), "dev makes certificates when missing");
    let drain = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());

    let herald = |args: &[&str], input: Option<Vec<u8>>| {
        let mut child = Command::new(BIN)
            .args(args)
            .env("HERALD_NAMING", &naming)
            .env("HERALD_CERTS", &certs)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = input {
            let mut pipe = child.stdin.take().unwrap();
            std::thread::spawn(move || std::io::Write::write_all(&mut pipe, &input));
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "herald {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let servers = herald(&["servers", "--json"], None);
    let servers: serde_json::Value = serde_json::from_slice(&servers.stdout).unwrap();
    assert_eq!(servers.as_array().unwrap().len(), 3);
    herald(&["topic", "create", "demo"], None);
    let produced = herald(&["produce", "demo"], Some(numbered_lines("d", 10_000)));
    assert!(String::from_utf8_lossy(&produced.stderr)
        .contains("produced 10000 records to demo (offsets 0..9999)"));
    let consumed = herald(&["consume", "demo", "--subscription", "s1", "--count", "10000"], None);
    assert_eq!(consumed.stdout, numbered_lines("d", 10_000));

    // Ctrl-C: a clean stop with status 0.
    let status = Command::new("kill").args(["-INT", &dev.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = dev.wait().unwrap();
    let rest = drain.join().unwrap();
    assert!(status.success(), "dev exited with {status}: {rest}");
    assert!(rest.contains("dev cluster stopped"), "{rest}");
}
