//! One Model per served name. The served name keys everything a model has in the cluster state
//! (worker registrations, session pins, turn logs), so two Models serving the same name, even
//! in different namespaces, would mix their workers and delete each other's keys. The first
//! Model to reconcile claims the name in `models/<served>` ([`ModelClaim`], written with a
//! compare-and-swap so two operators cannot both win); another Model asking for it is refused
//! with a `Degraded` condition naming the holder (and loses any groups it had), until the
//! holder is deleted or serves another name.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use tidelock_api::{Model, labels};
use tidelock_protocol::{ModelClaim, ModelName};
use tidelock_state::{CasOutcome, Expected, Revision};

use super::{Context, Error};

/// Who holds a served name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// This Model.
    Us,
    /// Another Model that still exists.
    Other(ModelClaim),
}

impl Holder {
    /// The `Degraded` message for a Model refused its served name.
    pub fn refusal(claim: &ModelClaim, served: &ModelName) -> String {
        format!(
            "the served name `{served}` belongs to Model {}/{} already (Models in different namespaces share the cluster state's names): set spec.servedName to another name, or delete that Model; nothing was applied",
            claim.namespace, claim.name
        )
    }
}

fn ours(model: &Model) -> Result<ModelClaim, Error> {
    Ok(ModelClaim {
        namespace: model.namespace().ok_or(Error::Missing("namespace"))?,
        name: model.name_any(),
        uid: model.uid().ok_or(Error::Missing("uid"))?,
    })
}

/// Claims `served` for `model`, or says who holds it. A claim whose Model is gone (deleted
/// without its finalizer, or replaced by a new Model of the same name) or serves another name
/// now is taken over.
pub async fn claim(model: &Model, served: &ModelName, ctx: &Context) -> Result<Holder, Error> {
    let key = ctx.layout.model(served);
    let me = ours(model)?;
    let value = serde_json::to_vec(&me).expect("a claim serializes");
    let mut expected = Expected::Absent;
    // A few rounds at most: each lost race means someone else wrote, and the next read says who.
    for _ in 0..3 {
        match ctx
            .store
            .compare_and_swap(&key, expected, value.clone(), None)
            .await?
        {
            CasOutcome::Swapped(_) => return Ok(Holder::Us),
            CasOutcome::Conflict(None) => expected = Expected::Absent,
            CasOutcome::Conflict(Some(kv)) => {
                let Ok(holder) = serde_json::from_slice::<ModelClaim>(&kv.value) else {
                    // Not a claim (written by something else): ours to overwrite.
                    expected = Expected::ModRevision(kv.mod_revision);
                    continue;
                };
                if holder == me {
                    return Ok(Holder::Us);
                }
                if still_holds(&holder, served, ctx).await? {
                    return Ok(Holder::Other(holder));
                }
                expected = Expected::ModRevision(kv.mod_revision);
            }
        }
    }
    Err(Error::Missing("a settled claim on the served name"))
}

/// The revision of `model`'s claim on `served`, when it holds it: only then may its cleanup
/// remove the name's keys (and the claim itself, as it was read). A missing claim is nobody's.
pub async fn held_by(
    model: &Model,
    served: &ModelName,
    ctx: &Context,
) -> Result<Option<Revision>, Error> {
    let me = ours(model)?;
    Ok(ctx
        .store
        .get(&ctx.layout.model(served))
        .await?
        .filter(|kv| serde_json::from_slice::<ModelClaim>(&kv.value).is_ok_and(|c| c == me))
        .map(|kv| kv.mod_revision))
}

/// Whether the Model a claim names exists with that uid and still serves `served`: its spec
/// names it, or one of its groups still runs it (a change of `servedName` rolls group by
/// group; the old name is free only once no group of the holder runs it). A Model the
/// operator may not read (another namespace, when it watches one only) counts as holding it.
async fn still_holds(claim: &ModelClaim, served: &ModelName, ctx: &Context) -> Result<bool, Error> {
    let api: Api<Model> = Api::namespaced(ctx.client.clone(), &claim.namespace);
    // A list by name: the operator's role lists and watches Models, it never gets one.
    let by_name = ListParams::default().fields(&format!("metadata.name={}", claim.name));
    let holder = match api.list(&by_name).await {
        Ok(found) => found
            .items
            .into_iter()
            .find(|m| m.meta().uid.as_deref() == Some(&claim.uid)),
        Err(kube::Error::Api(e)) if e.code == 403 => return Ok(true),
        Err(e) => return Err(e.into()),
    };
    let Some(holder) = holder else {
        return Ok(false);
    };
    if crate::builders::served_name(&holder) == served.as_str() {
        return Ok(true);
    }
    let groups: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &claim.namespace);
    let of_holder = ListParams::default().labels(&format!("{}={}", labels::MODEL, claim.name));
    Ok(groups.list(&of_holder).await?.items.iter().any(|g| {
        g.owner_references().iter().any(|o| o.uid == claim.uid)
            && crate::builders::group_served_name(g).as_deref() == Some(served.as_str())
    }))
}
