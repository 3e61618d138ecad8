//! A UDP forwarding proxy that can drop everything, to cut a server off the network in
//! tests (QUIC runs over UDP). Loopback only; it lives as long as the test holds it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub struct UdpProxy {
    pub addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl UdpProxy {
    /// Forwards datagrams arriving at `addr` to `target`, and the answers back.
    pub async fn start(addr: SocketAddr, target: SocketAddr) -> UdpProxy {
        let front = Arc::new(UdpSocket::bind(addr).await.unwrap());
        let blocked = Arc::new(AtomicBool::new(false));
        let flag = blocked.clone();
        let task = tokio::spawn(async move {
            let mut upstreams: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else { return };
                if flag.load(Ordering::Relaxed) {
                    continue;
                }
                let upstream = match upstreams.get(&client) {
                    Some((socket, _)) => socket.clone(),
                    None => {
                        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        socket.connect(target).await.unwrap();
                        let (back, front, flag) = (socket.clone(), front.clone(), flag.clone());
                        let reply = tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            loop {
                                match back.recv(&mut buf).await {
                                    Ok(n) => {
                                        if !flag.load(Ordering::Relaxed) {
                                            let _ = front.send_to(&buf[..n], client).await;
                                        }
                                    }
                                    // The target was down for a moment (an ICMP "port
                                    // unreachable" on the connected socket): it may come back.
                                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                                    Err(_) => return,
                                }
                            }
                        });
                        upstreams.insert(client, (socket.clone(), reply));
                        socket
                    }
                };
                let _ = upstream.send(&buf[..n]).await;
            }
        });
        UdpProxy { addr, blocked, task }
    }

    /// Drops (true) or forwards (false) everything from now on.
    pub fn block(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Relaxed);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
