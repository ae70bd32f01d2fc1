//! A real Kubernetes control plane on loopback, as envtest gives Go operators and more: etcd,
//! kube-apiserver (RBAC, admission with Pod Security and ResourceQuota, the TokenRequest API,
//! an audit log of what service accounts do), kube-controller-manager (every default
//! controller: StatefulSets, ReplicaSets, garbage collection, service accounts, quota...),
//! kube-scheduler, and kwok keeping fake CPU and GPU nodes alive. Each start gets fresh
//! credentials, free ports and a temporary folder; [`ControlPlane::stop`] (or dropping it)
//! stops every process and removes the folder, and the processes die with the thread that
//! started them in any case (`process`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tempfile::TempDir;

use crate::Error;
use crate::nodes::FakeNode;
use crate::pki::{self, Identity, Pki};
use crate::process::{self, Process, Spec};
use crate::tools::{self, Tools};

/// kwok's stages (see the file's header).
const KWOK_STAGES: &str = include_str!("kwok-stages.yaml");

/// Audit: every request made by a service account outside kube-system (the operator's, the
/// router's...), at the Metadata level; nothing else.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    userGroups: ["system:serviceaccounts:kube-system"]
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"#;

/// How long each component gets to come up.
const STARTUP: Duration = Duration::from_secs(60);

/// The issuer (and audience) of service-account tokens, as in most clusters.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Progress lines for a person watching (`tidelock kube up`); tests pass none.
pub type Report = Arc<dyn Fn(&str) + Send + Sync>;

/// How to start.
#[derive(Clone, Default)]
pub struct Options {
    /// The fake nodes (default: [`FakeNode::defaults`]).
    pub nodes: Option<Vec<FakeNode>>,
    /// Where to keep state and logs (default: a new temporary folder, removed on stop).
    pub dir: Option<PathBuf>,
    /// Also start a second etcd for Tidelock's own state (`tidelock kube up`: the chart's
    /// bundled etcd cannot run here, so releases point at this one).
    pub state_etcd: bool,
    pub report: Option<Report>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("nodes", &self.nodes)
            .field("dir", &self.dir)
            .field("state_etcd", &self.state_etcd)
            .finish_non_exhaustive()
    }
}

/// The running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    pki: Pki,
    server: String,
    etcd_url: String,
    state_etcd_url: Option<String>,
    tools: Tools,
    /// In start order; stopped in reverse.
    processes: Vec<Process>,
    nodes: Vec<FakeNode>,
    /// Removed on drop (None when the caller chose the folder). Last: fields drop in order, so
    /// the processes are killed before their folder goes.
    _temp: Option<TempDir>,
}

/// A client for the kubeconfig at `path`.
pub async fn client_for(path: &Path) -> Result<Client, Error> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Client::try_from(config).map_err(Error::Kube)
}

impl ControlPlane {
    /// Starts every component and waits until the API server is ready, the fake nodes are
    /// Ready and the controller-manager has made the `default` service account.
    pub async fn start(tools: Tools, options: Options) -> Result<ControlPlane, Error> {
        let report = |line: &str| {
            if let Some(r) = &options.report {
                r(line);
            }
        };
        let (temp, dir) = match &options.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                (None, dir.clone())
            }
            None => {
                sweep_stale();
                let temp = tempfile::Builder::new()
                    .prefix("tidelock-kube-")
                    .tempdir()
                    .map_err(|e| Error::io(Path::new("$TMPDIR"), e))?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let owner = dir.join("owner.pid");
        std::fs::write(&owner, std::process::id().to_string()).map_err(|e| Error::io(&owner, e))?;
        let pki = Pki::create(&dir.join("pki"))?;
        let etcd_port = process::free_port()?;
        let etcd_peer_port = process::free_port()?;
        let api_port = process::free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let server = format!("https://127.0.0.1:{api_port}");
        let nodes = options.nodes.clone().unwrap_or_else(FakeNode::defaults);
        let mut cp = ControlPlane {
            _temp: temp,
            dir: dir.clone(),
            pki,
            server,
            etcd_url,
            state_etcd_url: None,
            tools,
            processes: Vec::new(),
            nodes,
        };
        for who in Identity::ALL {
            let path = cp.kubeconfig_path(who);
            let text = pki::kubeconfig(&cp.server, &cp.pki.ca_pem, who.name(), cp.pki.token(who));
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }

        let etcd_version = tools::pinned("go.etcd.io/etcd/server/v3").unwrap_or("?");
        report(&format!("etcd {etcd_version} on {}", cp.etcd_url));
        cp.start_etcd("etcd", etcd_port, etcd_peer_port).await?;
        if options.state_etcd {
            let (client, peer) = (process::free_port()?, process::free_port()?);
            let url = format!("http://127.0.0.1:{client}");
            report(&format!(
                "etcd {etcd_version} on {url} for Tidelock's state"
            ));
            cp.start_etcd("tidelock-etcd", client, peer).await?;
            cp.state_etcd_url = Some(url);
        }

        report(&format!(
            "kube-apiserver {} on {}",
            tools::kubernetes_version(),
            cp.server
        ));
        let audit_policy = dir.join("audit-policy.yaml");
        std::fs::write(&audit_policy, AUDIT_POLICY).map_err(|e| Error::io(&audit_policy, e))?;
        let pki = &cp.pki;
        let apiserver = Spec {
            name: "kube-apiserver".into(),
            program: cp.tools.path("kube-apiserver"),
            args: vec![
                format!("--etcd-servers={}", cp.etcd_url),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                // The `kubernetes` Service cannot point at a loopback address; nothing in this
                // cluster reaches the API server through it.
                "--endpoint-reconciler-type=none".into(),
                format!("--tls-cert-file={}", pki.serving_cert.display()),
                format!("--tls-private-key-file={}", pki.serving_key.display()),
                format!("--client-ca-file={}", pki.ca_cert.display()),
                format!("--token-auth-file={}", pki.token_file.display()),
                "--authorization-mode=RBAC".into(),
                // The defaults, and OwnerReferencesPermissionEnforcement as hardened clusters (OpenShift)
                // run it: setting an owner that blocks deletion needs `update` on its finalizers.
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,ResourceQuota,DefaultStorageClass,DefaultTolerationSeconds,Priority,OwnerReferencesPermissionEnforcement".into(),
                format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
                format!("--api-audiences={SERVICE_ACCOUNT_ISSUER}"),
                format!("--service-account-key-file={}", pki.sa_public.display()),
                format!("--service-account-signing-key-file={}", pki.sa_private.display()),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                format!("--cert-dir={}", dir.join("pki/apiserver").display()),
                format!("--audit-policy-file={}", audit_policy.display()),
                format!("--audit-log-path={}", cp.audit_log().display()),
                "--profiling=false".into(),
            ],
            ..Spec::default()
        };
        cp.spawn(apiserver)?;
        let admin = cp.client().await?;
        cp.wait_ready(&admin).await?;

        let kubeconfig_flags = |who: Identity, cp: &ControlPlane| {
            let path = cp.kubeconfig_path(who).display().to_string();
            vec![
                format!("--kubeconfig={path}"),
                format!("--authentication-kubeconfig={path}"),
                format!("--authorization-kubeconfig={path}"),
                "--leader-elect=false".to_owned(),
                // No serving port: nothing scrapes them, and no port to collide.
                "--secure-port=0".to_owned(),
            ]
        };
        report("kube-controller-manager, kube-scheduler");
        let mut args = kubeconfig_flags(Identity::ControllerManager, &cp);
        args.extend([
            "--use-service-account-credentials=true".into(),
            format!(
                "--service-account-private-key-file={}",
                cp.pki.sa_private.display()
            ),
            format!("--root-ca-file={}", cp.pki.ca_cert.display()),
            "--cluster-name=tidelock-local".into(),
        ]);
        cp.spawn(Spec {
            name: "kube-controller-manager".into(),
            program: cp.tools.path("kube-controller-manager"),
            args,
            ..Spec::default()
        })?;
        cp.spawn(Spec {
            name: "kube-scheduler".into(),
            program: cp.tools.path("kube-scheduler"),
            args: kubeconfig_flags(Identity::Scheduler, &cp),
            ..Spec::default()
        })?;

        report(&format!(
            "kwok {} with {} fake nodes",
            tools::pinned("sigs.k8s.io/kwok").unwrap_or("?"),
            cp.nodes.len()
        ));
        let stages = dir.join("kwok.yaml");
        std::fs::write(&stages, KWOK_STAGES).map_err(|e| Error::io(&stages, e))?;
        cp.spawn(Spec {
            name: "kwok".into(),
            program: cp.tools.path("kwok"),
            args: vec![
                format!(
                    "--kubeconfig={}",
                    cp.kubeconfig_path(Identity::Kubelet).display()
                ),
                format!("--config={}", stages.display()),
                format!(
                    "--manage-nodes-with-annotation-selector={}={}",
                    crate::nodes::KWOK_ANNOTATION.0,
                    crate::nodes::KWOK_ANNOTATION.1
                ),
                "--node-lease-duration-seconds=40".into(),
                "--cidr=10.244.0.0/16".into(),
            ],
            // kwok reads ~/.kwok; keep it inside our folder.
            env: [("HOME".to_owned(), dir.display().to_string())].into(),
            ..Spec::default()
        })?;
        cp.add_nodes(&admin).await?;
        // The default storage class, whose claims kwok's volume stages bind to fake volumes.
        let class: StorageClass = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "kwok-volume",
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": "kwok.x-k8s.io/volume",
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }))
        .expect("a StorageClass");
        Api::<StorageClass>::all(admin.clone())
            .patch(
                "kwok-volume",
                &PatchParams::apply("tidelock-localkube").force(),
                &Patch::Apply(class),
            )
            .await
            .map_err(Error::Kube)?;
        // Pods need their namespace's `default` service account, which the controller-manager
        // creates: its presence says the controllers run.
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
        cp.watch_poll(
            "the controller-manager to create default/default",
            STARTUP,
            || {
                let accounts = accounts.clone();
                async move { accounts.get_opt("default").await.ok().flatten() }
            },
        )
        .await?;
        Ok(cp)
    }

    /// A single-member etcd named `name` (its data and log named after it), once it answers.
    async fn start_etcd(&mut self, name: &str, client: u16, peer: u16) -> Result<(), Error> {
        let url = format!("http://127.0.0.1:{client}");
        self.spawn(Spec {
            name: name.into(),
            program: self.tools.path("etcd"),
            args: vec![
                format!("--data-dir={}", self.dir.join(name).display()),
                format!("--listen-client-urls={url}"),
                format!("--advertise-client-urls={url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
                // A throwaway store: durability buys nothing and fsyncs cost seconds on CI disks.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            ..Spec::default()
        })?;
        self.wait_http(name, client, "/health", "true", Duration::from_secs(30))
            .await
    }

    fn spawn(&mut self, spec: Spec) -> Result<(), Error> {
        let process = Process::spawn(&spec, &self.dir.join("logs"))?;
        self.processes.push(process);
        Ok(())
    }

    /// Fails with the log of a component that exited.
    fn check_alive(&mut self) -> Result<(), Error> {
        for p in &mut self.processes {
            if let Some(status) = p.exited() {
                return Err(Error::Exited {
                    name: p.name.clone(),
                    status: status.to_string(),
                    log: p.log_tail(30),
                });
            }
        }
        Ok(())
    }

    /// [`wait_for`], failing at once when a component exited (with its log).
    async fn watch_poll<T, F>(
        &mut self,
        what: &str,
        limit: Duration,
        check: impl Fn() -> F,
    ) -> Result<T, Error>
    where
        F: Future<Output = Option<T>>,
    {
        poll_until(what, limit, || {
            let alive = self.check_alive();
            let next = check();
            async move {
                alive?;
                Ok(next.await)
            }
        })
        .await
    }

    /// Until `GET http://127.0.0.1:{port}{path}` answers 200 with `expect` in its body.
    async fn wait_http(
        &mut self,
        what: &str,
        port: u16,
        path: &str,
        expect: &str,
        limit: Duration,
    ) -> Result<(), Error> {
        let what = format!("{what} to answer {path}");
        self.watch_poll(&what, limit, || async move {
            let (status, body) = crate::http_get(port, path).await?;
            (status == 200 && body.contains(expect)).then_some(())
        })
        .await
    }

    async fn wait_ready(&mut self, client: &Client) -> Result<(), Error> {
        self.watch_poll("kube-apiserver /readyz", STARTUP, || async {
            let request = http::Request::get("/readyz").body(Vec::new()).ok()?;
            let text = client.request_text(request).await.ok()?;
            (text.trim() == "ok").then_some(())
        })
        .await
    }

    async fn add_nodes(&mut self, client: &Client) -> Result<(), Error> {
        let api: Api<Node> = Api::all(client.clone());
        let apply = PatchParams::apply("tidelock-localkube").force();
        for node in &self.nodes {
            api.patch(&node.name, &apply, &Patch::Apply(node.object()))
                .await
                .map_err(Error::Kube)?;
        }
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        self.watch_poll("kwok to make the fake nodes Ready", STARTUP, || {
            let api = api.clone();
            let names = names.clone();
            async move {
                for name in &names {
                    let node = api.get(name).await.ok()?;
                    let ready = node
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    if !ready {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA that signed the API server's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// The etcd for Tidelock's state, when [`Options::state_etcd`] asked for one.
    pub fn state_etcd_url(&self) -> Option<&str> {
        self.state_etcd_url.as_deref()
    }

    /// The admin kubeconfig (`system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig_path(Identity::Admin)
    }

    /// The kubeconfig of one of the control plane's identities.
    pub fn kubeconfig_path(&self, who: Identity) -> PathBuf {
        self.dir.join(format!("{}.kubeconfig", who.name()))
    }

    /// A client as the admin.
    pub async fn client(&self) -> Result<Client, Error> {
        client_for(&self.kubeconfig()).await
    }

    /// The audit log (JSON lines): every request of a service account outside kube-system.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("logs/audit.jsonl")
    }

    /// Where the components' logs are.
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// The state folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// The process ids of the components (etcd first).
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().filter_map(Process::id).collect()
    }

    pub fn nodes(&self) -> &[FakeNode] {
        &self.nodes
    }

    /// Stops every component, last started first (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(mut self) {
        while let Some(mut p) = self.processes.pop() {
            p.stop(Duration::from_secs(10)).await;
        }
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or fails naming `what` after `limit`.
pub async fn wait_for<T, F>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> Result<T, Error>
where
    F: Future<Output = Option<T>>,
{
    poll_until(what, limit, || {
        let next = check();
        async move { Ok(next.await) }
    })
    .await
}

/// [`wait_for`] whose check may fail the wait at once.
async fn poll_until<T, F>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> Result<T, Error>
where
    F: Future<Output = Result<Option<T>, Error>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                after: limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes the temporary folders of control planes whose process is gone (a test process
/// exits without dropping its shared control plane).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("tidelock-kube-"));
        let Ok(pid) = std::fs::read_to_string(path.join("owner.pid")) else {
            continue;
        };
        if is_ours && !Path::new("/proc").join(pid.trim()).exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}
