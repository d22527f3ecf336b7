//! The client side of `--idle-connections` and `--slow-streams`: connections held open to the
//! gateway while the load runs, on a thread and runtime of their own (so their work never
//! delays the load generator's requests in its queue).
//!
//! - An idle connection is one HTTP/1.1 keep-alive connection (hyper's single-connection
//!   client, so each is exactly one socket) that made one non-streamed request and then sends
//!   nothing; at the end it must answer a second request, which proves the gateway kept it.
//! - A slow stream is one streamed request to the model the slow upstream serves
//!   ([`super::trickle`]): one piece every 100 ms until the upstream is released, then the
//!   finish, the usage and `data: [DONE]`. It counts the pieces it read and the longest gap
//!   between two of them.
//!
//! It does not decide what is measured or when; [`super::conns`] does.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Request};
use hyper_util::rt::TokioIo;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Connections opened at once while opening idle connections or checking them.
const OPENING_AT_ONCE: usize = 64;

/// A thread with a single-threaded tokio runtime of its own, stopped (its tasks dropped, their
/// sockets closed) when this is dropped.
pub struct Side {
    handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Side {
    pub fn start(name: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `task` on this side's thread.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where held requests go: the gateway's address, a path, and the `Authorization` header.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub path: String,
    pub auth: String,
}

type Conn = SendRequest<Full<Bytes>>;

/// Error messages and how often each occurred.
#[derive(Debug, Default, Clone)]
pub struct Errors(pub HashMap<String, u64>);

impl Errors {
    pub fn add(&mut self, message: String) {
        *self.0.entry(message).or_default() += 1;
    }

    /// Adds `other`'s errors to these.
    pub fn merge(&mut self, other: Self) {
        for (message, n) in other.0 {
            *self.0.entry(message).or_default() += n;
        }
    }

    pub fn count(&self) -> u64 {
        self.0.values().sum()
    }

    /// The messages, most frequent first.
    pub fn sorted(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.0.iter().map(|(m, n)| (m.clone(), *n)).collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }
}

/// A new HTTP/1.1 connection to `addr`; its driver runs on the current runtime until the
/// server closes it or the returned sender is dropped.
async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

/// POSTs `body` on `conn`: the response, its body still to read.
async fn post(
    conn: &mut Conn,
    to: &Endpoint,
    body: Bytes,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    conn.ready()
        .await
        .map_err(|e| format!("the connection was closed: {e}"))?;
    let request = Request::post(to.path.as_str())
        .header(header::HOST, to.addr.to_string())
        .header(header::AUTHORIZATION, to.auth.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    conn.send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))
}

/// One non-streamed request on `conn`, read to the end; an error unless it was answered 200.
async fn request(conn: &mut Conn, to: &Endpoint, body: Bytes) -> Result<(), String> {
    let response = post(conn, to, body).await?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the response: {e}"))?
        .to_bytes();
    if status.is_success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&bytes);
        Err(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ))
    }
}

/// Opens `n` connections, each having made one request: the open ones, and the errors of the
/// others. Runs on the side's runtime (the connections' drivers stay there).
pub async fn open_idle(to: Endpoint, body: Bytes, n: usize) -> (Vec<Conn>, Errors) {
    let results: Vec<Result<Conn, String>> = futures::stream::iter(0..n)
        .map(|_| {
            let (to, body) = (to.clone(), body.clone());
            async move {
                let mut conn = connect(to.addr).await?;
                request(&mut conn, &to, body).await?;
                Ok(conn)
            }
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .collect()
        .await;
    let mut errors = Errors::default();
    let mut open = Vec::with_capacity(n);
    for r in results {
        match r {
            Ok(c) => open.push(c),
            Err(e) => errors.add(format!("opening an idle connection: {e}")),
        }
    }
    (open, errors)
}

/// A second request on each held connection: how many answered, and the errors of the others
/// (a connection the gateway closed meanwhile is one).
pub async fn recheck_idle(to: Endpoint, body: Bytes, conns: Vec<Conn>) -> (u64, Errors) {
    let results: Vec<Result<(), String>> = futures::stream::iter(conns)
        .map(|mut conn| {
            let (to, body) = (to.clone(), body.clone());
            async move {
                if conn.is_closed() {
                    return Err("the gateway closed it while it was idle".to_string());
                }
                request(&mut conn, &to, body).await
            }
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .collect()
        .await;
    let mut errors = Errors::default();
    let mut ok = 0;
    for r in results {
        match r {
            Ok(()) => ok += 1,
            Err(e) => errors.add(format!("an idle connection's second request: {e}")),
        }
    }
    (ok, errors)
}

/// What one slow stream read.
#[derive(Debug, Clone, Copy)]
pub struct StreamEnd {
    pub pieces: u64,
    pub longest_gap: Duration,
}

/// The piece the slow upstream sends, as it appears in the gateway's chunks.
pub const PIECE: &str = "tick";

/// One slow stream through the gateway, read to its end. `started` counts the streams that
/// have read their first piece.
pub async fn slow_stream(
    to: Endpoint,
    body: Bytes,
    started: Arc<AtomicU64>,
) -> Result<StreamEnd, String> {
    let mut conn = connect(to.addr).await?;
    let response = post(&mut conn, &to, body).await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        return Err(format!(
            "HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    let mut events = Events::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the stream broke: {e}"))?;
        if let Ok(data) = frame.into_data() {
            let before = events.pieces;
            events.read(&data)?;
            if before == 0 && events.pieces > 0 {
                started.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if !events.done {
        return Err("the stream ended without data: [DONE]".into());
    }
    Ok(StreamEnd {
        pieces: events.pieces,
        longest_gap: events.longest_gap,
    })
}

/// The server-sent events of one stream, as they arrive in arbitrary pieces.
#[derive(Default)]
struct Events {
    pending: Vec<u8>,
    pieces: u64,
    last_piece: Option<Instant>,
    longest_gap: Duration,
    done: bool,
}

impl Events {
    fn read(&mut self, data: &[u8]) -> Result<(), String> {
        self.pending.extend_from_slice(data);
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            self.event(&event)?;
        }
        Ok(())
    }

    fn event(&mut self, event: &[u8]) -> Result<(), String> {
        let Some(data) = event.strip_prefix(b"data: ") else {
            return Ok(()); // a comment (`: keep-alive`)
        };
        if data.starts_with(b"[DONE]") {
            self.done = true;
        } else if contains(data, b"\"error\":") {
            return Err(format!(
                "the stream carried an error event: {}",
                String::from_utf8_lossy(data)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ));
        } else if contains(data, format!("\"content\":\"{PIECE}\"").as_bytes()) {
            let now = Instant::now();
            if let Some(last) = self.last_piece {
                self.longest_gap = self.longest_gap.max(now - last);
            }
            self.last_piece = Some(now);
            self.pieces += 1;
        }
        Ok(())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_are_read_whole() {
        let piece =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{PIECE}\"}}}}]}}\n\n");
        let text = format!("{piece}: keep-alive\n\n{piece}data: [DONE]\n\n");
        for split in [1, 7, 40, text.len() - 3] {
            let mut e = Events::default();
            e.read(&text.as_bytes()[..split]).unwrap();
            e.read(&text.as_bytes()[split..]).unwrap();
            assert_eq!((e.pieces, e.done), (2, true), "split at {split}");
        }
        let mut e = Events::default();
        let error = e.read(b"data: {\"error\":{\"message\":\"upstream failed\"}}\n\n");
        assert!(error.unwrap_err().contains("upstream failed"));
    }
}
