//! The sink: the destination every benchmarked path ends at.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// First byte a client sends to the sink: discard everything that follows.
pub const MODE_DISCARD: u8 = b'D';
/// First byte a client sends to the sink: echo everything, this byte included.
pub const MODE_ECHO: u8 = b'E';
/// Read size of a discarding connection: as large as the generator's bulk writes, so the
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
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            if mode[0] == MODE_ECHO {
                let _ = s.write_all(&mode).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            } else {
                let mut buf = vec![0u8; DISCARD_READ];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
}
