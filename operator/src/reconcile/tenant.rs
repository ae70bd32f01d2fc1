//! The Tenant reconciler: reads the API keys from the Secrets a Tenant references and writes its
//! record (key hashes, allowed models, limits, secret cache salt) to the cluster state, where
//! routers read it.
//!
//! Fail closed: when a referenced Secret is missing or malformed the Tenant is `Degraded` (the
//! condition names the Secret) and it has **no** record, so none of its keys work, rather than
//! a record with some keys or yesterday's keys. Deleting a Secret therefore revokes its keys, and
//! fixing it restores them. The controller watches the referenced Secrets, so a rotation is
//! picked up without touching the Tenant. The finalizer removes the record before the Tenant goes.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tidelock_api::{Tenant, TenantStatus, conditions, reasons};

use super::{Context, Error, condition, with_finalizer, write_status};
use crate::tenants;

/// Reconciles one Tenant (the controller's entry point), in a span naming it.
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(kind = "Tenant", namespace = tenant.namespace().unwrap_or_default(), name = tenant.name_any())
)]
pub async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ctx = &*ctx;
    with_finalizer(
        "tenant",
        tenant,
        ctx,
        async |tenant| apply(&tenant, ctx).await,
        async |tenant| cleanup(&tenant, ctx).await,
    )
    .await
}

/// The Tenants (from the controller's cache) that reference `secret`: a Secret event
/// reconciles exactly those.
pub fn tenants_referencing(
    tenants: &Store<Tenant>,
    secret: &impl ResourceExt,
) -> Vec<ObjectRef<Tenant>> {
    let (Some(namespace), name) = (secret.namespace(), secret.name_any()) else {
        return Vec::new();
    };
    tenants
        .state()
        .iter()
        .filter(|t| t.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|t| t.spec.api_key_secrets.iter().any(|r| r.name == name))
        .map(|t| ObjectRef::from_obj(&**t))
        .collect()
}

async fn apply(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let namespace = tenant.namespace().ok_or(Error::Missing("namespace"))?;
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut secrets = BTreeMap::new();
    for reference in &tenant.spec.api_key_secrets {
        if secrets.contains_key(&reference.name) {
            continue;
        }
        if let Some(secret) = secrets_api.get_opt(&reference.name).await? {
            secrets.insert(reference.name.clone(), secret);
        }
    }
    let id = tenants::tenant_id(tenant);
    // An invalid id is reported first: the match below tries it first.
    let record = match &id {
        Ok(id) => {
            let share = tenant.spec.share_cache;
            let salt = tenants::cache_salt(&*ctx.store, &ctx.layout, id, share).await?;
            tenants::tenant_record(tenant, &secrets, salt)
        }
        Err(e) => Err(e.clone()),
    };
    let previous = tenant.status.clone().unwrap_or_default();
    let generation = tenant.metadata.generation;
    let prev = &previous.conditions;
    let status = match (&id, &record) {
        (Ok(id), Ok(record)) => {
            if tenants::write(&*ctx.store, &ctx.layout, id, record).await? {
                let note = format!(
                    "wrote {} key hashes and limits to the cluster state",
                    record.key_hashes.len()
                );
                ctx.event(tenant, false, "RecordWritten", note).await;
            }
            let keys = record.key_hashes.len();
            let message = format!("{keys} API keys active");
            TenantStatus {
                conditions: vec![
                    condition(
                        prev,
                        conditions::READY,
                        true,
                        reasons::KEYS_LOADED,
                        message,
                        generation,
                    ),
                    condition(
                        prev,
                        conditions::DEGRADED,
                        false,
                        reasons::AS_EXPECTED,
                        String::new(),
                        generation,
                    ),
                ],
                observed_generation: generation,
                keys: i32::try_from(keys).unwrap_or(i32::MAX),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            // Fail closed: no record, so no key of this tenant works until it is fixed.
            let removed = match &id {
                Ok(id) => tenants::remove(&*ctx.store, &ctx.layout, id).await?,
                Err(_) => false,
            };
            let message = if removed {
                format!("{e}; its keys are revoked until this is fixed")
            } else {
                format!("{e}; no key of this tenant works until this is fixed")
            };
            let changed = previous.conditions.iter().all(|c| {
                c.type_ != conditions::DEGRADED || c.status != "True" || c.message != message
            });
            if changed || removed {
                ctx.event(tenant, true, e.reason(), message.clone()).await;
            }
            TenantStatus {
                conditions: vec![
                    condition(
                        prev,
                        conditions::READY,
                        false,
                        e.reason(),
                        message.clone(),
                        generation,
                    ),
                    condition(
                        prev,
                        conditions::DEGRADED,
                        true,
                        e.reason(),
                        message,
                        generation,
                    ),
                ],
                observed_generation: generation,
                keys: 0,
            }
        }
    };
    if status != previous {
        write_status(ctx, tenant, &status).await?;
    }
    // Secrets are watched: nothing to poll. A periodic pass re-asserts the record anyway.
    Ok(Action::requeue(std::time::Duration::from_secs(600)))
}

/// The finalizer's step: removes the record, so the tenant's keys stop working on every router.
async fn cleanup(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    if let Ok(id) = tenants::tenant_id(tenant)
        && tenants::remove(&*ctx.store, &ctx.layout, &id).await?
    {
        let note = format!("removed tenant {id} from the cluster state; its keys no longer work");
        ctx.event(tenant, false, "Cleanup", note).await;
    }
    Ok(Action::await_change())
}
