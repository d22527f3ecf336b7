//! The accept loop: HTTP/1.1 and HTTP/2 connections served with hyper, hardened for the open
//! internet.
//!
//! * A connection must send a complete request head within `header_read_timeout` of being
//!   ready for one, on a new connection and between requests of a keep-alive connection alike
//!   (hyper's header-read timer), so connections that trickle or never finish a head, and idle
//!   keep-alive connections, are closed instead of held forever.
//! * At most `max_connections` connections are open at once; beyond that a new connection is
//!   accepted and closed at once (counted in `tollgate_connections_refused_total`), so a flood
//!   cannot exhaust the process's file descriptors and starve the requests already in flight.
//! * Graceful shutdown: stop accepting, then wait for open connections to finish their
//!   requests (the caller bounds the wait).
//!
//! Responses stream as many small writes, so every socket sets TCP_NODELAY.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Connection limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish.
/// `on_refused` is called for each connection closed at once for being over the limit.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    on_refused: impl Fn() + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_read_timeout))
        .keep_alive_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            on_refused();
            drop(tcp);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let service = TowerToHyperService::new(app.clone().map_request(
            move |req: hyper::Request<Incoming>| {
                // The peer's address, for `ConnectInfo`: the audit log's remote address and
                // the limit on failed admin logins per address.
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        ));
        let builder = builder.clone();
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
