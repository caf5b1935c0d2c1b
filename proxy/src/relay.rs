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
