//! The request loop: frames in, replies out, strictly one request at a time.

use futures::StreamExt;
use qga_wire::{CodecError, QgaCodec};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::FramedRead;

use crate::commands::Agent;

/// Output buffers larger than this are released after the reply, so the agent does not
/// keep the memory of its largest reply for the rest of its life.
const KEEP_OUTPUT_CAPACITY: usize = 64 * 1024;

/// Serves one connection (or one open serial port) until the peer goes away.
///
/// Each call starts with a fresh parser, so garbage left by one client never affects the
/// next. Returns `Ok(())` on end of stream.
pub async fn serve<R, W>(
    reader: R,
    mut writer: W,
    agent: &Agent,
    max_message: usize,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = FramedRead::new(reader, QgaCodec::new(max_message));
    let mut out = Vec::new();
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(CodecError::Io(e)) => return Err(e),
            Err(e) => return Err(std::io::Error::other(e)),
        };
        agent.handle_frame(frame, &mut out);
        if !out.is_empty() {
            writer.write_all(&out).await?;
            writer.flush().await?;
        }
        out.clear();
        if out.capacity() > KEEP_OUTPUT_CAPACITY {
            out = Vec::new();
        }
        if frames.read_buffer().capacity() > KEEP_OUTPUT_CAPACITY && frames.read_buffer().is_empty()
        {
            *frames.read_buffer_mut() = bytes::BytesMut::new();
        }
    }
    Ok(())
}
