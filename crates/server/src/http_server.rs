//! The accept loop: axum's `serve`, plus a deadline on request heads. axum gives hyper no
//! timer, so a client trickling its headers would keep its connection (a task and a socket)
//! forever; here hyper drops a connection whose head is not complete within the read timeout.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt;

/// Serves `app` until `shutdown` completes, then stops accepting, asks every connection to
/// close after its current request, and returns once all have.
pub async fn serve(listener: TcpListener, app: Router, read_timeout: Duration, shutdown: impl Future<Output = ()>) {
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
        tokio::spawn(connection(stream, app.clone(), read_timeout, stop_tx.clone(), done_rx.clone()));
    }
    drop((stop_rx, done_rx, listener));
    done_tx.closed().await;
}

async fn connection(stream: TcpStream, app: Router, read_timeout: Duration, stop: watch::Sender<()>, _done: watch::Receiver<()>) {
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
