//! The operator binary as it runs in the cluster, two replicas: real `tidelock-operator`
//! processes, a real etcd, and the mocked API server served over HTTP (watches included) and
//! found through a kubeconfig. Exactly one replica leads and reconciles (the Lease names it, its
//! `/metrics` says so, every Event on a Model comes from it); on SIGTERM it finishes, releases
//! the Lease and exits 0, and the standby takes over, reconciles the next Model, and follows a
//! Tenant's Secret through its rotation.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::PostParams;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use support::ApiServer;
use tidelock_api::{Model, Tenant};
use tidelock_state::StateStore;
use tidelock_state::testing::EtcdServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Operator {
    identity: &'static str,
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(identity: &'static str, dir: &Path, etcd: &str) -> Operator {
    let port = tidelock_state::testing::free_port().unwrap();
    let log = dir.join(format!("{identity}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tidelock-operator"))
        .args([
            "--etcd-endpoints",
            etcd,
            "--worker-image",
            "tidelock/tidelock:test",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--identity",
            identity,
            "--lease-namespace",
            "tidelock-system",
        ])
        .args(["--lease-duration-secs", "3"])
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    Operator {
        identity,
        port,
        child,
        log,
    }
}

/// `(status, body)` of a GET, or `None` when nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

async fn until(what: &str, ops: &[&Operator], mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        let died = ops.iter().any(|o| o.log().contains("tidelock-operator: "));
        if died || Instant::now() > deadline {
            let logs: Vec<String> = ops
                .iter()
                .map(|o| format!("--- {}:\n{}", o.identity, o.log()))
                .collect();
            panic!(
                "timed out or an operator failed: {what}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn holder(fake: &ApiServer) -> Option<String> {
    fake.get(
        "coordination.k8s.io/v1/leases",
        "tidelock-system",
        "tidelock-operator",
    )?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

async fn leading(op: &Operator) -> Option<bool> {
    let (_, metrics) = get(op.port, "/metrics").await?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidelock_operator_leader "))
        .map(|v| v == "1")
}

/// The reporting instances of the Events about Model `name`.
async fn reporters(client: &kube::Client, name: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), "ml");
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| e.reporting_instance.unwrap_or_default())
        .collect()
}

async fn create_model(client: &kube::Client, name: &str) {
    let model: Model = serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"source": {"url": {"url": "https://models.example/m.gguf"}}},
    }))
    .unwrap();
    Api::<Model>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &model)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_a_graceful_handover() {
    let etcd = EtcdServer::start()
        .await
        .expect("etcd (run ./scripts/test to install it)");
    let (fake, url) = ApiServer::serve_http().await;
    let dir =
        std::env::temp_dir().join(format!("tidelock-operator-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: {url}\n\
             contexts:\n- name: mock\n  context:\n    cluster: mock\n    user: mock\n\
             users:\n- name: mock\n  user: {{}}\ncurrent-context: mock\n"
        ),
    )
    .unwrap();
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();

    let ops = [
        start("operator-a", &dir, &etcd.endpoint()),
        start("operator-b", &dir, &etcd.endpoint()),
    ];
    let all = [&ops[0], &ops[1]];
    until(
        "both replicas are ready (a standby too)",
        &all,
        async || {
            get(ops[0].port, "/readyz").await.map(|r| r.0) == Some(200)
                && get(ops[1].port, "/readyz").await.map(|r| r.0) == Some(200)
        },
    )
    .await;
    until("one replica holds the Lease", &all, async || {
        holder(&fake).is_some()
    })
    .await;
    let leader = ops
        .iter()
        .position(|o| Some(o.identity.to_owned()) == holder(&fake))
        .unwrap();
    let standby = 1 - leader;
    assert_eq!(leading(&ops[leader]).await, Some(true));
    assert_eq!(leading(&ops[standby]).await, Some(false));

    create_model(&client, "first").await;
    until("the leader reconciled the first Model", &all, async || {
        fake.get("apps/v1/statefulsets", "ml", "first-g0").is_some()
            && fake
                .get("tidelock.dev/v1alpha1/models", "ml", "first")
                .is_some_and(|m| m["status"]["workers"] == "0/1")
    })
    .await;
    let first = reporters(&client, "first").await;
    assert!(
        !first.is_empty() && first.iter().all(|r| r == ops[leader].identity),
        "{first:?}"
    );
    assert_eq!(
        holder(&fake).as_deref(),
        Some(ops[leader].identity),
        "still the same leader"
    );
    assert!(
        !ops[standby].log().contains("reconciling Models"),
        "the standby does not reconcile"
    );

    // Graceful shutdown of the leader: exit 0, Lease released, the standby takes over at once.
    let mut ops = ops;
    let pid = Pid::from_raw(i32::try_from(ops[leader].child.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let stopped = Instant::now();
    let status = tokio::task::block_in_place(|| ops[leader].child.wait()).unwrap();
    assert!(
        status.success(),
        "the leader exits 0 on SIGTERM: {status}\n{}",
        ops[leader].log()
    );
    assert!(
        ops[leader].log().contains("lease released"),
        "{}",
        ops[leader].log()
    );
    let all = [&ops[0], &ops[1]];
    until("the standby leads", &all, async || {
        leading(&ops[standby]).await == Some(true)
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("the standby led {took:?} after SIGTERM to the leader (lease 3 s)");
    assert_eq!(holder(&fake).as_deref(), Some(ops[standby].identity));

    create_model(&client, "second").await;
    until(
        "the new leader reconciled the second Model",
        &all,
        async || {
            fake.get("apps/v1/statefulsets", "ml", "second-g0")
                .is_some()
        },
    )
    .await;
    let second = reporters(&client, "second").await;
    assert!(
        !second.is_empty() && second.iter().all(|r| r == ops[standby].identity),
        "{second:?}"
    );

    // A Tenant's Secret, created and then rotated: the Secret watch brings each key to etcd
    // without the Tenant changing.
    let store = tidelock_state::EtcdStore::connect(etcd.config())
        .await
        .unwrap();
    let layout = tidelock_protocol::KeyLayout::default();
    let record_key = layout.tenant(&tidelock_protocol::TenantId::new("ml/team-a").unwrap());
    let accepts = async |key: &str| {
        store
            .get(&record_key)
            .await
            .unwrap()
            .and_then(|kv| {
                serde_json::from_slice::<tidelock_protocol::TenantRecord>(&kv.value).ok()
            })
            .is_some_and(|r| r.accepts_key(key))
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ml");
    let first_key = "sk-team-a-first-0123456789";
    let mut secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "team-a-keys", "namespace": "ml"},
        "stringData": {"apiKey": first_key},
    }))
    .unwrap();
    secret = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "team-a", "namespace": "ml"},
        "spec": {"apiKeySecrets": [{"name": "team-a-keys"}]},
    }))
    .unwrap();
    Api::<Tenant>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &tenant)
        .await
        .unwrap();
    until("the tenant's key is in etcd", &all, async || {
        accepts(first_key).await
    })
    .await;
    let rotated = "sk-team-a-rotated-9876543210";
    secret.string_data = Some([("apiKey".to_owned(), rotated.to_owned())].into());
    secrets
        .replace("team-a-keys", &PostParams::default(), &secret)
        .await
        .unwrap();
    until("the rotated key replaced the first", &all, async || {
        accepts(rotated).await && !accepts(first_key).await
    })
    .await;

    let pid = Pid::from_raw(i32::try_from(ops[standby].child.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::task::block_in_place(|| ops[standby].child.wait()).unwrap();
    assert!(status.success(), "{status}\n{}", ops[standby].log());
    assert_eq!(
        holder(&fake),
        None,
        "the last leader released the Lease too"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
