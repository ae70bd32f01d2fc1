//! The user's Kubernetes path, end to end, against a real control plane (`tidelock-localkube`:
//! kube-apiserver with RBAC, admission and Pod Security, the controller-manager's StatefulSet,
//! Deployment and garbage-collector controllers, the scheduler, kwok's fake CPU and GPU nodes).
//!
//! What stands in for what cannot run here (no container runtime, no kubelet, no GPU): the
//! chart's operator and router pods, and the operator's worker pods, run as the workspace's
//! binaries under the stand-in kubelet (`tidelock_localkube::kubelet`): same command, arguments
//! and environment as the pod spec, the pod's own service-account token (so the operator talks
//! to the API server exactly as its ServiceAccount, never as admin), loopback ports for
//! container ports and pod DNS names, readiness from the real `/readyz`. CPU workers run the
//! real model (the default SmolLM2 GGUF instead of the Hugging Face download their init
//! container would do); GPU workers run the simulated engine. The chart's bundled etcd is not
//! run (its pods are kwok's fakes): the release points at a real etcd started here, the one
//! Tidelock's state lives in. What is not exercised: images, image pulls, volumes' contents,
//! resource limits, liveness probes, init containers, Service networking.
//!
//! Skipped (saying so) where the control plane is not built; failed under
//! `TIDELOCK_REQUIRE_CLUSTER=1` (CI). `-- --nocapture` prints the transcript.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tidelock_api::{Model, Tenant};
use tidelock_e2e::{binary, model_path, python, repo_root};
use tidelock_localkube::control_plane::wait_for;
use tidelock_localkube::kubelet::{self, Kubelet};
use tidelock_localkube::{ControlPlane, Options, shared};
use tidelock_protocol::{KeyLayout, ModelName, TenantId, TenantRecord};
use tidelock_state::StateStore;
use tidelock_state::testing::EtcdServer;

/// The release and its namespace; the Models and the Tenant go to `ML`.
const RELEASE: &str = "tidelock";
const NS: &str = "tidelock";
const ML: &str = "ml";
/// Readiness of real workers on two cores, with everything else running.
const SLOW: Duration = Duration::from_secs(180);
const LIMIT: Duration = Duration::from_secs(60);
/// A fresh key for the example Tenant: charts/tidelock/examples/tenant.yaml carries none, so the
/// tests create its Secret `team-a-key` as the example's comment says.
fn random_key() -> String {
    // 128 random bits in hex, as the cluster credential's generator makes them.
    format!(
        "sk-{}",
        &tidelock_protocol::ClusterToken::generate().expose()[..32]
    )
}

/// The control plane, the stand-in kubelet, and the etcd Tidelock's state lives in.
struct Cluster {
    cp: ControlPlane,
    kubelet: Kubelet,
    etcd: EtcdServer,
    client: Client,
    store: tidelock_state::EtcdStore,
    /// Where the test's files go.
    dir: tempfile::TempDir,
}

impl Cluster {
    fn tool(&self, name: &str) -> PathBuf {
        self.cp.tools().path(name)
    }

    /// Runs kubectl or helm with the admin kubeconfig; `(success, stdout + stderr)`.
    fn run(&self, tool: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(self.tool(tool))
            .args(args)
            .env("KUBECONFIG", self.cp.kubeconfig())
            .env("HOME", self.dir.path())
            .current_dir(repo_root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Like [`Self::run`], printed as a transcript line (helm's notes left out) and required
    /// to succeed.
    fn ok(&self, tool: &str, args: &[&str]) -> String {
        let (ok, text) = self.run(tool, args);
        let shown = text.split("\nNOTES:").next().unwrap_or_default();
        eprintln!("$ {tool} {}\n{shown}", args.join(" "));
        assert!(ok, "{tool} {} failed:\n{text}", args.join(" "));
        text
    }

    /// `kubectl delete model` and wait for it to be gone (its finalizer has run).
    fn delete_model(&self, namespace: &str, name: &str) {
        self.ok(
            "kubectl",
            &[
                "delete",
                "model",
                name,
                "-n",
                namespace,
                "--wait=true",
                "--timeout=60s",
            ],
        );
    }

    /// Sets Model `name`'s shard groups in `ML`.
    async fn set_replicas(&self, name: &str, replicas: i32) {
        self.api::<Model>(ML)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .unwrap();
    }

    fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The host port of the first running pod matching `selector` in `namespace`.
    async fn pod_port(&self, namespace: &str, selector: &str, port: i32) -> u16 {
        let pods: Api<Pod> = self.api(namespace);
        let selector = selector.to_owned();
        let kubelet = self.kubelet.clone();
        let namespace = namespace.to_owned();
        wait_for(&format!("a ready pod {selector}"), SLOW, || {
            let (pods, selector, kubelet, namespace) = (
                pods.clone(),
                selector.clone(),
                kubelet.clone(),
                namespace.clone(),
            );
            async move {
                let list = pods
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .ok()?;
                list.items
                    .iter()
                    .filter(|p| is_ready(p))
                    .find_map(|p| kubelet.port(&namespace, &p.name_any(), port))
            }
        })
        .await
        .unwrap()
    }

    /// A chat through the router with the `openai` client: the parsed reply line.
    async fn chat(&self, key: &str, model: &str, prompt: &str) -> Value {
        let port = self
            .pod_port(NS, "app.kubernetes.io/component=router", 8000)
            .await;
        let out = Command::new(python())
            .arg(repo_root().join("tests/py/kube_chat.py"))
            .args([&format!("http://127.0.0.1:{port}/v1"), key, model, prompt])
            .output()
            .expect("the venv's python");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "kube_chat.py: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    async fn model(&self, name: &str) -> Option<Model> {
        self.api::<Model>(ML).get_opt(name).await.ok().flatten()
    }

    /// Waits until the Model reports Ready with `workers` ("ready/desired").
    async fn model_ready(&self, name: &str, workers: &str, limit: Duration) -> Model {
        let started = Instant::now();
        let result = wait_for(&format!("Model {name} Ready {workers}"), limit, || async {
            let m = self.model(name).await?;
            let status = m.status.as_ref()?;
            let ready = condition(&m, "Ready").is_some_and(|(s, _, _)| s == "True");
            let current = status.observed_generation == m.metadata.generation;
            (ready && current && status.workers.as_deref() == Some(workers)).then_some(m)
        })
        .await;
        match result {
            Ok(m) => {
                eprintln!(
                    "Model {name} Ready {workers} after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                m
            }
            Err(e) => {
                let now = self.model(name).await.map(|m| m.status);
                let (_, refused) = operator_requests(self);
                panic!(
                    "{e}; the Model's status: {now:#?}\nthe operator's refused requests: {refused:#?}\n{}",
                    self.logs_of(ML)
                );
            }
        }
    }

    /// The tail of each process log in `namespace` (for failure messages).
    fn logs_of(&self, namespace: &str) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("kubelet")) else {
            return out;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&format!("{namespace}_")) && name.ends_with(".log") {
                let tail = tidelock_localkube::process::log_tail(&e.path(), 15);
                out.push_str(&format!("--- {name}\n{tail}\n"));
            }
        }
        out
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `(status, reason, message)` of a Model's condition.
fn condition(model: &Model, kind: &str) -> Option<(String, String, String)> {
    model
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn start() -> Option<Cluster> {
    let tools = shared::tools_or_skip()?;
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(tools, Options::default())
        .await
        .expect("the local control plane starts");
    let client = cp.client().await.unwrap();
    let etcd = EtcdServer::start()
        .await
        .expect("etcd (run ./scripts/test to install it)");
    let store = tidelock_state::EtcdStore::connect(etcd.config())
        .await
        .unwrap();
    let programs = kubelet::tidelock_programs(binary("tidelock-worker").parent().unwrap())
        .expect("the workspace's binaries");
    let kubelet = Kubelet::start(
        client.clone(),
        kubelet::Config {
            namespaces: Some(BTreeSet::from([NS.to_owned(), ML.to_owned()])),
            report: Some(std::sync::Arc::new(|line: &str| {
                eprintln!("kubelet: {line}")
            })),
            ..kubelet::Config::tidelock(&cp, programs, &model_path(), dir.path().join("kubelet"))
        },
    );
    Some(Cluster {
        cp,
        kubelet,
        etcd,
        client,
        store,
        dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_then_kubectl_apply_the_examples() {
    let Some(p) = start().await else {
        return;
    };
    let chart = repo_root().join("charts/tidelock");
    let chart = chart.to_str().unwrap();
    let etcd_url = p.etcd.endpoint();

    // helm install with the real helm CLI: helm v4 applies every object with server-side apply.
    p.ok(
        "helm",
        &[
            "install",
            RELEASE,
            chart,
            "--namespace",
            NS,
            "--create-namespace",
            "--set",
            &format!("etcd.external.endpoints[0]={etcd_url}"),
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    let (listed, manifest) = p.run("helm", &["get", "manifest", RELEASE, "-n", NS]);
    assert!(listed, "{manifest}");
    let kinds: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    eprintln!("the release's objects: {kinds:?}");
    for kind in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(&kind), "the release renders a {kind}");
    }
    let deployments = p.ok(
        "kubectl",
        &["get", "deployments", "-n", NS, "-o", "jsonpath={range .items[*]}{.metadata.name} {.metadata.managedFields[0].manager}/{.metadata.managedFields[0].operation}{\"\\n\"}{end}"],
    );
    assert!(
        deployments.contains("helm/Apply"),
        "server-side apply by helm: {deployments}"
    );

    // Other values install too, each object accepted by the API server (their pods stay
    // Pending: the stand-in kubelet runs only the main release's namespaces).
    let long = "a-release-name-of-the-longest-length-helm-allows-x-53";
    assert_eq!(long.len(), 53);
    for (release, extra) in [
        ("bundled", vec![]),
        (
            "ha",
            vec![
                "--set",
                "etcd.replicas=3",
                "--set",
                "router.autoscaling.enabled=true",
                "--set",
                "operator.watchNamespace=ha",
            ],
        ),
        (long, vec![]),
    ] {
        let namespace = if release == long { "long" } else { release };
        let mut args = vec![
            "install",
            release,
            chart,
            "-n",
            namespace,
            "--create-namespace",
        ];
        args.extend(extra);
        p.ok("helm", &args);
    }
    bundled_etcd_certificates_are_kept(&p, chart).await;

    // The CRDs: printer columns, field docs, and CEL rules the API server itself compiled.
    p.ok("kubectl", &["create", "namespace", ML]);
    let explain = p.ok("kubectl", &["explain", "model.spec"]);
    assert!(
        explain.contains("how many shard groups") && explain.contains("kvCache"),
        "the field docs: {explain}"
    );
    for (file, words) in [
        ("bad-block-tokens.yaml", "a power of two from 1 to 1024"),
        (
            "bad-name.yaml",
            "a Model's name is at most 46 lowercase letters",
        ),
    ] {
        let bad = repo_root().join("tests/kube").join(file);
        let (accepted, refusal) =
            p.run("kubectl", &["apply", "-n", ML, "-f", bad.to_str().unwrap()]);
        eprintln!("$ kubectl apply -f tests/kube/{file}\n{refusal}");
        assert!(!accepted && refusal.contains(words), "{refusal}");
    }

    // The examples run under Pod Security's "restricted" profile (issue #19, point 3): the API
    // server refuses any worker pod that asks for more.
    p.ok(
        "kubectl",
        &[
            "label",
            "namespace",
            ML,
            "pod-security.kubernetes.io/enforce=restricted",
        ],
    );

    // kubectl apply -f every example, after the Secret the Tenant example names.
    let example_key = random_key();
    let example_key = example_key.as_str();
    let literal = format!("--from-literal=apiKey={example_key}");
    p.ok(
        "kubectl",
        &[
            "create",
            "secret",
            "generic",
            "team-a-key",
            "-n",
            ML,
            &literal,
        ],
    );
    p.ok(
        "kubectl",
        &["apply", "-n", ML, "-f", &format!("{chart}/examples/")],
    );
    let cpu = p.model_ready("smollm2", "2/2", SLOW).await;
    let sharded = p.model_ready("smollm2-long", "4/4", SLOW).await;
    let gpu = p.model_ready("llama-3-1-8b", "2/2", SLOW).await;
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = p.api(ML);
    let gpu_claims = claims
        .list(&ListParams::default().labels("tidelock.dev/model=llama-3-1-8b"))
        .await
        .unwrap()
        .items;
    let named = |prefix: &str| {
        gpu_claims
            .iter()
            .filter(|c| {
                c.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .count()
    };
    assert_eq!(named("models-"), 2, "one model-cache claim per GPU worker");
    // kvCache.spill: each worker's own disk tier, a claim that follows it across restarts.
    assert_eq!(named("kv-spill-"), 2, "one spill claim per GPU worker");
    assert_eq!(gpu_claims.len(), 4);
    for m in [&cpu, &sharded, &gpu] {
        assert!(
            condition(m, "Degraded").is_some_and(|(s, _, _)| s == "False"),
            "{:?}",
            m.status
        );
    }
    let table = p.ok("kubectl", &["get", "models", "-n", ML]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "SERVED", "READY", "UPDATED", "CONTEXT", "AGE"]
    );
    assert!(
        table.lines().any(|l| {
            let row: Vec<&str> = l.split_whitespace().collect();
            row.len() == 6 && row[0] == "smollm2" && row[2] == "2/2" && row[3] == "2"
        }),
        "{table}"
    );

    // The workers: one StatefulSet per group, owned by the Model; GPU workers on GPU nodes.
    let groups: Api<StatefulSet> = p.api(ML);
    let owned: Vec<String> = groups
        .list(&ListParams::default().labels("tidelock.dev/model=llama-3-1-8b"))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|s| {
            s.owner_references()
                .iter()
                .any(|o| o.kind == "Model" && o.controller == Some(true))
        })
        .map(|s| s.name_any())
        .collect();
    assert_eq!(owned, ["llama-3-1-8b-g0", "llama-3-1-8b-g1"]);
    let service = p
        .api::<Service>(ML)
        .get("llama-3-1-8b-workers")
        .await
        .unwrap();
    assert_eq!(
        service.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None"),
        "headless"
    );
    let budget = p
        .api::<PodDisruptionBudget>(ML)
        .get("llama-3-1-8b-workers")
        .await
        .unwrap();
    for refs in [service.owner_references(), budget.owner_references()] {
        assert!(
            refs.iter()
                .any(|o| o.kind == "Model" && o.name == "llama-3-1-8b"),
            "owned by the Model: {refs:?}"
        );
    }
    let pods: Api<Pod> = p.api(ML);
    for pod in pods
        .list(&ListParams::default().labels("tidelock.dev/model=llama-3-1-8b"))
        .await
        .unwrap()
        .items
    {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        assert!(node.starts_with("gpu-"), "{} on {node}", pod.name_any());
    }
    p.ok(
        "kubectl",
        &[
            "get",
            "pods,statefulsets,services,pdb,pvc",
            "-n",
            ML,
            "-o",
            "wide",
        ],
    );

    network_policies_admit_only_the_cluster(&p).await;

    // The Tenant: its key is in etcd only as a hash; the router serves it.
    let tenant = wait_for("Tenant team-a Ready", LIMIT, || async {
        let t = p.api::<Tenant>(ML).get("team-a").await.ok()?;
        let ready = t
            .status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(t)
    })
    .await
    .unwrap();
    eprintln!("tenant status: {:?}", tenant.status);
    let tenants = p.ok("kubectl", &["get", "tenants", "-n", ML]);
    let header: Vec<&str> = tenants.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "KEYS", "MODELS", "READY", "AGE"]);
    assert!(
        tenants
            .lines()
            .any(|l| l.starts_with("team-a ") && l.contains(" True ")),
        "{tenants}"
    );
    let layout = KeyLayout::new(KeyLayout::DEFAULT_ROOT);
    let tenant_key = layout.tenant(&TenantId::new(format!("{ML}/team-a")).unwrap());
    let record = |store: &tidelock_state::EtcdStore| {
        let key = tenant_key.clone();
        let store = store.clone();
        async move {
            let kv = store.get(&key).await.ok()??;
            serde_json::from_slice::<TenantRecord>(&kv.value).ok()
        }
    };
    let stored = record(&p.store).await.expect("the tenant record");
    assert_eq!(stored.key_hashes, [TenantRecord::hash_api_key(example_key)]);
    let raw = String::from_utf8_lossy(&p.store.get(&tenant_key).await.unwrap().unwrap().value)
        .to_string();
    assert!(!raw.contains(example_key), "never the key itself");

    let reply = p.chat(example_key, "smollm2", "Say hello.").await;
    eprintln!("chat smollm2 (real model): {reply}");
    assert_eq!(reply["status"], 200, "{reply}");
    assert!(reply["content"].as_str().is_some_and(|c| !c.is_empty()));
    let reply = p
        .chat(example_key, "llama-3.1-8b-instruct", "Say hello.")
        .await;
    eprintln!("chat llama-3.1-8b-instruct (simulated GPU workers): {reply}");
    assert_eq!(reply["status"], 200, "{reply}");
    let reply = p.chat(example_key, "smollm2-long", "Say hello.").await;
    assert_eq!(
        reply["status"], 404,
        "not among the tenant's models: {reply}"
    );
    let reply = p
        .chat("sk-nobody-0123456789abcdef", "smollm2", "Say hello.")
        .await;
    assert_eq!(reply["status"], 401, "{reply}");

    // Secret rotation reaches the router through the operator; deletion revokes.
    let secrets: Api<Secret> = p.api(ML);
    let rotated = "sk-team-a-rotated-abcdefghijklmnop";
    secrets
        .patch(
            "team-a-key",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"apiKey": rotated}})),
        )
        .await
        .unwrap();
    wait_for("the rotated key's hash in etcd", LIMIT, || async {
        let r = record(&p.store).await?;
        (r.key_hashes == [TenantRecord::hash_api_key(rotated)]).then_some(())
    })
    .await
    .unwrap();
    wait_for("the router to accept the rotated key", LIMIT, || async {
        (p.chat(rotated, "smollm2", "Hi.").await["status"] == 200).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        p.chat(example_key, "smollm2", "Hi.").await["status"],
        401,
        "the old key is revoked"
    );
    secrets
        .delete("team-a-key", &Default::default())
        .await
        .unwrap();
    wait_for("the record removed with its Secret", LIMIT, || async {
        record(&p.store).await.is_none().then_some(())
    })
    .await
    .unwrap();
    wait_for("the router to refuse the deleted key", LIMIT, || async {
        (p.chat(rotated, "smollm2", "Hi.").await["status"] == 401).then_some(())
    })
    .await
    .unwrap();
    let degraded = wait_for("Tenant team-a Degraded SecretMissing", LIMIT, || async {
        let t = p.api::<Tenant>(ML).get("team-a").await.ok()?;
        t.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "SecretMissing")
    })
    .await
    .unwrap();
    eprintln!("tenant after its Secret was deleted: {}", degraded.message);

    // A spec change rolls the groups: every worker is replaced and the Model is Ready again.
    let uids = |pods: Vec<Pod>| pods.iter().filter_map(|p| p.uid()).collect::<BTreeSet<_>>();
    let cpu_pods = ListParams::default().labels("tidelock.dev/model=smollm2");
    let before = uids(pods.list(&cpu_pods).await.unwrap().items);
    p.api::<Model>(ML)
        .patch(
            "smollm2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"kvCache": {"memoryPerWorker": "256Mi"}}})),
        )
        .await
        .unwrap();
    wait_for("both groups rolled", SLOW, || async {
        let now = uids(pods.list(&cpu_pods).await.ok()?.items);
        (now.len() == 2 && now.is_disjoint(&before)).then_some(())
    })
    .await
    .unwrap();
    p.model_ready("smollm2", "2/2", SLOW).await;
    for g in ["smollm2-g0", "smollm2-g1"] {
        let args = groups
            .get(g)
            .await
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap();
        assert!(
            args.windows(2).any(|w| w == ["--kv-cache", "256Mi"]),
            "{g}: {args:?}"
        );
    }

    // Scaling adds and removes whole groups.
    p.set_replicas("smollm2", 3).await;
    p.model_ready("smollm2", "3/3", SLOW).await;
    assert!(groups.get_opt("smollm2-g2").await.unwrap().is_some());
    p.set_replicas("smollm2", 1).await;
    p.model_ready("smollm2", "1/1", SLOW).await;
    wait_for("groups g1 and g2 and their pods gone", LIMIT, || async {
        let g1 = groups.get_opt("smollm2-g1").await.ok()?;
        let g2 = groups.get_opt("smollm2-g2").await.ok()?;
        let left = pods.list(&cpu_pods).await.ok()?.items.len();
        (g1.is_none() && g2.is_none() && left == 1).then_some(())
    })
    .await
    .unwrap();
    wait_for("their processes to stop", LIMIT, || async {
        let running: Vec<String> = p.kubelet.running().into_iter().map(|(_, n)| n).collect();
        (!running
            .iter()
            .any(|n| n.starts_with("smollm2-g1") || n.starts_with("smollm2-g2")))
        .then_some(())
    })
    .await
    .unwrap();

    // One served name, one Model: the same name from another namespace is refused, naming the
    // holder, and its deletion leaves the holder serving.
    served_names_are_not_shared(&p, &layout).await;

    // A rollout of three groups keeps two serving at every moment.
    rollout_keeps_groups_serving(&p, &layout).await;

    // Failures surface on the Model: no node fits, a limit refuses its pods, quota.
    failures_surface(&p).await;

    // Two operator replicas: exactly one leads on the real Lease API; killing it hands over.
    leader_handover(&p).await;

    // Delete: the finalizer clears the model's cluster state, the garbage collector its objects.
    let served = ModelName::new("smollm2".to_owned()).unwrap();
    let workers_dir = layout.workers_of(&served);
    assert!(!p.store.list(&workers_dir).await.unwrap().kvs.is_empty());
    p.delete_model(ML, "smollm2");
    assert!(
        p.store.list(&workers_dir).await.unwrap().kvs.is_empty(),
        "registrations removed"
    );
    wait_for(
        "the garbage collector to remove smollm2's objects",
        LIMIT,
        || async {
            let sts = groups.list(&cpu_pods).await.ok()?.items.len();
            let left = pods.list(&cpu_pods).await.ok()?.items.len();
            let svc = p.api::<Service>(ML).get_opt("smollm2-workers").await.ok()?;
            let pdb = p
                .api::<PodDisruptionBudget>(ML)
                .get_opt("smollm2-workers")
                .await
                .ok()?;
            (sts == 0 && left == 0 && svc.is_none() && pdb.is_none()).then_some(())
        },
    )
    .await
    .unwrap();
    p.ok(
        "kubectl",
        &[
            "delete",
            "-n",
            ML,
            "-f",
            &format!("{chart}/examples/"),
            "--ignore-not-found",
            "--wait=true",
            "--timeout=90s",
        ],
    );
    p.ok("kubectl", &["get", "models,statefulsets,pods", "-n", ML]);
    // The GPU example's model-cache claims went with their groups (spec.modelCache.retain is
    // false): the StatefulSets' retention policy, carried out by the real controllers.
    wait_for(
        "the model-cache claims to go with their Model",
        LIMIT,
        || async {
            let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = p.api(ML);
            let left = claims.list(&ListParams::default()).await.ok()?.items;
            left.is_empty().then_some(())
        },
    )
    .await
    .unwrap();

    // The operator's ServiceAccount has exactly the permissions it used.
    permissions_are_exactly_what_the_operator_uses(&p).await;

    p.ok(
        "helm",
        &["uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "60s"],
    );
    p.kubelet.shutdown().await;
    p.cp.stop().await;
}

/// The "bundled" release's etcd: TLS certificates the chart generated, kept across `helm upgrade`
/// (read back with `lookup` from the real API server); a deleted one is made anew on the next
/// upgrade, signed by the kept CA; its NetworkPolicies are API objects the server accepted.
async fn bundled_etcd_certificates_are_kept(p: &Cluster, chart: &str) {
    let secrets: Api<Secret> = p.api("bundled");
    let read = || async {
        let mut out = BTreeMap::new();
        for part in ["ca", "server", "client"] {
            let s = secrets
                .get(&format!("bundled-tidelock-etcd-{part}"))
                .await
                .unwrap_or_else(|e| panic!("the generated {part} Secret: {e}"));
            for (key, value) in s.data.unwrap_or_default() {
                out.insert(format!("{part}/{key}"), value.0);
            }
        }
        out
    };
    let installed = read().await;
    assert_eq!(
        installed.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "ca/ca.crt",
            "ca/ca.key",
            "client/ca.crt",
            "client/tls.crt",
            "client/tls.key",
            "server/ca.crt",
            "server/tls.crt",
            "server/tls.key"
        ]
    );
    assert_eq!(installed["server/ca.crt"], installed["ca/ca.crt"]);
    let upgrade = || p.ok("helm", &["upgrade", "bundled", chart, "-n", "bundled"]);
    upgrade();
    assert!(
        read().await == installed,
        "helm upgrade keeps the certificates"
    );
    secrets
        .delete("bundled-tidelock-etcd-client", &Default::default())
        .await
        .unwrap();
    upgrade();
    let rotated = read().await;
    assert_ne!(rotated["client/tls.crt"], installed["client/tls.crt"]);
    for kept in ["ca/ca.crt", "ca/ca.key", "client/ca.crt", "server/tls.crt"] {
        assert_eq!(rotated[kept], installed[kept], "{kept} kept");
    }
    let policies = p.ok(
        "kubectl",
        &["get", "networkpolicies", "-n", "bundled", "-o", "name"],
    );
    for name in ["etcd", "router", "operator"] {
        assert!(
            policies.contains(&format!(
                "networkpolicy.networking.k8s.io/bundled-tidelock-{name}\n"
            )),
            "{policies}"
        );
    }
}

/// Issue #19, point 5: a Model in another namespace asking for `smollm2`'s served name is
/// `Degraded` (`ServedNameTaken`) naming `ml/smollm2`, gets no StatefulSet, and its deletion
/// (through its finalizer) leaves `smollm2`'s registrations in the cluster state.
async fn served_names_are_not_shared(p: &Cluster, layout: &KeyLayout) {
    let served = ModelName::new("smollm2".to_owned()).unwrap();
    let registered = || async {
        p.store
            .list(&layout.workers_of(&served))
            .await
            .unwrap()
            .kvs
            .len()
    };
    let before = registered().await;
    assert!(before > 0, "smollm2 has workers registered");
    p.ok("kubectl", &["create", "namespace", "ml-other"]);
    let copy: Model = serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "smollm2", "namespace": "ml-other"},
        "spec": {"source": {"url": {"url": "https://example.com/model.gguf"}}},
    }))
    .unwrap();
    let other: Api<Model> = p.api("ml-other");
    other.create(&Default::default(), &copy).await.unwrap();
    let (reason, message) = wait_for("the second smollm2 to be refused", LIMIT, || async {
        let m = other.get("smollm2").await.ok()?;
        let (status, reason, message) = condition(&m, "Degraded")?;
        (status == "True").then_some((reason, message))
    })
    .await
    .unwrap();
    eprintln!("Model ml-other/smollm2: Degraded {reason}: {message}");
    assert_eq!(reason, "ServedNameTaken");
    assert!(
        message.contains("belongs to Model ml/smollm2 already"),
        "{message}"
    );
    let groups: Api<StatefulSet> = p.api("ml-other");
    assert!(
        groups
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    p.delete_model("ml-other", "smollm2");
    assert_eq!(
        registered().await,
        before,
        "the holder's registrations stay"
    );
    let holder = p.api::<Model>(ML).get("smollm2").await.unwrap();
    assert!(condition(&holder, "Ready").is_some_and(|(s, _, _)| s == "True"));
}

/// What a poll of a Model's groups saw during a rollout.
#[derive(Debug, Default)]
struct RolloutWatch {
    polls: usize,
    /// The fewest groups serving at one poll.
    fewest: Option<usize>,
    /// Polls at which exactly `groups - 1` served (a group was being replaced).
    one_down: usize,
    /// The Progressing messages seen, in order, without repeats.
    messages: Vec<String>,
}

/// Groups of `model` serving now, and how many it has: a group serves when each of its
/// `shards` worker pods is ready, not terminating, and registered in the cluster state under
/// its group and shard (a group with a pod missing, being replaced, does not).
async fn serving_groups(p: &Cluster, layout: &KeyLayout, model: &Model) -> Option<(usize, usize)> {
    let name = model.name_any();
    let pods: Api<Pod> = p.api(ML);
    let selector = format!("tidelock.dev/model={name}");
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .ok()?;
    let served = ModelName::new(model.spec.served_name.clone().unwrap_or(name.clone())).unwrap();
    let registered: BTreeSet<(String, u32)> = p
        .store
        .list(&layout.workers_of(&served))
        .await
        .ok()?
        .kvs
        .iter()
        .filter_map(|kv| {
            serde_json::from_slice::<tidelock_protocol::WorkerRegistration>(&kv.value).ok()
        })
        .map(|r| (r.group.as_str().to_owned(), r.shard.get()))
        .collect();
    let groups = usize::try_from(model.spec.replicas).unwrap();
    let serving = (0..groups)
        .filter(|g| {
            let group = format!("{name}-g{g}");
            (0..model.spec.shards).all(|shard| {
                list.items.iter().any(|pod| {
                    pod.labels().get("tidelock.dev/group") == Some(&group)
                        && pod.labels().get("apps.kubernetes.io/pod-index")
                            == Some(&shard.to_string())
                        && is_ready(pod)
                        && pod.metadata.deletion_timestamp.is_none()
                        && registered.contains(&(group.clone(), shard as u32))
                })
            })
        })
        .count();
    Some((serving, groups))
}

/// Changes `model`'s spec and polls its groups every 100 ms until every worker was replaced
/// and the Model is Ready with all groups updated.
async fn watch_rollout(
    p: &Cluster,
    layout: &KeyLayout,
    model: &str,
    change: Value,
) -> RolloutWatch {
    let pods: Api<Pod> = p.api(ML);
    let models: Api<Model> = p.api(ML);
    let selector = ListParams::default().labels(&format!("tidelock.dev/model={model}"));
    let uids = |pods: Vec<Pod>| pods.iter().filter_map(|p| p.uid()).collect::<BTreeSet<_>>();
    let before = uids(pods.list(&selector).await.unwrap().items);
    models
        .patch(
            model,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": change})),
        )
        .await
        .unwrap();
    let mut seen = RolloutWatch::default();
    let until = Instant::now() + SLOW;
    loop {
        assert!(
            Instant::now() < until,
            "the rollout did not finish within {SLOW:?}: {seen:?}"
        );
        let m = models.get(model).await.unwrap();
        let Some((serving, groups)) = serving_groups(p, layout, &m).await else {
            continue;
        };
        seen.polls += 1;
        seen.fewest = Some(seen.fewest.map_or(serving, |f| f.min(serving)));
        seen.one_down += usize::from(serving + 1 == groups);
        let status = m.status.clone().unwrap_or_default();
        if let Some((_, _, message)) = condition(&m, "Progressing")
            && seen.messages.last() != Some(&message)
        {
            seen.messages.push(message);
        }
        let now = uids(pods.list(&selector).await.unwrap().items);
        let ready = condition(&m, "Ready").is_some_and(|(s, _, _)| s == "True");
        if now.is_disjoint(&before)
            && ready
            && status.updated_groups == status.desired_groups
            && serving == groups
        {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue #19, point 1: the GPU example (simulated workers) at three groups; a spec change rolls
/// one group at a time, so at every poll at least two groups serve (ready, registered, not
/// terminating), and the Model's status tells the rollout's progress. Then the same change
/// with `maxUnavailableGroups: 3`, which lets every group go at once: fewer than two serve at
/// some poll, so the watch can see what it guards against.
async fn rollout_keeps_groups_serving(p: &Cluster, layout: &KeyLayout) {
    let model = "llama-3-1-8b";
    p.set_replicas(model, 3).await;
    p.model_ready(model, "3/3", SLOW).await;
    let started = Instant::now();
    let one_by_one = watch_rollout(p, layout, model, json!({"maxContextTokens": 65536})).await;
    eprintln!(
        "rollout, at most 1 group down, {:.1} s: {} polls, fewest groups serving {:?}, {} polls with one group down; Progressing said:\n  {}",
        started.elapsed().as_secs_f64(),
        one_by_one.polls,
        one_by_one.fewest,
        one_by_one.one_down,
        one_by_one.messages.join("\n  ")
    );
    assert!(one_by_one.fewest >= Some(2), "{one_by_one:?}");
    assert!(
        one_by_one.one_down > 0,
        "a group was replaced while watched: {one_by_one:?}"
    );
    for progress in [
        "rollout: 0/3 groups updated",
        "rollout: 1/3 groups updated",
        "rollout: 2/3 groups updated",
    ] {
        assert!(
            one_by_one.messages.iter().any(|m| m.contains(progress)),
            "the status said {progress:?}: {:?}",
            one_by_one.messages
        );
    }
    let events = p.ok(
        "kubectl",
        &[
            "get",
            "events",
            "-n",
            ML,
            "--field-selector",
            &format!("involvedObject.name={model},reason=GroupUpdated"),
            "-o",
            "jsonpath={range .items[*]}{.note}{.message}{\"\\n\"}{end}",
        ],
    );
    assert!(
        events.contains("at most 1 of 3 groups out of service at once"),
        "{events}"
    );

    let started = Instant::now();
    let all_at_once = watch_rollout(
        p,
        layout,
        model,
        json!({"maxContextTokens": 32768, "rollout": {"maxUnavailableGroups": 3}}),
    )
    .await;
    eprintln!(
        "rollout, up to 3 groups down, {:.1} s: {} polls, fewest groups serving {:?}",
        started.elapsed().as_secs_f64(),
        all_at_once.polls,
        all_at_once.fewest
    );
    assert!(all_at_once.fewest < Some(2), "{all_at_once:?}");
    p.set_replicas(model, 2).await;
    p.model_ready(model, "2/2", SLOW).await;
}

/// A Model nothing can schedule, one a LimitRange refuses, one over its namespace's quota: each
/// says why in its conditions.
async fn failures_surface(p: &Cluster) {
    let spec = |gpus: u32, product: Option<&str>| {
        let mut resources = json!({"gpus": gpus, "cpu": "1", "memory": "1Gi"});
        if let Some(product) = product {
            resources["gpuProduct"] = json!(product);
        }
        json!({
            "source": {"url": {"url": "https://example.com/model.gguf"}},
            "replicas": 1, "shards": 1,
            "kvCache": {"memoryPerWorker": "64Mi"},
            "resources": resources,
        })
    };
    let create = |namespace: &str, name: &str, spec: Value| {
        let api: Api<Model> = p.api(namespace);
        let model: Model = serde_json::from_value(json!({
            "apiVersion": "tidelock.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec,
        }))
        .unwrap();
        async move {
            api.create(&Default::default(), &model).await.unwrap();
        }
    };
    let says = |namespace: &'static str, name: &'static str, words: &'static str| async move {
        let api: Api<Model> = p.api(namespace);
        let found = wait_for(&format!("Model {name} to say \"{words}\""), LIMIT, || {
            let api = api.clone();
            async move {
                let m = api.get(name).await.ok()?;
                let (status, reason, message) = condition(&m, "Degraded")?;
                (status == "True" && message.contains(words)).then_some((reason, message))
            }
        })
        .await;
        match found {
            Ok((reason, message)) => {
                eprintln!("Model {namespace}/{name}: Degraded {reason}: {message}")
            }
            Err(e) => {
                let status = api.get(name).await.ok().and_then(|m| m.status);
                let (_, refused) = operator_requests(p);
                panic!("{e}: {status:#?}\nthe operator's refused requests: {refused:#?}");
            }
        }
    };

    create(ML, "nowhere", spec(1, Some("NVIDIA-B300"))).await;
    says(ML, "nowhere", "0/4 nodes are available").await;

    // Workers pass Pod Security's "restricted" profile now; a LimitRange still refuses pods.
    p.ok("kubectl", &["create", "namespace", "ml-strict"]);
    let limits = p.dir.path().join("limits.yaml");
    std::fs::write(
        &limits,
        "apiVersion: v1\nkind: LimitRange\nmetadata:\n  name: small\nspec:\n  limits:\n    - type: Container\n      min:\n        cpu: \"2\"\n",
    )
    .unwrap();
    p.ok(
        "kubectl",
        &["apply", "-n", "ml-strict", "-f", limits.to_str().unwrap()],
    );
    create("ml-strict", "strict", spec(0, None)).await;
    says(
        "ml-strict",
        "strict",
        "minimum cpu usage per Container is 2",
    )
    .await;

    p.ok("kubectl", &["create", "namespace", "ml-quota"]);
    p.ok(
        "kubectl",
        &[
            "create",
            "quota",
            "gpus",
            "-n",
            "ml-quota",
            "--hard=requests.nvidia.com/gpu=0",
        ],
    );
    create("ml-quota", "overquota", spec(1, None)).await;
    says("ml-quota", "overquota", "exceeded quota").await;

    for (namespace, name) in [
        (ML, "nowhere"),
        ("ml-strict", "strict"),
        ("ml-quota", "overquota"),
    ] {
        p.delete_model(namespace, name);
    }
}

/// Exactly one of the two operator replicas holds the Lease; kill it as a machine failure would
/// and the other takes over within the lease duration, then reconciles.
async fn leader_handover(p: &Cluster) {
    let leases: Api<Lease> = p.api(NS);
    let lease_name = "tidelock-operator";
    let holder = || async { leases.get(lease_name).await.ok()?.spec?.holder_identity };
    let first = wait_for("a leader", LIMIT, holder).await.unwrap();
    let operators: Vec<String> = p
        .api::<Pod>(NS)
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(operators.len(), 2, "{operators:?}");
    assert!(
        operators.contains(&first),
        "{first} is one of {operators:?}"
    );
    let duration = leases
        .get(lease_name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .lease_duration_seconds
        .unwrap();
    let pid = p.kubelet.pid(NS, &first).expect("the leader's process");
    let killed = Instant::now();
    // As when its machine dies: SIGKILL, no restart (a restarted container keeps its pod's
    // name, so it would simply lead again).
    assert!(p.kubelet.crash(NS, &first));
    wait_for("the leader's process to die", LIMIT, || async move {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await
    .unwrap();
    let second = wait_for("another leader", Duration::from_secs(60), || async {
        holder().await.filter(|h| *h != first)
    })
    .await
    .unwrap();
    let took = killed.elapsed();
    eprintln!(
        "leader {first} killed (SIGKILL); {second} leads after {:.1} s (lease duration {duration} s)",
        took.as_secs_f64()
    );
    assert!(operators.contains(&second));
    // The standby counts the lease's duration from when it saw the last renewal, and looks
    // every 2 s (client-go's algorithm): the bound is duration + two retries, plus a margin for
    // a loaded machine.
    assert!(
        took <= Duration::from_secs(u64::try_from(duration).unwrap() + 2 * 2 + 5),
        "handover took {took:?}"
    );
    // The new leader reconciles: a change made now is acted on.
    p.api::<Model>(ML)
        .patch(
            "smollm2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    p.model_ready("smollm2", "2/2", SLOW).await;
}

/// `(group, resource[/subresource], verb)`.
type Permission = (String, String, String);

/// The NetworkPolicies of the chart and the operator, as the API server holds them, against the
/// attacks of issue #17 (nothing enforces them here, no network plugin: `tidelock_e2e::netpol`
/// decides as one would, from the real objects and pods). A pod of another namespace, or a
/// tenant's pod beside the workers, reaches no worker, no metrics port and no etcd; a worker of
/// another group does not reach this group; the routers and the group's own shards do;
/// Prometheus's namespace reaches metrics ports only; anyone reaches the router's API.
async fn network_policies_admit_only_the_cluster(p: &Cluster) {
    use tidelock_e2e::netpol::{Endpoint, allowed};
    let policies: Vec<NetworkPolicy> = Api::all(p.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let namespaces: BTreeMap<String, BTreeMap<String, String>> =
        Api::<Namespace>::all(p.client.clone())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|n| (n.name_any(), n.metadata.labels.unwrap_or_default()))
            .collect();
    let pods = Api::<Pod>::all(p.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let pod = |namespace: &str, labels: &[(&str, &str)]| -> Endpoint {
        let found = pods
            .iter()
            .find(|pod| {
                pod.namespace().as_deref() == Some(namespace)
                    && labels
                        .iter()
                        .all(|(k, v)| pod.labels().get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no pod {labels:?} in {namespace}"));
        Endpoint::of(found, namespaces[namespace].clone())
    };
    let component = "app.kubernetes.io/component";
    let router = pod(NS, &[(component, "router")]);
    let operator = pod(NS, &[(component, "operator")]);
    let group = |name: &str| pod(ML, &[("tidelock.dev/group", name)]);
    let (g0, g1) = (group("smollm2-g0"), group("smollm2-g1"));
    let shard = |i: &str| {
        pod(
            ML,
            &[
                ("tidelock.dev/group", "smollm2-long-g0"),
                ("apps.kubernetes.io/pod-index", i),
            ],
        )
    };
    let (coordinator, shard1) = (shard("0"), shard("1"));
    // The "bundled" release's etcd, router and operator (their pods exist, Pending).
    let etcd = pod("bundled", &[(component, "etcd")]);
    let bundled_router = pod("bundled", &[(component, "router")]);
    let bundled_operator = pod("bundled", &[(component, "operator")]);
    let outsider = Endpoint::stranger("tenant-x", &[("app", "notebook")]);
    let neighbour = Endpoint::stranger(ML, &[("app", "notebook")]);
    let prometheus = Endpoint::stranger("monitoring", &[("app", "prometheus")]);
    let cases: [(&str, &Endpoint, &str, &Endpoint, i32, bool); 21] = [
        (
            "a pod of another namespace",
            &outsider,
            "a worker's API",
            &g0,
            8000,
            false,
        ),
        (
            "a tenant's pod beside the workers",
            &neighbour,
            "a worker's API",
            &g0,
            8000,
            false,
        ),
        (
            "a pod of another namespace",
            &outsider,
            "a shard's RPC",
            &shard1,
            8000,
            false,
        ),
        (
            "a pod of another namespace",
            &outsider,
            "a worker's metrics",
            &g0,
            9100,
            false,
        ),
        (
            "a pod of another namespace",
            &outsider,
            "the router's metrics",
            &router,
            9090,
            false,
        ),
        (
            "a pod of another namespace",
            &outsider,
            "the operator's metrics",
            &operator,
            8080,
            false,
        ),
        (
            "a pod of another namespace",
            &outsider,
            "etcd",
            &etcd,
            2379,
            false,
        ),
        (
            "a tenant's pod beside the workers",
            &neighbour,
            "etcd",
            &etcd,
            2379,
            false,
        ),
        (
            "a worker of another group of the Model (KV pulls, handoffs)",
            &g1,
            "a worker's API",
            &g0,
            8000,
            true,
        ),
        (
            "a worker of another Model",
            &coordinator,
            "a worker's API",
            &g0,
            8000,
            false,
        ),
        (
            "Prometheus",
            &prometheus,
            "a worker's API",
            &g0,
            8000,
            false,
        ),
        (
            "a pod of another namespace",
            &outsider,
            "the router's API",
            &router,
            8000,
            true,
        ),
        ("the router", &router, "a worker's API", &g0, 8000, true),
        (
            "the operator (load reports, to autoscale)",
            &operator,
            "a worker's API",
            &g0,
            8000,
            true,
        ),
        (
            "the router",
            &router,
            "a shard group's coordinator",
            &coordinator,
            8000,
            true,
        ),
        (
            "the coordinator",
            &coordinator,
            "its shard's RPC",
            &shard1,
            8000,
            true,
        ),
        (
            "Prometheus",
            &prometheus,
            "a worker's metrics",
            &g0,
            9100,
            true,
        ),
        (
            "Prometheus",
            &prometheus,
            "the router's metrics",
            &router,
            9090,
            true,
        ),
        (
            "the release's router",
            &bundled_router,
            "etcd",
            &etcd,
            2379,
            true,
        ),
        (
            "the release's operator",
            &bundled_operator,
            "etcd",
            &etcd,
            2379,
            true,
        ),
        (
            "a worker",
            &g0,
            "etcd (bundled release's, any namespace)",
            &etcd,
            2379,
            true,
        ),
    ];
    for (who, from, what, to, port, expected) in cases {
        let verdict = allowed(&policies, from, to, port);
        eprintln!(
            "network: {who} -> {what} (port {port}): {}",
            if verdict { "admitted" } else { "refused" }
        );
        assert_eq!(verdict, expected, "{who} -> {what} on {port}");
    }
}

/// What the operator's ServiceAccount asked of the API server, from the audit log: the
/// permissions it used (an apply that created an object used `create`), and its refused
/// requests.
fn operator_requests(p: &Cluster) -> (BTreeSet<Permission>, BTreeSet<String>) {
    let user = format!("system:serviceaccount:{NS}:{RELEASE}-operator");
    let text = std::fs::read_to_string(p.cp.audit_log()).unwrap_or_default();
    let mut used = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if entry["user"]["username"] != user.as_str() {
            continue;
        }
        let object = &entry["objectRef"];
        let resource = match object["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", object["resource"].as_str().unwrap_or("")),
            None => object["resource"].as_str().unwrap_or("").to_owned(),
        };
        let group = object["apiGroup"].as_str().unwrap_or("").to_owned();
        let verb = entry["verb"].as_str().unwrap_or("").to_owned();
        let code = entry["responseStatus"]["code"].as_u64().unwrap_or(0);
        if resource.is_empty() {
            continue;
        }
        if code == 403 {
            refused.insert(format!(
                "{verb} {group}/{resource}: {}",
                entry["responseStatus"]["message"]
            ));
        }
        if verb == "patch" && code == 201 {
            used.insert((group.clone(), resource.clone(), "create".to_owned()));
        }
        used.insert((group, resource, verb));
    }
    (used, refused)
}

/// The operator's requests, from the API server's audit log: none refused, and every
/// permission its roles grant used at least once (an apply that created an object used
/// `create`). A permission removed from the chart fails the flow that needs it and is named
/// here as a refused request; one added without use is named as unused.
async fn permissions_are_exactly_what_the_operator_uses(p: &Cluster) {
    let (mut used, refused) = operator_requests(p);
    assert!(
        !used.is_empty(),
        "the audit log has the operator's requests"
    );
    assert!(
        refused.is_empty(),
        "requests the operator's roles refused: {refused:#?}"
    );
    let mut granted = BTreeSet::new();
    let cluster_role: ClusterRole = Api::all(p.client.clone())
        .get(&format!("{NS}-{RELEASE}-operator"))
        .await
        .unwrap();
    let lease_role: Role = p
        .api(NS)
        .get(&format!("{RELEASE}-operator-lease"))
        .await
        .unwrap();
    for rule in cluster_role
        .rules
        .unwrap_or_default()
        .into_iter()
        .chain(lease_role.rules.unwrap_or_default())
    {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    // Checked by an admission plugin (OwnerReferencesPermissionEnforcement: owning objects with
    // blockOwnerDeletion), not sent as a request: the objects it owns could not be applied
    // without it.
    used.insert((
        "tidelock.dev".into(),
        "models/finalizers".into(),
        "update".into(),
    ));
    let unused: Vec<String> = granted
        .difference(&used)
        .map(|(g, r, v)| format!("{v} {g}/{r}"))
        .collect();
    let used_list: Vec<String> = used
        .iter()
        .map(|(g, r, v)| format!("{v} {g}/{r}"))
        .collect();
    eprintln!("the operator used: {used_list:#?}");
    assert!(
        unused.is_empty(),
        "granted to the operator but never used: {unused:#?}"
    );
}

/// `tidelock kube up` as the README runs it: the printed commands work (helm install, the CPU
/// example to Ready 2/2), and Ctrl-C stops everything, leaving no process, port, folder or
/// kubeconfig.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidelock_kube_up_runs_the_readme_path_and_stops_clean() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    if shared::tools_or_skip().is_none() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = home.path().join("kubeconfig");
    let mut up = Command::new(binary("tidelock"))
        .args(["kube", "up", "--kubeconfig", kubeconfig.to_str().unwrap()])
        .args([
            "--bin-dir",
            binary("tidelock").parent().unwrap().to_str().unwrap(),
        ])
        .args(["--model", model_path().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = up.stderr.take().unwrap();
    let progress = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .inspect(|l| eprintln!("kube up: {l}"))
            .collect::<Vec<_>>()
    });
    let mut out = String::new();
    for line in BufReader::new(up.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        out.push_str(&line);
        out.push('\n');
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    eprintln!("{out}");
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name).map(|r| r.trim().to_owned()))
            .unwrap_or_else(|| panic!("`{name}` in the output:\n{out}"))
    };
    let server = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Kubernetes ")
                .and_then(|l| l.split(": ").nth(1))
        })
        .expect("the API server's address")
        .to_owned();
    let etcd = field("state etcd")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let logs = out
        .lines()
        .find_map(|l| l.split("Logs: ").nth(1))
        .map(|l| PathBuf::from(l.trim()))
        .expect("the logs folder");
    let state_dir = logs.parent().unwrap().to_path_buf();
    assert!(kubeconfig.is_file());
    let tools = shared::tools_or_skip().unwrap();
    let run = |tool: &str, args: &[&str]| {
        let o = Command::new(tools.path(tool))
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", home.path())
            .current_dir(repo_root())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{tool} {args:?}:\n{text}");
        text
    };
    // The commands the output prints.
    run(
        "helm",
        &[
            "install",
            "tidelock",
            "charts/tidelock",
            "-n",
            "tidelock",
            "--create-namespace",
            "--set",
            &format!("etcd.external.endpoints[0]={etcd}"),
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    let literal = format!("--from-literal=apiKey={}", random_key());
    run(
        "kubectl",
        &["create", "secret", "generic", "team-a-key", &literal],
    );
    run(
        "kubectl",
        &[
            "apply",
            "-f",
            "charts/tidelock/examples/model-cpu.yaml",
            "-f",
            "charts/tidelock/examples/tenant.yaml",
        ],
    );
    let deadline = Instant::now() + SLOW;
    let table = loop {
        let table = run("kubectl", &["get", "models"]);
        if table
            .lines()
            .any(|l| l.starts_with("smollm2 ") && l.contains(" 2/2 "))
        {
            break table;
        }
        assert!(Instant::now() < deadline, "smollm2 not Ready 2/2:\n{table}");
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!("$ kubectl get models\n{table}");

    // Ctrl-C (SIGINT to the command alone, as a terminal's is now: its children have their own
    // process group) stops everything.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(up.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = up.wait().unwrap();
    let progress = progress.join().unwrap();
    assert!(status.success(), "exit {status}: {progress:#?}");
    assert!(progress.iter().any(|l| l.contains("stopped every process")));
    let port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "the API server's port is free"
    );
    let etcd_port: u16 = etcd.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", etcd_port)).is_ok(),
        "etcd's port is free"
    );
    assert!(!state_dir.exists(), "{} removed", state_dir.display());
    assert!(!kubeconfig.exists(), "the kubeconfig removed");
    let marker = state_dir.display().to_string();
    // A component names its folder on its command line; a pod's process runs inside it.
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
            (cmdline.contains(&marker) || cwd.starts_with(&state_dir)).then_some(cmdline)
        })
        .collect();
    assert!(left.is_empty(), "processes left: {left:#?}");
}
