//! The listening socket, with room for a burst of connections.

use std::io;

use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel queues for `accept`. `TcpListener::bind` asks for 128, and a
/// client that opens more at once (a worker at prefetch 256 against an API that answers
/// slowly) has the rest of its SYNs dropped and retried a second later.
const BACKLOG: u32 = 1024;

/// Binds the first address `addr` resolves to that can be bound, and listens on it.
pub(crate) async fn bind(addr: &str) -> io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}
