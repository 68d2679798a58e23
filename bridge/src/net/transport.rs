//! Listening with limits, shared by the three servers.
//!
//! - [`Gate`]: accepts TCP connections with at most a configured number open at once.
//!   Connections over the cap are closed at once (HTTP servers first write a `503`), and
//!   accept errors such as running out of file descriptors pause accepting instead of
//!   spinning.
//! - [`http1`]: an HTTP/1 connection builder with a header-read timeout, so a client that
//!   opens a socket and sends nothing, or a header a byte at a time, is cut off.
//! - [`secure`] and [`incoming`]: a TLS handshake, when TLS is configured, bounded in
//!   time and off the accept loop; [`Conn`] is what the servers then speak HTTP on.
//! - [`BodyBudget`]: bytes of large request bodies being read at once, bridge-wide, so
//!   many large requests arriving together cannot multiply the bridge's memory.

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use hyper_util::rt::TokioTimer;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

pub use crate::peer::{Peer, UnixPeer};
use crate::{
    metrics::Metrics,
    net::{
        Server,
        tls::{Alpn, Tls},
    },
};

/// How long accepting pauses after an accept error (file descriptors exhausted, say).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long a refused HTTP connection is given to read its `503`.
const REFUSAL_DRAIN: Duration = Duration::from_secs(1);

/// Refused connections answered at once; more are closed without an answer.
const MAX_REFUSING: usize = 64;

/// An accepted socket, TCP or unix.
#[derive(Debug)]
pub enum Socket {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

/// Calls the poll method on whichever socket it is.
macro_rules! delegate {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).$method($($arg),*),
            Socket::Unix(s) => Pin::new(s).$method($($arg),*),
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_shutdown(cx))
    }
}

/// A connection admitted under its server's cap; the slot frees when it drops.
#[derive(Debug)]
pub struct Admitted {
    stream: Socket,
    _slot: OwnedSemaphorePermit,
}

impl Admitted {
    /// Who is at the other end, as far as the socket knows.
    pub fn peer(&self) -> Peer {
        match &self.stream {
            Socket::Tcp(s) => Peer {
                addr: s.peer_addr().ok(),
                ..Peer::default()
            },
            Socket::Unix(s) => Peer {
                unix: s.peer_cred().ok().map(|c| UnixPeer {
                    uid: c.uid(),
                    gid: c.gid(),
                    pid: c.pid(),
                }),
                ..Peer::default()
            },
        }
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A listening socket, TCP or unix.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket.
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Self::Tcp(l)
    }
}

impl Listener {
    async fn accept(&self) -> io::Result<Socket> {
        match self {
            Self::Tcp(l) => {
                let (s, _) = l.accept().await?;
                // Best effort: a socket that refuses NODELAY still works.
                let _ = s.set_nodelay(true);
                Ok(Socket::Tcp(s))
            }
            Self::Unix(l) => Ok(Socket::Unix(l.accept().await?.0)),
        }
    }
}

/// Listens on the unix socket `path` with file mode `mode` and group `group`. A stale
/// socket left by a previous run is replaced; a live one (another process answers) or a
/// file that is not a socket is refused, saying so. The socket never exists with looser
/// permissions than asked for.
pub fn bind_unix(path: &Path, mode: u32, group: Option<u32>) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another process is listening on {}", path.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?
                }
                Err(e) => return Err(e),
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bound, given its group and mode inside a private directory next to `path` (where
    // nobody else can swap it for a symlink), then renamed into place: the socket is
    // never reachable with other permissions than asked for.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let private = parent.join(format!(".qga-bridge-{}-{nonce}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("socket");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        if let Some(gid) = group {
            rustix::fs::chown(&staged, None, Some(rustix::fs::Gid::from_raw(gid)))?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok::<_, io::Error>(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    let listener = bound?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// A listener that keeps at most `cap` of its connections open.
#[derive(Debug)]
pub struct Gate {
    listener: Listener,
    slots: Arc<Semaphore>,
    cap: usize,
    server: Server,
    /// Written (best effort) to a refused connection before it is closed.
    refusal: Option<Vec<u8>>,
    /// Whether the last connection was refused; refusals are logged once per episode.
    full: AtomicBool,
    /// Refused connections being answered at once.
    refusing: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Gate {
    /// Serves `listener` for `server` (a metrics label) with at most `cap` connections.
    pub fn new(
        listener: impl Into<Listener>,
        cap: usize,
        server: Server,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            listener: listener.into(),
            slots: Arc::new(Semaphore::new(cap)),
            cap,
            server,
            refusal: None,
            full: AtomicBool::new(false),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            metrics,
        }
    }

    /// The TCP address listened on (`None` for a unix socket).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }

    /// Refused HTTP connections get `503 Service Unavailable` saying why.
    pub fn http(mut self) -> Self {
        let body = format!(
            "too many connections to the bridge's {} server (limit {})\n",
            self.server.name(),
            self.cap
        );
        self.refusal = Some(
            format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
                 content-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        );
        self
    }

    /// The next connection admitted under the cap.
    pub async fn accept(&self) -> Admitted {
        loop {
            let stream = match self.listener.accept().await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(server = self.server.name(), error = %e, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    self.full.store(false, Ordering::Relaxed);
                    return Admitted {
                        stream,
                        _slot: slot,
                    };
                }
                Err(_) => self.refuse(stream),
            }
        }
    }

    fn refuse(&self, stream: Socket) {
        self.metrics.refused(self.server.name(), "connections");
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                server = self.server.name(),
                limit = self.cap,
                "connection limit reached; refusing new connections"
            );
        }
        let Some(refusal) = self.refusal.clone() else {
            return;
        };
        // Closing a socket with unread input resets it, and a reset can destroy the
        // answer before the client reads it: answer, then drain briefly before closing.
        // A bounded number of refusals at once; beyond that, the socket is just closed.
        let Ok(slot) = self.refusing.clone().try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            let _slot = slot;
            let mut stream = stream;
            let answer = async {
                stream.write_all(&refusal).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                io::Result::Ok(())
            };
            let _ = tokio::time::timeout(REFUSAL_DRAIN, answer).await;
        });
    }
}

/// An admitted connection, in TLS when TLS is configured.
#[derive(Debug)]
pub enum Conn {
    /// Plain TCP.
    Plain(Admitted),
    /// TLS over TCP.
    Tls(Box<TlsStream<Admitted>>),
}

impl Conn {
    /// Its peer.
    pub fn peer(&self) -> Peer {
        match self {
            Self::Plain(a) => a.peer(),
            Self::Tls(t) => {
                let (tcp, session) = t.get_ref();
                Peer {
                    certificate: session
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned()),
                    ..tcp.peer()
                }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(a) => Pin::new(a).poll_read(cx, buf),
            Self::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(a) => Pin::new(a).poll_write(cx, buf),
            Self::Tls(t) => Pin::new(&mut **t).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(a) => Pin::new(a).poll_write_vectored(cx, bufs),
            Self::Tls(t) => Pin::new(&mut **t).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(a) => a.is_write_vectored(),
            Self::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(a) => Pin::new(a).poll_flush(cx),
            Self::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(a) => Pin::new(a).poll_shutdown(cx),
            Self::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer()
    }
}

/// Completes `conn`'s TLS handshake within `timeout` when `tls` is set.
pub async fn secure(
    conn: Admitted,
    tls: Option<&Tls>,
    alpn: Alpn,
    timeout: Duration,
) -> io::Result<Conn> {
    let Some(tls) = tls else {
        return Ok(Conn::Plain(conn));
    };
    match tokio::time::timeout(timeout, tls.acceptor(alpn).accept(conn)).await {
        Ok(Ok(stream)) => Ok(Conn::Tls(Box::new(stream))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

/// The connections `gate` admits, through their TLS handshakes (each in its own task,
/// within `timeout`), as a stream for tonic. Failed handshakes are counted and dropped.
pub fn incoming(
    gate: Gate,
    tls: Option<Arc<Tls>>,
    timeout: Duration,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        loop {
            let admitted = tokio::select! {
                a = gate.accept() => a,
                () = tx.closed() => return,
            };
            let (tx, tls, metrics) = (tx.clone(), tls.clone(), gate.metrics.clone());
            let server = gate.server.name();
            tokio::spawn(async move {
                match secure(admitted, tls.as_deref(), Alpn::H2, timeout).await {
                    Ok(conn) => {
                        let _ = tx.send(conn).await;
                    }
                    Err(e) => {
                        metrics.refused(server, "tls_handshake");
                        tracing::debug!(server, error = %e, "TLS handshake failed");
                    }
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        let conn = rx.recv().await?;
        Some((Ok(conn), rx))
    })
}

/// Returns when `shutdown` turns true (or its sender is gone).
pub async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// An HTTP/1 server connection builder that closes connections whose request header does
/// not arrive whole within `header_read_timeout` (idle keep-alive connections included).
pub fn http1(header_read_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
}

/// Serves HTTP/1 (and upgrades to WebSocket) on `conn` with `svc` until the peer closes,
/// or until `stopped` fires: then the request in progress finishes and the connection
/// closes.
pub async fn serve_http1<S, B>(
    conn: Conn,
    svc: S,
    header_read_timeout: Duration,
    stopped: impl Future<Output = ()>,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1(header_read_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
        .with_upgrades();
    tokio::pin!(conn, stopped);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = &mut stopped => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Bodies at least this large draw on the [`BodyBudget`]; smaller ones (every ordinary
/// call, a full 4096-entry set included) never wait for it.
pub const LARGE_BODY_BYTES: u64 = 256 * 1024;

/// Bytes of large request bodies being read and handled at once, bridge-wide.
#[derive(Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: u32,
    max_body: u32,
}

impl BodyBudget {
    /// A budget of `total` bytes for bodies of at most `max_body` bytes each.
    pub fn new(total: u32, max_body: u32) -> Arc<Self> {
        // A budget smaller than one body would block that body for ever.
        let total = total.max(max_body);
        Arc::new(Self {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
            max_body,
        })
    }

    /// Waits until a body declaring `content_length` bytes (`None`: chunked, so the
    /// largest allowed) may be read. Small bodies pass at once.
    pub async fn admit(&self, content_length: Option<u64>) -> Option<OwnedSemaphorePermit> {
        let declared = content_length.unwrap_or(u64::from(self.max_body));
        if declared < LARGE_BODY_BYTES {
            return None;
        }
        // Bodies over the limit are refused by the server without being read; they cost
        // what the server reads of them at most.
        let cost = u32::try_from(declared)
            .unwrap_or(u32::MAX)
            .min(self.max_body)
            .min(self.total);
        // The semaphore is never closed.
        self.bytes.clone().acquire_many_owned(cost).await.ok()
    }
}
