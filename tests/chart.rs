//! The Helm chart (`charts/tidelock`) without a cluster: its CRDs are the repository's, Helm's
//! own SDK lints it strictly and renders it for several value sets whose objects are checked and
//! validated against Kubernetes 1.30's schemas (`py/chart_checks.py`, with helm-python-sdk and
//! kubernetes-validate from the venv), every command the rendered chart starts in a Tidelock
//! image is a binary the workspace builds and both Dockerfiles copy, and the etcd certificates
//! the chart generates work: a real etcd serves with them and admits the chart's client
//! certificate only, and the server certificate names every address clients and peers use.
//!
//! `cargo test -p tidelock-e2e --test chart -- --nocapture` shows the rendered objects and the
//! validator's output.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use serde_json::Value;
use tidelock_e2e::{binary, image_binaries, python, repo_root};
use tidelock_state::testing::{EtcdServer, TestPki};
use tidelock_state::{EtcdConfig, EtcdStore, EtcdTls, StateError, StateStore};

/// The chart's default image repository (values.yaml `image.repository`).
const TIDELOCK_IMAGE: &str = "tidelock/tidelock:";
/// The bundled etcd's image (values.yaml `etcd.image`), the only other image the chart runs.
const ETCD_IMAGE: &str = "rancher/mirrored-coreos-etcd:";

#[test]
fn the_charts_crds_are_the_repositorys_crds() {
    let root = repo_root();
    let names = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect()
    };
    let repo = names("crds");
    assert!(!repo.is_empty(), "crds/ has no CRDs");
    assert_eq!(
        names("charts/tidelock/crds"),
        repo,
        "charts/tidelock/crds must hold exactly the CRDs of crds/: cp crds/*.yaml charts/tidelock/crds/"
    );
    for name in &repo {
        let a = std::fs::read(root.join("crds").join(name)).unwrap();
        let b = std::fs::read(root.join("charts/tidelock/crds").join(name)).unwrap();
        assert!(
            a == b,
            "charts/tidelock/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/tidelock/crds/"
        );
    }
}

#[test]
fn the_chart_lints_renders_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let commands = dir.path().join("commands.json");
    let certificates = dir.path().join("certificates");
    let script = repo_root().join("tests/py/chart_checks.py");
    let output = Command::new(python())
        .arg(&script)
        .env("CHART", repo_root().join("charts/tidelock"))
        .env("COMMANDS_OUT", &commands)
        .env("TLS_OUT", &certificates)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        output.status.code() != Some(3),
        "the venv lacks the chart checks' packages: run ./scripts/test, which installs them\n{stdout}"
    );
    assert!(
        output.status.success(),
        "chart checks failed ({}):\n{stdout}{stderr}",
        output.status
    );

    // Every binary the chart starts, and the worker binary the operator starts in the worker
    // image the chart gives it, is built by the workspace and copied by both images.
    let started: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&commands).unwrap()).unwrap();
    let cpu = image_binaries("Dockerfile");
    let cuda = image_binaries("Dockerfile.cuda");
    let mut binaries = BTreeSet::new();
    for entry in &started {
        let image = entry["image"].as_str().unwrap();
        let command: Vec<&str> = entry["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        if image.starts_with(ETCD_IMAGE) {
            assert_eq!(command, ["/usr/local/bin/etcd"], "{entry}");
            continue;
        }
        assert!(
            image.starts_with(TIDELOCK_IMAGE),
            "a container in an unexpected image: {entry}"
        );
        let [name] = command[..] else {
            panic!("a Tidelock container's command is one binary: {entry}");
        };
        for (dockerfile, copied) in [("Dockerfile", &cpu), ("Dockerfile.cuda", &cuda)] {
            assert!(
                copied.iter().any(|c| c == name),
                "the chart starts {name}, which {dockerfile} does not copy ({entry})"
            );
        }
        // What the chart passes is what the binary reads: its flags and its variables.
        let help = Command::new(binary(name)).arg("--help").output().unwrap();
        let help = String::from_utf8(help.stdout).unwrap();
        let strings = |key: &str| -> Vec<String> {
            entry[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        for arg in strings("args") {
            if let Some(flag) = arg.strip_prefix("--") {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("--{flag} ")) || help.contains(&format!("--{flag}\n")),
                    "{name} has no --{flag} ({entry})"
                );
            }
        }
        for env in strings("env") {
            let read =
                help.contains(&format!("[env: {env}=")) || help.contains(&format!("[env: {env}]"));
            // RUST_LOG is read by the logger, not by clap.
            assert!(
                read || env == "RUST_LOG",
                "{name} does not read {env} ({entry})"
            );
        }
        binaries.insert(name);
    }
    assert_eq!(
        binaries,
        BTreeSet::from(["tidelock-operator", "tidelock-router", "tidelock-worker"]),
        "the binaries the chart starts"
    );

    the_generated_certificates_name_every_address(&certificates.join("ha"));
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(etcd_serves_with_the_generated_certificates(
            &certificates.join("default"),
        ));
}

fn pem(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
}

fn certificate(dir: &Path, file: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(&pem(dir, file)).unwrap()
}

/// The HA render's server certificate is valid, under the chart's CA, for the client Service,
/// the peers Service and each of the three members, as a server and (peers dial each other) as
/// a client; the client certificate is a client certificate only, for no etcd name.
fn the_generated_certificates_name_every_address(dir: &Path) {
    let ns = "tidelock-system";
    let ca = certificate(&dir.join("tidelock-etcd-ca"), "ca.crt");
    let server = certificate(&dir.join("tidelock-etcd-server"), "tls.crt");
    let client = certificate(&dir.join("tidelock-etcd-client"), "tls.crt");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let as_server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let as_client = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .unwrap();
    let now = UnixTime::now();
    let serves = |cert: &CertificateDer<'_>, name: &str| {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        as_server
            .verify_server_cert(cert, &[], &name, &[], now)
            .map(|_| ())
    };
    let mut names = vec![
        "tidelock-etcd".to_owned(),
        format!("tidelock-etcd.{ns}.svc"),
        format!("tidelock-etcd.{ns}.svc.cluster.local"),
        format!("tidelock-etcd-peers.{ns}.svc"),
        "127.0.0.1".to_owned(),
    ];
    names.extend((0..3).map(|i| format!("tidelock-etcd-{i}.tidelock-etcd-peers.{ns}.svc")));
    for name in &names {
        serves(&server, name).unwrap_or_else(|e| panic!("etcd's certificate for {name}: {e}"));
        assert!(
            serves(&client, name).is_err(),
            "the client certificate serves {name}"
        );
    }
    assert!(serves(&server, "tidelock-etcd.elsewhere.svc").is_err());
    for (what, cert) in [("peer", &server), ("client", &client)] {
        as_client
            .verify_client_cert(cert, &[], now)
            .unwrap_or_else(|e| panic!("the {what} certificate as a client: {e}"));
    }
    eprintln!(
        "the generated etcd certificate is valid for {} names; the client certificate for none",
        names.len()
    );
}

/// A real etcd with the default render's server certificate, TLS for clients and peers and
/// client-certificate authentication (as the chart runs it): the chart's client Secret, as the
/// operator and the routers mount it, reads and writes; without a certificate, refused.
async fn etcd_serves_with_the_generated_certificates(dir: &Path) {
    let server = dir.join("tidelock-etcd-server");
    let client = dir.join("tidelock-etcd-client");
    let pki = TestPki::from_pem(
        &pem(&server, "ca.crt"),
        (&pem(&server, "tls.crt"), &pem(&server, "tls.key")),
        (&pem(&client, "tls.crt"), &pem(&client, "tls.key")),
    )
    .unwrap();
    let etcd = EtcdServer::start_tls(pki)
        .await
        .expect("etcd with the chart's certificates (run ./scripts/test to install etcd)");
    let mounted = EtcdTls::new(client.join("ca.crt"))
        .with_identity(client.join("tls.crt"), client.join("tls.key"));
    let config = |tls| {
        let mut config = EtcdConfig::new([etcd.endpoint()]).with_tls(Some(tls));
        config.connect_timeout = Duration::from_secs(5);
        config
    };
    let store = EtcdStore::connect(config(mounted))
        .await
        .expect("the chart's client certificate is accepted");
    store.put("chart/tls", b"ok".to_vec(), None).await.unwrap();
    assert_eq!(store.get("chart/tls").await.unwrap().unwrap().value, b"ok");
    let refused = EtcdStore::connect(config(EtcdTls::new(client.join("ca.crt"))))
        .await
        .expect_err("no client certificate");
    assert!(matches!(refused, StateError::Tls { .. }), "{refused}");
    eprintln!(
        "etcd with the chart's certificates: the client Secret gets in; without it: {refused}"
    );
}
