//! The bodies the blob benchmark moves: one shared chunk repeated to any length, so neither
//! the generator nor the upstream allocates or copies per frame and the path under test is
//! what the figures measure.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Frame size of every body: as large as the CONNECT benchmark's bulk writes, so per-frame
/// overhead in the generator and the upstream is negligible.
pub const CHUNK: usize = 256 * 1024;

/// The bytes every body is made of (a fixed pattern: TLS does not compress, so its content
/// does not matter).
pub fn chunk() -> Bytes {
    Bytes::from(vec![0x5a; CHUNK])
}

/// A body of an exact length, made of `chunk` repeated (the last frame cut short).
#[derive(Debug, Clone)]
pub struct Repeat {
    /// What every frame is a slice of; shared, so a frame costs a reference count.
    chunk: Bytes,
    /// Bytes still to send.
    left: u64,
}

impl Repeat {
    /// `len` bytes of `chunk` repeated; an empty chunk makes an empty body whatever `len`.
    pub fn new(chunk: Bytes, len: u64) -> Self {
        let left = if chunk.is_empty() { 0 } else { len };
        Self { chunk, left }
    }

    /// No body at all (GET requests, 201 answers).
    pub fn empty() -> Self {
        Self::new(Bytes::new(), 0)
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.left).map_or(self.chunk.len(), |l| l.min(self.chunk.len()));
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn yields_exactly_the_length_asked() {
        let body = Repeat::new(Bytes::from_static(b"abc"), 7);
        assert_eq!(body.size_hint().exact(), Some(7));
        let all = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(all.ok().as_deref(), Some(&b"abcabca"[..]));
    }

    #[tokio::test]
    async fn empty_chunk_is_an_empty_body() {
        let body = Repeat::new(Bytes::new(), 10);
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
