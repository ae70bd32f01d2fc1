//! The worker pods the operator creates can start: for each example Model of the chart, every
//! container's command (the worker, and the init container's `tidelock fetch`) is a binary of
//! this workspace (and of the images), every `--flag` it
//! passes is one that binary accepts, and every `TIDELOCK_*` variable it sets is one the binary
//! reads (the shard identity included).
//! No cluster runs here, so this is how a renamed worker flag is caught before pods crash-loop.

use std::collections::BTreeSet;
use std::process::Command;

use tidelock_api::Model;
use tidelock_e2e::{binary, image_binaries, repo_root};
use tidelock_operator::builders::{Defaults, desired};

/// `--help` of a container's command (a binary and its subcommands, e.g. `tidelock fetch hf`).
fn help(command: &[String]) -> String {
    let out = Command::new(binary(&command[0]))
        .args(&command[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{command:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_operators_worker_containers_run_binaries_with_flags_they_accept() {
    let defaults = Defaults {
        worker_image: "tidelock/tidelock:0.1.0".into(),
        etcd_endpoints: vec![
            "https://tidelock-etcd-0.tidelock-etcd-peers.tidelock.svc:2379".into(),
        ],
        etcd_prefix: "/tidelock/".into(),
        // The chart's default: etcd over TLS, so the workers get the TLS variables too.
        etcd_client_secret: Some(tidelock_operator::builders::SecretRef {
            namespace: "tidelock".into(),
            name: "tidelock-etcd-client".into(),
        }),
        cluster_token_secret: tidelock_operator::builders::SecretRef {
            namespace: "tidelock".into(),
            name: "tidelock-cluster-token".into(),
        },
        network_policy: None,
        // A collector too, so that every variable the operator can give a worker is checked.
        log: tidelock_service::LogArgs {
            otlp_endpoint: Some("http://otel-collector.monitoring:4317".into()),
            ..tidelock_service::LogArgs::default()
        },
    };
    let in_image = image_binaries("Dockerfile");
    let examples = repo_root().join("charts/tidelock/examples");
    let mut checked = 0;
    for name in ["model-cpu.yaml", "model-gpu.yaml", "model-sharded.yaml"] {
        let text = std::fs::read_to_string(examples.join(name)).unwrap();
        let mut model: Model = serde_yaml_ng::from_str(&text).unwrap();
        model
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into());
        model.metadata.uid = Some("uid-1".into());
        let d = desired(&model, &defaults).unwrap();
        for group in &d.groups {
            let pod = group.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            // The weights' download (init) and the worker.
            for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
                let command = c.command.as_ref().unwrap_or_else(|| {
                    panic!(
                        "{name}: container {} names no command (the image has no entrypoint)",
                        c.name
                    )
                });
                let program = &command[0];
                assert!(
                    in_image.contains(program),
                    "{name}: {program} is not in the image"
                );
                let help = help(command);
                for flag in c.args.iter().flatten().filter(|a| a.starts_with("--")) {
                    assert!(
                        help.contains(&format!("{flag} "))
                            || help.contains(&format!("{flag}="))
                            || help.contains(&format!("{flag}\n")),
                        "{name}: `{program}` has no {flag}:\n{help}"
                    );
                    checked += 1;
                }
                let read: BTreeSet<&str> = help
                    .split("[env: ")
                    .skip(1)
                    .filter_map(|s| s.split(['=', ']']).next())
                    .collect();
                for env in c
                    .env
                    .iter()
                    .flatten()
                    .map(|e| e.name.as_str())
                    .filter(|n| n.starts_with("TIDELOCK_"))
                {
                    assert!(
                        read.contains(env),
                        "{name}: `{program}` does not read {env} (it reads {read:?})"
                    );
                    checked += 1;
                }
            }
        }
    }
    eprintln!("{checked} worker flags and variables checked against `tidelock-worker --help`");
    assert!(checked >= 20, "only {checked} checked");
}
