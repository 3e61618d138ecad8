//! A cluster across three network namespaces, each with its own address, as three hosts
//! would be: a naming member and a topic server on each (`--listen 0.0.0.0:PORT --advertise
//! HOST:PORT`, as docs/deploy.md runs them), clients on the hosts, and a host lost whole.
//! Nothing may assume loopback. The namespaces and a veth bridge (in a fourth namespace, so
//! the machine's own network is untouched) are made by the test and removed after it; it
//! needs root and `ip`, and says why it skips without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{numbered_lines, wait_for, BIN};

const HOSTS: usize = 3;

/// Namespaces `PREFIX-1` .. `PREFIX-3` (the hosts, 10.77.0.N/24) and `PREFIX-hub` (a bridge
/// joining their veth links), deleted on drop.
struct Net {
    prefix: String,
}

impl Net {
    /// Makes the namespaces, or says why this machine cannot (not root, no `ip`); once it
    /// can, a step that fails fails the test rather than skip it.
    fn make() -> Result<Net, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if uid.as_deref().unwrap_or("") != "0" {
            return Err("not root: network namespaces need CAP_SYS_ADMIN".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("no `ip` command (iproute2)".into());
        }
        let net = Net { prefix: format!("hh{}", std::process::id()) };
        let hub = net.ns_name("hub");
        net.ip(&["netns", "add", &hub]);
        net.ip(&["netns", "exec", &hub, "ip", "link", "add", "hbr", "type", "bridge"]);
        net.ip(&["netns", "exec", &hub, "ip", "link", "set", "hbr", "up"]);
        for n in 1..=HOSTS {
            let ns = net.host(n);
            let (inner, outer) = (format!("{}h{n}", net.prefix), format!("{}b{n}", net.prefix));
            net.ip(&["netns", "add", &ns]);
            net.ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer]);
            net.ip(&["link", "set", &inner, "netns", &ns]);
            net.ip(&["link", "set", &outer, "netns", &hub]);
            net.ip(&["netns", "exec", &hub, "ip", "link", "set", &outer, "master", "hbr"]);
            net.ip(&["netns", "exec", &hub, "ip", "link", "set", &outer, "up"]);
            net.ip(&["netns", "exec", &ns, "ip", "addr", "add", &format!("{}/24", addr(n)), "dev", &inner]);
            net.ip(&["netns", "exec", &ns, "ip", "link", "set", &inner, "up"]);
            net.ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        Ok(net)
    }

    fn ns_name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// Host `n`'s namespace.
    fn host(&self, n: usize) -> String {
        self.ns_name(&n.to_string())
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ip {}: {}", args.join(" "), said.trim());
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends in it, and with them their peers.
        for n in 1..=HOSTS {
            let _ = Command::new("ip").args(["netns", "del", &self.host(n)]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns_name("hub")]).output();
    }
}

/// Host `n`'s address.
fn addr(n: usize) -> String {
    format!("10.77.0.{n}")
}

/// A `herald` process in a host's namespace, killed (`kill -9`) on drop.
struct HostProc {
    child: Child,
    log: PathBuf,
}

impl HostProc {
    fn start(ns: &str, args: &[String], dir: &Path, name: &str) -> HostProc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        // `ip netns exec` execs the command: the child is herald itself.
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN])
            .args(args)
            .env("HERALD_CERTS", dir.join("certs"))
            .env("HERALD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        HostProc { child, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HostProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!(
                "---- {} ----\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_three_hosts_serves_clients_on_each_and_survives_losing_one() {
    let net = match Net::make() {
        Ok(net) => net,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let hosts: Vec<String> = (1..=HOSTS).map(addr).collect();
    let certs = Command::new(BIN)
        .args(["certs", "--dir"])
        .arg(dir.path().join("certs"))
        .args(["--servers", "3", "--hosts", &hosts.join(",")])
        .output()
        .unwrap();
    assert!(certs.status.success(), "{}", String::from_utf8_lossy(&certs.stderr));
    let peers: Vec<String> = (1..=HOSTS).map(|n| format!("{n}={}:7400", addr(n))).collect();
    let naming: Vec<String> = (1..=HOSTS).map(|n| format!("{}:7400", addr(n))).collect();
    let (peers, naming) = (peers.join(","), naming.join(","));
    let mut procs: Vec<(HostProc, HostProc)> = (1..=HOSTS)
        .map(|n| {
            let data = |what: &str| dir.path().join(format!("{what}-{n}")).display().to_string();
            let id = n.to_string();
            let member = [
                "naming",
                "--id",
                &id,
                "--listen",
                &format!("{}:7400", addr(n)),
                "--peers",
                &peers,
                "--data",
                &data("naming"),
                "--lease-ms",
                "1500",
            ]
            .map(String::from);
            let server = [
                "server",
                "--id",
                &id,
                "--listen",
                "0.0.0.0:7401",
                "--advertise",
                &format!("{}:7401", addr(n)),
                "--naming",
                &naming,
                "--data",
                &data("server"),
            ]
            .map(String::from);
            let ns = net.host(n);
            (
                HostProc::start(&ns, &member, dir.path(), &format!("naming-{n}")),
                HostProc::start(&ns, &server, dir.path(), &format!("server-{n}")),
            )
        })
        .collect();
    // A client command run on host `n`.
    let cli = |n: usize, args: &[&str], stdin: Option<Vec<u8>>| -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.host(n), BIN])
            .args(args)
            .env("HERALD_NAMING", &naming)
            .env("HERALD_CERTS", dir.path().join("certs"))
            .env("HERALD_CONFIG", dir.path().join("config.toml"))
            .env("HERALD_TIMEOUT", "60")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().unwrap();
            std::thread::spawn(move || pipe.write_all(&input));
        }
        child.wait_with_output().unwrap()
    };
    let ok = |out: Output| -> String {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };

    wait_for("the three hosts' cluster to be healthy", || async {
        cli(1, &["status"], None).status.success().then_some(())
    })
    .await;
    let servers: serde_json::Value = serde_json::from_str(&ok(cli(2, &["servers", "--json"], None))).unwrap();
    let advertised: Vec<&str> =
        servers.as_array().unwrap().iter().map(|s| s["address"].as_str().unwrap()).collect();
    assert_eq!(advertised, ["10.77.0.1:7401", "10.77.0.2:7401", "10.77.0.3:7401"], "each host's own address");
    ok(cli(2, &["topic", "create", "orders", "--replicas", "3"], None));
    ok(cli(2, &["subscription", "create", "orders", "billing"], None));
    ok(cli(3, &["produce", "orders"], Some(numbered_lines("a", 500))));

    // The host of the topic's leader is lost whole: its naming member and its topic server.
    let describe = |n: usize| -> serde_json::Value {
        serde_json::from_str(&ok(cli(n, &["topic", "describe", "orders", "--json"], None))).unwrap()
    };
    let lost = describe(1)["leader"].as_u64().unwrap() as usize;
    let (member, server) = &mut procs[lost - 1];
    member.kill();
    server.kill();
    let survivor = if lost == 1 { 2 } else { 1 };
    // A producer on a surviving host carries on once a new leader is elected.
    ok(cli(survivor, &["produce", "orders"], Some(numbered_lines("b", 500))));
    let leader = describe(survivor)["leader"].as_u64().unwrap() as usize;
    assert_ne!(leader, lost, "a new leader on a surviving host");
    let read = ok(cli(survivor, &["consume", "orders", "-s", "billing", "--count", "1000"], None));
    let mut expected = numbered_lines("a", 500);
    expected.extend(numbered_lines("b", 500));
    assert_eq!(read.as_bytes(), expected, "every record once, in order, across the loss of a host");
    // And the cluster says what is missing.
    let status = cli(survivor, &["status"], None);
    assert_eq!(status.status.code(), Some(1), "{}", String::from_utf8_lossy(&status.stdout));
}
