//! Accepting connections without letting idle or broken ones pile up: both servers (gRPC and
//! admin) accept through a [`Listener`], which
//!
//! - caps the connections open at once: one over the cap is accepted and closed at once, so
//!   that the kernel's backlog never holds connections nobody will serve;
//! - closes a connection whose first bytes (the HTTP/2 preface, or an HTTP/1 request line) do
//!   not arrive within a handshake timeout, which ends idle and half-open TCP connections;
//! - backs off on accept errors (EMFILE when the descriptor limit is reached), so that a full
//!   descriptor table does not turn the accept loop into a busy loop.
//!
//! What follows the handshake is bounded by the protocols' own timers: HTTP/2 keepalive pings
//! on the gRPC port, hyper's header-read timeout on the admin port.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The first wait after an accept error; doubled on each further error, as Go's net/http does.
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// The longest wait between accept attempts: short enough to serve again within a second of
/// descriptors being freed.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The bounds a [`Listener`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long a new connection has to send its first `handshake_bytes` bytes.
    pub handshake_timeout: Duration,
    /// How many bytes complete the handshake: 24 for the HTTP/2 preface, 1 for HTTP/1.
    pub handshake_bytes: usize,
}

/// A listener that enforces [`ConnectionLimits`].
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    slots: Arc<Semaphore>,
    limits: ConnectionLimits,
    backoff: Option<Duration>,
}

impl Listener {
    /// Enforces `limits` on what `tcp` accepts.
    pub fn new(tcp: TcpListener, limits: ConnectionLimits) -> Self {
        Self {
            tcp,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            backoff: None,
        }
    }

    /// The next connection within the cap. Never fails: an accept error is logged and retried
    /// after a growing pause.
    pub async fn accept(&mut self) -> (Connection, SocketAddr) {
        loop {
            match self.tcp.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = None;
                    let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                        tracing::debug!(%peer, max = self.limits.max_connections,
                            "connection refused: connection cap reached");
                        drop(stream);
                        continue;
                    };
                    // Latency over throughput: gRPC messages are small and answered at once.
                    let _ = stream.set_nodelay(true);
                    return (Connection::new(stream, slot, self.limits), peer);
                }
                // The peer gave up before we accepted it: nothing to wait for.
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    let wait = self
                        .backoff
                        .map_or(FIRST_ACCEPT_BACKOFF, |b| (b * 2).min(MAX_ACCEPT_BACKOFF));
                    // One line per doubling at most, so a long EMFILE spell logs a handful.
                    if self.backoff != Some(MAX_ACCEPT_BACKOFF) {
                        tracing::warn!(error = %err, retry_in = ?wait, "cannot accept connections");
                    }
                    self.backoff = Some(wait);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The connections as a stream, as tonic's `serve_with_incoming` takes them.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Connection, std::convert::Infallible>> {
        futures_util::stream::unfold(self, |mut listener| async move {
            let (connection, _) = listener.accept().await;
            Some((Ok(connection), listener))
        })
    }
}

/// Errors about one connection rather than the listener.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// An accepted connection: holds its slot under the cap, and fails its reads if the
/// handshake does not arrive in time.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    handshake: Option<Handshake>,
}

#[derive(Debug)]
struct Handshake {
    missing: usize,
    deadline: Pin<Box<Sleep>>,
}

impl Connection {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, limits: ConnectionLimits) -> Self {
        let handshake = Handshake {
            missing: limits.handshake_bytes.max(1),
            deadline: Box::pin(tokio::time::sleep_until(
                Instant::now() + limits.handshake_timeout,
            )),
        };
        Self {
            stream,
            _slot: slot,
            handshake: Some(handshake),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if let Some(handshake) = &mut this.handshake {
                    let read = buf.filled().len() - before;
                    handshake.missing = handshake.missing.saturating_sub(read);
                    if handshake.missing == 0 {
                        this.handshake = None;
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if let Some(handshake) = &mut this.handshake {
                    ready!(handshake.deadline.as_mut().poll(cx));
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no handshake within the handshake timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

/// `impl AsyncWrite for $type` by its `stream` field: the wrappers of this module and of
/// [`crate::transport::tls`] watch reads only.
macro_rules! write_through_stream {
    ($type:ty) => {
        impl tokio::io::AsyncWrite for $type {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.stream.is_write_vectored()
            }
        }
    };
}
pub(crate) use write_through_stream;

write_through_stream!(Connection);

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max_connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            handshake_timeout: Duration::from_secs(5),
            handshake_bytes: 3,
        }
    }

    async fn listener(limits: ConnectionLimits) -> (Listener, SocketAddr) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = tcp.local_addr().unwrap();
        (Listener::new(tcp, limits), address)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_at_the_handshake_timeout() {
        let (mut listener, address) = listener(limits(4)).await;
        let _client = TcpStream::connect(address).await.unwrap();
        let (mut connection, _) = listener.accept().await;
        let mut byte = [0u8; 1];
        let started = Instant::now();
        let err = connection.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_handshake_a_connection_may_be_quiet() {
        let (mut listener, address) = listener(limits(4)).await;
        let mut client = TcpStream::connect(address).await.unwrap();
        let (mut connection, _) = listener.accept().await;
        client.write_all(b"abc").await.unwrap();
        let mut read = [0u8; 3];
        connection.read_exact(&mut read).await.unwrap();
        let quiet = tokio::time::timeout(Duration::from_secs(60), connection.read(&mut read)).await;
        assert!(quiet.is_err(), "a read after the handshake has no deadline");
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_and_a_freed_slot_serves_again() {
        let (mut listener, address) = listener(limits(1)).await;
        let _first = TcpStream::connect(address).await.unwrap();
        let (held, _) = listener.accept().await;
        let mut over = TcpStream::connect(address).await.unwrap();
        let accepting = tokio::spawn(async move {
            let accepted = listener.accept().await;
            (listener, accepted)
        });
        // The second connection is closed by the server: EOF (or a reset), not a hang.
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), over.read(&mut byte))
            .await
            .expect("the connection over the cap is closed at once");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        drop(held);
        let mut third = TcpStream::connect(address).await.unwrap();
        third.write_all(b"abc").await.unwrap();
        let (_listener, (mut connection, _)) =
            tokio::time::timeout(Duration::from_secs(5), accepting)
                .await
                .expect("a freed slot accepts")
                .unwrap();
        let mut read = [0u8; 3];
        connection.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"abc");
    }
}
