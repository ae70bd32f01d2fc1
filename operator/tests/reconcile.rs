//! Reconcile flows of the Model and Tenant controllers, each run against the mocked API server
//! (`mocked::*`) and against a real cluster when `KUBECONFIG` is set (`cluster::*`): create,
//! spec change, scale up and down, delete with the finalizer, a missing / malformed / rotated
//! Secret, API errors with backoff, an invalid spec. Steps that only Kubernetes' own
//! controllers perform (StatefulSet status) run on the mocked server only.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::response::IntoResponse;
use http::Method;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use support::Harness;
use tidelock_api::{Model, Tenant};
use tidelock_operator::reconcile::{self, Error, error_policy, is_true};
use tidelock_protocol::{KeyLayout, ModelName, TenantId, TenantRecord, WorkerId};
use tidelock_state::StateStore;

flows!(
    a_model_becomes_groups_then_ready,
    a_spec_change_rolls_and_scaling_moves_whole_groups,
    deleting_a_model_removes_its_cluster_state,
    a_tenant_follows_its_secrets_and_fails_closed,
    api_errors_back_off_then_recover,
    an_invalid_spec_is_degraded_and_applies_nothing,
    a_served_name_belongs_to_one_model,
    the_autoscaler_follows_the_load_reports,
);

fn model_object(h: &Harness, name: &str, spec: Value) -> Model {
    serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": name, "namespace": h.namespace},
        "spec": spec,
    }))
    .unwrap()
}

/// Creates a Model and reconciles it once: the first pass only adds the finalizer (the
/// controller then sees the change and comes back, as the tests do next).
async fn create_model(h: &Harness, name: &str, spec: Value) {
    h.api::<Model>()
        .create(&PostParams::default(), &model_object(h, name, spec))
        .await
        .unwrap();
    assert_eq!(
        reconcile_model(h, name).await.unwrap(),
        Action::await_change()
    );
    let model = h.api::<Model>().get(name).await.unwrap();
    assert_eq!(model.finalizers(), ["tidelock.dev/cleanup"]);
    assert!(
        model.status.is_none(),
        "nothing else happened in the first pass"
    );
}

/// Reads the Model back and reconciles it once, as the controller would after a change.
async fn reconcile_model(h: &Harness, name: &str) -> Result<Action, Error> {
    let model = h.api::<Model>().get(name).await.unwrap();
    reconcile::model::reconcile(Arc::new(model), h.ctx.clone()).await
}

async fn reconcile_tenant(h: &Harness, name: &str) -> Result<Action, Error> {
    let tenant = h.api::<Tenant>().get(name).await.unwrap();
    reconcile::tenant::reconcile(Arc::new(tenant), h.ctx.clone()).await
}

async fn patch_spec<K>(h: &Harness, name: &str, spec: Value)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    h.api::<K>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await
        .unwrap();
}

/// `(reason, note)` of the Events about `name`, oldest first.
async fn events(h: &Harness, name: &str) -> Vec<(String, String)> {
    let mut events: Vec<Event> = h
        .api::<Event>()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    events.sort_by_key(|e| {
        e.metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
    });
    // A repeated event is one object with a series count.
    events
        .into_iter()
        .flat_map(|e| {
            let n = e.series.as_ref().map_or(1, |s| s.count);
            let item = (e.reason.unwrap_or_default(), e.note.unwrap_or_default());
            std::iter::repeat_n(item, usize::try_from(n).unwrap())
        })
        .collect()
}

fn reasons(events: &[(String, String)]) -> Vec<&str> {
    events.iter().map(|(r, _)| r.as_str()).collect()
}

fn condition(
    model_status: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> (String, String) {
    let c = model_status
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone())
}

/// The message of condition `type_`.
fn message_of<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> &'a str {
    &conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap()
        .message
}

async fn groups(h: &Harness, model: &str) -> Vec<StatefulSet> {
    let mut groups: Vec<StatefulSet> = h
        .api::<StatefulSet>()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.labels().get("tidelock.dev/model").map(String::as_str) == Some(model))
        .collect();
    groups.sort_by_key(|s| s.name_any());
    groups
}

fn names<K: ResourceExt>(objects: &[K]) -> Vec<String> {
    objects.iter().map(ResourceExt::name_any).collect()
}

/// What the StatefulSet controller would report: `ready` pods at `revision` (current and
/// updated revisions differ while rolling). Mocked server only.
fn report_pods(h: &Harness, group: &str, ready: i32, current: &str, update: &str) {
    let fake = h.fake.as_ref().expect("mocked server only");
    let sts = fake
        .get("apps/v1/statefulsets", &h.namespace, group)
        .unwrap();
    let want = sts["spec"]["replicas"].as_i64().unwrap();
    let updated = if current == update { want } else { 0 };
    fake.set_status(
        "apps/v1/statefulsets",
        &h.namespace,
        group,
        json!({"replicas": want, "readyReplicas": ready, "updatedReplicas": updated,
               "currentRevision": current, "updateRevision": update,
               "observedGeneration": sts["metadata"]["generation"]}),
    );
}

/// Registers worker `shard` of `group` for `served` in the cluster state, as a ready worker does.
async fn register(h: &Harness, served: &str, group: &str, shard: u32) -> String {
    let worker = format!("{group}-{shard}");
    let registration = json!({
        "address": format!("http://{worker}.x.svc:8000"), "group": group, "shard": shard,
        "shard_count": 2, "block_tokens": 64, "kv_capacity_bytes": 1u64 << 30,
    });
    let key = KeyLayout::default().worker(
        &ModelName::new(served).unwrap(),
        &WorkerId::new(worker.clone()).unwrap(),
    );
    h.store
        .put(&key, serde_json::to_vec(&registration).unwrap(), None)
        .await
        .unwrap();
    key
}

async fn a_model_becomes_groups_then_ready(h: Harness) {
    let spec = json!({"source": {"huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
                      "servedName": "smollm2", "replicas": 2, "shards": 2});
    create_model(&h, "smol", spec).await;
    let action = reconcile_model(&h, "smol").await.unwrap();
    // Not ready yet: the next look is soon (registrations live in etcd, not watched).
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(10)));

    let model = h.api::<Model>().get("smol").await.unwrap();
    let groups = groups(&h, "smol").await;
    assert_eq!(names(&groups), ["smol-g0", "smol-g1"]);
    let uid = model.uid().unwrap();
    for g in &groups {
        assert_eq!(
            g.spec.as_ref().unwrap().replicas,
            Some(2),
            "shards per group"
        );
        let owner = &g.owner_references()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            (uid.as_str(), Some(true))
        );
    }
    assert!(
        h.api::<Service>()
            .get_opt("smol-workers")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        h.api::<PodDisruptionBudget>()
            .get_opt("smol-workers")
            .await
            .unwrap()
            .is_some()
    );
    // The workers' credential is the Model's copy of the cluster token (created by the operator
    // where it was missing), and each group has its NetworkPolicy.
    let source = Api::<Secret>::namespaced(h.client.clone(), "default")
        .get("tidelock-cluster-token")
        .await
        .unwrap();
    let copy = h.api::<Secret>().get("smol-cluster-token").await.unwrap();
    let token = |s: &Secret| s.data.as_ref().unwrap()["token"].0.clone();
    assert_eq!(token(&copy), token(&source));
    assert!(token(&copy).len() >= 32);
    assert_eq!(copy.owner_references()[0].name, "smol");
    assert_eq!(policy_names(&h).await, ["smol-g0", "smol-g1"]);
    let status = model.status.unwrap();
    assert_eq!((status.ready_workers, status.desired_workers), (0, 4));
    assert_eq!(status.workers.as_deref(), Some("0/4"));
    assert_eq!(status.served_name.as_deref(), Some("smollm2"));
    assert_eq!(status.observed_generation, model.metadata.generation);
    assert_eq!(
        condition(&status.conditions, "Ready"),
        ("False".into(), "WorkersStarting".into())
    );
    assert_eq!(
        condition(&status.conditions, "Progressing"),
        ("True".into(), "WorkersStarting".into())
    );
    assert_eq!(
        condition(&status.conditions, "Degraded"),
        ("False".into(), "AsExpected".into())
    );
    assert_eq!(
        reasons(&events(&h, "smol").await),
        ["GroupCreated", "GroupCreated"]
    );

    // A second pass with nothing new changes nothing and says nothing.
    reconcile_model(&h, "smol").await.unwrap();
    assert_eq!(events(&h, "smol").await.len(), 2);

    if h.fake.is_none() {
        return h.finish().await;
    }
    // Pods ready but nothing registered: still starting (a pod that has not loaded the model).
    for g in ["smol-g0", "smol-g1"] {
        report_pods(&h, g, 2, "r1", "r1");
    }
    reconcile_model(&h, "smol").await.unwrap();
    let status = h.api::<Model>().get("smol").await.unwrap().status.unwrap();
    assert_eq!(
        status.ready_workers, 0,
        "registered workers count, not pods alone"
    );
    for (g, s) in [("smol-g0", 0), ("smol-g0", 1), ("smol-g1", 0)] {
        register(&h, "smollm2", g, s).await;
    }
    reconcile_model(&h, "smol").await.unwrap();
    let status = h.api::<Model>().get("smol").await.unwrap().status.unwrap();
    assert_eq!(status.workers.as_deref(), Some("3/4"));
    assert!(!is_true(&status.conditions, "Ready"));
    register(&h, "smollm2", "smol-g1", 1).await;
    let action = reconcile_model(&h, "smol").await.unwrap();
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(300)));
    let status = h.api::<Model>().get("smol").await.unwrap().status.unwrap();
    assert_eq!(status.workers.as_deref(), Some("4/4"));
    assert_eq!(
        condition(&status.conditions, "Ready"),
        ("True".into(), "AllWorkersReady".into())
    );
    assert_eq!(
        condition(&status.conditions, "Progressing"),
        ("False".into(), "AllWorkersReady".into())
    );
    let events = events(&h, "smol").await;
    assert_eq!(
        reasons(&events),
        ["GroupCreated", "GroupCreated", "AllWorkersReady"]
    );
    assert!(events[2].1.contains("4/4 workers ready"), "{events:?}");
}

/// The NetworkPolicies in the test's namespace, by name.
async fn policy_names(h: &Harness) -> Vec<String> {
    let mut names: Vec<String> = h
        .api::<NetworkPolicy>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    names.sort();
    names
}

/// The `--kv-cache` argument of a group's worker.
fn kv_cache_of(group: &StatefulSet) -> String {
    let args = group
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    let at = args.iter().position(|x| x == "--kv-cache").unwrap();
    args[at + 1].clone()
}

async fn a_spec_change_rolls_and_scaling_moves_whole_groups(h: Harness) {
    let spec =
        json!({"source": {"url": {"url": "https://models.example/smol.gguf"}}, "replicas": 2});
    create_model(&h, "roll", spec).await;
    reconcile_model(&h, "roll").await.unwrap();
    let before = groups(&h, "roll").await;
    assert_eq!(names(&before), ["roll-g0", "roll-g1"]);

    if h.fake.is_some() {
        // Both groups serve (ready and registered). A spec change reaches one group at a time:
        // g0 rolls while g1 keeps the older spec and serves.
        for g in ["roll-g0", "roll-g1"] {
            report_pods(&h, g, 1, "r1", "r1");
            register(&h, "roll", g, 0).await;
        }
        reconcile_model(&h, "roll").await.unwrap();
        let status = h.api::<Model>().get("roll").await.unwrap().status.unwrap();
        assert_eq!(condition(&status.conditions, "Ready").0, "True");
        assert_eq!((status.updated_groups, status.desired_groups), (2, 2));

        patch_spec::<Model>(&h, "roll", json!({"kvCache": {"memoryPerWorker": "2Gi"}})).await;
        reconcile_model(&h, "roll").await.unwrap();
        let during = groups(&h, "roll").await;
        assert!(during[0].metadata.generation > before[0].metadata.generation);
        assert_eq!(kv_cache_of(&during[0]), "2Gi");
        assert_eq!(during[1].metadata.generation, before[1].metadata.generation);
        assert_eq!(kv_cache_of(&during[1]), "8Gi", "g1 waits for g0");
        let evs = events(&h, "roll").await;
        let updated: Vec<&str> = evs
            .iter()
            .filter(|(r, _)| r == "GroupUpdated")
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(
            updated,
            [
                "updated shard group roll-g0: its workers roll (at most 1 of 2 groups out of service at once)"
            ]
        );
        // g0's pods are being replaced: still nothing for g1, whatever the number of looks.
        report_pods(&h, "roll-g0", 0, "r1", "r2");
        for _ in 0..2 {
            reconcile_model(&h, "roll").await.unwrap();
        }
        assert_eq!(kv_cache_of(&groups(&h, "roll").await[1]), "8Gi");
        let status = h.api::<Model>().get("roll").await.unwrap().status.unwrap();
        assert_eq!(
            condition(&status.conditions, "Progressing"),
            ("True".into(), "RollingUpdate".into())
        );
        let message = message_of(&status.conditions, "Progressing");
        assert_eq!(
            message,
            "1/2 workers ready; rollout: 0/2 groups updated; rolling roll-g0; waiting roll-g1"
        );
        // g0 rolled and serving again: now g1 rolls.
        report_pods(&h, "roll-g0", 1, "r2", "r2");
        reconcile_model(&h, "roll").await.unwrap();
        assert_eq!(kv_cache_of(&groups(&h, "roll").await[1]), "2Gi");
        report_pods(&h, "roll-g1", 1, "r2", "r2");
        reconcile_model(&h, "roll").await.unwrap();
        let status = h.api::<Model>().get("roll").await.unwrap().status.unwrap();
        assert_eq!(condition(&status.conditions, "Ready").0, "True");
        assert_eq!(status.updated_groups, 2);

        // A new served name: the groups on the older spec are registered under the old one and
        // still serve, so again one group at a time.
        let generation = groups(&h, "roll").await[1].metadata.generation;
        patch_spec::<Model>(&h, "roll", json!({"servedName": "renamed"})).await;
        reconcile_model(&h, "roll").await.unwrap();
        let during = groups(&h, "roll").await;
        assert_eq!(during[1].metadata.generation, generation, "g1 waits for g0");
    } else {
        // No kubelet runs these pods: no group serves, so a spec change costs no service and
        // reaches every group at once (a fix must reach workers that do not start).
        patch_spec::<Model>(&h, "roll", json!({"kvCache": {"memoryPerWorker": "2Gi"}})).await;
        reconcile_model(&h, "roll").await.unwrap();
        let after = groups(&h, "roll").await;
        for (b, a) in before.iter().zip(&after) {
            assert!(
                a.metadata.generation > b.metadata.generation,
                "{} rolled",
                a.name_any()
            );
            assert_eq!(kv_cache_of(a), "2Gi");
        }
        let evs = events(&h, "roll").await;
        assert_eq!(reasons(&evs)[2..4], ["GroupUpdated", "GroupUpdated"]);
    }

    // Scale up: a whole new group; scale down: whole groups go, the first ones stay.
    patch_spec::<Model>(&h, "roll", json!({"replicas": 3})).await;
    reconcile_model(&h, "roll").await.unwrap();
    assert_eq!(
        names(&groups(&h, "roll").await),
        ["roll-g0", "roll-g1", "roll-g2"]
    );
    patch_spec::<Model>(&h, "roll", json!({"replicas": 1})).await;
    reconcile_model(&h, "roll").await.unwrap();
    let sts: Api<StatefulSet> = h.api();
    support::until("groups g1 and g2 are gone", || async {
        names(&groups(&h, "roll").await) == ["roll-g0"]
    })
    .await;
    assert!(sts.get_opt("roll-g0").await.unwrap().is_some());
    assert_eq!(
        policy_names(&h).await,
        ["roll-g0"],
        "a removed group's policy goes too"
    );
    let evs = events(&h, "roll").await;
    let removed: Vec<&str> = evs
        .iter()
        .filter(|(r, _)| r == "GroupRemoved")
        .map(|(_, n)| n.as_str())
        .collect();
    assert_eq!(
        removed,
        [
            "removed shard group roll-g1 (replicas is now 1)",
            "removed shard group roll-g2 (replicas is now 1)"
        ]
    );
    let status = h.api::<Model>().get("roll").await.unwrap().status.unwrap();
    assert_eq!(status.desired_workers, 1);
    h.finish().await;
}

async fn deleting_a_model_removes_its_cluster_state(h: Harness) {
    let spec =
        json!({"source": {"url": {"url": "https://models.example/a.gguf"}}, "servedName": "gone"});
    create_model(&h, "gone", spec).await;
    reconcile_model(&h, "gone").await.unwrap();
    let layout = KeyLayout::default();
    let tenant = TenantId::new("ml/team-a").unwrap();
    let mine = [
        register(&h, "gone", "gone-g0", 0).await,
        format!(
            "{}s-1",
            layout.sessions_of(&ModelName::new("gone").unwrap(), &tenant)
        ),
        layout.model(&ModelName::new("gone").unwrap()),
    ];
    let others = [
        register(&h, "kept", "kept-g0", 0).await,
        format!(
            "{}s-1",
            layout.sessions_of(&ModelName::new("kept").unwrap(), &tenant)
        ),
    ];
    // The model key holds the claim the reconcile wrote.
    for key in [&mine[1], &others[1]] {
        h.store.put(key, b"{}".to_vec(), None).await.unwrap();
    }
    h.api::<Model>()
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    // The finalizer holds the Model until the operator cleaned up.
    let model = h.api::<Model>().get("gone").await.unwrap();
    assert!(model.metadata.deletion_timestamp.is_some());
    reconcile_model(&h, "gone").await.unwrap();
    for key in &mine {
        assert!(h.store.get(key).await.unwrap().is_none(), "{key} removed");
    }
    for key in &others {
        assert!(h.store.get(key).await.unwrap().is_some(), "{key} kept");
    }
    support::until("the Model is gone", || async {
        h.api::<Model>().get_opt("gone").await.unwrap().is_none()
    })
    .await;
    let evs = events(&h, "gone").await;
    let cleanup = evs
        .iter()
        .find(|(r, _)| r == "Cleanup")
        .expect("a Cleanup event");
    assert!(
        cleanup.1.starts_with("removed 3 keys of `gone`"),
        "{cleanup:?}"
    );
    if h.fake.is_some() {
        // The garbage collector (mocked) removed what the Model owned.
        assert!(groups(&h, "gone").await.is_empty());
    }
    h.finish().await;
}

fn secret(name: &str, key: &str) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.into());
    s.data = Some(BTreeMap::from([(
        "apiKey".to_owned(),
        ByteString(key.as_bytes().to_vec()),
    )]));
    s
}

/// Rotates the key in Secret `team-a-keys`.
async fn set_key(secrets: &Api<Secret>, key: &str) {
    let mut s = secrets.get("team-a-keys").await.unwrap();
    s.data = secret("team-a-keys", key).data;
    secrets
        .replace("team-a-keys", &PostParams::default(), &s)
        .await
        .unwrap();
}

async fn a_tenant_follows_its_secrets_and_fails_closed(h: Harness) {
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "team-a", "namespace": h.namespace},
        "spec": {"apiKeySecrets": [{"name": "team-a-keys"}], "limits": {"requestsPerMinute": 60}},
    }))
    .unwrap();
    let tenants: Api<Tenant> = h.api();
    tenants
        .create(&PostParams::default(), &tenant)
        .await
        .unwrap();
    assert_eq!(
        reconcile_tenant(&h, "team-a").await.unwrap(),
        Action::await_change()
    );
    assert_eq!(
        tenants.get("team-a").await.unwrap().finalizers(),
        ["tidelock.dev/cleanup"]
    );
    let id = TenantId::new(format!("{}/team-a", h.namespace)).unwrap();
    let key = KeyLayout::default().tenant(&id);
    let record = || async {
        h.store
            .get(&key)
            .await
            .unwrap()
            .map(|kv| serde_json::from_slice::<TenantRecord>(&kv.value).unwrap())
    };
    let status = || async { tenants.get("team-a").await.unwrap().status.unwrap() };

    // The Secret does not exist yet: Degraded, naming it; no record at all.
    reconcile_tenant(&h, "team-a").await.unwrap();
    let s = status().await;
    assert_eq!(
        condition(&s.conditions, "Degraded"),
        ("True".into(), "SecretMissing".into())
    );
    let message = message_of(&s.conditions, "Degraded");
    assert!(
        message.contains(&format!(
            "Secret {}/team-a-keys does not exist",
            h.namespace
        )),
        "{message}"
    );
    assert_eq!(s.keys, 0);
    assert!(record().await.is_none());

    // The Secret appears (the controller maps its event to this Tenant): the key works.
    let secrets: Api<Secret> = h.api();
    let first = "sk-team-a-first-0123456789";
    secrets
        .create(&PostParams::default(), &secret("team-a-keys", first))
        .await
        .unwrap();
    let (cache, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Apply(tenants.get("team-a").await.unwrap()));
    let mapped =
        reconcile::tenant::tenants_referencing(&cache, &secrets.get("team-a-keys").await.unwrap());
    assert_eq!(
        mapped.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["team-a"]
    );
    assert!(reconcile::tenant::tenants_referencing(&cache, &secret("unrelated", first)).is_empty());
    reconcile_tenant(&h, "team-a").await.unwrap();
    let r = record().await.expect("a record");
    assert!(r.accepts_key(first));
    // The cache salt is a fresh secret, nothing derived from the tenant's name.
    let salt = r.cache_salt.clone();
    assert!(
        salt.is_secret() && !salt.as_str().contains("team-a"),
        "{salt}"
    );
    assert_eq!(r.limits.requests_per_minute, Some(60));
    let s = status().await;
    assert_eq!(
        condition(&s.conditions, "Ready"),
        ("True".into(), "KeysLoaded".into())
    );
    assert_eq!(
        condition(&s.conditions, "Degraded"),
        ("False".into(), "AsExpected".into())
    );
    assert_eq!(s.keys, 1);

    // Rotation: the new key replaces the old one.
    let second = "sk-team-a-second-9876543210";
    set_key(&secrets, second).await;
    reconcile_tenant(&h, "team-a").await.unwrap();
    let r = record().await.unwrap();
    assert!(r.accepts_key(second) && !r.accepts_key(first));
    assert_eq!(
        r.cache_salt, salt,
        "a rotation keeps the salt (and the cache)"
    );

    // Malformed: fail closed, the record goes, the condition names the Secret and the problem.
    set_key(&secrets, "short").await;
    reconcile_tenant(&h, "team-a").await.unwrap();
    assert!(
        record().await.is_none(),
        "no key works while the Secret is malformed"
    );
    let s = status().await;
    assert_eq!(
        condition(&s.conditions, "Degraded"),
        ("True".into(), "SecretMalformed".into())
    );
    let evs = events(&h, "team-a").await;
    assert_eq!(
        reasons(&evs),
        [
            "SecretMissing",
            "RecordWritten",
            "RecordWritten",
            "SecretMalformed"
        ]
    );
    assert!(
        evs[3].1.contains("shorter than 16 characters") && evs[3].1.contains("revoked"),
        "{evs:?}"
    );

    // Deleting the Tenant removes its record through the finalizer.
    set_key(&secrets, second).await;
    reconcile_tenant(&h, "team-a").await.unwrap();
    assert!(record().await.is_some());
    tenants
        .delete("team-a", &DeleteParams::default())
        .await
        .unwrap();
    reconcile_tenant(&h, "team-a").await.unwrap();
    assert!(record().await.is_none());
    support::until("the Tenant is gone", || async {
        tenants.get_opt("team-a").await.unwrap().is_none()
    })
    .await;
    h.finish().await;
}

async fn api_errors_back_off_then_recover(h: Harness) {
    let Some(fake) = h.fake.clone() else {
        // Faults are injected into the mocked server only.
        return h.finish().await;
    };
    let spec = json!({"source": {"url": {"url": "https://models.example/a.gguf"}}});
    create_model(&h, "flaky", spec).await;
    fake.fail(Method::PATCH, "/statefulsets/flaky-g0", 500, 2);
    let model = Arc::new(h.api::<Model>().get("flaky").await.unwrap());
    let mut delays = Vec::new();
    for _ in 0..2 {
        let e = reconcile_model(&h, "flaky").await.unwrap_err();
        assert_eq!(e.reason(), "ServerError", "{e}");
        assert!(e.to_string().contains("injected fault"), "{e}");
        delays.push(error_policy(&*model, &e, &h.ctx));
    }
    assert_eq!(
        delays,
        [
            Action::requeue(std::time::Duration::from_secs(5)),
            Action::requeue(std::time::Duration::from_secs(10))
        ],
        "exponential backoff per object"
    );
    reconcile_model(&h, "flaky").await.unwrap();
    assert_eq!(names(&groups(&h, "flaky").await), ["flaky-g0"]);
    // Success reset the backoff.
    let e = Error::Missing("test");
    assert_eq!(
        error_policy(&*model, &e, &h.ctx),
        Action::requeue(std::time::Duration::from_secs(5))
    );

    // A conflict on the status write is an error the controller retries, not a panic.
    fake.fail(Method::PATCH, "/models/flaky/status", 409, 1);
    report_pods(&h, "flaky-g0", 1, "r1", "r1");
    register(&h, "flaky", "flaky-g0", 0).await;
    let e = reconcile_model(&h, "flaky").await.unwrap_err();
    assert_eq!(e.reason(), "Conflict");
    reconcile_model(&h, "flaky").await.unwrap();
    let status = h.api::<Model>().get("flaky").await.unwrap().status.unwrap();
    assert_eq!(
        condition(&status.conditions, "Ready"),
        ("True".into(), "AllWorkersReady".into())
    );

    // A refused apply (422: an immutable field, a webhook): Degraded naming the object, a
    // Warning, retried with backoff; once accepted, Degraded clears.
    fake.fail(Method::PATCH, "/statefulsets/flaky-g0", 422, 1);
    let e = reconcile_model(&h, "flaky").await.unwrap_err();
    assert_eq!(e.reason(), "ApplyRejected");
    let status = h.api::<Model>().get("flaky").await.unwrap().status.unwrap();
    assert_eq!(
        condition(&status.conditions, "Degraded"),
        ("True".into(), "ApplyRejected".into())
    );
    let message = message_of(&status.conditions, "Degraded");
    assert!(
        message.starts_with("the API server refused StatefulSet flaky-g0: injected fault"),
        "{message}"
    );
    assert!(!is_true(&status.conditions, "Ready"));
    reconcile_model(&h, "flaky").await.unwrap();
    let status = h.api::<Model>().get("flaky").await.unwrap().status.unwrap();
    assert_eq!(
        condition(&status.conditions, "Degraded"),
        ("False".into(), "AsExpected".into())
    );
    assert!(is_true(&status.conditions, "Ready"));
    let warnings: Vec<String> = events(&h, "flaky")
        .await
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert!(
        warnings.contains(&"ApplyRejected".to_owned()),
        "{warnings:?}"
    );

    let metrics = h.ctx.metrics.render();
    for line in [
        r#"tidelock_operator_reconcile_errors_total{controller="model",reason="ServerError"} 2"#,
        r#"tidelock_operator_reconcile_errors_total{controller="model",reason="Conflict"} 1"#,
        r#"tidelock_operator_reconcile_errors_total{controller="model",reason="ApplyRejected"} 1"#,
        r#"tidelock_operator_reconciliations_total{controller="model",result="success"} 4"#,
        r#"tidelock_operator_reconciliations_total{controller="model",result="error"} 4"#,
        r#"tidelock_operator_reconcile_duration_seconds_count{controller="model"} 8"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    h.finish().await;
}

async fn an_invalid_spec_is_degraded_and_applies_nothing(h: Harness) {
    // Two sources: the CRD's CEL rule refuses this on a real server, so the operator's own check
    // is only reachable on the mocked one (or with validation bypassed).
    let Some(_) = h.fake else {
        let bad = model_object(
            &h,
            "two",
            json!({"source": {
            "url": {"url": "https://models.example/a.gguf"}, "huggingFace": {"repo": "a/b"}}}),
        );
        let e = h
            .api::<Model>()
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("exactly one of huggingFace, pvc or url"),
            "{e}"
        );
        return h.finish().await;
    };
    create_model(
        &h,
        "two",
        json!({"source": {
        "url": {"url": "https://models.example/a.gguf"}, "huggingFace": {"repo": "a/b"}}}),
    )
    .await;
    let action = reconcile_model(&h, "two").await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(groups(&h, "two").await.is_empty());
    let status = h.api::<Model>().get("two").await.unwrap().status.unwrap();
    assert_eq!(
        condition(&status.conditions, "Degraded"),
        ("True".into(), "InvalidSpec".into())
    );
    let evs = events(&h, "two").await;
    assert_eq!(reasons(&evs), ["InvalidSpec"]);
    assert!(
        evs[0]
            .1
            .contains("set exactly one of huggingFace, pvc or url"),
        "{evs:?}"
    );
    h.finish().await;
}

/// Two Models asking for one served name: the first holds it; the second is `Degraded`
/// (`ServedNameTaken`, naming the first), loses the group it had under its former name, and
/// its deletion leaves the first's keys alone; a Model that moves to another name frees the
/// old one; once the holder is deleted, a newcomer takes the name over.
async fn a_served_name_belongs_to_one_model(h: Harness) {
    let spec = |served: &str| json!({"source": {"url": {"url": "https://models.example/a.gguf"}}, "servedName": served});
    create_model(&h, "first", spec("shared")).await;
    reconcile_model(&h, "first").await.unwrap();
    let registration = register(&h, "shared", "first-g0", 0).await;
    assert_eq!(names(&groups(&h, "first").await), ["first-g0"]);

    // The second runs under its own name, then asks for the first's.
    create_model(&h, "second", spec("elsewhere")).await;
    reconcile_model(&h, "second").await.unwrap();
    assert_eq!(names(&groups(&h, "second").await), ["second-g0"]);
    patch_spec::<Model>(&h, "second", json!({"servedName": "shared"})).await;
    let action = reconcile_model(&h, "second").await.unwrap();
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(30)));
    let status = h
        .api::<Model>()
        .get("second")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        condition(&status.conditions, "Degraded"),
        ("True".into(), "ServedNameTaken".into())
    );
    let message = message_of(&status.conditions, "Degraded");
    assert!(
        message.contains(&format!("belongs to Model {}/first already", h.namespace)),
        "{message}"
    );
    support::until("the refused Model's group is gone", || async {
        groups(&h, "second").await.is_empty()
    })
    .await;
    // The first is untouched by the second's passes.
    reconcile_model(&h, "first").await.unwrap();
    let status = h.api::<Model>().get("first").await.unwrap().status.unwrap();
    assert_eq!(condition(&status.conditions, "Degraded").0, "False");

    // Deleting the refused one leaves the holder's registration.
    h.api::<Model>()
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    reconcile_model(&h, "second").await.unwrap();
    assert!(h.store.get(&registration).await.unwrap().is_some());

    // The holder moves to another name: its old claim does not block the newcomer.
    patch_spec::<Model>(&h, "first", json!({"servedName": "moved"})).await;
    reconcile_model(&h, "first").await.unwrap();
    create_model(&h, "third", spec("shared")).await;
    reconcile_model(&h, "third").await.unwrap();
    assert_eq!(names(&groups(&h, "third").await), ["third-g0"]);
    let status = h.api::<Model>().get("third").await.unwrap().status.unwrap();
    assert_eq!(condition(&status.conditions, "Degraded").0, "False");

    // And the moved one cannot take its old name back while the newcomer holds it.
    patch_spec::<Model>(&h, "first", json!({"servedName": "shared"})).await;
    reconcile_model(&h, "first").await.unwrap();
    let status = h.api::<Model>().get("first").await.unwrap().status.unwrap();
    assert_eq!(
        condition(&status.conditions, "Degraded").1,
        "ServedNameTaken"
    );
    h.finish().await;
}

/// Load reports served as workers serve them (`GET <address>/v1/load`), one per group, set by
/// the test: the simulated load the autoscaler reads.
struct FakeLoads {
    reports: Arc<std::sync::Mutex<BTreeMap<String, tidelock_protocol::LoadReport>>>,
    port: u16,
}

impl FakeLoads {
    async fn start() -> FakeLoads {
        let reports: Arc<std::sync::Mutex<BTreeMap<String, tidelock_protocol::LoadReport>>> =
            Arc::default();
        let shared = reports.clone();
        let app = axum::Router::new().route(
            "/{group}/v1/load",
            axum::routing::get(
                move |axum::extract::Path(group): axum::extract::Path<String>| {
                    let report = shared.lock().unwrap().get(&group).copied();
                    async move {
                        match report {
                            Some(r) => axum::Json(r).into_response(),
                            None => http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
                        }
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeLoads { reports, port }
    }

    /// `group` reports `waiting` prompt tokens to prefill and `kv_percent` of its KV in use.
    fn set(&self, group: &str, waiting: u64, kv_percent: u64) {
        self.reports.lock().unwrap().insert(
            group.to_owned(),
            tidelock_protocol::LoadReport {
                running: 1,
                waiting: 0,
                kv_used_blocks: kv_percent,
                kv_total_blocks: 100,
                prefill_tokens_waiting: waiting,
                prefill_tokens_per_second: 1000.0,
                ..tidelock_protocol::LoadReport::default()
            },
        );
    }

    /// Registers group `group`'s coordinator for `served`, its address this server.
    async fn register(&self, h: &Harness, served: &str, group: &str) {
        let registration = json!({
            "address": format!("http://127.0.0.1:{}/{group}", self.port), "group": group,
            "shard": 0, "shard_count": 1, "block_tokens": 64, "kv_capacity_bytes": 1u64 << 30,
        });
        let key = KeyLayout::default().worker(
            &ModelName::new(served).unwrap(),
            &WorkerId::new(format!("{group}-0")).unwrap(),
        );
        h.store
            .put(&key, serde_json::to_vec(&registration).unwrap(), None)
            .await
            .unwrap();
    }
}

/// Issue #19, point 7: the operator's autoscaler on simulated load reports. A queue of 2.5
/// times the target adds groups (1 -> 3, bounded by maxReplicas); an idle cluster removes the
/// least-loaded groups, keeping the busiest (`g1`) even though it is not the first; a cool-down
/// holds the next change; each change is an Event, a metric and `status.lastScale`. On the
/// real API server, the scale subresource reads and sets the groups (as an HPA would).
async fn the_autoscaler_follows_the_load_reports(h: Harness) {
    let loads = FakeLoads::start().await;
    let spec = json!({"source": {"url": {"url": "https://models.example/a.gguf"}}, "replicas": 1,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetWaitingPrefillTokens": 1000,
                        "targetKvUtilizationPercent": 80, "scaleUpStabilizationSeconds": 0,
                        "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 0}});
    create_model(&h, "auto", spec).await;
    reconcile_model(&h, "auto").await.unwrap();
    assert_eq!(names(&groups(&h, "auto").await), ["auto-g0"]);
    loads.register(&h, "auto", "auto-g0").await;
    loads.set("auto-g0", 2500, 10);
    let action = reconcile_model(&h, "auto").await.unwrap();
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(1)));
    let model = h.api::<Model>().get("auto").await.unwrap();
    assert_eq!(model.spec.replicas, 3, "2.5 x 1 group, rounded up");
    let last = model.status.unwrap().last_scale.unwrap();
    assert_eq!((last.from, last.to), (1, 3));
    assert_eq!(
        last.reason,
        "2500 prompt tokens waiting per group (target 1000), 10% of KV cache in use (target 80%)"
    );
    reconcile_model(&h, "auto").await.unwrap();
    assert_eq!(
        names(&groups(&h, "auto").await),
        ["auto-g0", "auto-g1", "auto-g2"]
    );

    // Quiet: g1 keeps a little work; g0 and g2 go.
    for g in ["auto-g1", "auto-g2"] {
        loads.register(&h, "auto", g).await;
    }
    loads.set("auto-g0", 0, 0);
    loads.set("auto-g1", 100, 10);
    loads.set("auto-g2", 0, 2);
    reconcile_model(&h, "auto").await.unwrap();
    assert_eq!(h.api::<Model>().get("auto").await.unwrap().spec.replicas, 1);
    reconcile_model(&h, "auto").await.unwrap();
    support::until("only the busiest group is left", || async {
        names(&groups(&h, "auto").await) == ["auto-g1"]
    })
    .await;
    let evs = events(&h, "auto").await;
    let scaled: Vec<&str> = evs
        .iter()
        .filter(|(r, _)| r.starts_with("Scaled"))
        .map(|(_, n)| n.as_str())
        .collect();
    assert_eq!(
        scaled,
        [
            "1 -> 3 groups: 2500 prompt tokens waiting per group (target 1000), 10% of KV cache in use (target 80%)",
            "3 -> 1 groups: 33 prompt tokens waiting per group (target 1000), 4% of KV cache in use (target 80%); removing the least loaded: auto-g0, auto-g2"
        ]
    );
    let metrics = h.ctx.metrics.render();
    for direction in ["up", "down"] {
        let line = format!(
            "tidelock_operator_autoscale_changes_total{{direction=\"{direction}\",model=\"{}/auto\"}} 1",
            h.namespace
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // A cool-down holds the next change however busy it gets.
    patch_spec::<Model>(&h, "auto", json!({"autoscaling": {"minReplicas": 1, "maxReplicas": 3, "cooldownSeconds": 3600, "scaleUpStabilizationSeconds": 0, "targetWaitingPrefillTokens": 1000}})).await;
    loads.set("auto-g1", 50_000, 90);
    reconcile_model(&h, "auto").await.unwrap();
    assert_eq!(h.api::<Model>().get("auto").await.unwrap().spec.replicas, 1);
    assert!(h.ctx.metrics.render().contains(&format!(
        "tidelock_operator_autoscale_recommended_groups{{model=\"{}/auto\"}} 3",
        h.namespace
    )));

    if h.fake.is_none() {
        // The scale subresource: what an HPA or KEDA reads and writes.
        let api = h.api::<Model>();
        let scale = api.get_scale("auto").await.unwrap();
        assert_eq!(scale.spec.and_then(|s| s.replicas), Some(1));
        let status = scale.status.unwrap();
        assert_eq!(status.replicas, 1);
        assert_eq!(
            status.selector.as_deref(),
            Some("tidelock.dev/model=auto,apps.kubernetes.io/pod-index=0")
        );
        api.patch_scale(
            "auto",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
        assert_eq!(api.get("auto").await.unwrap().spec.replicas, 2);
    }
    h.finish().await;
}
