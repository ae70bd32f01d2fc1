//! The Kubernetes-facing vocabulary of Tidelock, shared by the operator, the Helm chart's
//! templates (by convention) and anything that reads Tidelock's objects: the API group and
//! version, the labels and annotations the operator puts on what it creates, and the condition
//! types and reasons it reports.
//!
//! The custom resources are [`Model`] and [`Tenant`] (group `tidelock.dev`, version `v1alpha1`):
//! every field documented (it shows in `kubectl explain`), validated in the schema (bounds,
//! enums, CEL rules), defaulted, with printer columns and a status subresource. [`crd::all_yaml`]
//! renders them; `crds/` holds that output, checked current by this crate's tests.

pub mod crd;
pub mod model;
pub mod tenant;

pub use model::{Model, ModelSpec, ModelStatus};
pub use tenant::{Tenant, TenantSpec, TenantStatus};

/// API group of Tidelock's custom resources.
pub const GROUP: &str = "tidelock.dev";
/// API version of Tidelock's custom resources.
pub const VERSION: &str = "v1alpha1";
/// Field manager used for server-side apply.
pub const FIELD_MANAGER: &str = "tidelock-operator";

/// Labels put on every object the operator creates.
pub mod labels {
    /// `Model` the object serves.
    pub const MODEL: &str = "tidelock.dev/model";
    /// Shard group (model replica) a worker pod belongs to.
    pub const GROUP: &str = "tidelock.dev/group";
    /// Shard index of a worker pod inside its group.
    pub const SHARD: &str = "tidelock.dev/shard";
    /// Component: `worker`, `router` or `operator`.
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// Always [`MANAGED_BY_VALUE`] on objects the operator owns.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MANAGED_BY_VALUE: &str = "tidelock-operator";
}

/// Annotations the operator puts on the objects it creates.
pub mod annotations {
    /// On a group's StatefulSet: a digest of the spec the operator last applied to it, so a
    /// rollout knows which groups still run an older spec without comparing against the fields
    /// the API server defaulted.
    pub const SPEC_HASH: &str = "tidelock.dev/spec-hash";
    /// On a Model: the groups to remove first when it has more than `replicas` (the
    /// autoscaler's least loaded, set in the same write that lowers `replicas`).
    pub const REMOVE_FIRST: &str = "tidelock.dev/remove-first";
}

/// Condition types on `Model` and `Tenant` status.
pub mod conditions {
    /// Every desired worker is registered and ready.
    pub const READY: &str = "Ready";
    /// A rollout or scale is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs a human: see the reason and message.
    pub const DEGRADED: &str = "Degraded";
}

/// Condition reasons: CamelCase, stable, bounded (they are also metric labels).
pub mod reasons {
    pub const ALL_WORKERS_READY: &str = "AllWorkersReady";
    pub const WORKERS_STARTING: &str = "WorkersStarting";
    pub const ROLLING_UPDATE: &str = "RollingUpdate";
    pub const SECRET_MISSING: &str = "SecretMissing";
    pub const SECRET_MALFORMED: &str = "SecretMalformed";
    pub const STATE_STORE_UNAVAILABLE: &str = "StateStoreUnavailable";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The API server refused an object built from the spec (e.g. an immutable field changed).
    pub const APPLY_REJECTED: &str = "ApplyRejected";
    /// No node can take a worker's pod (the scheduler's message says why: resources, GPU
    /// product, taints, volumes).
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// A group's pods cannot be created (Pod Security, a ResourceQuota, a webhook refused them).
    pub const POD_CREATION_FAILED: &str = "PodCreationFailed";
    /// A worker's container cannot start or keeps exiting (image pull, crash loop, config).
    pub const WORKER_FAILING: &str = "WorkerFailing";
    /// Another Model (in any namespace) serves the same name already.
    pub const SERVED_NAME_TAKEN: &str = "ServedNameTaken";
    /// A `False` `Degraded` condition: nothing needs a human.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// A Tenant's record is written and its keys work.
    pub const KEYS_LOADED: &str = "KeysLoaded";
}
