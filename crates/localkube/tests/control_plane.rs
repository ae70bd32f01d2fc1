//! The local control plane against itself: it starts, it is a real cluster (RBAC, Pod Security,
//! the scheduler, the garbage collector, kwok's nodes), the stand-in kubelet runs a pod as a
//! process with the pod's environment and identity, and stopping leaves no process or port.
//! Skipped (saying so) where the programs are not built; failed under
//! `TIDELOCK_REQUIRE_CLUSTER=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    Namespace, Node, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tidelock_localkube::control_plane::wait_for;
use tidelock_localkube::kubelet::{self, Kubelet};
use tidelock_localkube::{ControlPlane, Options, shared};

const LIMIT: Duration = Duration::from_secs(60);

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap()
}

async fn namespace(client: &Client, name: &str, labels: serde_json::Value) {
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": name, "labels": labels}}),
    )
    .await;
    // Pods need the namespace's `default` service account (the controller-manager makes it).
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    wait_for("the default service account", LIMIT, || {
        let accounts = accounts.clone();
        async move { accounts.get_opt("default").await.ok().flatten() }
    })
    .await
    .unwrap();
}

fn pod_condition(pod: &Pod, kind: &str) -> Option<(String, String, String)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

/// A client that authenticates as `account`'s token (from the TokenRequest API).
async fn client_as(cp: &ControlPlane, namespace: &str, account: &str) -> Client {
    let admin = cp.client().await.unwrap();
    let token = Api::<ServiceAccount>::namespaced(admin, namespace)
        .create_token_request(
            account,
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec::default(),
                ..TokenRequest::default()
            },
        )
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        tidelock_localkube::pki::kubeconfig(cp.server(), cp.ca_pem(), account, &token),
    )
    .unwrap();
    tidelock_localkube::control_plane::client_for(&path)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_cluster_that_stops_cleanly() {
    let Some(tools) = shared::tools_or_skip() else {
        return;
    };
    let cp = ControlPlane::start(tools, Options::default())
        .await
        .expect("the control plane starts");
    let admin = cp.client().await.unwrap();

    // kwok's nodes are Ready; the GPU ones advertise GPUs and are tainted.
    let nodes = Api::<Node>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(nodes.items.len(), 4);
    let gpu = nodes
        .items
        .iter()
        .find(|n| n.name_any() == "gpu-0")
        .unwrap();
    let capacity = gpu.status.as_ref().unwrap().capacity.as_ref().unwrap();
    assert_eq!(capacity["nvidia.com/gpu"].0, "8");

    // Pod Security: a restricted namespace refuses a pod that runs as root by default.
    namespace(
        &admin,
        "strict",
        json!({"pod-security.kubernetes.io/enforce": "restricted"}),
    )
    .await;
    let refused = Api::<Pod>::namespaced(admin.clone(), "strict")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "loose"},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("violates PodSecurity \"restricted"),
        "{refused}"
    );

    // RBAC: a service account is nobody until bound.
    namespace(&admin, "apps", json!({})).await;
    let nobody = client_as(&cp, "apps", "default").await;
    let denied = Api::<Secret>::namespaced(nobody, "apps")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(denied.to_string().contains("forbidden"), "{denied}");

    // The scheduler: a GPU pod that tolerates the taint lands on a GPU node; one asking for a
    // product no node has stays unschedulable, saying why.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "apps");
    let gpu_pod = |name: &str, product: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "containers": [{"name": "c", "image": "busybox",
                                "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "nodeSelector": {"nvidia.com/gpu.product": product},
            },
        })
    };
    create(&pods, gpu_pod("fits", "NVIDIA-H100-80GB-HBM3")).await;
    create(&pods, gpu_pod("nowhere", "NVIDIA-B300")).await;
    let fits = wait_for("the GPU pod to run (kwok)", LIMIT, || {
        let pods = pods.clone();
        async move {
            let p = pods.get("fits").await.ok()?;
            (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
        }
    })
    .await
    .unwrap();
    assert!(
        fits.spec.unwrap().node_name.unwrap().starts_with("gpu-"),
        "a GPU pod on a GPU node"
    );
    let (status, reason, message) = wait_for("the scheduler to refuse a pod", LIMIT, || {
        let pods = pods.clone();
        async move { pod_condition(&pods.get("nowhere").await.ok()?, "PodScheduled") }
    })
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Unschedulable")
    );
    assert!(message.contains("0/4 nodes are available"), "{message}");

    // The controller-manager: a Deployment gets its pods, and the garbage collector removes
    // them with it.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "apps");
    create(
        &deployments,
        json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "c", "image": "nginx"}]}},
            },
        }),
    )
    .await;
    let web = ListParams::default().labels("app=web");
    wait_for("two web pods", LIMIT, || {
        let (pods, web) = (pods.clone(), web.clone());
        async move { (pods.list(&web).await.ok()?.items.len() == 2).then_some(()) }
    })
    .await
    .unwrap();
    deployments
        .delete("web", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for("the garbage collector to remove the pods", LIMIT, || {
        let (pods, web) = (pods.clone(), web.clone());
        async move { pods.list(&web).await.ok()?.items.is_empty().then_some(()) }
    })
    .await
    .unwrap();

    // kwok's volume stages bind a claim of the default storage class.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), "apps");
    create(
        &claims,
        json!({"metadata": {"name": "models"},
               "spec": {"accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "40Gi"}}}}),
    )
    .await;
    wait_for("the claim to be bound", LIMIT, || {
        let claims = claims.clone();
        async move {
            let c = claims.get("models").await.ok()?;
            (c.status?.phase.as_deref() == Some("Bound")).then_some(())
        }
    })
    .await
    .unwrap();

    // The stand-in kubelet: a pod whose command is a Tidelock binary runs as a local process
    // (here Python stands in for the binary), with the pod's environment, its identity, and a
    // readiness probe on its port.
    let logs = tempfile::tempdir().unwrap();
    let kubelet = Kubelet::start(
        admin.clone(),
        kubelet::Config {
            programs: BTreeMap::from([("tidelock-worker".to_owned(), "/usr/bin/python3".into())]),
            namespaces: Some(BTreeSet::from(["apps".to_owned()])),
            dir: logs.path().to_path_buf(),
            server: cp.server().to_owned(),
            ca_pem: cp.ca_pem().to_owned(),
            ..kubelet::Config::default()
        },
    );
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "apps");
    create(
        &secrets,
        json!({"metadata": {"name": "s"}, "stringData": {"word": "tide"}}),
    )
    .await;
    // Serves its own folder (its HOME) after writing its environment there.
    let script = "import http.server, json, os, sys\n\
                  json.dump(dict(os.environ), open('env.json', 'w'))\n\
                  host, port = sys.argv[1].split(':')\n\
                  http.server.HTTPServer((host, int(port)), http.server.SimpleHTTPRequestHandler).serve_forever()";
    create(
        &pods,
        json!({
            "metadata": {"name": "proc", "labels": {"role": "x"}},
            "spec": {
                "containers": [{
                    "name": "worker", "image": "tidelock/tidelock:test",
                    "command": ["tidelock-worker", "-c", script],
                    "args": ["0.0.0.0:8000"],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
                        {"name": "WORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "word"}}},
                        {"name": "GREETING", "value": "hello $(POD_NAME)"},
                    ],
                    "ports": [{"name": "http", "containerPort": 8000}],
                    "readinessProbe": {"httpGet": {"path": "/env.json", "port": "http"}},
                }],
            },
        }),
    )
    .await;
    wait_for("the process pod to be Ready", LIMIT, || {
        let pods = pods.clone();
        async move {
            let (status, _, _) = pod_condition(&pods.get("proc").await.ok()?, "Ready")?;
            (status == "True").then_some(())
        }
    })
    .await
    .unwrap();
    let port = kubelet.port("apps", "proc", 8000).expect("a host port");
    let (code, body) = tidelock_localkube::http_get(port, "/env.json")
        .await
        .unwrap();
    assert_eq!(code, 200);
    let env: BTreeMap<String, String> = serde_json::from_str(&body).unwrap();
    assert_eq!(env["POD_NAME"], "proc");
    assert_eq!(env["ROLE"], "x");
    assert_eq!(env["WORD"], "tide");
    assert_eq!(env["GREETING"], "hello proc");
    assert!(
        !env.contains_key("TIDELOCK_REQUIRE_CLUSTER"),
        "only the pod's environment"
    );
    let kubeconfig = std::fs::read_to_string(&env["KUBECONFIG"]).unwrap();
    assert!(
        kubeconfig.contains("system:serviceaccount:apps:default"),
        "{kubeconfig}"
    );
    let pid = kubelet.pid("apps", "proc").expect("running");

    // Deleting the pod stops its process.
    pods.delete("proc", &DeleteParams::default()).await.unwrap();
    wait_for("the process to stop", LIMIT, || async move {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await
    .unwrap();
    assert!(kubelet.running().is_empty());
    kubelet.shutdown().await;

    // Stopping leaves no process and no port.
    let api_port: u16 = cp.server().rsplit(':').next().unwrap().parse().unwrap();
    let logs_dir = cp.logs();
    let pids = cp.pids();
    assert_eq!(
        pids.len(),
        5,
        "etcd, apiserver, controller-manager, scheduler, kwok"
    );
    cp.stop().await;
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} stopped"
        );
    }
    assert!(std::net::TcpListener::bind(("127.0.0.1", api_port)).is_ok());
    assert!(!logs_dir.exists(), "the temporary folder is removed");
}

#[tokio::test]
async fn the_shared_control_plane_answers() {
    let Some(shared) = shared::shared() else {
        return;
    };
    let client = shared.client().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        format!("v{}.{}", version.major, version.minor),
        tidelock_localkube::tools::kubernetes_version()
            .rsplit_once('.')
            .unwrap()
            .0
    );
}
