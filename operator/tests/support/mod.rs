//! Where the reconcile flows run: against the mocked API server ([`apiserver`]) always, and
//! against a real Kubernetes API server: the cluster `KUBECONFIG` names when it is set, else the
//! local control plane (`tidelock-localkube`: kube-apiserver, controller-manager, scheduler and
//! kwok, built by `./scripts/test`), one per test binary. Where neither exists the cluster runs
//! are skipped, saying so; with `TIDELOCK_REQUIRE_CLUSTER=1` (CI) they fail instead. On a cluster
//! each test gets its own namespace, installs the CRDs (server-side apply) and deletes the
//! namespace at the end; the cluster state is the in-memory store in both cases (the etcd store
//! passes the same conformance suite).

#![allow(dead_code)]

pub mod apiserver;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use tidelock_api::{Model, Tenant};
use tidelock_operator::builders::Defaults;
use tidelock_operator::metrics::Metrics;
use tidelock_operator::reconcile::Context;
use tidelock_protocol::KeyLayout;
use tidelock_state::{MemoryStore, StateStore};

pub use apiserver::ApiServer;

/// One place to run a flow.
pub struct Harness {
    pub client: Client,
    /// The mocked server, when not on a real cluster: flows use it for what only Kubernetes'
    /// own controllers would do (StatefulSet status) and for injected faults.
    pub fake: Option<ApiServer>,
    pub namespace: String,
    pub store: Arc<MemoryStore>,
    pub ctx: Arc<Context>,
}

pub fn defaults() -> Defaults {
    Defaults {
        worker_image: "tidelock/tidelock:test".into(),
        etcd_endpoints: vec!["http://etcd:2379".into()],
        etcd_prefix: "/tidelock/".into(),
        etcd_client_secret: None,
        cluster_token_secret: tidelock_operator::builders::SecretRef {
            namespace: "default".into(),
            name: "tidelock-cluster-token".into(),
        },
        network_policy: Some(tidelock_operator::builders::PolicyPeers {
            router_namespace: "tidelock-system".into(),
            router_labels: [(
                "app.kubernetes.io/component".to_owned(),
                "router".to_owned(),
            )]
            .into(),
            operator_labels: [(
                "app.kubernetes.io/component".to_owned(),
                "operator".to_owned(),
            )]
            .into(),
            monitoring_namespace_labels: [(
                "kubernetes.io/metadata.name".to_owned(),
                "monitoring".to_owned(),
            )]
            .into(),
        }),
        log: tidelock_service::LogArgs::default(),
    }
}

fn context(client: &Client, store: &Arc<MemoryStore>) -> Arc<Context> {
    Arc::new(Context::new(
        client.clone(),
        store.clone() as Arc<dyn StateStore>,
        KeyLayout::new(KeyLayout::DEFAULT_ROOT),
        defaults(),
        Metrics::new(),
        Some("test".into()),
    ))
}

impl Harness {
    /// Against the mocked API server.
    pub fn mocked() -> Harness {
        let (fake, client) = ApiServer::start();
        let store = Arc::new(MemoryStore::new());
        Harness {
            ctx: context(&client, &store),
            client,
            fake: Some(fake),
            namespace: "ml".into(),
            store,
        }
    }

    /// Against the cluster `KUBECONFIG` names, else the local control plane, or `None` (the
    /// test is skipped, saying why) without either.
    pub async fn cluster(test: &str) -> Option<Harness> {
        let client = if std::env::var_os("KUBECONFIG").is_some() {
            Client::try_default()
                .await
                .expect("a client from KUBECONFIG")
        } else {
            tidelock_localkube::shared::shared()?.client().await
        };
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in [Model::crd(), Tenant::crd()] {
            let name = crd.metadata.name.clone().unwrap();
            crds.patch(
                &name,
                &PatchParams::apply("tidelock-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("install the CRDs");
            until("the CRD is established", || async {
                crds.get(&name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .is_some_and(|s| {
                        s.conditions
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            })
            .await;
        }
        // A DNS label: at most 63 characters.
        let test: String = test.replace('_', "-").chars().take(40).collect();
        let namespace = format!("tlt-{}-{}", test.trim_end_matches('-'), std::process::id());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(namespace.clone());
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create the test namespace");
        let store = Arc::new(MemoryStore::new());
        Some(Harness {
            ctx: context(&client, &store),
            client,
            fake: None,
            namespace,
            store,
        })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Deletes the test namespace on a real cluster.
    pub async fn finish(self) {
        if self.fake.is_none() {
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(&self.namespace, &DeleteParams::default())
                .await;
        }
    }
}

/// Polls `check` until it holds; panics naming `what` after 30 s.
pub async fn until<F: Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs each flow against the mocked API server (`mocked::<flow>`) and against a real cluster
/// (`cluster::<flow>`, skipped without `KUBECONFIG`).
#[macro_export]
macro_rules! flows {
    ($($flow:ident),* $(,)?) => {
        mod mocked {
            $(
                #[tokio::test]
                async fn $flow() {
                    super::$flow($crate::support::Harness::mocked()).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $flow() {
                    if let Some(h) = $crate::support::Harness::cluster(stringify!($flow)).await {
                        super::$flow(h).await;
                    }
                }
            )*
        }
    };
}
