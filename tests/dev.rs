//! `herald dev`, the first thing a new user runs: it makes certificates, starts a naming
//! group of three and three topic servers, prints how to use them, serves the README's
//! commands, and stops cleanly on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{free_ports, numbered_lines, BIN};

#[test]
fn the_dev_cluster_serves_the_readme_commands_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    // Naming members at +0, +10 and +20, servers at +1..+3.
    let port = free_ports(21);
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
    let status = herald(&["naming", "status", "--json"], None);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 1, "only the address given is asked: {status}");
    let all = format!("127.0.0.1:{port},127.0.0.1:{},127.0.0.1:{}", port + 10, port + 20);
    let status = herald(&["--naming", &all, "naming", "status", "--json"], None);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{status}");
    assert_eq!(members.iter().filter(|m| m["role"] == "leader").count(), 1, "{status}");
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

#[test]
fn a_second_dev_cluster_fails_at_once_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let data = dir.path().join("data");
    let dev = |naming: &str| {
        Command::new(BIN)
            .args(["dev", "--dir"])
            .arg(&data)
            .env("HERALD_NAMING", naming)
            .env("HERALD_CERTS", &certs)
            .env("HERALD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let port = free_ports(21);
    let naming = format!("127.0.0.1:{port}");
    let mut first = dev(&naming);
    let mut stderr = BufReader::new(first.stderr.take().unwrap());
    let mut banner = String::new();
    while !banner.contains("Ctrl-C stops") {
        assert!(stderr.read_line(&mut banner).unwrap() > 0, "dev exited early: {banner}");
    }
    // Its hints carry what a new terminal needs to reach it.
    let all = format!("{naming},127.0.0.1:{},127.0.0.1:{}", port + 10, port + 20);
    assert!(banner.contains(&format!("export HERALD_NAMING={all}")), "{banner}");
    assert!(banner.contains("export HERALD_CERTS=/"), "{banner}");

    // The same ports: refused before anything starts, and no banner.
    let same = dev(&naming).wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&same.stderr);
    assert!(!same.status.success() && said.contains("is another `herald dev` running"), "{said}");
    assert!(!said.contains("Try, in another terminal"), "{said}");
    // Other ports, the same data directory: refused too.
    let other = dev(&format!("127.0.0.1:{}", free_ports(21))).wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success() && said.contains("in use by another herald process"), "{said}");

    first.kill().unwrap();
    first.wait().unwrap();
}

/// `herald completions SHELL` prints a script that completes the commands and their flags,
/// and a pipe closed early (`| head`) is no error.
#[test]
fn completions_cover_the_commands_and_flags_of_each_shell() {
    for (shell, opening) in
        [("bash", "_herald()"), ("zsh", "#compdef herald"), ("fish", "complete -c herald")]
    {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.starts_with(opening) || script.contains(opening), "{shell}: {}", &script[..200]);
        for word in ["produce", "consume", "subscription", "peek", "timeout"] {
            assert!(script.contains(word), "{shell} completes no {word}");
        }
    }
    let mut head = Command::new(BIN)
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(head.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let out = head.wait_with_output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
