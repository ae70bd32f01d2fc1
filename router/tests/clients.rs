//! Slow, idle and too many clients (issue #18, point 2): the router's public listener
//! (`tidelock_service::serve`) over real TCP, with the whole router and a sim worker behind it.
//! Small limits (a second or two) stand in for the defaults (30 to 60 s) so the tests are quick.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::json;
use support::cluster::{Cluster, KEY_A, KEY_B, MODEL, cluster};
use tidelock_router::app::{Settings, app};
use tidelock_service::serve::{ClientLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Serves the cluster's router on a loopback port with `limits`.
async fn listen(c: &Cluster, limits: ClientLimits) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, metrics) = (app(c.state.clone()), c.state.metrics.connections.clone());
    tokio::spawn(serve(
        listener,
        app,
        limits,
        metrics,
        std::future::pending(),
    ));
    addr
}

/// Reads until the peer closes (or `within` passes: a panic); returns what was read.
async fn read_to_close(tcp: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the router kept the connection open for {within:?}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn request(path: &str, key: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: router\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_slow_bodies_and_idle_connections_are_cut() {
    let settings = Settings {
        body_timeout: Duration::from_secs(1),
        ..Settings::default()
    };
    let c = cluster(1, settings, |_| {}).await;
    let addr = listen(
        &c,
        ClientLimits {
            header_timeout: Duration::from_secs(1),
            ..ClientLimits::default()
        },
    )
    .await;

    // Headers that never end: closed after the header timeout.
    let mut slow_header = TcpStream::connect(addr).await.unwrap();
    slow_header
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: router\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    read_to_close(&mut slow_header, Duration::from_secs(10)).await;
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A body that stops halfway: 408 in the OpenAI shape, after the body timeout.
    let mut slow_body = TcpStream::connect(addr).await.unwrap();
    let head = request("/v1/completions", KEY_A, &" ".repeat(1_000));
    slow_body
        .write_all(&head.as_bytes()[..head.len() - 990])
        .await
        .unwrap();
    let answer = read_to_close(&mut slow_body, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");

    // A kept-alive connection that goes idle after its request: closed after the timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: router\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    read_to_close(&mut idle, Duration::from_secs(10)).await;
    c.wait("no connection open", |s| {
        s.metrics.connections.open.get() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_stream_is_cut_and_its_request_cancelled() {
    let c = cluster(1, Settings::default(), |w| {
        // Room to generate for as long as the client does not read.
        w.max_context = 1 << 20;
        w.blocks = 1 << 16;
    })
    .await;
    let addr = listen(
        &c,
        ClientLimits {
            write_timeout: Duration::from_secs(2),
            ..ClientLimits::default()
        },
    )
    .await;
    // A client with a small receive buffer that sends a streamed request and never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    // Twenty alternatives a token make each event about 2 KB: the buffers fill in a second.
    let body = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": 1_000_000, "ignore_eos": true, "stream": true,
        "logprobs": true, "top_logprobs": 20,
    });
    stalled
        .write_all(request("/v1/chat/completions", KEY_A, &body.to_string()).as_bytes())
        .await
        .unwrap();
    c.wait("the stream running", |s| s.metrics.in_flight.get() == 1)
        .await;
    // Once the socket's buffers are full the router's writes stall; two seconds later the
    // connection is closed, which ends the request in the router and cancels it on the worker.
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.state.metrics.in_flight.get() != 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled client's request still runs after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.wait("the worker's request cancelled", |s| {
        s.models.get(MODEL).is_some_and(|m| {
            m.workers()
                .values()
                .all(|w| w.load().running == 0 && w.load().waiting == 0)
        })
    })
    .await;
    assert_eq!(c.state.metrics.connections.open.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503_and_tenants_over_theirs_429() {
    let settings = Settings {
        max_requests_per_tenant: 2,
        ..Settings::default()
    };
    let c = cluster(1, settings, |w| {
        w.max_context = 1 << 20;
        w.blocks = 1 << 16;
        // 5 ms a step: the streams are still going while the test acts.
        w.timing.step = Duration::from_millis(5);
    })
    .await;
    let addr = listen(
        &c,
        ClientLimits {
            max_connections: 3,
            ..ClientLimits::default()
        },
    )
    .await;
    // Tenant a opens two endless streams (its limit), on two of the three connections.
    let body = json!({"model": MODEL, "prompt": [17, 18], "max_tokens": 100_000, "ignore_eos": true, "stream": true});
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request("/v1/completions", KEY_A, &body.to_string()).as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        streams.push(tcp);
    }
    // A third request of tenant a: 429, while tenant b is served (through the router directly).
    let third = c.post("/v1/completions", KEY_A, body.clone()).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.error()["code"], "too_many_requests");
    assert_eq!(third.headers["retry-after"], "1");
    let other = json!({"model": MODEL, "prompt": [17, 18], "max_tokens": 2});
    assert_eq!(
        c.post("/v1/completions", KEY_B, other.clone()).await.status,
        StatusCode::OK
    );
    // The third connection is taken; a fourth gets a 503 with Retry-After, then is closed.
    let mut third_conn = TcpStream::connect(addr).await.unwrap();
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    let refused = read_to_close(&mut fourth, Duration::from_secs(10)).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");
    assert_eq!(c.state.metrics.connections.refused.get(), 1);
    // Closing a stream gives tenant a its request back and frees a connection.
    drop(streams.pop());
    c.wait("one stream left", |s| s.metrics.in_flight.get() == 1)
        .await;
    third_conn
        .write_all(request("/v1/completions", KEY_A, &other.to_string()).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = third_conn.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}
