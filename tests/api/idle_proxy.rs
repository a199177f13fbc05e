//! A TCP proxy that cuts connections idle for longer than a limit, like a load balancer's idle
//! timeout (AWS ALB: 60 s) or a CDN's. Bytes in either direction count as activity. It can also
//! cut every open connection on demand, like a flaky mobile network.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct IdleProxy {
    pub addr: SocketAddr,
}

impl IdleProxy {
    pub async fn start(upstream: SocketAddr, idle_limit: Duration) -> Self {
        Self::cuttable(upstream, idle_limit, watch::channel(0).1).await
    }

    /// Also drops every open connection each time `cuts` changes.
    pub async fn cuttable(
        upstream: SocketAddr,
        idle_limit: Duration,
        cuts: watch::Receiver<u64>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let cut = async {
                        // A proxy nobody can cut (its sender is gone) just relays.
                        if cuts.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        () = relay(client, upstream, idle_limit) => {}
                        () = cut => {}
                    }
                });
            }
        });
        Self { addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, idle_limit: Duration) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    loop {
        let moved = tokio::time::timeout(idle_limit, async {
            tokio::select! {
                n = from_client.read(&mut up) => match n {
                    Ok(n) if n > 0 => to_server.write_all(&up[..n]).await.is_ok(),
                    _ => false,
                },
                n = from_server.read(&mut down) => match n {
                    Ok(n) if n > 0 => to_client.write_all(&down[..n]).await.is_ok(),
                    _ => false,
                },
            }
        })
        .await;
        // Idle too long, or either side closed: drop both connections.
        if !matches!(moved, Ok(true)) {
            return;
        }
    }
}
