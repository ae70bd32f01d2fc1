//! An etcd that is not there, or stops answering, is a typed error naming the endpoint within a
//! bounded time: never a hang.

use std::net::TcpListener;
use std::time::Duration;

use tidelock_state::testing::EtcdServer;
use tidelock_state::{EtcdConfig, EtcdStore, StateError, StateStore};

/// Far above every timeout configured below: reaching it means the call hung.
const HANG: Duration = Duration::from_secs(20);

fn config(endpoint: &str) -> EtcdConfig {
    let mut config = EtcdConfig::new([endpoint]);
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(2);
    config
}

fn assert_names_endpoint(error: &StateError, endpoint: &str) {
    assert!(error.is_transient(), "transient error expected: {error:?}");
    assert!(
        error.to_string().contains(endpoint),
        "error does not name {endpoint}: {error}"
    );
}

#[tokio::test]
async fn nothing_listening_is_unavailable() {
    // Bind and release: nothing listens on this port now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let result = tokio::time::timeout(HANG, EtcdStore::connect(config(&endpoint)))
        .await
        .expect("connect hung");
    let error = result.expect_err("nothing listens there");
    assert_names_endpoint(&error, &endpoint);
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out() {
    // The kernel completes TCP handshakes for this listener, but nobody ever speaks HTTP/2.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let result = tokio::time::timeout(HANG, EtcdStore::connect(config(&endpoint)))
        .await
        .expect("connect hung");
    let error = result.expect_err("a silent peer is not etcd");
    assert!(matches!(error, StateError::Timeout { .. }), "{error:?}");
    assert_names_endpoint(&error, &endpoint);
    drop(listener);
}

#[tokio::test]
async fn etcd_that_goes_away_fails_requests_promptly() {
    let mut server = EtcdServer::start().await.expect("start etcd");
    let endpoint = server.endpoint();
    let store = EtcdStore::connect(config(&endpoint))
        .await
        .expect("connect");
    store
        .put("k", b"v".to_vec(), None)
        .await
        .expect("put while up");
    server.stop();
    let result = tokio::time::timeout(HANG, store.get("k"))
        .await
        .expect("get hung");
    let error = result.expect_err("etcd is gone");
    assert_names_endpoint(&error, &endpoint);
    // A watch on a dead etcd is an error too, not a stream that never yields.
    let result = tokio::time::timeout(HANG, store.watch("d", Default::default()))
        .await
        .expect("watch hung");
    assert_names_endpoint(&result.err().expect("etcd is gone"), &endpoint);
}
