//! The workers' etcd TLS files: with `--etcd-client-secret`, the Model reconciler copies the
//! operator's client Secret into the Model's namespace (pods mount Secrets of their own namespace
//! only), owned by the Model, before the StatefulSets that mount it; a rotated source reaches
//! the copy on the next reconcile; a missing Secret stops the Model before any worker is created.
//! Run against the mocked API server and, when there is one, a real cluster.

mod support;

use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::Harness;
use tidelock_api::Model;
use tidelock_operator::builders::{Defaults, SecretRef};
use tidelock_operator::metrics::Metrics;
use tidelock_operator::reconcile::{self, Context, Error};
use tidelock_protocol::KeyLayout;
use tidelock_state::StateStore;

flows!(
    a_models_workers_mount_a_copy_of_the_etcd_client_secret,
    a_missing_etcd_client_secret_stops_the_model,
);

/// Where the operator's Secret lives: another namespace on the mocked server (which needs no
/// Namespace object), the test's own on a cluster.
fn source(h: &Harness) -> SecretRef {
    let namespace = if h.fake.is_some() {
        "tidelock-system".to_owned()
    } else {
        h.namespace.clone()
    };
    SecretRef {
        namespace,
        name: "tidelock-etcd-client".into(),
    }
}

fn context(h: &Harness) -> Arc<Context> {
    let defaults = Defaults {
        etcd_endpoints: vec!["https://etcd:2379".into()],
        etcd_client_secret: Some(source(h)),
        ..support::defaults()
    };
    Arc::new(Context::new(
        h.client.clone(),
        h.store.clone() as Arc<dyn StateStore>,
        KeyLayout::new(KeyLayout::DEFAULT_ROOT),
        defaults,
        Metrics::new(),
        Some("test".into()),
    ))
}

fn files(cert: &str) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "tidelock-etcd-client"},
        "type": "kubernetes.io/tls",
        "stringData": {"ca.crt": "CA PEM", "tls.crt": cert, "tls.key": "KEY PEM"},
    }))
    .unwrap()
}

/// Creates the Model and reconciles it twice (the first pass adds the finalizer).
async fn reconcile_new_model(h: &Harness, ctx: &Arc<Context>) -> Result<(), Error> {
    let model: Model = serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "smol", "namespace": h.namespace},
        "spec": {"source": {"huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
                 "replicas": 2},
    }))
    .unwrap();
    h.api::<Model>()
        .create(&PostParams::default(), &model)
        .await
        .unwrap();
    reconcile_again(h, ctx).await?;
    reconcile_again(h, ctx).await
}

async fn reconcile_again(h: &Harness, ctx: &Arc<Context>) -> Result<(), Error> {
    let model = h.api::<Model>().get("smol").await.unwrap();
    reconcile::model::reconcile(Arc::new(model), ctx.clone())
        .await
        .map(|_| ())
}

fn data(s: &Secret, key: &str) -> Vec<u8> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

async fn a_models_workers_mount_a_copy_of_the_etcd_client_secret(h: Harness) {
    let ctx = context(&h);
    let src = source(&h);
    let sources: Api<Secret> = Api::namespaced(h.client.clone(), &src.namespace);
    let mut secret = files("CERT PEM 1");
    if h.fake.is_some() {
        // The mocked server stores what it is sent: give it the data as the API server would.
        secret.data = Some(
            secret
                .string_data
                .take()
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        );
    }
    sources
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    reconcile_new_model(&h, &ctx).await.unwrap();

    let model = h.api::<Model>().get("smol").await.unwrap();
    let copy = h.api::<Secret>().get("smol-etcd-client").await.unwrap();
    for (key, value) in [
        ("ca.crt", "CA PEM"),
        ("tls.crt", "CERT PEM 1"),
        ("tls.key", "KEY PEM"),
    ] {
        assert_eq!(data(&copy, key), value.as_bytes(), "{key}");
    }
    assert_eq!(
        copy.data.as_ref().unwrap().len(),
        3,
        "exactly the three keys"
    );
    let owner = &copy.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("Model", model.uid().unwrap().as_str(), Some(true))
    );

    let groups = h
        .api::<StatefulSet>()
        .list(&ListParams::default().labels("tidelock.dev/model=smol"))
        .await
        .unwrap()
        .items;
    assert_eq!(groups.len(), 2);
    for g in &groups {
        let pod = g.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "etcd-tls")
            .expect("the TLS volume");
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("smol-etcd-client")
        );
        let env: Vec<&str> = pod.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        for var in [
            "TIDELOCK_ETCD_CA_FILE",
            "TIDELOCK_ETCD_CERT_FILE",
            "TIDELOCK_ETCD_KEY_FILE",
        ] {
            assert!(env.contains(&var), "{var} in {env:?}");
        }
    }

    // A rotation of the source reaches the copy on the next reconcile.
    let mut rotated = sources.get("tidelock-etcd-client").await.unwrap();
    rotated
        .data
        .as_mut()
        .unwrap()
        .insert("tls.crt".into(), ByteString(b"CERT PEM 2".to_vec()));
    sources
        .replace("tidelock-etcd-client", &PostParams::default(), &rotated)
        .await
        .unwrap();
    reconcile_again(&h, &ctx).await.unwrap();
    let copy = h.api::<Secret>().get("smol-etcd-client").await.unwrap();
    assert_eq!(data(&copy, "tls.crt"), b"CERT PEM 2");
    h.finish().await;
}

async fn a_missing_etcd_client_secret_stops_the_model(h: Harness) {
    let ctx = context(&h);
    let error = reconcile_new_model(&h, &ctx).await.unwrap_err();
    let text = error.to_string();
    // Wrapped by the finalizer helper; its reason is the cause's.
    assert_eq!(error.reason(), "EtcdClientSecretInvalid", "{text}");
    assert!(
        text.contains("Secret")
            && text.contains("tidelock-etcd-client")
            && text.contains("not found"),
        "{text}"
    );
    let groups = h
        .api::<StatefulSet>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert!(groups.is_empty(), "no worker before the TLS files exist");
    h.finish().await;
}
