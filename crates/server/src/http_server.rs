//! The accept loop: axum's `serve`, plus a deadline on request heads and a cap on open
//! connections. axum gives hyper no timer, so a client trickling its headers would keep its
//! connection (a task and a socket) forever; here hyper drops a connection whose head is not
//! complete within the read timeout. And a connection over `max_connections` is answered 503
//! at once and closed, rather than held: a flood of clients cannot exhaust the process's file
//! descriptors or memory, and the clients that are refused learn it immediately.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::error::{ApiError, ErrorKind};
use crate::metrics;

/// How long a refused connection is kept while its 503 goes out and what the client already
/// sent is read (closing with unread bytes resets the connection, and the client could lose
/// the answer before reading it).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Serves `app` until `shutdown` completes, then stops accepting, asks every connection to
/// close after its current request, and returns once all have. At most `max_connections` are
/// open at once; the accept loop answers the others 503 `too_many_connections` and closes them.
pub async fn serve(listener: TcpListener, app: Router, read_timeout: Duration, max_connections: usize, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(max_connections));
    // Connections watch `stop` close to start their graceful shutdown; each holds a `done`
    // receiver, so `done_tx.closed()` resolves when the last one has ended.
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let slot = OpenConnection::new(slot);
                tokio::spawn(connection(stream, app.clone(), read_timeout, slot, stop_tx.clone(), done_rx.clone()));
            }
            Err(_) => {
                ::metrics::counter!(metrics::CONNECTIONS_REFUSED).increment(1);
                tokio::spawn(refuse(stream, max_connections));
            }
        }
    }
    drop((stop_rx, done_rx, listener));
    done_tx.closed().await;
}

async fn connection(
    stream: TcpStream,
    app: Router,
    read_timeout: Duration,
    // Freed when the connection ends, however it ends.
    _slot: OpenConnection,
    stop: watch::Sender<()>,
    _done: watch::Receiver<()>,
) {
    let service = TowerToHyperService::new(app.map_request(|request: Request<Incoming>| request.map(Body::new)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(read_timeout);
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut stopping = std::pin::pin!(stop.closed());
    let mut stopped = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            // Once: the in-flight request finishes, then the connection closes.
            _ = &mut stopping, if !stopped => {
                stopped = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A connection's place under `max_connections`, counted in the open-connections gauge.
struct OpenConnection {
    _slot: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(slot: OwnedSemaphorePermit) -> Self {
        ::metrics::gauge!(metrics::CONNECTIONS_OPEN).increment(1.0);
        Self { _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// Answers a connection over the cap: 503 `too_many_connections` with `Retry-After`, in the
/// API's error shape, written without reading the request, then the connection is closed.
async fn refuse(mut stream: TcpStream, max_connections: usize) {
    let error = ApiError::new(
        ErrorKind::TooManyConnections,
        format!("the server already has {max_connections} connections open (max_connections); retry shortly"),
    );
    let body = serde_json::to_string(&error.body()).unwrap_or_default();
    let status = error.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(secs) = error.retry_after {
        head.push_str(&format!("retry-after: {secs}\r\n"));
    }
    let answer = head + "\r\n" + &body;
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}
