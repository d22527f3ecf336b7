//! `tollgate::serve` on an ephemeral port, on its own thread and runtime, so every test of a
//! binary (each with its own tokio runtime) can reach it. Shared by the end-to-end test binaries
//! (`#[path]`-included).

use std::net::SocketAddr;

/// Serves `config` without metering until the test binary exits; returns its address once its
/// models are loaded (`/health` answers 200).
pub fn serve(config: tollgate_gateway::config::Config) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            tollgate::serve(
                listener,
                config,
                tollgate::Metering::default(),
                std::future::pending(),
            )
            .await
            .unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    while !healthy(addr) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    addr
}

/// Whether `GET /health` answers 200 (plain HTTP/1.0 over a socket: callers may be inside a
/// runtime already).
fn healthy(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut socket) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let mut answer = String::new();
    socket
        .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .and_then(|()| socket.read_to_string(&mut answer))
        .is_ok()
        && answer.starts_with("HTTP/1.0 200")
}
