//! Desired state: a `Model` to the objects that run it. Pure functions, no I/O, unit-tested as a
//! table of specs to objects; the reconciler applies their output with server-side apply.
//!
//! Layout: **one StatefulSet per shard group** (`<model>-g<i>`, `shards` pods). A pod's ordinal
//! is its shard index and its StatefulSet its group, both stable across restarts, so a worker
//! always rejoins the same place in the same group. Scaling `replicas` adds or removes whole
//! StatefulSets (whole groups), never a shard out of a group; and each group rolls on its own,
//! so a spec change never takes down every group's shard 0 at once. One headless Service gives
//! every worker a stable DNS name; one PodDisruptionBudget keeps voluntary evictions to one
//! worker at a time.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, Lifecycle, LifecycleHandler, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Toleration,
    TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use tidelock_api::Model;
use tidelock_api::labels;
use tidelock_api::model::{KvDtype, ModelSource, ModelSpec};

/// A worker's CPU request when the Model names none.
const DEFAULT_CPU: &str = "1";
/// A worker's memory beside its KV cache (weights, activations, buffers) when the Model names
/// none; on CPU workers the KV cache is host memory too.
const DEFAULT_MEMORY_MIB: u64 = 1024;

/// A worker's memory request when the Model names none (no limit is set then): the base, plus
/// the KV cache on CPU workers.
fn default_memory(model: &Model) -> Quantity {
    let kv = match model.spec.resources.gpus {
        0 => model
            .spec
            .kv_cache
            .memory_per_worker
            .parse::<bytesize::ByteSize>()
            .map_or(0, |b| b.as_u64().div_ceil(1 << 20)),
        _ => 0,
    };
    Quantity(format!("{}Mi", DEFAULT_MEMORY_MIB + kv))
}

/// The worker's HTTP port.
pub const WORKER_PORT: i32 = 8000;
/// The worker's metrics-only port (`--metrics-listen`), for Prometheus.
pub const METRICS_PORT: i32 = 9100;
/// The key of the cluster credential in its Secret.
pub const CLUSTER_TOKEN_KEY: &str = "token";
/// Where the weights live in a worker pod.
const MODELS_DIR: &str = "/models";
/// Where a `pvc` source is mounted (read-only).
const SOURCE_DIR: &str = "/source";
/// Where a worker's spill volume (`kvCache.spill`) is mounted: its disk tier.
pub const KV_SPILL_DIR: &str = "/var/lib/tidelock/kv";
/// Share of the spill volume the disk tier fills at most (the rest: the filesystem's own).
const SPILL_FILL: f64 = 0.9;
/// Bytes per second a draining worker is assumed to write its KV cache to its spill volume at
/// least, for the grace period.
const DRAIN_BYTES_PER_SECOND: u64 = 100 << 20;
/// Seconds the preStop hook pauses before SIGTERM, so endpoints and routers stop sending first.
const PRE_STOP_SECONDS: i64 = 5;
/// Seconds of a drain beyond writing the KV cache: finishing requests, deregistering.
const DRAIN_BASE_SECONDS: i64 = 30;
/// Where the etcd TLS files are mounted (read-only), as `ca.crt`, `tls.crt` and `tls.key`.
pub const ETCD_TLS_DIR: &str = "/etc/tidelock/etcd-tls";

/// What the operator was installed with (Helm values), used for every Model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// Worker image when the Model names none.
    pub worker_image: String,
    /// etcd client URLs the workers register in.
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of the cluster state in etcd.
    pub etcd_prefix: String,
    /// The Secret with the etcd TLS files (`ca.crt`, `tls.crt`, `tls.key`) the workers use; the
    /// reconciler copies it into each Model's namespace as [`etcd_client_secret`]. None: no TLS.
    pub etcd_client_secret: Option<SecretRef>,
    /// The Secret holding the cluster credential ([`CLUSTER_TOKEN_KEY`]); the reconciler copies
    /// it into each Model's namespace as [`cluster_token_secret`] for the workers.
    pub cluster_token_secret: SecretRef,
    /// Who may reach the workers, for their NetworkPolicies (None: no NetworkPolicies).
    pub network_policy: Option<PolicyPeers>,
    /// The operator's own log format and OTLP endpoint: the workers log and export their spans
    /// the same way (their `TIDELOCK_LOG_FORMAT`, `TIDELOCK_OTLP_ENDPOINT`).
    pub log: tidelock_service::LogArgs,
}

/// The pods a worker NetworkPolicy admits besides the worker's own shard group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPeers {
    /// The routers' namespace and labels: they reach the workers' HTTP port.
    pub router_namespace: String,
    pub router_labels: BTreeMap<String, String>,
    /// The operator's labels (in the routers' namespace): it reads the coordinators' load
    /// reports for the autoscaler.
    pub operator_labels: BTreeMap<String, String>,
    /// The labels of the monitoring namespace: it reaches the metrics port only.
    pub monitoring_namespace_labels: BTreeMap<String, String>,
}

/// The name of a Model's copy of the cluster credential's Secret, in the Model's namespace.
pub fn cluster_token_secret(model: &str) -> String {
    format!("{model}-cluster-token")
}

/// A Secret by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// The name of a Model's copy of the etcd client Secret, in the Model's namespace: pods can
/// mount Secrets of their own namespace only.
pub fn etcd_client_secret(model: &str) -> String {
    format!("{model}-etcd-client")
}

/// Why a Model cannot be turned into objects (reported as a `Degraded` condition).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("the Model has no {0} (it must be read from the API server)")]
    Missing(&'static str),
    #[error("spec.source: set exactly one of huggingFace, pvc or url")]
    Source,
}

/// Everything a Model needs, in apply order.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub service: Service,
    pub groups: Vec<StatefulSet>,
    /// One per group, named as the group (empty without [`Defaults::network_policy`]).
    pub policies: Vec<NetworkPolicy>,
    pub budget: PodDisruptionBudget,
}

/// Names and labels of one Model's objects.
struct Names<'a> {
    model: &'a str,
    namespace: &'a str,
    owner: OwnerReference,
}

impl Names<'_> {
    fn service(&self) -> String {
        format!("{}-workers", self.model)
    }

    fn group(&self, i: i32) -> String {
        format!("{}-g{i}", self.model)
    }

    fn labels(&self, group: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (labels::MODEL.to_owned(), self.model.to_owned()),
            (labels::COMPONENT.to_owned(), "worker".to_owned()),
            (
                labels::MANAGED_BY.to_owned(),
                labels::MANAGED_BY_VALUE.to_owned(),
            ),
        ]);
        if let Some(group) = group {
            l.insert(labels::GROUP.to_owned(), group.to_owned());
        }
        l
    }

    fn selector(&self, group: Option<&str>) -> LabelSelector {
        let mut l = BTreeMap::from([(labels::MODEL.to_owned(), self.model.to_owned())]);
        if let Some(group) = group {
            l.insert(labels::GROUP.to_owned(), group.to_owned());
        }
        LabelSelector {
            match_labels: Some(l),
            ..LabelSelector::default()
        }
    }

    fn meta(&self, name: String, group: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_owned()),
            labels: Some(self.labels(group)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// The objects that run `model`, its groups numbered `0..replicas`.
pub fn desired(model: &Model, defaults: &Defaults) -> Result<Desired, BuildError> {
    let indices: Vec<i32> = (0..model.spec.replicas).collect();
    desired_groups(model, defaults, &indices)
}

/// The group indices a Model with `replicas` groups keeps, given the indices its groups have
/// now: all of them while there are not too many (the autoscaler may have removed any group,
/// so indices need not be contiguous); when `replicas` went down, those in `remove_first` go
/// first (the autoscaler's least loaded), then the highest; when it went up, the lowest free
/// ones are added.
pub fn group_indices(
    existing: impl IntoIterator<Item = i32>,
    replicas: i32,
    remove_first: &[i32],
) -> Vec<i32> {
    let want = usize::try_from(replicas).unwrap_or(0);
    let mut kept: std::collections::BTreeSet<i32> = existing.into_iter().collect();
    for i in remove_first {
        if kept.len() <= want {
            break;
        }
        kept.remove(i);
    }
    while kept.len() > want {
        kept.pop_last();
    }
    let mut next = 0;
    while kept.len() < want {
        kept.insert(next);
        next += 1;
    }
    kept.into_iter().collect()
}

/// The index of the group a StatefulSet named `name` is, for a Model named `model`.
pub fn group_index(model: &str, name: &str) -> Option<i32> {
    name.strip_prefix(model)?.strip_prefix("-g")?.parse().ok()
}

/// The objects that run `model` with the groups `indices` (see [`group_indices`]).
pub fn desired_groups(
    model: &Model,
    defaults: &Defaults,
    indices: &[i32],
) -> Result<Desired, BuildError> {
    let name = model
        .meta()
        .name
        .as_deref()
        .ok_or(BuildError::Missing("name"))?;
    let namespace = model
        .meta()
        .namespace
        .as_deref()
        .ok_or(BuildError::Missing("namespace"))?;
    let owner = model
        .controller_owner_ref(&())
        .ok_or(BuildError::Missing("uid"))?;
    let names = Names {
        model: name,
        namespace,
        owner,
    };
    let service = Service {
        metadata: names.meta(names.service(), None),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Workers register themselves when ready; their DNS names must resolve before that.
            publish_not_ready_addresses: Some(true),
            selector: names.selector(None).match_labels,
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: WORKER_PORT,
                target_port: Some(IntOrString::Int(WORKER_PORT)),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let groups = indices
        .iter()
        .map(|&i| group(model, &names, i, defaults))
        .collect::<Result<_, _>>()?;
    let policies = match &defaults.network_policy {
        Some(peers) => indices
            .iter()
            .map(|&i| network_policy(&names, i, peers))
            .collect(),
        None => Vec::new(),
    };
    let budget = PodDisruptionBudget {
        metadata: names.meta(names.service(), None),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(names.selector(None)),
            // A worker that is not ready (loading, crash-looping) may always be evicted: the
            // budget protects serving workers and never blocks a node drain on broken ones.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    Ok(Desired {
        service,
        groups,
        policies,
        budget,
    })
}

/// Group `i`'s NetworkPolicy: its workers take traffic on the HTTP port only from the
/// Model's own workers (their shard group's RPC; any group's KV pulls and a draining worker's
/// handoff, issue #21), the routers and the operator, and on the metrics port only from the
/// monitoring namespace; nothing else (tenants' pods, other Models' workers) reaches them.
fn network_policy(names: &Names<'_>, i: i32, peers: &PolicyPeers) -> NetworkPolicy {
    let group = names.group(i);
    let port = |port: i32| {
        Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(port)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        }])
    };
    let namespace = |labels: BTreeMap<String, String>| {
        Some(LabelSelector {
            match_labels: Some(labels),
            ..LabelSelector::default()
        })
    };
    let named =
        |name: &str| BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), name.to_owned())]);
    let same_model = NetworkPolicyPeer {
        pod_selector: Some(names.selector(None)),
        ..NetworkPolicyPeer::default()
    };
    // Pods of the release's namespace (the routers', the operator's) by their labels.
    let release_pods = |labels: &BTreeMap<String, String>| NetworkPolicyPeer {
        namespace_selector: namespace(named(&peers.router_namespace)),
        pod_selector: Some(LabelSelector {
            match_labels: Some(labels.clone()),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    let routers = release_pods(&peers.router_labels);
    let operator = release_pods(&peers.operator_labels);
    let monitoring = NetworkPolicyPeer {
        namespace_selector: namespace(peers.monitoring_namespace_labels.clone()),
        ..NetworkPolicyPeer::default()
    };
    NetworkPolicy {
        metadata: names.meta(group.clone(), Some(&group)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(names.selector(Some(&group))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![same_model, routers, operator]),
                    ports: port(WORKER_PORT),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![monitoring]),
                    ports: port(METRICS_PORT),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// `name` from key `key` of the Secret `secret` (in the pod's namespace).
fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(WORKER_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// Seconds between two startup probes.
const STARTUP_PERIOD: i32 = 10;

/// The startup probe: `/readyz`, which the worker answers 200 once its model is loaded and it
/// is registered, allowed to fail for the Model's `startupTimeoutSeconds` (a load that hangs is
/// restarted then); liveness (`/healthz`, answered from the first second) begins only after.
fn startup_probe(timeout_seconds: i64) -> Probe {
    let period = i64::from(STARTUP_PERIOD);
    let tries = ((timeout_seconds + period - 1) / period).max(1);
    Probe {
        failure_threshold: Some(i32::try_from(tries).unwrap_or(i32::MAX)),
        ..http_probe("/readyz", STARTUP_PERIOD)
    }
}

/// What every worker pod runs as: Pod Security's `restricted` profile. The image's own
/// unprivileged user (Dockerfile: uid 10001), which also owns the writable volumes.
const RUN_AS: i64 = 10001;

fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Every container: no privilege escalation, no capabilities, a read-only root filesystem
/// (writes go to the mounted volumes: the weights, `/tmp`).
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Where containers may write scratch files (a read-only root filesystem has no other).
const TMP_DIR: &str = "/tmp";

fn tmp_mount() -> VolumeMount {
    VolumeMount {
        name: "tmp".into(),
        mount_path: TMP_DIR.into(),
        ..VolumeMount::default()
    }
}

/// The digest [`tidelock_api::annotations::SPEC_HASH`] records: of everything the
/// StatefulSet's spec says (its JSON form, whose maps are ordered).
pub fn spec_hash(spec: &StatefulSetSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    blake3::hash(&bytes).to_hex()[..16].to_owned()
}

/// TLS to etcd: the Model's copy of the client Secret, mounted read-only, and the worker's flags
/// pointing at its files.
fn etcd_tls(
    model: &str,
    vars: &mut Vec<EnvVar>,
    mounts: &mut Vec<VolumeMount>,
    volumes: &mut Vec<Volume>,
) {
    for (var, file) in [
        ("TIDELOCK_ETCD_CA_FILE", "ca.crt"),
        ("TIDELOCK_ETCD_CERT_FILE", "tls.crt"),
        ("TIDELOCK_ETCD_KEY_FILE", "tls.key"),
    ] {
        vars.push(env(var, format!("{ETCD_TLS_DIR}/{file}")));
    }
    mounts.push(VolumeMount {
        name: "etcd-tls".into(),
        mount_path: ETCD_TLS_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    volumes.push(Volume {
        name: "etcd-tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(etcd_client_secret(model)),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
}

/// The model path the worker reads, and the init container that puts it there (for sources
/// that must be downloaded): `tidelock fetch` from the worker's own image, the source's fields
/// as arguments (never a shell string), nothing installed at start.
fn source(spec: &ModelSource, image: &str) -> Result<(String, Option<Container>), BuildError> {
    let fetch = |kind: &str, args: Vec<String>, env: Vec<EnvVar>| Container {
        name: "fetch-model".into(),
        image: Some(image.to_owned()),
        command: Some(vec!["tidelock".into(), "fetch".into(), kind.into()]),
        args: Some(args),
        env: (!env.is_empty()).then_some(env),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "models".into(),
                mount_path: MODELS_DIR.into(),
                ..VolumeMount::default()
            },
            tmp_mount(),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("250m".into())),
                ("memory".to_owned(), Quantity("256Mi".into())),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(container_security()),
        ..Container::default()
    };
    match (&spec.hugging_face, &spec.pvc, &spec.url) {
        (Some(hf), None, None) => {
            let dir = format!("{MODELS_DIR}/hf/{}/{}", hf.repo, hf.revision);
            let mut args = vec![
                "--repo".to_owned(),
                hf.repo.clone(),
                "--revision".to_owned(),
                hf.revision.clone(),
                "--dest".to_owned(),
                dir.clone(),
            ];
            if let Some(file) = &hf.file {
                args.extend(["--file".to_owned(), file.clone()]);
            }
            // A gated repository's token, from the Model's namespace.
            let env = hf
                .token_secret
                .iter()
                .map(|s| secret_env("HF_TOKEN", &s.name, &s.key))
                .collect();
            let path = match &hf.file {
                Some(file) => format!("{dir}/{file}"),
                None => dir,
            };
            Ok((path, Some(fetch("hf", args, env))))
        }
        (None, Some(pvc), None) => Ok((format!("{SOURCE_DIR}/{}", pvc.path), None)),
        (None, None, Some(url)) => {
            // Named by the URL: a Model that changes its URL on a kept model cache gets the
            // new file, not the one already there.
            let name = &blake3::hash(url.url.as_bytes()).to_hex()[..16];
            let path = format!("{MODELS_DIR}/url/{name}.gguf");
            let mut args = vec!["--url".to_owned(), url.url.clone()];
            if let Some(sum) = &url.sha256 {
                args.extend(["--sha256".to_owned(), sum.clone()]);
            }
            args.extend(["--dest".to_owned(), path.clone()]);
            Ok((path, Some(fetch("url", args, Vec::new()))))
        }
        _ => Err(BuildError::Source),
    }
}

/// The served name a group's workers run with (its worker's `--served-model-name`): during a
/// change of `servedName`, groups not yet rolled still register under the old one.
pub fn group_served_name(group: &StatefulSet) -> Option<String> {
    let pod = group.spec.as_ref()?.template.spec.as_ref()?;
    let args = pod.containers.first()?.args.as_ref()?;
    let at = args.iter().position(|a| a == "--served-model-name")?;
    args.get(at + 1).cloned()
}

/// The name tenants request the model by: `spec.servedName`, else the resource's name.
pub fn served_name(model: &Model) -> String {
    model
        .spec
        .served_name
        .clone()
        .unwrap_or_else(|| model.name_any())
}

/// The worker's flags for `spec.sampling`: only the fields set (the others fall back to the
/// model's `generation_config.json`, which the worker reads itself).
fn sampling_args(spec: &ModelSpec) -> Vec<String> {
    let Some(sampling) = &spec.sampling else {
        return Vec::new();
    };
    [
        (
            "--default-temperature",
            sampling.temperature.map(|t| t.to_string()),
        ),
        ("--default-top-p", sampling.top_p.map(|p| p.to_string())),
        ("--default-top-k", sampling.top_k.map(|k| k.to_string())),
    ]
    .into_iter()
    .filter_map(|(flag, value)| Some([flag.to_owned(), value?]))
    .flatten()
    .collect()
}

/// The worker's backend, device and KV dtype: GPU workers compute on their GPU with candle's
/// CUDA backend (half-precision weights, `kvCache.dtype`, f16 by default); CPU workers run the
/// packed f32 kernels unless the Model asks for a half-precision KV cache, which only the candle
/// backend holds.
fn compute_args(spec: &ModelSpec) -> Vec<String> {
    let args: &[&str] = match (spec.resources.gpus, spec.kv_cache.dtype) {
        (0, None | Some(KvDtype::F32)) => &[],
        (0, Some(dtype)) => &["--backend", "candle", "--kv-dtype", dtype.name()],
        (_, dtype) => &[
            "--device",
            "cuda:0",
            "--kv-dtype",
            dtype.unwrap_or(KvDtype::F16).name(),
        ],
    };
    args.iter().map(|&a| a.to_owned()).collect()
}

/// The worker's disk tier on its spill volume, when the Model asks for one: the options and the
/// volume's claim template (a StatefulSet claim, so a restarted or rolled worker gets its own
/// volume back and finds its blocks).
fn spill(spec: &ModelSpec) -> Option<(Vec<String>, PersistentVolumeClaim)> {
    let spill = spec.kv_cache.spill.as_ref()?;
    let bytes = spill.size.parse::<bytesize::ByteSize>().ok()?.as_u64();
    let args = vec![
        "--kv-disk".to_owned(),
        KV_SPILL_DIR.to_owned(),
        "--kv-disk-size".to_owned(),
        format!("{}", (bytes as f64 * SPILL_FILL) as u64),
    ];
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("kv-spill".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spill.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(spill.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    Some((args, claim))
}

/// The grace period a worker gets to drain: the Model's, or longer when writing its whole KV
/// cache to the spill volume at [`DRAIN_BYTES_PER_SECOND`] would take more.
fn grace_seconds(spec: &ModelSpec) -> i64 {
    let kv = spec
        .kv_cache
        .memory_per_worker
        .parse::<bytesize::ByteSize>()
        .map_or(0, |b| b.as_u64());
    let write = match spec.kv_cache.spill {
        Some(_) => i64::try_from(kv.div_ceil(DRAIN_BYTES_PER_SECOND)).unwrap_or(i64::MAX),
        None => 0,
    };
    spec.termination_grace_period_seconds
        .max(DRAIN_BASE_SECONDS.saturating_add(write))
}

/// Shard group `i`: a StatefulSet of `shards` workers.
fn group(
    model: &Model,
    names: &Names<'_>,
    i: i32,
    defaults: &Defaults,
) -> Result<StatefulSet, BuildError> {
    let spec = &model.spec;
    let group = names.group(i);
    let served = served_name(model);
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| defaults.worker_image.clone());
    let (model_path, fetch) = source(&spec.source, &image)?;
    let advertise = format!(
        "http://$(POD_NAME).{}.{}.svc:{WORKER_PORT}",
        names.service(),
        names.namespace
    );
    let mut args = vec![
        "--model".to_owned(),
        model_path,
        "--served-model-name".to_owned(),
        served,
        "--listen".to_owned(),
        format!("0.0.0.0:{WORKER_PORT}"),
        "--kv-cache".to_owned(),
        spec.kv_cache.memory_per_worker.clone(),
        "--block-tokens".to_owned(),
        spec.kv_cache.block_tokens.to_string(),
        "--group".to_owned(),
        group.clone(),
        "--worker-id".to_owned(),
        "$(POD_NAME)".to_owned(),
        "--advertise-url".to_owned(),
        advertise,
        "--metrics-listen".to_owned(),
        format!("0.0.0.0:{METRICS_PORT}"),
    ];
    if let Some(context) = spec.max_context_tokens {
        args.extend(["--max-context".to_owned(), context.to_string()]);
    }
    args.extend(sampling_args(spec));
    args.extend(compute_args(spec));
    // The drain's budget: the grace period less the preStop pause and a margin to exit.
    args.extend([
        "--drain-secs".to_owned(),
        (grace_seconds(spec) - PRE_STOP_SECONDS - 5)
            .max(5)
            .to_string(),
    ]);
    // A shard group's blocks do not spill yet (the API refuses the combination).
    let spill = spill(spec).filter(|_| spec.shards == 1);
    if let Some((spill_args, _)) = &spill {
        args.extend(spill_args.iter().cloned());
    }
    let mut vars = vec![
        field_env("POD_NAME", "metadata.name"),
        // The pod's ordinal is its shard index in the group.
        field_env(
            "TIDELOCK_SHARD",
            "metadata.labels['apps.kubernetes.io/pod-index']",
        ),
        env("TIDELOCK_SHARDS", spec.shards.to_string()),
        env("TIDELOCK_ETCD_ENDPOINTS", defaults.etcd_endpoints.join(",")),
        env("TIDELOCK_ETCD_PREFIX", defaults.etcd_prefix.clone()),
        // The credential every internal route requires, which shard 0 also sends its shards.
        secret_env(
            "TIDELOCK_CLUSTER_TOKEN",
            &cluster_token_secret(names.model),
            CLUSTER_TOKEN_KEY,
        ),
    ];
    if spec.shards > 1 {
        // Shard 0 coordinates and reaches the others by their stable pod names.
        let peers: Vec<String> = (0..spec.shards)
            .map(|k| {
                format!(
                    "http://{group}-{k}.{}.{}.svc:{WORKER_PORT}",
                    names.service(),
                    names.namespace
                )
            })
            .collect();
        vars.push(env("TIDELOCK_SHARD_PEERS", peers.join(",")));
    }
    vars.extend(
        defaults
            .log
            .env()
            .into_iter()
            .map(|(name, value)| env(name, value)),
    );
    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if spec.resources.gpus > 0 {
        limits.insert(
            "nvidia.com/gpu".to_owned(),
            Quantity(spec.resources.gpus.to_string()),
        );
    }
    // Every container requests what it needs at least, so the scheduler never packs workers
    // onto a node by nothing; the spec's figures when given.
    let cpu = spec.resources.cpu.clone();
    requests.insert(
        "cpu".to_owned(),
        cpu.unwrap_or_else(|| Quantity(DEFAULT_CPU.into())),
    );
    match &spec.resources.memory {
        Some(memory) => {
            requests.insert("memory".to_owned(), memory.clone());
            limits.insert("memory".to_owned(), memory.clone());
        }
        None => {
            requests.insert("memory".to_owned(), default_memory(model));
        }
    }
    let mut mounts = vec![
        VolumeMount {
            name: "models".into(),
            mount_path: MODELS_DIR.into(),
            ..VolumeMount::default()
        },
        tmp_mount(),
    ];
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    if defaults.etcd_client_secret.is_some() {
        etcd_tls(names.model, &mut vars, &mut mounts, &mut volumes);
    }
    if let Some(pvc) = &spec.source.pvc {
        mounts.push(VolumeMount {
            name: "source".into(),
            mount_path: SOURCE_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "source".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
    }
    if spill.is_some() {
        mounts.push(VolumeMount {
            name: "kv-spill".into(),
            mount_path: KV_SPILL_DIR.into(),
            ..VolumeMount::default()
        });
    }
    let mut claims = match &spec.model_cache.size {
        Some(size) => Some(vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("models".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: spec.model_cache.storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }]),
        None => {
            volumes.push(Volume {
                name: "models".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
            None
        }
    };
    if let Some((_, claim)) = spill {
        claims.get_or_insert_with(Vec::new).push(claim);
    }
    let mut tolerations = spec.placement.tolerations.clone();
    if spec.resources.gpus > 0 {
        tolerations.push(Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        });
    }
    let affinity = spec.resources.gpu_product.as_ref().map(|product| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "nvidia.com/gpu.product".into(),
                        operator: "In".into(),
                        values: Some(vec![product.clone()]),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    });
    let spread = spec.placement.spread.then(|| {
        vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(names.selector(Some(&group))),
            ..TopologySpreadConstraint::default()
        }]
    });
    let worker = Container {
        name: "worker".into(),
        image: Some(image),
        // The image holds every binary and no entrypoint (the Dockerfile's `ENTRYPOINT []`).
        command: Some(vec!["tidelock-worker".into()]),
        args: Some(args),
        env: Some(vars),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: WORKER_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", 5)),
        startup_probe: Some(startup_probe(spec.startup_timeout_seconds)),
        // After the startup probe passed: a worker that stops answering is restarted.
        liveness_probe: Some(http_probe("/healthz", 10)),
        // Give endpoints and routers a moment to stop sending new work; SIGTERM then drains.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: Some(ResourceRequirements {
            limits: (!limits.is_empty()).then_some(limits),
            requests: (!requests.is_empty()).then_some(requests),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(mounts),
        security_context: Some(container_security()),
        ..Container::default()
    };
    let pod_labels = names.labels(Some(&group));
    let spec = StatefulSetSpec {
        replicas: Some(spec.shards),
        service_name: Some(names.service()),
        // Shards of a group start and stop together: they are one replica.
        pod_management_policy: Some("Parallel".into()),
        selector: names.selector(Some(&group)),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(pod_labels),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                init_containers: fetch.map(|c| vec![c]),
                containers: vec![worker],
                node_selector: (!spec.placement.node_selector.is_empty())
                    .then(|| spec.placement.node_selector.clone()),
                tolerations: (!tolerations.is_empty()).then_some(tolerations),
                affinity,
                topology_spread_constraints: spread,
                termination_grace_period_seconds: Some(grace_seconds(spec)),
                volumes: Some(volumes),
                security_context: Some(pod_security()),
                // Workers never call the Kubernetes API.
                automount_service_account_token: Some(false),
                ..PodSpec::default()
            }),
        },
        // The claims (model cache, spill volume) follow their group (spec.modelCache.retain).
        persistent_volume_claim_retention_policy: claims.as_ref().map(|_| {
            let policy = if spec.model_cache.retain {
                "Retain"
            } else {
                "Delete"
            };
            StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some(policy.into()),
                when_scaled: Some(policy.into()),
            }
        }),
        volume_claim_templates: claims,
        ..StatefulSetSpec::default()
    };
    let mut metadata = names.meta(group.clone(), Some(&group));
    metadata.annotations = Some(BTreeMap::from([(
        tidelock_api::annotations::SPEC_HASH.to_owned(),
        spec_hash(&spec),
    )]));
    Ok(StatefulSet {
        metadata,
        spec: Some(spec),
        ..StatefulSet::default()
    })
}

#[cfg(test)]
mod tests;
