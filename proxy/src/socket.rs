//! Where a redirected connection was going: `SO_ORIGINAL_DST` (through
//! socket2's safe wrapper, so this crate needs no `unsafe`).

use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// The original destination of a connection redirected by iptables; for a
/// connection that was not redirected, its local address.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match orig.ok().and_then(|a| a.as_socket()) {
        Some(addr) => Ok(addr),
        None => Ok(local),
    }
}
