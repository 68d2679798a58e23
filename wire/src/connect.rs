//! Where byte streams to an agent or a QEMU monitor come from: a [`Connector`] opens a new
//! one per connection. Production code uses [`UnixConnector`]; tests hand in in-memory
//! pipes, so the protocols above are tested without sockets.

use std::{future::Future, io, path::PathBuf};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::UnixStream,
};

/// Opens connections: a new byte stream each time.
pub trait Connector: Send + Sync + 'static {
    /// The byte stream of one connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Opens a new connection.
    fn connect(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// A unix socket (QEMU's virtio-serial chardev, a `-qmp unix:...` monitor); its errors
/// name the path.
#[derive(Debug, Clone)]
pub struct UnixConnector(pub PathBuf);

impl Connector for UnixConnector {
    type Stream = UnixStream;

    async fn connect(&self) -> io::Result<UnixStream> {
        UnixStream::connect(&self.0)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.0.display())))
    }
}
