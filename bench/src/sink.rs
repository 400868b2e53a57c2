//! The sink: the destination every benchmarked path ends at.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// First byte a client sends to the sink: discard everything that follows.
pub const MODE_DISCARD: u8 = b'D';
/// First byte a client sends to the sink: echo everything, this byte included.
pub const MODE_ECHO: u8 = b'E';
/// Read size of a connection: as large as the generator's bulk writes, so a discarding
/// sink needs one read per write and is not the bottleneck.
const DISCARD_READ: usize = 256 * 1024;
/// Pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Prints `listening ADDR`, then serves until killed.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; DISCARD_READ];
            let n = match s.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            if buf.first() == Some(&MODE_ECHO) {
                // What arrived goes back in one write, mode byte included: writing the mode
                // byte on its own would make two small writes per round trip, which a
                // proxy without TCP_NODELAY holds back for a delayed ACK (about 40 ms).
                if s.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            } else {
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
}
