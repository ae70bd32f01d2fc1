//! Rollouts group by group: which shard groups a reconciliation may update now.
//!
//! Each group's StatefulSet carries the digest of the spec the operator last applied to it
//! (`tidelock.dev/spec-hash`). A group whose digest differs from the desired one runs an older
//! spec. Updating a group restarts all its workers (a group serves only with every shard), so
//! the plan keeps at least `replicas - maxUnavailableGroups` groups serving:
//!
//! - a group that does not serve anyway (starting, crash-looping, not scheduled) is updated at
//!   once: that costs nothing, and a bad spec can always be fixed by the next one;
//! - a serving group is updated only while fewer than `maxUnavailableGroups` desired groups are
//!   out of service, counting groups still starting, still rolling, missing (about to be
//!   created by a scale-up), and those updated in this very pass; lower indices first;
//! - the others are held: not applied at all, so their StatefulSets keep the older spec until a
//!   later reconciliation (the controller watches the StatefulSets, whose status changes as the
//!   updated group's workers come back).
//!
//! A group serves when its StatefulSet has rolled out (the controller saw the latest spec and
//! every pod runs it) and all its workers are ready pods and registered in the cluster state.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;
use tidelock_api::annotations::SPEC_HASH;

/// Worker registrations per group name, from the cluster state.
pub type Registered = BTreeMap<String, i32>;

/// What to do with one desired group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Apply the desired StatefulSet: create it, update it, or re-apply the same spec.
    Apply,
    /// Leave the group at its older spec for now.
    Hold,
}

/// The digest of the spec a StatefulSet was last applied with.
pub fn applied_hash(group: &StatefulSet) -> Option<&str> {
    group.annotations().get(SPEC_HASH).map(String::as_str)
}

/// Workers of `group` that are ready pods and registered (the registrations unknown: ready
/// pods alone), at most the group's size.
pub fn serving_workers(group: &StatefulSet, registered: Option<&Registered>) -> i32 {
    let st = group.status.clone().unwrap_or_default();
    let want = group.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let pods_ready = st.ready_replicas.unwrap_or(0);
    let in_store = registered.map_or(pods_ready, |r| {
        r.get(&group.name_any()).copied().unwrap_or(0)
    });
    pods_ready.min(in_store).min(want)
}

/// Whether the StatefulSet controller has rolled `group` out: it saw the latest spec and every
/// pod runs it.
pub fn rolled(group: &StatefulSet) -> bool {
    let st = group.status.clone().unwrap_or_default();
    let want = group.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    st.observed_generation >= group.metadata.generation
        && st.updated_replicas.unwrap_or(0) == want
        && st.update_revision.is_some()
        && st.current_revision == st.update_revision
}

/// Whether `group` serves: rolled out, every worker ready and registered.
pub fn serves(group: &StatefulSet, registered: Option<&Registered>) -> bool {
    let want = group.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    rolled(group) && serving_workers(group, registered) >= want
}

/// One step per desired group (in order), given the groups as they are (`existing`, by name),
/// the registrations and `spec.rollout.maxUnavailableGroups`.
pub fn plan(
    desired: &[StatefulSet],
    existing: &BTreeMap<String, StatefulSet>,
    registered: Option<&Registered>,
    max_unavailable: i32,
) -> Vec<Step> {
    let out_of_service = desired
        .iter()
        .filter(|d| {
            existing
                .get(&d.name_any())
                .is_none_or(|group| !serves(group, registered))
        })
        .count();
    let mut budget = usize::try_from(max_unavailable.max(1))
        .unwrap_or(1)
        .saturating_sub(out_of_service);
    desired
        .iter()
        .map(|d| {
            let Some(group) = existing.get(&d.name_any()) else {
                return Step::Apply;
            };
            if applied_hash(group) == applied_hash(d) || !serves(group, registered) {
                return Step::Apply;
            }
            if budget > 0 {
                budget -= 1;
                Step::Apply
            } else {
                Step::Hold
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    /// Group `i` at spec digest `hash`, with `ready` of 2 pods ready, rolled out or not.
    fn group(i: usize, hash: &str, ready: i32, rolled: bool) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                name: Some(format!("m-g{i}")),
                generation: Some(2),
                annotations: Some([(SPEC_HASH.to_owned(), hash.to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(2),
                ..StatefulSetSpec::default()
            }),
            status: Some(StatefulSetStatus {
                observed_generation: Some(if rolled { 2 } else { 1 }),
                ready_replicas: Some(ready),
                updated_replicas: Some(2),
                current_revision: Some("r1".into()),
                update_revision: Some("r1".into()),
                ..StatefulSetStatus::default()
            }),
        }
    }

    fn desired(n: usize) -> Vec<StatefulSet> {
        (0..n).map(|i| group(i, "new", 0, false)).collect()
    }

    fn existing(groups: Vec<StatefulSet>) -> BTreeMap<String, StatefulSet> {
        groups.into_iter().map(|g| (g.name_any(), g)).collect()
    }

    use Step::{Apply, Hold};

    #[test]
    fn one_serving_group_at_a_time() {
        let all_old = existing((0..3).map(|i| group(i, "old", 2, true)).collect());
        assert_eq!(plan(&desired(3), &all_old, None, 1), [Apply, Hold, Hold]);
        assert_eq!(plan(&desired(3), &all_old, None, 2), [Apply, Apply, Hold]);
        // g0 updated and still rolling: nothing else moves.
        let rolling = existing(vec![
            group(0, "new", 2, false),
            group(1, "old", 2, true),
            group(2, "old", 2, true),
        ]);
        assert_eq!(plan(&desired(3), &rolling, None, 1), [Apply, Hold, Hold]);
        // g0 back: g1 goes.
        let back = existing(vec![
            group(0, "new", 2, true),
            group(1, "old", 2, true),
            group(2, "old", 2, true),
        ]);
        assert_eq!(plan(&desired(3), &back, None, 1), [Apply, Apply, Hold]);
    }

    #[test]
    fn a_worker_not_ready_or_not_registered_holds_the_rollout() {
        let one_down = existing(vec![group(0, "new", 1, true), group(1, "old", 2, true)]);
        assert_eq!(plan(&desired(2), &one_down, None, 1), [Apply, Hold]);
        let both_up = existing(vec![group(0, "new", 2, true), group(1, "old", 2, true)]);
        let unregistered = Registered::from([("m-g0".to_owned(), 1), ("m-g1".to_owned(), 2)]);
        assert_eq!(
            plan(&desired(2), &both_up, Some(&unregistered), 1),
            [Apply, Hold]
        );
        let registered = Registered::from([("m-g0".to_owned(), 2), ("m-g1".to_owned(), 2)]);
        assert_eq!(
            plan(&desired(2), &both_up, Some(&registered), 1),
            [Apply, Apply]
        );
    }

    #[test]
    fn groups_out_of_service_are_updated_at_once_and_count() {
        // g1 crash-loops on the old spec: it is updated now (a fix must reach it), and it
        // takes the budget, so the serving g0 and g2 wait.
        let g1_down = existing(vec![
            group(0, "old", 2, true),
            group(1, "old", 0, true),
            group(2, "old", 2, true),
        ]);
        assert_eq!(plan(&desired(3), &g1_down, None, 1), [Hold, Apply, Hold]);
        // Every group down (a bad image everywhere): all are updated.
        let all_down = existing((0..3).map(|i| group(i, "old", 0, true)).collect());
        assert_eq!(plan(&desired(3), &all_down, None, 1), [Apply, Apply, Apply]);
    }

    #[test]
    fn a_scale_up_counts_its_new_group_as_out_of_service() {
        let two_old = existing(vec![group(0, "old", 2, true), group(1, "old", 2, true)]);
        assert_eq!(plan(&desired(3), &two_old, None, 1), [Hold, Hold, Apply]);
        assert_eq!(plan(&desired(3), &two_old, None, 2), [Apply, Hold, Apply]);
        // A fresh Model: everything is created.
        assert_eq!(
            plan(&desired(3), &BTreeMap::new(), None, 1),
            [Apply, Apply, Apply]
        );
    }

    #[test]
    fn groups_at_the_desired_spec_are_applied_again() {
        // Re-applying the same spec changes nothing, and puts back what someone else changed.
        let current = existing((0..3).map(|i| group(i, "new", 2, true)).collect());
        assert_eq!(plan(&desired(3), &current, None, 1), [Apply, Apply, Apply]);
    }
}
