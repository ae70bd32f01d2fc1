//! etcd over TLS with client authentication, against a real etcd (`--cert-file`, `--key-file`,
//! `--trusted-ca-file`, `--client-cert-auth`) with certificates made in the test: the right CA
//! and client certificate work; no client certificate, a client certificate of another CA, or
//! trusting another CA is refused with an error that says which, within the connect timeout; a
//! missing or malformed file is an error naming it before anything connects; endpoints' schemes
//! must agree with the TLS setting.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tidelock_state::testing::{EtcdServer, TestPki};
use tidelock_state::{
    EtcdConfig, EtcdStore, EtcdTls, Revision, StateError, StateStore, WatchEvent,
};

const CONNECT: Duration = Duration::from_secs(3);
/// Far above the connect timeout: reaching it means the call hung.
const HANG: Duration = Duration::from_secs(20);

async fn server() -> EtcdServer {
    let pki = TestPki::generate("tidelock test CA").expect("certificates");
    EtcdServer::start_tls(pki)
        .await
        .expect("start etcd with TLS")
}

fn config(endpoint: &str, tls: Option<EtcdTls>) -> EtcdConfig {
    let mut config = EtcdConfig::new([endpoint]).with_tls(tls);
    config.connect_timeout = CONNECT;
    config.request_timeout = CONNECT;
    config
}

/// Connects and returns the error, checking that it came within the connect timeout.
async fn refused(config: EtcdConfig) -> StateError {
    let started = Instant::now();
    let result = tokio::time::timeout(HANG, EtcdStore::connect(config))
        .await
        .expect("connect hung");
    let elapsed = started.elapsed();
    let error = result.expect_err("the connection must be refused");
    assert!(
        elapsed <= CONNECT + Duration::from_millis(500),
        "refused after {elapsed:?}, beyond the connect timeout {CONNECT:?}: {error}"
    );
    eprintln!("refused after {elapsed:?}: {error}");
    error
}

fn assert_says(error: &StateError, words: &[&str]) {
    let text = error.to_string();
    for w in words {
        assert!(text.contains(w), "{w:?} missing from: {text}");
    }
}

#[tokio::test]
async fn the_right_ca_and_client_certificate_put_get_and_watch() {
    let server = server().await;
    let endpoint = server.endpoint();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let tls = server.pki().unwrap().client_tls();
    let store = EtcdStore::connect(config(&endpoint, Some(tls)))
        .await
        .expect("connect with the CA and a client certificate");
    let first = store.put("tls/a", b"1".to_vec(), None).await.unwrap();
    let kv = store.get("tls/a").await.unwrap().expect("the key");
    assert_eq!(kv.value, b"1");
    let mut watch = store.watch("tls", first).await.unwrap();
    store.put("tls/b", b"2".to_vec(), None).await.unwrap();
    let event = tokio::time::timeout(HANG, watch.next())
        .await
        .expect("the watch delivers")
        .expect("a live stream")
        .unwrap();
    match event {
        WatchEvent::Put(kv) => {
            assert_eq!((kv.key.as_str(), kv.value.as_slice()), ("tls/b", &b"2"[..]));
            assert!(kv.mod_revision > Revision(first.0));
        }
        other => panic!("expected a put, got {other:?}"),
    }
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store.keep_alive(lease).await.unwrap();
    store.revoke_lease(lease).await.unwrap();
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let server = server().await;
    let pki = server.pki().unwrap();
    let error = refused(config(&server.endpoint(), Some(EtcdTls::new(&pki.ca_cert)))).await;
    assert!(matches!(error, StateError::Tls { .. }), "{error:?}");
    assert_says(
        &error,
        &[
            &server.endpoint(),
            "requires a client certificate",
            "--etcd-cert-file",
        ],
    );
}

#[tokio::test]
async fn a_client_certificate_of_another_ca_is_refused() {
    let server = server().await;
    let pki = server.pki().unwrap();
    let other = TestPki::generate("another CA").unwrap();
    let tls = EtcdTls::new(&pki.ca_cert).with_identity(&other.client_cert, &other.client_key);
    let error = refused(config(&server.endpoint(), Some(tls))).await;
    assert!(matches!(error, StateError::Tls { .. }), "{error:?}");
    assert_says(
        &error,
        &[
            &server.endpoint(),
            "refused the client certificate",
            &other.client_cert.display().to_string(),
        ],
    );
}

#[tokio::test]
async fn trusting_another_ca_is_refused() {
    let server = server().await;
    let pki = server.pki().unwrap();
    let other = TestPki::generate("another CA").unwrap();
    let tls = EtcdTls::new(&other.ca_cert).with_identity(&pki.client_cert, &pki.client_key);
    let error = refused(config(&server.endpoint(), Some(tls))).await;
    assert!(matches!(error, StateError::Tls { .. }), "{error:?}");
    assert_says(
        &error,
        &[
            &server.endpoint(),
            "serving certificate",
            &other.ca_cert.display().to_string(),
            "UnknownIssuer",
        ],
    );
    // Plain HTTP to a TLS etcd is no way around it either.
    let plain = server.endpoint().replace("https://", "http://");
    let error = refused(config(&plain, None)).await;
    assert!(error.is_transient(), "{error:?}");
}

#[tokio::test]
async fn schemes_must_agree_with_the_tls_setting() {
    // Checked before connecting: nothing listens at these addresses.
    let pki = TestPki::generate("tidelock test CA").unwrap();
    let error = refused(config("https://127.0.0.1:1", None)).await;
    assert!(matches!(error, StateError::InvalidRequest(_)), "{error:?}");
    assert_says(&error, &["https://127.0.0.1:1", "--etcd-ca-file"]);
    let error = refused(config("http://127.0.0.1:1", Some(pki.client_tls()))).await;
    assert!(matches!(error, StateError::InvalidRequest(_)), "{error:?}");
    assert_says(&error, &["http://127.0.0.1:1", "https://"]);
}

#[tokio::test]
async fn a_missing_or_malformed_file_is_named() {
    let pki = TestPki::generate("tidelock test CA").unwrap();
    let other = TestPki::generate("another CA").unwrap();
    let dir = pki.dir();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let missing = dir.join("missing.crt");
    let garbage = write("garbage.crt", "not a certificate\n");
    let bad_der = write(
        "bad-der.crt",
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
    );
    let key_as_cert = pki.client_key.clone();
    let cert_as_key = pki.client_cert.clone();
    let tls = |ca: &Path, cert: &Path, key: &Path| Some(EtcdTls::new(ca).with_identity(cert, key));
    let (ca, cert, key) = (&pki.ca_cert, &pki.client_cert, &pki.client_key);
    let cases: Vec<(Option<EtcdTls>, &Path, &str)> = vec![
        (tls(&missing, cert, key), &missing, "No such file"),
        (
            tls(&garbage, cert, key),
            &garbage,
            "holds no PEM certificate",
        ),
        (
            tls(&bad_der, cert, key),
            &bad_der,
            "not a usable CA certificate",
        ),
        (tls(ca, &missing, key), &missing, "etcd client certificate"),
        (
            tls(ca, &key_as_cert, key),
            &key_as_cert,
            "holds no PEM certificate",
        ),
        (tls(ca, cert, &missing), &missing, "etcd client key"),
        (
            tls(ca, cert, &cert_as_key),
            &cert_as_key,
            "no PEM private key",
        ),
        // A key that is not the certificate's.
        (
            tls(ca, cert, &other.client_key),
            &other.client_key,
            "unusable with the client certificate",
        ),
    ];
    for (tls, file, words) in cases {
        // The endpoint is never contacted: the files are checked first.
        let error = refused(config("https://127.0.0.1:1", tls)).await;
        assert!(matches!(error, StateError::TlsFile { .. }), "{error:?}");
        assert!(!error.is_transient(), "{error:?}");
        assert_eq!(error.metric_label(), "tls_file");
        assert_says(&error, &[&file.display().to_string(), words]);
    }
}
