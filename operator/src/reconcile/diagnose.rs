//! Why a Model's workers do not run, in the words Kubernetes used: the scheduler's reason a pod
//! fits no node, the StatefulSet controller's reason it could not create a pod (Pod Security,
//! a quota, a webhook), a container that cannot start or keeps exiting. Read while a Model is not
//! ready, and reported as its `Degraded` condition, so `kubectl get model -o yaml` (and
//! `kubectl describe`) says what a person must fix instead of "starting" forever.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tidelock_api::{Model, labels, reasons};

use super::{Context, Error};

/// Container states a person must act on (the kubelet's reasons).
const FAILING: [&str; 7] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// How old a FailedCreate Event may be and still describe the present: the StatefulSet
/// controller's retries back off to about 17 minutes.
const RECENT: jiff::SignedDuration = jiff::SignedDuration::from_secs(20 * 60);

/// A problem: `(reason, message)`.
pub type Problem = (&'static str, String);

/// The first problem of one pod: unschedulable, or a container failing.
pub fn pod_problem(pod: &Pod) -> Option<Problem> {
    let name = pod.name_any();
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    }) {
        let why = c.message.clone().unwrap_or_default();
        return Some((
            reasons::UNSCHEDULABLE,
            format!("pod {name} cannot be scheduled: {why}"),
        ));
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if FAILING.contains(&reason) {
            let why = waiting.message.as_deref().unwrap_or("no message");
            return Some((
                reasons::WORKER_FAILING,
                format!("pod {name}: container {} is {reason}: {why}", c.name),
            ));
        }
    }
    None
}

/// Looks for a problem among the Model's pods, then among the groups that lack pods.
pub async fn diagnose(
    model: &Model,
    ctx: &Context,
    groups: &[StatefulSet],
) -> Result<Option<Problem>, Error> {
    let namespace = model.namespace().ok_or(Error::Missing("namespace"))?;
    let selector = format!("{}={}", labels::MODEL, model.name_any());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut listed = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    listed.sort_by_key(ResourceExt::name_any);
    if let Some(problem) = listed.iter().find_map(pod_problem) {
        return Ok(Some(problem));
    }
    let events: Api<Event> = Api::namespaced(ctx.client.clone(), &namespace);
    for group in groups {
        let want = group.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let have = group.status.as_ref().map_or(0, |s| s.replicas);
        if have >= want {
            continue;
        }
        let fields = format!(
            "involvedObject.kind=StatefulSet,involvedObject.name={},reason=FailedCreate",
            group.name_any()
        );
        // This StatefulSet's (not an earlier one's of the same name), and recent: the controller
        // retries with a growing back-off and repeats the Event while the failure lasts.
        let uid = group.metadata.uid.clone();
        let now = jiff::Timestamp::now();
        let latest = events
            .list(&ListParams::default().fields(&fields))
            .await?
            .items
            .into_iter()
            .filter(|e| e.involved_object.uid == uid)
            .filter_map(|e| {
                let seen = e.last_timestamp.as_ref().map(|t| t.0)?;
                (now.duration_since(seen) <= RECENT).then_some((seen, e))
            })
            .max_by_key(|(seen, _)| *seen)
            .map(|(_, e)| e);
        if let Some(event) = latest {
            let why = event.message.unwrap_or_default();
            return Ok(Some((
                reasons::POD_CREATION_FAILED,
                format!("{} cannot create its pods: {why}", group.name_any()),
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "m-g0-0"}, "status": status})).unwrap()
    }

    #[test]
    fn an_unschedulable_pod_is_named_with_the_schedulers_words() {
        let p = pod(
            json!({"conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}),
        );
        let (reason, message) = pod_problem(&p).unwrap();
        assert_eq!(reason, reasons::UNSCHEDULABLE);
        assert_eq!(
            message,
            "pod m-g0-0 cannot be scheduled: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
        );
    }

    #[test]
    fn a_failing_container_is_named_a_starting_one_is_not() {
        let p = pod(
            json!({"containerStatuses": [{"name": "worker", "image": "x", "imageID": "",
            "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}}]}),
        );
        assert_eq!(
            pod_problem(&p).unwrap(),
            (
                reasons::WORKER_FAILING,
                "pod m-g0-0: container worker is CrashLoopBackOff: back-off 40s".to_owned()
            )
        );
        let starting = pod(
            json!({"containerStatuses": [{"name": "worker", "image": "x",
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}],
            "conditions": [{"type": "PodScheduled", "status": "True"}]}),
        );
        assert_eq!(pod_problem(&starting), None);
    }
}
