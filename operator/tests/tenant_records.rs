//! The operator's tenant records are the router's tenants: a record written to the store (the
//! in-memory one; the etcd one passes the same conformance suite) makes the Tenant's key work on
//! a router following that store, a rotated key replaces the old one, and removal ends both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde_json::json;
use tidelock_api::Tenant;
use tidelock_operator::tenants::{cache_salt, remove, tenant_id, tenant_record, write};
use tidelock_protocol::KeyLayout;
use tidelock_router::tenants::Tenants;
use tidelock_state::{MemoryStore, StateStore};

fn secret(key: &str) -> BTreeMap<String, Secret> {
    let secret = Secret {
        data: Some(BTreeMap::from([(
            "apiKey".to_owned(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    BTreeMap::from([("keys".to_owned(), secret)])
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_written_record_lets_the_tenants_key_in_on_a_router() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new());
    let layout = KeyLayout::new(KeyLayout::DEFAULT_ROOT);
    let tenants = Arc::new(Tenants::default());
    let follow = tokio::spawn(tenants.clone().follow(store.clone(), layout.clone()));

    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "team-a", "namespace": "ml"},
        "spec": {"apiKeySecrets": [{"name": "keys"}], "limits": {"requestsPerMinute": 60}},
    }))
    .unwrap();
    let id = tenant_id(&tenant).unwrap();
    let first = "sk-team-a-first-key-0123456789";
    let salt = cache_salt(&*store, &layout, &id, false).await.unwrap();
    let record = tenant_record(&tenant, &secret(first), salt).unwrap();
    assert!(write(&*store, &layout, &id, &record).await.unwrap());
    assert!(
        !write(&*store, &layout, &id, &record).await.unwrap(),
        "an unchanged record is not rewritten"
    );
    until("the router accepts the key", || {
        tenants.authenticate(first).is_some()
    })
    .await;
    let seen = tenants.authenticate(first).unwrap();
    assert_eq!(seen.id.as_str(), "ml/team-a");
    assert_eq!(seen.record.limits.requests_per_minute, Some(60));

    // The Secret is rotated: the new key works, the old one stops.
    let second = "sk-team-a-second-key-9876543210";
    let salt = cache_salt(&*store, &layout, &id, false).await.unwrap();
    assert_eq!(salt, record.cache_salt, "the record's salt is kept");
    let rotated = tenant_record(&tenant, &secret(second), salt).unwrap();
    assert!(write(&*store, &layout, &id, &rotated).await.unwrap());
    until("the new key works", || {
        tenants.authenticate(second).is_some()
    })
    .await;
    assert!(tenants.authenticate(first).is_none());

    // The Tenant is deleted: its keys stop working everywhere.
    assert!(remove(&*store, &layout, &id).await.unwrap());
    until("the key stops working", || {
        tenants.authenticate(second).is_none()
    })
    .await;
    assert!(!remove(&*store, &layout, &id).await.unwrap());
    follow.abort();
}
