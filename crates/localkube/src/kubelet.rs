//! The stand-in kubelet: runs Tidelock's pods as local processes. No container runtime exists
//! here, so a pod the real scheduler put on a fake node, whose first container's command is one
//! of Tidelock's binaries, is started as that binary on this machine, as a kubelet would start
//! the container:
//!
//! - **command and args** from the pod spec, `$(VAR)` expanded from the container's
//!   environment as Kubernetes does;
//! - **environment** from the pod spec only (`value`, `fieldRef`, `secretKeyRef`,
//!   `configMapKeyRef`, `envFrom`; `LD_*` dropped), plus `PATH` and an empty `HOME` of its own;
//! - **identity**: unless the pod (or its service account) opts out of the token mount, a
//!   token from the TokenRequest API for the pod's service account, bound to the pod, in a
//!   kubeconfig named by `KUBECONFIG`; the process is exactly that service account to the API
//!   server, as in a pod, and has no credential otherwise;
//! - **network**: every pod shares loopback, so each container port gets a free host port;
//!   `0.0.0.0:<port>` in an argument or variable becomes `127.0.0.1:<its host port>`, and a pod's
//!   DNS name `<pod>.<service>.<namespace>.svc[.cluster.local]:<port>` becomes
//!   `127.0.0.1:<that pod's host port>` (allocated on first mention, so peers can name each
//!   other before they start);
//! - **status**: phase Running once started, `Ready` from the container's HTTP readiness probe
//!   (polled every second), restarts counted, the process restarted with a back-off when it
//!   exits (`restartPolicy: Always`);
//! - **deletion**: when the pod goes, SIGTERM, its grace period (at most 10 s), then SIGKILL.
//!
//! What it does not do: pull images (the binaries come from `programs`), run init containers
//! (reported as completed), mount volumes (a process sees this machine's files; arguments under
//! an emptyDir's or a claim's mount are moved into the pod's own folder), enforce
//! resources, or run liveness probes. Per command, `overrides` replace flags a real container
//! would need its image for: the worker's `--model` becomes a local model file, and a worker
//! whose pod asks for GPUs runs the simulated engine (`--engine sim`) because no GPU exists here. kwok's stages leave these pods
//! to us (`kwok-stages.yaml`) and still delete them when they are deleted.
//!
//! Trust: whoever may create pods in the namespaces it runs (the admin, and the operator on a
//! Model's behalf) starts these binaries on this machine, as this user, with arguments of their
//! choosing. It is a tool for one developer's machine and a test suite, not a sandbox.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use regex::Regex;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Error;
use crate::control_plane::Report;
use crate::pki;
use crate::process::{self, Process, Spec};

/// The commands this kubelet runs (the same list `kwok-stages.yaml` leaves to it).
pub const TIDELOCK_COMMANDS: [&str; 3] =
    ["tidelock-worker", "tidelock-router", "tidelock-operator"];

/// Flags replaced and arguments added for one command.
#[derive(Debug, Clone, Default)]
pub struct Override {
    /// `(flag, value)`: the value of `flag` (`--flag v` or `--flag=v`) becomes `value`.
    pub set: Vec<(String, String)>,
    /// Added after the pod's own arguments.
    pub append: Vec<String>,
    /// Added too when the container asks for GPUs (`nvidia.com/gpu`), which no process here
    /// has: the worker's `--engine sim`.
    pub append_without_gpu: Vec<String>,
}

/// Whether a container asks for GPUs.
fn wants_gpus(container: &Container) -> bool {
    let resources = container.resources.as_ref();
    [
        resources.and_then(|r| r.limits.as_ref()),
        resources.and_then(|r| r.requests.as_ref()),
    ]
    .into_iter()
    .flatten()
    .any(|m| m.get("nvidia.com/gpu").is_some_and(|q| q.0 != "0"))
}

/// What the kubelet runs and where.
#[derive(Clone, Default)]
pub struct Config {
    /// A container's `command[0]` to the local program that stands in for it.
    pub programs: BTreeMap<String, PathBuf>,
    pub overrides: BTreeMap<String, Override>,
    /// Only pods in these namespaces run (None: every namespace).
    pub namespaces: Option<BTreeSet<String>>,
    /// Logs, kubeconfigs and each process's `HOME`.
    pub dir: PathBuf,
    /// The API server and its CA, for the pods' kubeconfigs.
    pub server: String,
    pub ca_pem: String,
    pub report: Option<Report>,
}

/// The workspace binaries in `bin_dir` standing in for each of [`TIDELOCK_COMMANDS`]; fails
/// naming a missing one.
pub fn tidelock_programs(bin_dir: &Path) -> Result<BTreeMap<String, PathBuf>, Error> {
    TIDELOCK_COMMANDS
        .iter()
        .map(|command| {
            let path = bin_dir.join(command);
            match path.is_file() {
                true => Ok(((*command).to_owned(), path)),
                false => Err(Error::ProgramMissing { path }),
            }
        })
        .collect()
}

impl Config {
    /// Tidelock's pods on this machine: `programs` ([`tidelock_programs`]) stand in for the
    /// image, a worker loads `model`, a worker that asks for GPUs runs the simulator; every
    /// namespace, state under `dir`.
    pub fn tidelock(
        control_plane: &crate::ControlPlane,
        programs: BTreeMap<String, PathBuf>,
        model: &Path,
        dir: PathBuf,
    ) -> Config {
        let worker = Override {
            set: vec![("--model".into(), model.display().to_string())],
            append: Vec::new(),
            append_without_gpu: vec!["--engine".into(), "sim".into()],
        };
        Config {
            programs,
            overrides: BTreeMap::from([("tidelock-worker".to_owned(), worker)]),
            namespaces: None,
            dir,
            server: control_plane.server().to_owned(),
            ca_pem: control_plane.ca_pem().to_owned(),
            report: None,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("programs", &self.programs)
            .field("overrides", &self.overrides)
            .field("namespaces", &self.namespaces)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// `(namespace, pod name)`.
type PodKey = (String, String);

/// What a pod's task is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    /// Keep running (the initial value).
    No,
    /// The pod is gone: SIGTERM, its grace period, SIGKILL.
    Stop,
    /// The machine is gone: SIGKILL now, nothing restarts it, the pod object stays.
    Crash,
}

/// One pod this kubelet runs.
#[derive(Debug)]
struct Run {
    uid: String,
    stop: watch::Sender<Halt>,
    task: JoinHandle<()>,
    pid: Arc<Mutex<Option<u32>>>,
}

#[derive(Debug, Default)]
struct State {
    /// `(namespace, pod, container port)` to the host port standing in for it.
    ports: BTreeMap<(String, String, i32), u16>,
    runs: BTreeMap<PodKey, Run>,
    /// Set by [`Kubelet::shutdown`]: no new run starts.
    closed: bool,
}

/// A handle on the running kubelet (cheap to clone, usable from any thread).
#[derive(Debug, Clone)]
pub struct Kubelet {
    state: Arc<Mutex<State>>,
    task: Arc<JoinHandle<()>>,
}

struct Ctx {
    client: Client,
    config: Arc<Config>,
    state: Arc<Mutex<State>>,
    net: Net,
}

/// Loopback addresses standing in for the pods' network (see the module doc).
#[derive(Debug)]
struct Net {
    state: Arc<Mutex<State>>,
    dns: Regex,
    any_address: Regex,
}

impl Kubelet {
    /// Starts watching scheduled pods with `client` (an identity allowed to read pods,
    /// Secrets and ConfigMaps, create service-account tokens and patch pod status).
    pub fn start(client: Client, config: Config) -> Kubelet {
        let config = Arc::new(config);
        let state = Arc::new(Mutex::new(State::default()));
        let ctx = Arc::new(Ctx {
            client,
            config,
            state: state.clone(),
            net: Net::new(state.clone()),
        });
        let task = tokio::spawn(watch_pods(ctx));
        Kubelet {
            state,
            task: Arc::new(task),
        }
    }

    /// The host port standing in for `port` of the pod, once it was allocated (the pod
    /// started, or a peer named it).
    pub fn port(&self, namespace: &str, pod: &str, port: i32) -> Option<u16> {
        let state = self.state.lock().expect("kubelet state");
        state
            .ports
            .get(&(namespace.to_owned(), pod.to_owned(), port))
            .copied()
    }

    /// The process id of the pod's running process.
    pub fn pid(&self, namespace: &str, pod: &str) -> Option<u32> {
        let state = self.state.lock().expect("kubelet state");
        let run = state.runs.get(&(namespace.to_owned(), pod.to_owned()))?;
        *run.pid.lock().expect("pid")
    }

    /// The pods it runs now, `(namespace, name)`.
    pub fn running(&self) -> Vec<(String, String)> {
        let state = self.state.lock().expect("kubelet state");
        state
            .runs
            .iter()
            .filter(|(_, r)| !r.task.is_finished())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Kills the pod's process as a machine failure would: SIGKILL, no restart, the pod object
    /// left as it is (Running, until someone deletes it). Returns whether it ran.
    pub fn crash(&self, namespace: &str, pod: &str) -> bool {
        let state = self.state.lock().expect("kubelet state");
        match state.runs.get(&(namespace.to_owned(), pod.to_owned())) {
            Some(run) => run.stop.send(Halt::Crash).is_ok(),
            None => false,
        }
    }

    /// Stops watching; every process it runs is stopped (all at once, each with its grace
    /// period).
    pub async fn shutdown(&self) {
        self.task.abort();
        let runs: Vec<Run> = {
            let mut state = self.state.lock().expect("kubelet state");
            state.closed = true;
            std::mem::take(&mut state.runs).into_values().collect()
        };
        for run in &runs {
            let _ = run.stop.send(Halt::Stop);
        }
        for run in runs {
            let _ = run.task.await;
        }
    }
}

fn report(ctx: &Ctx, line: &str) {
    match &ctx.config.report {
        Some(r) => r(line),
        None => tracing::info!("{line}"),
    }
}

/// The local program for a pod, if this kubelet runs it.
fn program_of<'a>(config: &'a Config, pod: &Pod) -> Option<(&'a PathBuf, Container)> {
    if let Some(namespaces) = &config.namespaces
        && !namespaces.contains(&pod.namespace().unwrap_or_default())
    {
        return None;
    }
    let container = pod.spec.as_ref()?.containers.first()?.clone();
    let command = container.command.as_ref()?.first()?;
    config.programs.get(command).map(|p| (p, container))
}

async fn watch_pods(ctx: Arc<Ctx>) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields("spec.nodeName!=");
    let mut events = watcher::watcher(pods, config).default_backoff().boxed();
    // A re-list (after a dropped watch) sends no Delete for pods that went meanwhile: the runs
    // whose pods it did not list are stopped when it ends.
    let mut listed: Option<BTreeSet<String>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(pod)) => on_pod(&ctx, pod),
            Ok(Event::InitApply(pod)) => {
                if let (Some(seen), Some(uid)) = (listed.as_mut(), pod.uid()) {
                    seen.insert(uid);
                }
                on_pod(&ctx, pod);
            }
            Ok(Event::Delete(pod)) => stop_run(&ctx, &key(&pod), pod.uid().as_deref()),
            Ok(Event::Init) => listed = Some(BTreeSet::new()),
            Ok(Event::InitDone) => {
                if let Some(seen) = listed.take() {
                    let state = ctx.state.lock().expect("kubelet state");
                    for run in state.runs.values().filter(|r| !seen.contains(&r.uid)) {
                        let _ = run.stop.send(Halt::Stop);
                    }
                }
            }
            Err(e) => tracing::warn!("kubelet: watching pods: {e}"),
        }
    }
}

fn key(pod: &Pod) -> PodKey {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

fn stop_run(ctx: &Ctx, key: &PodKey, uid: Option<&str>) {
    let state = ctx.state.lock().expect("kubelet state");
    if let Some(run) = state.runs.get(key)
        && uid.is_none_or(|u| u == run.uid)
    {
        let _ = run.stop.send(Halt::Stop);
    }
}

fn on_pod(ctx: &Arc<Ctx>, pod: Pod) {
    let Some(_) = program_of(&ctx.config, &pod) else {
        return;
    };
    let key = key(&pod);
    let uid = pod.uid().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        stop_run(ctx, &key, Some(&uid));
        return;
    }
    let mut state = ctx.state.lock().expect("kubelet state");
    if state.closed {
        return;
    }
    let previous = match state.runs.get(&key) {
        Some(run) if run.uid == uid => return,
        Some(_) => {
            // The same name, a new pod (a StatefulSet's replacement): the old one stops first.
            let old = state.runs.remove(&key).expect("present");
            let _ = old.stop.send(Halt::Stop);
            Some(old.task)
        }
        None => None,
    };
    let (stop, stopped) = watch::channel(Halt::No);
    let pid = Arc::new(Mutex::new(None));
    let task = tokio::spawn(run_pod(ctx.clone(), pod, stopped, previous, pid.clone()));
    state.runs.insert(
        key,
        Run {
            uid,
            stop,
            task,
            pid,
        },
    );
}

/// Expands `$(NAME)` from `env` as Kubernetes does: `$$` is a literal `$`, unknown names stay.
pub fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
            && let Some(value) = env.get(&inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

impl Net {
    fn new(state: Arc<Mutex<State>>) -> Net {
        const LABEL: &str = "[a-z0-9](?:[-a-z0-9]*[a-z0-9])?";
        Net {
            state,
            dns: Regex::new(&format!(
                r"\b({LABEL})\.({LABEL})\.({LABEL})\.svc(?:\.cluster\.local)?:(\d+)\b"
            ))
            .expect("a valid pattern"),
            any_address: Regex::new(r"\b0\.0\.0\.0:(\d+)\b").expect("a valid pattern"),
        }
    }

    /// The host port for a pod's container port (allocated once).
    fn host_port(&self, namespace: &str, pod: &str, port: i32) -> Result<u16, Error> {
        let mut state = self.state.lock().expect("kubelet state");
        let key = (namespace.to_owned(), pod.to_owned(), port);
        if let Some(p) = state.ports.get(&key) {
            return Ok(*p);
        }
        // A port is released for its process to bind later: never hand out one twice.
        let p = loop {
            let p = process::free_port()?;
            if !state.ports.values().any(|&taken| taken == p) {
                break p;
            }
        };
        state.ports.insert(key, p);
        Ok(p)
    }

    /// Rewrites the addresses in one argument or value (see the module doc).
    fn rewrite(&self, namespace: &str, pod: &str, text: &str) -> Result<String, Error> {
        let mut failed = None;
        let text = self
            .any_address
            .replace_all(text, |c: &regex::Captures<'_>| {
                let port: i32 = c[1].parse().unwrap_or(0);
                match self.host_port(namespace, pod, port) {
                    Ok(p) => format!("127.0.0.1:{p}"),
                    Err(e) => {
                        failed = Some(e);
                        c[0].to_owned()
                    }
                }
            });
        let text = self.dns.replace_all(&text, |c: &regex::Captures<'_>| {
            let port: i32 = c[4].parse().unwrap_or(0);
            match self.host_port(&c[3], &c[1], port) {
                Ok(p) => format!("127.0.0.1:{p}"),
                Err(e) => {
                    failed = Some(e);
                    c[0].to_owned()
                }
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(text.into_owned()),
        }
    }
}

/// A `fieldRef` path's value for `pod`.
fn field(pod: &Pod, path: &str) -> Option<String> {
    let quoted = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")
            .map(str::to_owned)
    };
    if let Some(k) = quoted("metadata.labels") {
        return pod.labels().get(&k).cloned();
    }
    if let Some(k) = quoted("metadata.annotations") {
        return pod.annotations().get(&k).cloned();
    }
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    match path {
        "metadata.name" => Some(pod.name_any()),
        "metadata.namespace" => pod.namespace(),
        "metadata.uid" => pod.uid(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" | "status.hostIP" => Some(
            status
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or("127.0.0.1".into()),
        ),
        _ => None,
    }
}

/// Why a pod's process cannot be prepared: the message of its `CreateContainerConfigError`
/// waiting state, as a kubelet would say it.
#[derive(Debug, thiserror::Error)]
enum PodConfigError {
    /// The pod's first container runs none of [`TIDELOCK_COMMANDS`].
    #[error("not ours")]
    NotOurs,
    #[error("the pod has no spec")]
    NoSpec,
    /// A read from the API server failed.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// Writing the pod's folder or kubeconfig failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A host port for an address could not be had.
    #[error(transparent)]
    Port(#[from] Error),
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    #[error("env {var}: unsupported fieldRef {path}")]
    UnsupportedFieldRef { var: String, path: String },
    #[error("env {var}: key {key} of secret \"{name}\" not found")]
    SecretKeyNotFound {
        var: String,
        key: String,
        name: String,
    },
    #[error("env {var}: key {key} of configmap \"{name}\" not found")]
    ConfigMapKeyNotFound {
        var: String,
        key: String,
        name: String,
    },
    #[error("env {var}: unsupported valueFrom")]
    UnsupportedValueFrom { var: String },
    #[error("token for service account {account}: {source}")]
    Token {
        account: String,
        #[source]
        source: kube::Error,
    },
    #[error("the TokenRequest has no status")]
    NoTokenStatus,
    #[error("readiness probe names an unknown port {0}")]
    UnknownProbePort(String),
}

/// A referenced value: `None` when it is absent and optional, an error when absent and required.
fn present(
    value: Option<String>,
    optional: Option<bool>,
    missing: impl FnOnce() -> PodConfigError,
) -> Result<Option<String>, PodConfigError> {
    match value {
        Some(v) => Ok(Some(v)),
        None if optional.unwrap_or(false) => Ok(None),
        None => Err(missing()),
    }
}

/// The container's environment, resolved against the pod and the API server.
async fn environment(
    ctx: &Ctx,
    pod: &Pod,
    container: &Container,
) -> Result<BTreeMap<String, String>, PodConfigError> {
    let namespace = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut env = BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.secret_ref {
            let optional = r.optional.unwrap_or(false);
            match secrets.get_opt(&r.name).await? {
                Some(s) => {
                    for (k, v) in s.data.unwrap_or_default() {
                        env.insert(format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into());
                    }
                }
                None if optional => {}
                None => return Err(PodConfigError::SecretNotFound(r.name.clone())),
            }
        }
        if let Some(r) = &from.config_map_ref {
            match maps.get_opt(&r.name).await? {
                Some(m) => {
                    for (k, v) in m.data.unwrap_or_default() {
                        env.insert(format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => return Err(PodConfigError::ConfigMapNotFound(r.name.clone())),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => Some(expand(v, &env)),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    Some(field(pod, &f.field_path).ok_or_else(|| {
                        PodConfigError::UnsupportedFieldRef {
                            var: var.name.clone(),
                            path: f.field_path.clone(),
                        }
                    })?)
                } else if let Some(s) = &from.secret_key_ref {
                    let secret = secrets.get_opt(&s.name).await?;
                    let value = secret
                        .and_then(|x| x.data)
                        .and_then(|d| d.get(&s.key).map(|v| String::from_utf8_lossy(&v.0).into()));
                    present(value, s.optional, || PodConfigError::SecretKeyNotFound {
                        var: var.name.clone(),
                        key: s.key.clone(),
                        name: s.name.clone(),
                    })?
                } else if let Some(c) = &from.config_map_key_ref {
                    let map = maps.get_opt(&c.name).await?;
                    let value = map
                        .and_then(|m| m.data)
                        .and_then(|d| d.get(&c.key).cloned());
                    present(value, c.optional, || PodConfigError::ConfigMapKeyNotFound {
                        var: var.name.clone(),
                        key: c.key.clone(),
                        name: c.name.clone(),
                    })?
                } else {
                    return Err(PodConfigError::UnsupportedValueFrom {
                        var: var.name.clone(),
                    });
                }
            }
            (None, None) => Some(String::new()),
        };
        if let Some(value) = value {
            env.insert(var.name.clone(), value);
        }
    }
    Ok(env)
}

/// A kubeconfig for the pod's service account (a bound token), unless the pod opts out.
async fn identity(ctx: &Ctx, pod: &Pod, dir: &Path) -> Result<Option<PathBuf>, PodConfigError> {
    let namespace = pod.namespace().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or(PodConfigError::NoSpec)?;
    let account_name = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    let mount = match spec.automount_service_account_token {
        Some(m) => m,
        None => accounts
            .get_opt(&account_name)
            .await?
            .and_then(|a| a.automount_service_account_token)
            .unwrap_or(true),
    };
    if !mount {
        return Ok(None);
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![crate::control_plane::SERVICE_ACCOUNT_ISSUER.to_owned()],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
            expiration_seconds: Some(24 * 3600),
        },
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request(&account_name, &PostParams::default(), &request)
        .await
        .map_err(|source| PodConfigError::Token {
            account: account_name.clone(),
            source,
        })?
        .status
        .ok_or(PodConfigError::NoTokenStatus)?
        .token;
    let user = format!("system:serviceaccount:{namespace}:{account_name}");
    let path = dir.join("kubeconfig");
    let text = pki::kubeconfig(&ctx.config.server, &ctx.config.ca_pem, &user, &token);
    std::fs::write(&path, text)?;
    Ok(Some(path))
}

/// Everything needed to start the pod's process, and its readiness probe's host port and path.
struct Prepared {
    spec: Spec,
    probe: Option<(u16, String)>,
    grace: Duration,
}

async fn prepare(ctx: &Ctx, pod: &Pod) -> Result<Prepared, PodConfigError> {
    let (program, container) = program_of(&ctx.config, pod).ok_or(PodConfigError::NotOurs)?;
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let dir = ctx.config.dir.join(format!("{namespace}_{name}"));
    std::fs::create_dir_all(&dir)?;
    let mut env = environment(ctx, pod, &container).await?;
    let command = container.command.clone().unwrap_or_default();
    let mut args: Vec<String> = command
        .iter()
        .skip(1)
        .chain(container.args.iter().flatten())
        .map(|a| expand(a, &env))
        .collect();
    let rewrite = |text: &str| ctx.net.rewrite(&namespace, &name, text);
    args = args.iter().map(|a| rewrite(a)).collect::<Result<_, _>>()?;
    for value in env.values_mut() {
        *value = rewrite(value)?;
    }
    // Volumes: a process here sees this machine's files, so an argument under the mount of an
    // emptyDir or a claim moves into the pod's own folder, as a mounted volume is the pod's own
    // (the folder is named after the pod, so a claim's outlives the pod's restarts, as a
    // StatefulSet's claim does). Two pods with the same spill path get two folders.
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    for mount in container.volume_mounts.iter().flatten() {
        let own = volumes.into_iter().flatten().any(|v| {
            v.name == mount.name && (v.empty_dir.is_some() || v.persistent_volume_claim.is_some())
        });
        if !own {
            continue;
        }
        let local = dir.join("volumes").join(&mount.name);
        let root = mount.mount_path.trim_end_matches('/');
        args = args
            .into_iter()
            .map(|a| match a.strip_prefix(root) {
                Some(rest) if !root.is_empty() && (rest.is_empty() || rest.starts_with('/')) => {
                    format!("{}{rest}", local.display())
                }
                _ => a,
            })
            .collect();
    }
    if let Some(o) = ctx.config.overrides.get(&command[0]) {
        for (flag, value) in &o.set {
            set_flag(&mut args, flag, value);
        }
        args.extend(o.append.iter().cloned());
        if wants_gpus(&container) {
            args.extend(o.append_without_gpu.iter().cloned());
        }
    }
    // Every declared port gets its host port now (a probe or a peer may name it).
    let mut named = BTreeMap::new();
    for port in container.ports.iter().flatten() {
        let host = ctx.net.host_port(&namespace, &name, port.container_port)?;
        if let Some(n) = &port.name {
            named.insert(n.clone(), host);
        }
    }
    let probe = match container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
    {
        Some(get) => {
            use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
            let port = match &get.port {
                IntOrString::Int(p) => ctx.net.host_port(&namespace, &name, *p)?,
                IntOrString::String(n) => *named
                    .get(n)
                    .ok_or_else(|| PodConfigError::UnknownProbePort(n.clone()))?,
            };
            Some((port, get.path.clone().unwrap_or_else(|| "/".into())))
        }
        None => None,
    };
    // The process runs on this machine, not in a container: a pod's variables must not steer
    // the dynamic loader.
    env.retain(|name, _| !name.starts_with("LD_"));
    if let Some(path) = identity(ctx, pod, &dir).await? {
        env.insert("KUBECONFIG".into(), path.display().to_string());
    }
    env.insert("HOME".into(), dir.display().to_string());
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
        .clamp(0, 10);
    Ok(Prepared {
        spec: Spec {
            name: format!("{namespace}_{name}"),
            program: program.clone(),
            args,
            env,
            clear_env: true,
            cwd: Some(dir),
        },
        probe,
        grace: Duration::from_secs(u64::try_from(grace).unwrap_or(10)),
    })
}

/// Sets `flag`'s value in `args` (`--flag v` or `--flag=v`), or appends `--flag value`.
fn set_flag(args: &mut Vec<String>, flag: &str, value: &str) {
    let with_eq = format!("{flag}=");
    for i in 0..args.len() {
        if args[i] == flag && i + 1 < args.len() {
            args[i + 1] = value.to_owned();
            return;
        }
        if args[i].starts_with(&with_eq) {
            args[i] = format!("{flag}={value}");
            return;
        }
    }
    args.extend([flag.to_owned(), value.to_owned()]);
}

/// The pod's status as this kubelet sees it.
fn status(pod: &Pod, state: &ContainerState, ready: bool, restarts: i32) -> serde_json::Value {
    let now = jiff_now();
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
        .unwrap_or_default();
    let bool_str = |b: bool| if b { "True" } else { "False" };
    let container_state = match state {
        ContainerState::Waiting(reason, message) => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        ContainerState::Running(since) => json!({"running": {"startedAt": since}}),
    };
    let inits: Vec<serde_json::Value> = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({"name": c.name, "image": c.image, "ready": true, "restartCount": 0,
                   "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                             "startedAt": now, "finishedAt": now}}})
        })
        .collect();
    json!({"status": {
        "phase": match state { ContainerState::Running(_) => "Running", _ => "Pending" },
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": bool_str(ready), "lastTransitionTime": now},
            {"type": "Ready", "status": bool_str(ready), "lastTransitionTime": now},
        ],
        "initContainerStatuses": inits,
        "containerStatuses": [{
            "name": container.name, "image": container.image, "imageID": "",
            "ready": ready, "started": matches!(state, ContainerState::Running(_)),
            "restartCount": restarts, "state": container_state,
        }],
    }})
}

/// An RFC 3339 timestamp of now, in whole seconds (as the API server writes them).
fn jiff_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

enum ContainerState {
    Waiting(&'static str, String),
    Running(String),
}

/// Writes the pod's status; whether it was written. The patch names the pod's uid, so a status
/// meant for one pod never lands on a replacement of the same name.
async fn patch_status(ctx: &Ctx, pod: &Pod, mut status: serde_json::Value) -> bool {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    status["metadata"] = json!({"uid": pod.uid()});
    match pods
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
    {
        Ok(_) => true,
        Err(e) => {
            // The pod may be gone already (its next state comes with the next event), or the
            // API server busy: the probe loop writes again.
            tracing::debug!("kubelet: status of {}: {e}", pod.name_any());
            false
        }
    }
}

/// Runs one pod until it is stopped: prepare, start, probe, restart on exit.
async fn run_pod(
    ctx: Arc<Ctx>,
    pod: Pod,
    mut stopped: watch::Receiver<Halt>,
    previous: Option<JoinHandle<()>>,
    pid: Arc<Mutex<Option<u32>>>,
) {
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let label = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    let mut restarts = 0;
    let mut backoff = Duration::from_secs(1);
    loop {
        if *stopped.borrow() != Halt::No {
            return;
        }
        // Preparing talks to the API server: a stop must not wait for it.
        let prepared = tokio::select! {
            prepared = prepare(&ctx, &pod) => prepared,
            _ = stopped.changed() => return,
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                report(&ctx, &format!("pod {label}: cannot start: {e}"));
                let waiting = ContainerState::Waiting("CreateContainerConfigError", e.to_string());
                let pause = Duration::from_secs(2);
                if hold(&ctx, &pod, &mut stopped, waiting, restarts, pause).await {
                    return;
                }
                continue;
            }
        };
        if *stopped.borrow() != Halt::No {
            return;
        }
        let mut process = match Process::spawn(&prepared.spec, &ctx.config.dir) {
            Ok(p) => p,
            Err(e) => {
                report(&ctx, &format!("pod {label}: cannot start: {e}"));
                let waiting = ContainerState::Waiting("RunContainerError", e.to_string());
                if hold(&ctx, &pod, &mut stopped, waiting, restarts, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        *pid.lock().expect("pid") = process.id();
        let started = jiff_now();
        let running = ContainerState::Running(started);
        let listening = prepared
            .probe
            .as_ref()
            .map(|(port, _)| format!(" on 127.0.0.1:{port}"))
            .unwrap_or_default();
        report(
            &ctx,
            &format!(
                "pod {label}: {}{listening} (pid {})",
                prepared.spec.program.display(),
                process.id().unwrap_or(0)
            ),
        );
        // What the API server last accepted (None: nothing yet), so a failed write is retried.
        let mut written: Option<bool> = None;
        let mut ready = false;
        loop {
            tokio::select! {
                _ = stopped.changed() => {
                    if *stopped.borrow() == Halt::Crash {
                        process.kill_now();
                        let _ = process.wait().await;
                    } else {
                        process.stop(prepared.grace).await;
                    }
                    *pid.lock().expect("pid") = None;
                    return;
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if process.exited().is_some() {
                break;
            }
            let now_ready = match &prepared.probe {
                Some((port, path)) => crate::http_get(*port, path)
                    .await
                    .is_some_and(|(code, _)| (200..400).contains(&code)),
                None => true,
            };
            if now_ready && !ready {
                backoff = Duration::from_secs(1);
            }
            ready = now_ready;
            if written != Some(ready)
                && patch_status(&ctx, &pod, status(&pod, &running, ready, restarts)).await
            {
                written = Some(ready);
            }
        }
        *pid.lock().expect("pid") = None;
        let code = process.exited().map(|s| s.to_string()).unwrap_or_default();
        restarts += 1;
        report(
            &ctx,
            &format!("pod {label}: exited ({code}); restarting in {backoff:?}"),
        );
        let waiting = ContainerState::Waiting("CrashLoopBackOff", format!("exited ({code})"));
        if hold(&ctx, &pod, &mut stopped, waiting, restarts, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The longest wait before a pod's process is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Reports a container that does not run, then waits `pause` unless the pod is stopped first;
/// whether it was.
async fn hold(
    ctx: &Ctx,
    pod: &Pod,
    stopped: &mut watch::Receiver<Halt>,
    waiting: ContainerState,
    restarts: i32,
    pause: Duration,
) -> bool {
    let _ = patch_status(ctx, pod, status(pod, &waiting, false, restarts)).await;
    tokio::time::timeout(pause, stopped.changed()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes() {
        let env = BTreeMap::from([("POD_NAME".to_owned(), "m-g0-1".to_owned())]);
        assert_eq!(expand("http://$(POD_NAME).svc", &env), "http://m-g0-1.svc");
        assert_eq!(
            expand("$$(POD_NAME) $(NOPE) $", &env),
            "$(POD_NAME) $(NOPE) $"
        );
    }

    #[test]
    fn addresses_become_loopback_ports_that_peers_share() {
        let net = Net::new(Arc::default());
        let own = net
            .rewrite("ml", "m-g0-0", "--listen 0.0.0.0:8000")
            .unwrap();
        let port = net.host_port("ml", "m-g0-0", 8000).unwrap();
        assert_eq!(own, format!("--listen 127.0.0.1:{port}"));
        // A peer's DNS name, before that peer started, and again after: one port.
        let peers = net
            .rewrite(
                "ml",
                "m-g0-0",
                "http://m-g0-1.m-workers.ml.svc:8000,http://m-g0-1.m-workers.ml.svc.cluster.local:8000",
            )
            .unwrap();
        let peer = net.host_port("ml", "m-g0-1", 8000).unwrap();
        assert_ne!(peer, port);
        assert_eq!(
            peers,
            format!("http://127.0.0.1:{peer},http://127.0.0.1:{peer}")
        );
        // A Service's name (two labels) and other text stay as they are.
        let untouched = "http://etcd.ml.svc:2379 and 10.0.0.0:1";
        assert_eq!(net.rewrite("ml", "x", untouched).unwrap(), untouched);
    }

    #[test]
    fn flags_are_replaced_in_both_spellings_or_added() {
        let mut args: Vec<String> = ["--model", "/models/x", "--listen=0.0.0.0:1"]
            .map(String::from)
            .to_vec();
        set_flag(&mut args, "--model", "/tmp/m.gguf");
        set_flag(&mut args, "--listen", "127.0.0.1:2");
        set_flag(&mut args, "--engine", "sim");
        assert_eq!(
            args,
            [
                "--model",
                "/tmp/m.gguf",
                "--listen=127.0.0.1:2",
                "--engine",
                "sim"
            ]
        );
    }

    #[test]
    fn field_paths_of_the_downward_api() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "m-g0-2", "namespace": "ml", "uid": "u",
                         "labels": {"apps.kubernetes.io/pod-index": "2"}},
            "spec": {"containers": [], "nodeName": "cpu-0"},
        }))
        .unwrap();
        assert_eq!(
            field(&pod, "metadata.labels['apps.kubernetes.io/pod-index']").as_deref(),
            Some("2")
        );
        assert_eq!(field(&pod, "metadata.namespace").as_deref(), Some("ml"));
        assert_eq!(field(&pod, "spec.nodeName").as_deref(), Some("cpu-0"));
        assert_eq!(field(&pod, "metadata.labels['absent']"), None);
        assert_eq!(field(&pod, "status.nothing"), None);
    }

    #[test]
    fn the_stages_leave_exactly_our_commands_to_us() {
        let stages = include_str!("kwok-stages.yaml");
        for command in TIDELOCK_COMMANDS {
            assert!(stages.contains(&format!("- '{command}'")), "{command}");
        }
    }
}
