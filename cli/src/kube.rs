//! `tidelock kube up`: a real Kubernetes control plane on this machine to try the Helm chart and
//! the operator on, as a platform team would on their cluster (`tidelock-localkube` has the
//! parts; `./scripts/kube` builds them and runs this). The pods of Tidelock's own binaries run
//! as local processes (CPU workers on the real model, GPU workers simulated); other pods are
//! kwok's fakes. Everything stops on Ctrl-C or SIGTERM, leaving no process, port or kubeconfig.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tidelock_localkube::kubelet::{self, Kubelet};
use tidelock_localkube::{ControlPlane, Options, Tools, tools};

use crate::config::KubeUpArgs;

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tidelock kube up: {message}");
    ExitCode::FAILURE
}

pub(crate) async fn up(args: KubeUpArgs) -> ExitCode {
    let k8s_bin = args
        .k8s_bin
        .clone()
        .unwrap_or_else(|| Tools::dir_in(&args.cache_dir()));
    let tools = match Tools::at(k8s_bin) {
        Ok(tools) => tools,
        Err(e) => {
            return fail(format!(
                "{e}\n  ./scripts/kube builds it and starts this command"
            ));
        }
    };
    let bin_dir = match args.bin_dir.clone() {
        Some(dir) => dir,
        None => match std::env::current_exe() {
            Ok(exe) => exe.parent().map(Path::to_path_buf).unwrap_or_default(),
            Err(e) => return fail(format!("cannot find my own folder: {e}")),
        },
    };
    let programs = match kubelet::tidelock_programs(&bin_dir) {
        Ok(p) => p,
        Err(e) => return fail(format!("{e} or pass --bin-dir")),
    };
    let model = args.model_path();
    if !model.is_file() {
        return fail(format!(
            "the model {} is missing (./scripts/kube fetches the default one; or pass --model)",
            model.display()
        ));
    }
    let kubeconfig = args
        .kubeconfig
        .clone()
        .unwrap_or_else(|| args.cache_dir().join("kube").join("kubeconfig"));

    eprintln!(
        "==> Starting Kubernetes {} on loopback",
        tools::kubernetes_version()
    );
    let report: tidelock_localkube::control_plane::Report =
        Arc::new(|line: &str| eprintln!("    {line}"));
    let cp = match ControlPlane::start(
        tools.clone(),
        Options {
            state_etcd: true,
            report: Some(report.clone()),
            ..Options::default()
        },
    )
    .await
    {
        Ok(cp) => cp,
        Err(e) => return fail(e),
    };
    let result = serve(&cp, &tools, programs, &model, &kubeconfig, report).await;
    eprintln!("==> Stopping");
    let _ = std::fs::remove_file(&kubeconfig);
    cp.stop().await;
    eprintln!("    stopped every process");
    result
}

async fn serve(
    cp: &ControlPlane,
    tools: &Tools,
    programs: BTreeMap<String, PathBuf>,
    model: &Path,
    kubeconfig: &Path,
    report: tidelock_localkube::control_plane::Report,
) -> ExitCode {
    if let Some(dir) = kubeconfig.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    // The admin's token: readable by this user alone.
    let written = std::fs::copy(cp.kubeconfig(), kubeconfig).and_then(|_| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(kubeconfig, std::fs::Permissions::from_mode(0o600))
    });
    if let Err(e) = written {
        return fail(format!("cannot write {}: {e}", kubeconfig.display()));
    }
    // Watched from now, before "Press Ctrl-C" is printed.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut interrupt, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => return fail(format!("cannot watch for signals: {e}")),
    };
    let client = match cp.client().await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let kubelet = Kubelet::start(
        client,
        kubelet::Config {
            report: Some(report),
            ..kubelet::Config::tidelock(cp, programs, model, cp.dir().join("kubelet"))
        },
    );
    let etcd = cp.state_etcd_url().unwrap_or_default();
    let nodes: Vec<String> = cp
        .nodes()
        .iter()
        .map(|n| match &n.gpus {
            Some((count, product)) => {
                format!("{} ({count} x {product}, tainted nvidia.com/gpu)", n.name)
            }
            None => format!("{} ({} CPUs)", n.name, n.cpu),
        })
        .collect();
    println!(
        r#"
Kubernetes {version} is up: {server}
  nodes          {nodes}
  state etcd     {etcd} (Tidelock's cluster state; point releases at it)
  stand-in pods  tidelock-operator, -router and -worker pods run here as processes with their
                 pods' environment and service-account tokens; CPU workers load {model},
                 GPU workers run the simulator. Logs: {logs}

In another terminal, from the repository:

  export KUBECONFIG={kubeconfig} PATH={bin}:$PATH
  helm install tidelock charts/tidelock -n tidelock --create-namespace \
      --set 'etcd.external.endpoints[0]={etcd}' --wait
  KEY="sk-$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
  kubectl create secret generic team-a-key --from-literal=apiKey="$KEY"
  kubectl apply -f charts/tidelock/examples/model-cpu.yaml -f charts/tidelock/examples/tenant.yaml
  kubectl get models -w          # Ready 2/2 once both workers loaded the model

The router's address is printed below when its pod starts (tidelock-router on 127.0.0.1:PORT);
talk to it with `target/release/tidelock chat --url http://127.0.0.1:PORT/v1 --api-key "$KEY"
--model smollm2`.

Press Ctrl-C to stop."#,
        version = tools::kubernetes_version(),
        server = cp.server(),
        nodes = nodes.join(", "),
        model = model.display(),
        logs = cp.dir().join("kubelet").display(),
        kubeconfig = kubeconfig.display(),
        bin = tools.dir().display(),
    );
    let code = tokio::select! {
        _ = interrupt.recv() => ExitCode::SUCCESS,
        _ = term.recv() => ExitCode::SUCCESS,
    };
    kubelet.shutdown().await;
    code
}
