//! A public HTTP/1.1 listener that slow or idle clients cannot hold forever (issue #18, point 2).
//!
//! `axum::serve` has no timeouts towards clients: 500 slow-header and 100 slow-body connections
//! were held for 300 s, and 600 streaming clients that never read held every slot of the router
//! and of its workers. [`serve`] accepts connections itself and bounds them:
//!
//! - **Headers** must arrive within `header_timeout` (hyper's `header_read_timeout`). The same
//!   timer runs while a kept-alive connection waits for its next request, so it is also the idle
//!   keep-alive timeout.
//! - **Writes** that make no progress for `write_timeout` fail (`tokio-io-timeout`): a client that
//!   stops reading its stream is disconnected once the socket's buffers are full, which drops the
//!   response body and with it the request (the router's worker request is cancelled). A client
//!   that reads slowly but reads is never cut.
//! - **Connections**: at most `max_connections` open at once; one more is answered `503` with
//!   `Retry-After` and closed.
//!
//! A request body's own deadline is the handler's business (it knows when it reads one).
//! Small streamed writes go out at once (`TCP_NODELAY`). On shutdown, no connection is accepted
//! any more and the open ones finish their requests (hyper's graceful shutdown), for at most
//! [`SHUTDOWN_GRACE`]; then they are dropped.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tower::ServiceExt;

/// What [`serve`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// To receive a request's headers, and to wait idle for the next request.
    pub header_timeout: Duration,
    /// A write to the client that makes no progress for this long closes the connection.
    pub write_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for ClientLimits {
    /// 30 s for headers or idle (nginx allows 60 and 75), 60 s for a stalled write (nginx's
    /// `send_timeout`), 8,192 connections.
    fn default() -> Self {
        ClientLimits {
            header_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            max_connections: 8_192,
        }
    }
}

/// Counters [`serve`] keeps, to be registered wherever the server keeps its metrics.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: IntGauge,
    /// Connections answered 503 because `max_connections` were open.
    pub refused: IntCounter,
}

impl ConnectionMetrics {
    /// `<prefix>_connections_open` and `<prefix>_connections_refused_total`, unregistered.
    pub fn new(prefix: &str) -> Result<Self, prometheus::Error> {
        Ok(ConnectionMetrics {
            open: IntGauge::new(
                format!("{prefix}_connections_open"),
                "Client connections open now.",
            )?,
            refused: IntCounter::new(
                format!("{prefix}_connections_refused_total"),
                "Client connections answered 503 because the most allowed were open.",
            )?,
        })
    }
}

/// The answer to a connection over the limit: an OpenAI-shaped 503, then the connection closes.
fn refusal() -> Vec<u8> {
    let body = r#"{"error":{"message":"This server has as many connections open as it allows; retry shortly.","type":"server_error","param":null,"code":"too_many_connections"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` under `limits` until `shutdown` completes, then lets open
/// connections finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ClientLimits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused.inc();
            tokio::spawn(refuse(tcp));
            continue;
        };
        let mut io = TimeoutStream::new(tcp);
        io.set_write_timeout(Some(limits.write_timeout));
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let app = app.clone();
            async move { app.oneshot(request.map(Body::new)).await }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(Box::pin(io)), service));
        let open = metrics.open.clone();
        open.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "client connection ended");
            }
            open.dec();
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {SHUTDOWN_GRACE:?} after shutdown began; closing them"
        );
    }
}

/// How long open connections may take to finish their requests once shutdown begins (the
/// chart's pods get 30 s between SIGTERM and SIGKILL by default).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Writes [`refusal`] and closes, within a second. What the client sent is read and dropped
/// first (up to 64 KiB): closing a socket with unread data resets the connection, and the client
/// would see the reset instead of the 503.
async fn refuse(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut sent = [0u8; 4096];
        let mut drained = 0;
        while drained < 64 << 10 {
            match tokio::time::timeout(Duration::from_millis(50), tcp.read(&mut sent)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
        tcp.write_all(&refusal()).await?;
        tcp.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_response_with_an_openai_error() {
        let refusal = refusal();
        let text = std::str::from_utf8(&refusal).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }
}
