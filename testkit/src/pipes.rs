//! In-memory connections for a client under test: [`Pipes`] is the [`Connector`] the
//! client opens its connections with, each one end of a fresh `tokio::io::duplex`;
//! [`PipeEnds`] is the test's side, which takes the other end of each connection (to play
//! the agent or QEMU), counts the connection attempts and can refuse them.
//!
//! Shared by the bridge's session tests and the QMP client's tests.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use qga_wire::connect::Connector;
use tokio::{io::DuplexStream, sync::mpsc};

/// Hands the client one end of a fresh in-memory pipe per connection, the test the other
/// (through its [`PipeEnds`]).
#[derive(Debug)]
pub struct Pipes {
    ends: mpsc::UnboundedSender<DuplexStream>,
    refuse: Arc<AtomicBool>,
    connects: Arc<AtomicUsize>,
    capacity: usize,
}

/// The test's side of [`Pipes`]: the far end of each connection, the attempts counted,
/// and a switch that refuses them.
#[derive(Debug)]
pub struct PipeEnds {
    ends: mpsc::UnboundedReceiver<DuplexStream>,
    refuse: Arc<AtomicBool>,
    connects: Arc<AtomicUsize>,
}

impl Pipes {
    /// A connector whose pipes buffer `capacity` bytes each way, and the test's side of it.
    pub fn new(capacity: usize) -> (Self, PipeEnds) {
        let (tx, ends) = mpsc::unbounded_channel();
        let refuse = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicUsize::new(0));
        let pipes = Self {
            ends: tx,
            refuse: refuse.clone(),
            connects: connects.clone(),
            capacity,
        };
        (
            pipes,
            PipeEnds {
                ends,
                refuse,
                connects,
            },
        )
    }
}

impl Connector for Pipes {
    type Stream = DuplexStream;

    /// Counts the attempt; refused while [`PipeEnds::refuse`] says so, or once the test's
    /// side is gone.
    async fn connect(&self) -> io::Result<DuplexStream> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        if self.refuse.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::ConnectionRefused.into());
        }
        let (ours, theirs) = tokio::io::duplex(self.capacity);
        self.ends
            .send(theirs)
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        Ok(ours)
    }
}

impl PipeEnds {
    /// The far end of the next connection the client opens; `None` once the [`Pipes`]
    /// are dropped and every connection taken.
    pub async fn accept(&mut self) -> Option<DuplexStream> {
        self.ends.recv().await
    }

    /// Refuses the connections attempted from now on (`true`), or lets them through.
    pub fn refuse(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }

    /// How many connections the client attempted so far, refused ones included.
    pub fn connects(&self) -> usize {
        self.connects.load(Ordering::SeqCst)
    }
}
