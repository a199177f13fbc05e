//! The main listener's accept loop: cleartext HTTP/1.1 and h2c, or HTTPS with ALPN, each
//! connection served by the protocol it speaks, watched for graceful shutdown, with the peer's
//! address as `ConnectInfo` for the router.
//!
//! Why not axum's `serve` (or hyper-util's auto builder): to tell HTTP/2 from HTTP/1.1 they read
//! the first bytes of a connection and hand them back through a rewinding wrapper, whose first
//! read returns only those 24 bytes; hyper then reserves a fresh 8 KiB of room for its second read
//! and the connection's read buffer doubles to 16 KiB, held for the life of every SSE stream.
//! Peeking at the socket (for TLS: the ALPN result) decides without consuming anything, so
//! hyper's first read gets the whole request head into its 8 KiB buffer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::connections::{AcceptBackoff, Activity, ConnectionGate, ConnectionPlace};
use crate::http::body_end::BodyEnd;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cleartext connection may stay silent before its first byte (hyper then allows 30 s
/// for the rest of the request head).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 pings a quiet connection this often and drops it when a ping goes unanswered this
/// long: a peer that vanished without a FIN (a phone that lost its network) is noticed.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);
/// How long an idle connection asked to close may take to do so before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What a connection speaks, known before hyper reads a byte of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// Too few bytes yet to tell: hyper-util's auto builder reads and decides.
    Unsure,
}

/// The connection builders, configured once and shared by every connection (their timers and
/// settings would otherwise be copied into each connection's task for its whole life).
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new() -> Self {
        let mut http1 = http1::Builder::new();
        // With a timer hyper enforces its 30 s limit on reading a request head (slow clients).
        http1.timer(TokioTimer::new());
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_KEEPALIVE)
            .keep_alive_timeout(HTTP2_KEEPALIVE);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().timer(TokioTimer::new());
        auto.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_KEEPALIVE)
            .keep_alive_timeout(HTTP2_KEEPALIVE);
        Self { http1, http2, auto }
    }
}

/// Serves `router` until `stop` is cancelled, then waits for open connections to finish (the
/// caller bounds that wait). With `tls`, every connection is HTTPS. Connections past the
/// gate's caps are closed at once; an accept error backs off instead of spinning.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    gate: ConnectionGate,
    stop: CancellationToken,
    tune: impl Fn(&mut TcpStream),
) -> std::io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let builders = Arc::new(Builders::new());
    let connections = TaskTracker::new();
    let idle_timeout = gate.idle_timeout();
    let mut backoff = AcceptBackoff::default();
    loop {
        let (mut tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff.succeeded();
                    accepted
                }
                Err(e) => {
                    let delay = backoff.failed();
                    tracing::warn!(retry_in_ms = delay.as_millis() as u64, "accept failed: {e}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = stop.cancelled() => break,
                    }
                }
            },
            () = stop.cancelled() => break,
        };
        let Some(place) = gate.admit(peer.ip()) else {
            continue; // dropping the socket closes it
        };
        tune(&mut tcp);
        let connection = Connection {
            peer,
            router: router.clone(),
            builders: builders.clone(),
            stop: stop.clone(),
            idle_timeout,
            _place: place,
        };
        connections.spawn(connection.handle(tcp, acceptor.clone()));
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// One accepted connection and what it shares with the rest.
struct Connection {
    peer: SocketAddr,
    router: Router,
    builders: Arc<Builders>,
    stop: CancellationToken,
    idle_timeout: Duration,
    _place: ConnectionPlace,
}

impl Connection {
    /// From the first byte to the end. A task's memory is its largest state, held for the life
    /// of the connection — for an SSE client, the whole stream — so the rare, large states (a TLS
    /// handshake, HTTP/2, the auto builder) are boxed and a cleartext HTTP/1.1 connection carries
    /// only its own.
    async fn handle(self, tcp: TcpStream, acceptor: Option<TlsAcceptor>) {
        match acceptor {
            None => {
                // None: closed or silent before its first byte.
                if let Some(protocol) = sniff(&tcp).await {
                    self.serve(tcp, protocol).await;
                }
            }
            Some(acceptor) => {
                Box::pin(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    let Ok(Ok(tls)) = handshake.await else {
                        return; // a failed or stalled handshake is the client's problem
                    };
                    let protocol = match tls.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Protocol::Http2,
                        Some(_) => Protocol::Http1,
                        None => Protocol::Unsure,
                    };
                    self.serve(tls, protocol).await;
                })
                .await
            }
        }
    }

    async fn serve<I>(self, io: I, protocol: Protocol)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::default());
        let service = service(self.router.clone(), self.peer, activity.clone());
        let io = TokioIo::new(io);
        let builders = &self.builders;
        let ended: Result<(), Box<dyn std::error::Error + Send + Sync>> = match protocol {
            Protocol::Http1 => {
                let connection = builders.http1.serve_connection(io, service);
                self.run(connection, &activity).await.map_err(Into::into)
            }
            Protocol::Http2 => {
                let connection = builders.http2.serve_connection(io, service);
                Box::pin(self.run(connection, &activity))
                    .await
                    .map_err(Into::into)
            }
            Protocol::Unsure => {
                let connection = builders.auto.serve_connection(io, service).into_owned();
                Box::pin(self.run(connection, &activity)).await
            }
        };
        if let Err(e) = ended {
            tracing::debug!("connection ended: {e}");
        }
    }

    /// Drives a connection until it ends; on shutdown, or once idle for the timeout, asks it to
    /// finish gracefully (requests in flight complete, no new ones are taken) and lets it.
    async fn run<C: GracefulConnection>(
        &self,
        connection: C,
        activity: &Activity,
    ) -> Result<(), C::Error> {
        tokio::pin!(connection);
        let idle = tokio::select! {
            ended = connection.as_mut() => return ended,
            () = self.stop.cancelled() => false,
            () = activity.idle_for(self.idle_timeout) => true,
        };
        connection.as_mut().graceful_shutdown();
        if !idle {
            return connection.await; // the drain bounds this wait
        }
        // Nothing is in flight: an HTTP/2 peer that never acknowledges the GOAWAY must not keep
        // the connection either.
        tracing::debug!(peer = %self.peer, "closing an idle connection");
        match tokio::time::timeout(IDLE_CLOSE_GRACE, connection).await {
            Ok(ended) => ended,
            Err(_) => Ok(()),
        }
    }
}

/// The router as hyper's service for one connection: each request carries the peer's address
/// and counts as in flight until its response body is done.
fn service(
    router: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    axum::http::Request<Incoming>,
    Response = axum::http::Response<axum::body::Body>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |mut request: axum::http::Request<Incoming>| {
        let (router, busy) = (router.clone(), activity.begin());
        request
            .extensions_mut()
            .insert(ConnectInfo::<SocketAddr>(peer));
        async move {
            let response = router.oneshot(request).await?;
            let response = response.map(|body| BodyEnd::wrap(body, busy));
            Ok::<_, Infallible>(response)
        }
    })
}

/// Looks at a cleartext connection's first bytes without consuming them: an HTTP/2 connection
/// (prior knowledge, h2c) opens with `PRI * HTTP/2.0`, no HTTP/1.1 request does. `None` when the
/// client closed, failed or stayed silent before sending anything.
async fn sniff(tcp: &TcpStream) -> Option<Protocol> {
    const PREFACE: &[u8] = b"PRI ";
    let mut head = [0u8; PREFACE.len()];
    let peeked = tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.peek(&mut head)).await;
    match peeked.unwrap_or(Ok(0)) {
        Ok(0) | Err(_) => None,
        Ok(n) if head[..n] != PREFACE[..n] => Some(Protocol::Http1),
        Ok(n) if n == PREFACE.len() => Some(Protocol::Http2),
        Ok(_) => Some(Protocol::Unsure),
    }
}
