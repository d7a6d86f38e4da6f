//! Captured guest stdout and stderr. Bounded, and writes past the bound are dropped and counted
//! rather than refused: a refused write makes a Rust guest panic, so a chatty guest would crash
//! (and lose the panic message it was about to print) instead of being truncated.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// One captured stream. Clones share the buffer.
#[derive(Clone)]
pub(crate) struct CappedPipe {
    inner: Arc<Mutex<Captured>>,
}

struct Captured {
    buf: Vec<u8>,
    cap: usize,
    dropped: usize,
}

impl CappedPipe {
    pub(crate) fn new(cap: usize) -> Self {
        let captured = Captured {
            buf: Vec::new(),
            cap,
            dropped: 0,
        };
        Self {
            inner: Arc::new(Mutex::new(captured)),
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = c.cap.saturating_sub(c.buf.len());
        let (kept, over) = bytes.split_at(room.min(bytes.len()));
        c.buf.extend_from_slice(kept);
        c.dropped += over.len();
    }

    /// What was written, and how many bytes were dropped over the cap.
    pub(crate) fn take(&self) -> (Vec<u8>, usize) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut c.buf), std::mem::take(&mut c.dropped))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: whatever does not fit is dropped in `push`.
        Ok(64 << 10)
    }
}

impl AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
