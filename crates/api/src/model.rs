//! The `Model` custom resource: one served model, as shard groups of workers on GPU nodes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A model Tidelock serves: where its weights come from, how many shard groups of how many
/// workers serve it, and how much KV cache each worker keeps. The operator runs the workers as
/// StatefulSets and reports their state here.
// Each printer column repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tidelock.dev",
    version = "v1alpha1",
    kind = "Model",
    namespaced,
    status = "ModelStatus",
    // HorizontalPodAutoscalers and KEDA scale shard groups through this.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    shortname = "tlm",
    category = "tidelock",
    cel,
    doc = "A model Tidelock serves: its weights' source, shard groups of workers, KV cache and placement.",
    // The name becomes a Service (`<name>-workers`, a DNS label) and StatefulSets `<name>-g<i>`
    // whose pods carry a `<name>-g<i>-<10-character hash>` revision label: 46 characters leave
    // room for group 1023. The API server refuses longer names, and dots, up front.
    // Checked when a Model is created only (a name never changes): a Model made before this
    // rule can still be updated and deleted.
    validation = Rule::new("oldSelf.hasValue() || (self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 46)").optional_old_self(true).message("a Model's name is at most 46 lowercase letters, digits and '-', starting with a letter (it names the Service <name>-workers and the StatefulSets <name>-g<i>)"),
    printcolumn(
        name = "Served",
        type_ = "string",
        json_path = ".status.servedName",
        description = "The name tenants request"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.workers",
        description = "Ready workers / desired workers"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        json_path = ".status.updatedGroups",
        description = "Shard groups running the current spec"
    ),
    printcolumn(
        name = "Context",
        type_ = "integer",
        json_path = ".spec.maxContextTokens",
        description = "Longest context one request may reach"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.kvCache) || !has(self.kvCache.spill) || !has(self.shards) || self.shards == 1").message("kvCache.spill needs shards: 1 (a shard group's KV blocks do not spill yet)"))]
pub struct ModelSpec {
    /// Where the weights come from: exactly one of `huggingFace`, `pvc` or `url`.
    pub source: ModelSource,

    /// The name tenants put in `model` (and the router lists in `/v1/models`). Default: the
    /// resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$')").message("a served name is letters, digits, '.', '_' and '-', with at most one '/'"))]
    #[schemars(length(min = 1, max = 253))]
    pub served_name: Option<String>,

    /// Shard groups (model replicas). Each group serves whole sessions; scaling adds or removes
    /// whole groups.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,

    /// Workers per shard group. A session's KV cache is spread across the group's workers, so a
    /// group holds `shards` times the context one worker could.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub shards: i32,

    /// Longest context (prompt plus completion) of one request, in tokens. Default: the model's
    /// trained context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16_777_216))]
    pub max_context_tokens: Option<i64>,

    /// Sampling for the parameters a request leaves out (`temperature`, `top_p`, `top_k`); a
    /// request's own values always win. Default: the model folder's `generation_config.json`,
    /// else OpenAI's defaults. `/v1/models` shows what applies as `sampling_defaults`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingDefaults>,

    /// The KV cache of each worker.
    #[serde(default)]
    pub kv_cache: KvCacheSpec,

    /// Accelerators, CPU and memory of each worker.
    #[serde(default)]
    pub resources: WorkerResources,

    /// Where workers may run.
    #[serde(default)]
    pub placement: Placement,

    /// Where each worker keeps the downloaded weights.
    #[serde(default)]
    pub model_cache: ModelCache,

    /// Worker image. Default: the image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Seconds a worker has to drain (export its sessions' KV blocks) before it is stopped.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 1, max = 86_400))]
    pub termination_grace_period_seconds: i64,

    /// Seconds a worker may take to start (download and load its weights) before Kubernetes
    /// restarts it: the startup probe's budget. Liveness checks begin only once it has passed, so
    /// a model that loads for many minutes does not crash-loop.
    #[serde(default = "default_startup")]
    #[schemars(range(min = 10, max = 86_400))]
    pub startup_timeout_seconds: i64,
    /// How a spec change reaches the workers: group by group.
    #[serde(default)]
    pub rollout: Rollout,
    /// Bounds for an autoscaler acting on `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

fn one() -> i32 {
    1
}

fn default_grace() -> i64 {
    300
}

fn default_startup() -> i64 {
    1800
}

/// How a spec change rolls: the operator updates one shard group's StatefulSet at a time and
/// moves to the next only when the updated group's workers are ready and registered again.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Shard groups that may be out of service at once during a rollout (groups already out of
    /// service for another reason count too, and are updated first).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_unavailable_groups: i32,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_unavailable_groups: 1,
        }
    }
}

/// Where the weights come from. Exactly one field is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.huggingFace), has(self.pvc), has(self.url)].filter(x, x).size() == 1").message("set exactly one of huggingFace, pvc or url"))]
pub struct ModelSource {
    /// A Hugging Face repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSource>,
    /// A path in a PersistentVolumeClaim (a GGUF file or a Hugging Face folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// A GGUF file to download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlSource>,
}

/// A Hugging Face repository at a revision.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// `owner/name`, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$')").message("a repository is owner/name"))]
    pub repo: String,
    /// A branch, tag or commit; pin a commit for reproducible rollouts.
    #[serde(default = "main_revision")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("!self.contains('..') && !self.startsWith('/')").message("a revision has no '..' and does not start with '/' (git refuses such names too)"))]
    pub revision: String,
    /// A GGUF file in the repository to serve instead of the safetensors weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.contains('..') && !self.startsWith('/')").message("a path in the repository, without '..'"))]
    pub file: Option<String>,
    /// A Secret in the Model's namespace holding a Hugging Face token, for gated or private
    /// repositories (the download sends it as a bearer token; it never appears in the pod spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKey>,
}

/// One key of a Secret in the Model's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKey {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key holding the value.
    #[serde(default = "token_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn token_key() -> String {
    "token".into()
}

fn main_revision() -> String {
    "main".into()
}

/// A path inside a PersistentVolumeClaim in the Model's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// The claim.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// The model's path inside the volume.
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("a path relative to the volume, without '..'"))]
    #[schemars(length(min = 1))]
    pub path: String,
}

/// A file to download.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlSource {
    /// `https://` URL of a GGUF file.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("an http(s) URL"))]
    pub url: String,
    /// Expected SHA-256 (64 hex digits); the download is refused when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("64 lowercase hex digits"))]
    pub sha256: Option<String>,
}

/// KV element type.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// 32-bit floats (the default on CPU workers).
    F32,
    /// 16-bit floats (the default on GPU workers).
    F16,
    /// bfloat16.
    Bf16,
}

/// A model's default sampling (`spec.sampling`): each field left out falls back to the model's
/// `generation_config.json`, then to OpenAI's default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SamplingDefaults {
    /// Softmax temperature in [0, 2]; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 2.0").message("temperature is between 0 and 2"))]
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("topP is greater than 0 and at most 1"))]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub top_k: Option<i32>,
}

/// The KV cache of each worker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KvCacheSpec {
    /// Tokens per KV block: a power of two from 1 to 1024. Routers and workers hash prompts in
    /// blocks of this size.
    #[serde(default = "default_block_tokens")]
    #[x_kube(validation = Rule::new("self in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]").message("a power of two from 1 to 1024"))]
    pub block_tokens: i32,
    /// Accelerator (or, on CPU, host) memory for the KV cache of each worker, e.g. `40Gi`.
    #[serde(default = "default_kv_memory")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("a positive quantity such as 40Gi"))]
    pub memory_per_worker: String,
    /// KV element type. Default: f16 on GPU workers, f32 on CPU workers (whose fast kernels
    /// compute in f32; f16 or bf16 there runs the slower candle backend, for half the memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<KvDtype>,
    /// Where cold blocks spill instead of being forgotten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill: Option<SpillTier>,
}

fn default_block_tokens() -> i32 {
    64
}

fn default_kv_memory() -> String {
    "8Gi".into()
}

impl KvDtype {
    /// The worker's name for it (`--kv-dtype`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
        }
    }
}

impl Default for KvCacheSpec {
    fn default() -> Self {
        KvCacheSpec {
            block_tokens: default_block_tokens(),
            memory_per_worker: default_kv_memory(),
            dtype: None,
            spill: None,
        }
    }
}

/// A spill tier: a volume per worker for KV blocks evicted from memory (its disk tier). The
/// volume is the worker's own StatefulSet claim: a restarted or rolled worker finds its blocks
/// again, and a draining worker writes its cache there.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SpillTier {
    /// Size of each worker's spill volume, e.g. `200Gi`.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("a positive quantity such as 200Gi"))]
    pub size: String,
    /// Storage class of the spill volumes. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
}

/// Accelerators, CPU and memory of each worker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerResources {
    /// GPUs per worker (`nvidia.com/gpu`); 0 runs on CPU.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: i32,
    /// GPU product the workers need, matched against the node label `nvidia.com/gpu.product`
    /// (e.g. `NVIDIA-H100-80GB-HBM3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_product: Option<String>,
    /// CPU request of each worker, e.g. `8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request (and limit) of each worker, e.g. `64Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// Where workers may run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Nodes the workers may run on, by label.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added to the workers (the `nvidia.com/gpu` taint is tolerated already when
    /// `resources.gpus` > 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Spread each group's workers across nodes (topology spread on `kubernetes.io/hostname`).
    #[serde(default = "yes")]
    pub spread: bool,
}

fn yes() -> bool {
    true
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            spread: true,
        }
    }
}

/// Where each worker keeps the downloaded weights.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelCache {
    /// A PersistentVolumeClaim per worker of this size (kept across restarts); without it, an
    /// emptyDir (downloaded again on every start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("a positive quantity such as 50Gi"))]
    pub size: Option<String>,
    /// Storage class of the model cache claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Keep the claims when their group goes (the Model deleted, scaled down, a group removed
    /// by the autoscaler), to reuse the downloaded weights later. Default: they go with it.
    #[serde(default)]
    pub retain: bool,
}

/// The operator's autoscaler: it sets `replicas` from the workers' load reports (prompt tokens
/// waiting to be prefilled, KV cache in use), within bounds, after the load held for a
/// stabilisation window, and not within a cool-down of its last change. Leave it unset to
/// drive `replicas` through the scale subresource instead (a HorizontalPodAutoscaler, KEDA).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct Autoscaling {
    /// Fewest shard groups.
    #[schemars(range(min = 0, max = 1024))]
    pub min_replicas: i32,
    /// Most shard groups.
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    /// Prompt tokens waiting to be prefilled per group that the autoscaler aims for: more adds
    /// groups, less removes them.
    #[serde(default = "default_waiting_tokens")]
    #[schemars(range(min = 1))]
    pub target_waiting_prefill_tokens: i64,
    /// Percent of each group's KV cache held by running requests that the autoscaler aims for.
    #[serde(default = "default_kv_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub target_kv_utilization_percent: i32,
    /// Seconds a higher load must last before groups are added (the lowest recommendation
    /// over this window is taken).
    #[serde(default = "default_up_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i64,
    /// Seconds a lower load must last before groups are removed (the highest recommendation
    /// over this window is taken).
    #[serde(default = "default_down_window")]
    #[schemars(range(min = 0, max = 86_400))]
    pub scale_down_stabilization_seconds: i64,
    /// Seconds after a change of `replicas` (by the autoscaler) before the next.
    #[serde(default = "default_cooldown")]
    #[schemars(range(min = 0, max = 86_400))]
    pub cooldown_seconds: i64,
}

fn default_waiting_tokens() -> i64 {
    8192
}

fn default_kv_percent() -> i32 {
    80
}

fn default_up_window() -> i64 {
    30
}

fn default_down_window() -> i64 {
    300
}

fn default_cooldown() -> i64 {
    120
}

/// What the operator observed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// `Ready`, `Progressing` and `Degraded`, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Workers registered and ready.
    #[serde(default)]
    pub ready_workers: i32,
    /// Workers the spec asks for (`replicas` x `shards`).
    #[serde(default)]
    pub desired_workers: i32,
    /// `ready/desired`, for `kubectl get models`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<String>,
    /// The name tenants request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    /// Shard groups running the current spec (rolled out), for `kubectl get models`.
    #[serde(default)]
    pub updated_groups: i32,
    /// Shard groups the spec asks for (`replicas`).
    #[serde(default)]
    pub desired_groups: i32,
    /// Shard groups that exist (the scale subresource's replicas).
    #[serde(default)]
    pub replicas: i32,
    /// The label selector of each group's coordinator pod (the scale subresource's selector:
    /// an autoscaler counting pods counts groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// When the autoscaler last changed `replicas`, and what it saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<LastScale>,
}

/// The autoscaler's last change.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastScale {
    /// RFC 3339.
    pub time: String,
    /// `replicas` before the change.
    pub from: i32,
    /// `replicas` after the change.
    pub to: i32,
    /// Why, in words (the load against the targets).
    pub reason: String,
}
