//! The Model reconciler: applies a Model's desired objects (`builders`) with server-side apply,
//! removes the groups that scaling down left over, and reports status from the StatefulSets and
//! from the workers registered in the cluster state. Its finalizer removes the model's keys from
//! the cluster state (sessions, registrations, the model record) before the Model goes;
//! Kubernetes' garbage collector deletes the owned objects.
//!
//! Status:
//! - `Ready` is true when every desired worker is registered and every group is rolled out.
//! - `Progressing` is true while a group rolls (`RollingUpdate`) or workers start
//!   (`WorkersStarting`).
//! - `Degraded` is true when the spec cannot be built (`InvalidSpec`), the cluster state cannot
//!   be read (`StateStoreUnavailable`), or workers cannot run for a reason a person must fix:
//!   no node fits (`Unschedulable`), their pods cannot be created (`PodCreationFailed`: Pod
//!   Security, a quota), a container cannot start (`WorkerFailing`); `diagnose` reads those from
//!   the pods and the StatefulSets' Events while the Model is not ready.
//!
//! Before anything is applied, the Model claims its served name (`claim`: one Model per name
//! across namespaces) and, with `spec.autoscaling`, the autoscaler takes its look (`autoscale`;
//! a change of `replicas` ends the pass). Groups are applied as the rollout plan allows
//! (`rollout`: group by group).
//!
//! Every change to the objects and every condition that flips is a Kubernetes Event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tidelock_api::model::{Autoscaling, LastScale};
use tidelock_api::{FIELD_MANAGER, Model, ModelStatus, conditions, labels, reasons};
use tidelock_protocol::{ModelName, WorkerRegistration};
use tidelock_state::Expected;

use super::rollout::{self, Registered};
use super::{Context, Error, condition, diagnose, is_true, with_finalizer, write_status};
use super::{claim, cluster_token};
use crate::autoscale;
use crate::builders;

/// Requeue while workers start: registrations live in etcd, which the controller does not watch.
const STARTING_REQUEUE: Duration = Duration::from_secs(10);
/// Requeue of a Model refused its served name: the holder may be deleted meanwhile.
const CLAIM_REQUEUE: Duration = Duration::from_secs(30);
/// Requeue when all is well: a periodic check that nothing drifted.
const STEADY_REQUEUE: Duration = Duration::from_secs(300);

/// Reconciles one Model (the controller's entry point), in a span naming it: every log line of
/// the pass says which Model it is about.
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(kind = "Model", namespace = model.namespace().unwrap_or_default(), name = model.name_any())
)]
pub async fn reconcile(model: Arc<Model>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ctx = &*ctx;
    with_finalizer(
        "model",
        model,
        ctx,
        async |model| apply(&model, ctx).await,
        async |model| cleanup(&model, ctx).await,
    )
    .await
}

/// Applies the Service, the groups the rollout plan lets through and the budget, and removes
/// the groups scaling down left over; returns every desired group as it now is (applied, or as
/// it was when held). Events for every group created, updated or removed.
async fn apply_objects(
    model: &Model,
    ctx: &Context,
    desired: &builders::Desired,
    before: &BTreeMap<String, StatefulSet>,
    registered: Option<&Registered>,
    statefulsets: &Api<StatefulSet>,
) -> Result<Vec<StatefulSet>, Error> {
    let namespace = model.namespace().ok_or(Error::Missing("namespace"))?;
    let client = &ctx.client;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let service = &desired.service;
    Api::<Service>::namespaced(client.clone(), &namespace)
        .patch(&service.name_any(), &apply, &Patch::Apply(service))
        .await
        .map_err(|e| rejected(e, "Service", &service.name_any()))?;
    let steps = rollout::plan(
        &desired.groups,
        before,
        registered,
        model.spec.rollout.max_unavailable_groups,
    );
    let mut groups = Vec::with_capacity(desired.groups.len());
    for (group, step) in desired.groups.iter().zip(steps) {
        let group_name = group.name_any();
        if let (rollout::Step::Hold, Some(held)) = (step, before.get(&group_name)) {
            groups.push(held.clone());
            continue;
        }
        let applied = statefulsets
            .patch(&group_name, &apply, &Patch::Apply(group))
            .await
            .map_err(|e| rejected(e, "StatefulSet", &group_name))?;
        match before.get(&group_name) {
            None => {
                let note = format!(
                    "created shard group {group_name} ({} workers)",
                    model.spec.shards
                );
                ctx.event_about(
                    model,
                    Some(applied.object_ref(&())),
                    false,
                    "GroupCreated",
                    note,
                )
                .await;
            }
            Some(old) if old.metadata.generation != applied.metadata.generation => {
                let note = format!(
                    "updated shard group {group_name}: its workers roll (at most {} of {} groups out of service at once)",
                    model.spec.rollout.max_unavailable_groups.max(1),
                    desired.groups.len()
                );
                ctx.event_about(
                    model,
                    Some(applied.object_ref(&())),
                    false,
                    "GroupUpdated",
                    note,
                )
                .await;
            }
            Some(_) => {}
        }
        groups.push(applied);
    }
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), &namespace);
    for policy in &desired.policies {
        policies
            .patch(&policy.name_any(), &apply, &Patch::Apply(policy))
            .await
            .map_err(|e| rejected(e, "NetworkPolicy", &policy.name_any()))?;
    }
    let budget = &desired.budget;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), &namespace)
        .patch(&budget.name_any(), &apply, &Patch::Apply(budget))
        .await
        .map_err(|e| rejected(e, "PodDisruptionBudget", &budget.name_any()))?;
    // Scaling down removes whole groups: every owned StatefulSet the spec no longer names.
    for (group_name, group) in before {
        if desired.groups.iter().any(|g| g.name_any() == *group_name) {
            continue;
        }
        statefulsets
            .delete(group_name, &DeleteParams::background())
            .await?;
        // Its NetworkPolicy shares its name.
        if ctx.defaults.network_policy.is_some() {
            match policies
                .delete(group_name, &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let note = format!(
            "removed shard group {group_name} (replicas is now {})",
            model.spec.replicas
        );
        ctx.event_about(
            model,
            Some(group.object_ref(&())),
            false,
            "GroupRemoved",
            note,
        )
        .await;
    }

    Ok(groups)
}

/// A 422 from the API server on an apply names the object: the spec asks for something the
/// server refuses (an immutable field changed, a value an admission webhook rejects).
fn rejected(e: kube::Error, kind: &str, name: &str) -> Error {
    match e {
        kube::Error::Api(s) if s.code == 422 => Error::Rejected {
            object: format!("{kind} {name}"),
            message: s.message,
        },
        e => Error::Kube(e),
    }
}

async fn apply(model: &Model, ctx: &Context) -> Result<Action, Error> {
    let namespace = model.namespace().ok_or(Error::Missing("namespace"))?;
    let name = model.name_any();
    let previous = model.status.clone().unwrap_or_default();
    let statefulsets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = model.uid();
    let before: BTreeMap<String, StatefulSet> = statefulsets
        .list(&ListParams::default().labels(&format!("{}={name}", labels::MODEL)))
        .await?
        .items
        .into_iter()
        .filter(|s| {
            s.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .map(|s| (s.name_any(), s))
        .collect();
    let remove_first: Vec<i32> = model
        .annotations()
        .get(tidelock_api::annotations::REMOVE_FIRST)
        .map(|groups| {
            groups
                .split(',')
                .filter_map(|g| builders::group_index(&name, g.trim()))
                .collect()
        })
        .unwrap_or_default();
    let indices = builders::group_indices(
        before
            .keys()
            .filter_map(|g| builders::group_index(&name, g)),
        model.spec.replicas,
        &remove_first,
    );
    let desired = match builders::desired_groups(model, &ctx.defaults, &indices) {
        Ok(desired) => desired,
        Err(e) => {
            let message = format!("{e}; nothing was applied");
            let status = degraded_status(model, &previous, reasons::INVALID_SPEC, message);
            publish(model, ctx, &previous, status).await?;
            // Nothing to retry until the spec changes.
            return Ok(Action::await_change());
        }
    };
    let served = ModelName::new(builders::served_name(model))
        .map_err(|_| Error::Missing("valid served name"))?;
    match claim::claim(model, &served, ctx).await {
        Ok(claim::Holder::Us) => {}
        Ok(claim::Holder::Other(holder)) => {
            // Refused: no worker of this Model may register under the holder's name, so groups
            // it already has (made before the holder claimed the name) go too.
            for group in before.keys() {
                statefulsets
                    .delete(group, &DeleteParams::background())
                    .await?;
            }
            let message = claim::Holder::refusal(&holder, &served);
            let status = degraded_status(model, &previous, reasons::SERVED_NAME_TAKEN, message);
            publish(model, ctx, &previous, status).await?;
            // The holder's deletion is not an event of this Model: look again now and then.
            return Ok(Action::requeue(CLAIM_REQUEUE));
        }
        Err(e @ Error::State(_)) => {
            // Who holds the name is unknown: nothing is applied until the store answers (the
            // groups that run keep running); the controller retries with backoff.
            let message = format!(
                "the cluster state (etcd) cannot be read, so the served name `{served}` cannot be claimed: {e}"
            );
            let status =
                degraded_status(model, &previous, reasons::STATE_STORE_UNAVAILABLE, message);
            publish(model, ctx, &previous, status).await?;
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    let autoscaled = model.spec.autoscaling.is_some();
    match &model.spec.autoscaling {
        Some(spec) => {
            if let Some(action) = autoscale(model, spec, ctx, &before, &previous, &served).await? {
                return Ok(action);
            }
        }
        None => ctx.autoscaler.forget(&autoscale_key(model)),
    }

    super::etcd_tls::copy_client_secret(model, ctx).await?;
    super::cluster_token::copy_to_model(model, ctx).await?;
    // Read before applying: the rollout moves on only when updated groups serve again.
    let registered = registrations(model, ctx, &before).await;
    let registered_now = registered.as_ref().ok();
    let applied = apply_objects(model, ctx, &desired, &before, registered_now, &statefulsets).await;
    let groups = match applied {
        Ok(groups) => groups,
        Err(e @ Error::Rejected { .. }) => {
            let message = format!(
                "{e}; nothing further was applied (some fields, like a StatefulSet's volume claim templates, cannot change on a running Model)"
            );
            let status = degraded_status(model, &previous, reasons::APPLY_REJECTED, message);
            publish(model, ctx, &previous, status).await?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };

    let mut status = status(model, &previous, &desired, &groups, registered_now, None);
    if !is_true(&status.conditions, conditions::READY) && registered_now.is_some() {
        match diagnose::diagnose(model, ctx, &groups).await {
            Ok(problem @ Some(_)) => {
                status = self::status(model, &previous, &desired, &groups, registered_now, problem);
            }
            Ok(None) => {}
            // A diagnosis is a courtesy: its failure leaves the status as it was computed.
            Err(e) => tracing::warn!(model = %name, "cannot read why workers do not run: {e}"),
        }
    }
    let ready = is_true(&status.conditions, conditions::READY);
    publish(model, ctx, &previous, status).await?;
    // A store that cannot be read is an error: the controller retries with backoff.
    registered?;
    let next = if ready {
        STEADY_REQUEUE
    } else {
        STARTING_REQUEUE
    };
    Ok(Action::requeue(if autoscaled {
        next.min(autoscale::SAMPLE_PERIOD)
    } else {
        next
    }))
}

/// The autoscaler's name for a Model (its history is kept per Model).
fn autoscale_key(model: &Model) -> String {
    format!(
        "{}/{}",
        model.namespace().unwrap_or_default(),
        model.name_any()
    )
}

/// One look of the autoscaler (module `autoscale`): reads each group's load report, and when
/// the stabilised recommendation differs from `spec.replicas` (or the bounds exclude it) and
/// the cool-down has passed, sets `spec.replicas`, deletes the least-loaded groups when going
/// down, records the change (Event, metric, `status.lastScale`) and asks for the next pass.
async fn autoscale(
    model: &Model,
    spec: &Autoscaling,
    ctx: &Context,
    before: &BTreeMap<String, StatefulSet>,
    previous: &ModelStatus,
    served: &ModelName,
) -> Result<Option<Action>, Error> {
    let key = autoscale_key(model);
    let current = model.spec.replicas;
    // A change of replicas not yet applied (by hand, or the last pass): converge first.
    if before.len() != usize::try_from(current).unwrap_or(0) {
        return Ok(None);
    }
    // Without the cluster state there are no addresses to ask: no look this time, and the
    // rest of the pass goes on (the status says the store is unavailable).
    let listing = match ctx.store.list(&ctx.layout.workers_of(served)).await {
        Ok(listing) => listing,
        Err(e) => {
            tracing::warn!(model = %key, "autoscaler: cannot read registrations: {e}");
            return Ok(None);
        }
    };
    let coordinators: BTreeMap<String, String> = listing
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<WorkerRegistration>(&kv.value).ok())
        .filter(|r| r.shard.get() == 0)
        .map(|r| (r.group.as_str().to_owned(), r.address))
        .collect();
    let token = cluster_token::ensure(&ctx.client, &ctx.defaults.cluster_token_secret).await?;
    let token = String::from_utf8(token.0).ok();
    let reports = futures::future::join_all(before.keys().map(|group| {
        let address = coordinators.get(group).cloned();
        let token = token.as_deref();
        async move {
            let load = match address {
                Some(address) => match ctx.autoscaler.load(&address, token).await {
                    Ok(report) => Some(autoscale::GroupLoad::from_report(&report)),
                    Err(e) => {
                        tracing::debug!(%group, %address, "no load report: {e}");
                        None
                    }
                },
                None => None,
            };
            (group.clone(), load)
        }
    }))
    .await;
    let loads: BTreeMap<String, Option<autoscale::GroupLoad>> = reports.into_iter().collect();
    let recommended = autoscale::recommend(current, spec, &loads);
    ctx.metrics
        .autoscale_recommended
        .with_label_values(&[key.as_str()])
        .set(i64::from(recommended.groups));
    let stable = ctx
        .autoscaler
        .stabilize(&key, recommended.groups, current, spec, Instant::now());
    let bounded = current.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    let cooling = previous.last_scale.as_ref().and_then(|last| {
        let at: jiff::Timestamp = last.time.parse().ok()?;
        let since = jiff::Timestamp::now().duration_since(at);
        (since.as_secs() < spec.cooldown_seconds).then_some(since)
    });
    let target = if bounded != current {
        bounded
    } else if cooling.is_some() {
        current
    } else {
        stable
    };
    if target == current {
        return Ok(None);
    }
    let models: Api<Model> = Api::namespaced(
        ctx.client.clone(),
        &model.namespace().ok_or(Error::Missing("namespace"))?,
    );
    let why = if bounded != current {
        format!(
            "outside minReplicas {} .. maxReplicas {}",
            spec.min_replicas, spec.max_replicas
        )
    } else {
        recommended.why
    };
    // Going down: the least-loaded groups are named in the same write that lowers `replicas`,
    // so whichever pass applies the new count removes exactly those (the reconciler deletes
    // the groups the spec no longer names, with their NetworkPolicies).
    let removed = if target < current {
        autoscale::least_loaded(&loads, usize::try_from(target).unwrap_or(0), spec)
    } else {
        Vec::new()
    };
    let mut patch = serde_json::json!({"spec": {"replicas": target}});
    if !removed.is_empty() {
        patch["metadata"] = serde_json::json!({"annotations": {
            tidelock_api::annotations::REMOVE_FIRST: removed.join(","),
        }});
    }
    models
        .patch(
            &model.name_any(),
            &PatchParams {
                field_manager: Some(tidelock_api::FIELD_MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(patch),
        )
        .await?;
    let (direction, reason, mut note) = if target > current {
        (
            "up",
            "ScaledUp",
            format!("{current} -> {target} groups: {why}"),
        )
    } else {
        (
            "down",
            "ScaledDown",
            format!("{current} -> {target} groups: {why}"),
        )
    };
    if !removed.is_empty() {
        note.push_str(&format!(
            "; removing the least loaded: {}",
            removed.join(", ")
        ));
    }
    ctx.metrics
        .autoscale_changes
        .with_label_values(&[key.as_str(), direction])
        .inc();
    ctx.event(model, false, reason, note).await;
    let status = ModelStatus {
        last_scale: Some(LastScale {
            time: jiff::Timestamp::now().to_string(),
            from: current,
            to: target,
            reason: why,
        }),
        ..previous.clone()
    };
    write_status(ctx, model, &status).await?;
    Ok(Some(Action::requeue(Duration::from_secs(1))))
}

/// Counts the model's registered workers per group (a worker registers once it serves).
async fn registrations(
    model: &Model,
    ctx: &Context,
    groups: &BTreeMap<String, StatefulSet>,
) -> Result<Registered, Error> {
    // Groups still on the older spec of a served-name change register under the old name:
    // counted too, or the rollout would take them all for out of service and roll them at once.
    let mut names = std::collections::BTreeSet::from([builders::served_name(model)]);
    names.extend(groups.values().filter_map(builders::group_served_name));
    let mut per_group = Registered::new();
    for name in names {
        let Ok(served) = ModelName::new(name) else {
            continue;
        };
        for kv in ctx.store.list(&ctx.layout.workers_of(&served)).await?.kvs {
            // A value some other writer put there is not a worker of ours; it is not counted.
            if let Ok(r) = serde_json::from_slice::<WorkerRegistration>(&kv.value) {
                *per_group.entry(r.group.as_str().to_owned()).or_default() += 1;
            }
        }
    }
    Ok(per_group)
}

/// The status a reconciliation reports. Pure: from the Model, its desired objects, every
/// desired group as it is (applied or held by the rollout), the registrations (`None` when the
/// cluster state could not be read) and why workers do not run (`diagnose`), when that is known.
fn status(
    model: &Model,
    previous: &ModelStatus,
    desired: &builders::Desired,
    groups: &[StatefulSet],
    registered: Option<&Registered>,
    problem: Option<diagnose::Problem>,
) -> ModelStatus {
    let generation = model.metadata.generation;
    let desired_workers = model.spec.replicas * model.spec.shards;
    let mut ready = 0;
    let mut updated = 0;
    let mut rolling = Vec::new();
    let mut waiting = Vec::new();
    let mut starting = Vec::new();
    for (group, want) in groups.iter().zip(&desired.groups) {
        let name = group.name_any();
        let size = group.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let serving = rollout::serving_workers(group, registered);
        ready += serving;
        let current = rollout::applied_hash(group) == rollout::applied_hash(want);
        let rolled = rollout::rolled(group);
        if !current {
            waiting.push(name);
        } else if !rolled
            && group.status.as_ref().is_some_and(|s| {
                s.current_revision.is_some()
                    && (s.current_revision != s.update_revision
                        || s.observed_generation < group.metadata.generation)
            })
        {
            // An existing group given the new spec: its controller has not seen it yet, or
            // has not replaced every pod.
            rolling.push(name);
        } else if !rolled || serving < size {
            if rolled {
                updated += 1;
            }
            starting.push(name);
        } else {
            updated += 1;
        }
    }
    let desired_groups = i32::try_from(desired.groups.len()).unwrap_or(i32::MAX);
    let prev = &previous.conditions;
    let workers = format!("{ready}/{desired_workers}");
    let all_ready =
        ready == desired_workers && rolling.is_empty() && waiting.is_empty() && starting.is_empty();
    let (reason, message) = if !rolling.is_empty() || !waiting.is_empty() {
        let mut message =
            format!("{workers} workers ready; rollout: {updated}/{desired_groups} groups updated");
        for (what, names) in [
            ("rolling", &rolling),
            ("starting", &starting),
            ("waiting", &waiting),
        ] {
            if !names.is_empty() {
                message.push_str(&format!("; {what} {}", names.join(", ")));
            }
        }
        (reasons::ROLLING_UPDATE, message)
    } else if !all_ready {
        (
            reasons::WORKERS_STARTING,
            format!("{workers} workers ready; starting {}", starting.join(", ")),
        )
    } else {
        (
            reasons::ALL_WORKERS_READY,
            format!("{workers} workers ready"),
        )
    };
    let degraded = match (registered, problem) {
        (Some(_), Some((reason, message))) => condition(
            prev,
            conditions::DEGRADED,
            true,
            reason,
            message,
            generation,
        ),
        (Some(_), None) => condition(
            prev,
            conditions::DEGRADED,
            false,
            reasons::AS_EXPECTED,
            String::new(),
            generation,
        ),
        (None, _) => condition(
            prev,
            conditions::DEGRADED,
            true,
            reasons::STATE_STORE_UNAVAILABLE,
            "the cluster state (etcd) cannot be read: worker registrations are unknown".into(),
            generation,
        ),
    };
    ModelStatus {
        conditions: vec![
            condition(
                prev,
                conditions::READY,
                all_ready,
                reason,
                message.clone(),
                generation,
            ),
            condition(
                prev,
                conditions::PROGRESSING,
                !all_ready,
                reason,
                message,
                generation,
            ),
            degraded,
        ],
        observed_generation: generation,
        ready_workers: ready,
        desired_workers,
        workers: Some(workers),
        served_name: Some(builders::served_name(model)),
        updated_groups: updated,
        desired_groups,
        replicas: i32::try_from(groups.len()).unwrap_or(i32::MAX),
        // Each group's coordinator (shard 0): an HPA counting pods counts groups.
        selector: Some(format!(
            "{}={},apps.kubernetes.io/pod-index=0",
            labels::MODEL,
            model.name_any()
        )),
        last_scale: previous.last_scale.clone(),
    }
}

/// The status of a Model that needs a human: `Degraded` with `reason`, not ready, not
/// progressing; the worker counts are kept.
fn degraded_status(
    model: &Model,
    previous: &ModelStatus,
    reason: &str,
    message: String,
) -> ModelStatus {
    let generation = model.metadata.generation;
    let prev = &previous.conditions;
    ModelStatus {
        conditions: vec![
            condition(
                prev,
                conditions::READY,
                false,
                reason,
                message.clone(),
                generation,
            ),
            condition(
                prev,
                conditions::PROGRESSING,
                false,
                reason,
                message.clone(),
                generation,
            ),
            condition(
                prev,
                conditions::DEGRADED,
                true,
                reason,
                message,
                generation,
            ),
        ],
        observed_generation: generation,
        desired_workers: model.spec.replicas * model.spec.shards,
        desired_groups: model.spec.replicas,
        ..previous.clone()
    }
}

/// Writes `status` (when it changed) and publishes an Event for each condition that flipped.
async fn publish(
    model: &Model,
    ctx: &Context,
    previous: &ModelStatus,
    status: ModelStatus,
) -> Result<(), Error> {
    if *previous == status {
        return Ok(());
    }
    for c in &status.conditions {
        let was = previous.conditions.iter().find(|p| p.type_ == c.type_);
        let changed = was.map(|p| (p.status.as_str(), p.reason.as_str()))
            != Some((c.status.as_str(), c.reason.as_str()));
        let is_true = c.status == "True";
        let noteworthy = match c.type_.as_str() {
            // Not the first "not ready yet": the GroupCreated events say that.
            conditions::READY => is_true || was.is_some(),
            conditions::DEGRADED => is_true || was.is_some_and(|p| p.status == "True"),
            _ => false,
        };
        if changed && noteworthy {
            let warning = c.type_ == conditions::DEGRADED && is_true;
            let note = format!("{} is {}: {}", c.type_, c.status, c.message);
            ctx.event(model, warning, &c.reason, note).await;
        }
    }
    write_status(ctx, model, &status).await
}

/// The finalizer's step: removes the model's keys from the cluster state (session pins,
/// worker registrations, the model record) so routers stop routing to it at once.
async fn cleanup(model: &Model, ctx: &Context) -> Result<Action, Error> {
    let served = ModelName::new(builders::served_name(model))
        .map_err(|_| Error::Missing("valid served name"))?;
    let Some(claimed) = claim::held_by(model, &served, ctx).await? else {
        // Refused its served name (or never claimed it): the keys under it are not its own.
        let note = format!("the served name `{served}` is not this Model's: its keys stay");
        ctx.event(model, false, "Cleanup", note).await;
        return Ok(Action::await_change());
    };
    let layout = &ctx.layout;
    let mut removed = 0;
    for dir in [
        layout.sessions_of_model(&served),
        layout.workers_of(&served),
    ] {
        for kv in ctx.store.list(&dir).await?.kvs {
            removed += usize::from(ctx.store.delete(&kv.key).await?.is_some());
        }
    }
    // The claim last, and only as it was read: a newcomer's claim is never removed.
    let released = ctx
        .store
        .compare_and_delete(&layout.model(&served), Expected::ModRevision(claimed))
        .await?;
    removed += usize::from(matches!(released, tidelock_state::CasOutcome::Swapped(_)));
    let note = format!(
        "removed {removed} keys of `{served}` from the cluster state; Kubernetes deletes its workers"
    );
    ctx.event(model, false, "Cleanup", note).await;
    Ok(Action::await_change())
}
