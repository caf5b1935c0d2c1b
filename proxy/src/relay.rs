//! Opaque TCP relaying: bytes copied both ways until both sides close.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction. tokio's default of 8 KiB costs one read, one write
/// and (over mTLS) one TLS record per 8 KiB; 64 KiB lets rustls fill full
/// 16 KiB records and cuts the syscalls of a bulk stream by eight, for
/// 128 KiB per opaque connection (HTTP never takes this path).
pub const BUFFER: usize = 64 * 1024;

/// Copies between `a` and `b` in both directions until both are done;
/// returns the bytes sent each way (a → b, b → a).
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER, BUFFER).await
}

/// [`relay`], after first handing `a` what `b` has already said (a
/// server-first protocol's greeting, read while detecting).
pub async fn relay_greeted<A, B>(a: &mut A, b: &mut B, greeting: &[u8]) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    use tokio::io::AsyncWriteExt as _;
    if greeting.is_empty() {
        // The server closed without a word: nobody is left to talk to.
        a.shutdown().await?;
        return Ok((0, 0));
    }
    a.write_all(greeting).await?;
    let (sent, received) = relay(a, b).await?;
    Ok((sent, received + greeting.len() as u64))
}
