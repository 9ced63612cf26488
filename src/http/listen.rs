//! The server's listening socket.

use std::io;

use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel may hold for the server before it accepts them (capped by
/// `net.core.somaxconn`). The standard library's and tokio's 128 overflows when a few
/// hundred clients connect at once, and every dropped SYN costs its client the kernel's
/// 1 s retransmit: 256 clients connecting in one burst lost 50 SYNs, and their requests,
/// refused in ~20 ms, took 1.03 s (`cargo bench --bench serve -- admission`).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Listens on `host:port` (the first of its addresses that binds) with [`LISTEN_BACKLOG`].
pub async fn listen(host: &str, port: u16) -> io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As tokio's own bind does: a restarted server may rebind at once.
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host} has no address"),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// 300 clients connect while the server accepts none: each connect completes once the
    /// kernel queues it, which a 128-connection backlog would refuse for the last ~170.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_backlog() {
        let listener = listen("127.0.0.1", 0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..300 {
            let connect = tokio::net::TcpStream::connect(addr);
            let stream = tokio::time::timeout(Duration::from_millis(500), connect)
                .await
                .unwrap_or_else(|_| panic!("connection {i} was not queued"))
                .unwrap();
            held.push(stream);
        }
        drop(listener);
    }

    #[tokio::test]
    async fn a_host_without_an_address_is_an_error() {
        assert!(listen("no-such-host.invalid", 0).await.is_err());
    }
}
