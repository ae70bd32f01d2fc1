//! A table of Model specs to the objects they must produce.

use serde_json::{Value, json};

use super::*;

fn defaults() -> Defaults {
    Defaults {
        worker_image: "tidelock/worker:0.1.0".into(),
        etcd_endpoints: vec![
            "http://etcd-0.etcd:2379".into(),
            "http://etcd-1.etcd:2379".into(),
        ],
        etcd_prefix: "/tidelock/".into(),
        etcd_client_secret: None,
        cluster_token_secret: SecretRef {
            namespace: "tidelock-system".into(),
            name: "tidelock-cluster-token".into(),
        },
        network_policy: Some(PolicyPeers {
            router_namespace: "tidelock-system".into(),
            router_labels: BTreeMap::from([(
                "app.kubernetes.io/component".to_owned(),
                "router".to_owned(),
            )]),
            operator_labels: [(
                "app.kubernetes.io/component".to_owned(),
                "operator".to_owned(),
            )]
            .into(),
            monitoring_namespace_labels: [(
                "kubernetes.io/metadata.name".to_owned(),
                "monitoring".to_owned(),
            )]
            .into(),
        }),
        log: tidelock_service::LogArgs::default(),
    }
}

fn model(spec: Value) -> Model {
    serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "smol", "namespace": "ml", "uid": "1234-5678"},
        "spec": spec,
    }))
    .unwrap()
}

fn hf() -> Value {
    json!({"huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc123"}})
}

fn pod(set: &StatefulSet) -> &PodSpec {
    set.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn worker(set: &StatefulSet) -> &Container {
    &pod(set).containers[0]
}

fn arg<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    let args = c.args.as_ref().unwrap();
    args.iter()
        .position(|a| a == flag)
        .map(|i| args[i + 1].as_str())
}

#[test]
fn one_statefulset_per_group_with_shards_pods_owned_by_the_model() {
    let d = desired(
        &model(json!({"source": hf(), "replicas": 3, "shards": 4})),
        &defaults(),
    )
    .unwrap();
    let names: Vec<&str> = d
        .groups
        .iter()
        .map(|g| g.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(names, ["smol-g0", "smol-g1", "smol-g2"]);
    for (i, g) in d.groups.iter().enumerate() {
        let spec = g.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(4));
        assert_eq!(spec.service_name.as_deref(), Some("smol-workers"));
        let owner = &g.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("Model", "1234-5678", Some(true))
        );
        let group = format!("smol-g{i}");
        assert_eq!(g.metadata.labels.as_ref().unwrap()[labels::GROUP], group);
        assert_eq!(
            spec.selector.match_labels.as_ref().unwrap()[labels::GROUP],
            group
        );
        assert_eq!(arg(worker(g), "--group"), Some(group.as_str()));
        // Shard 0 reaches the group's workers by their pod names, in shard order.
        let peers = worker(g)
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "TIDELOCK_SHARD_PEERS")
            .and_then(|e| e.value.clone());
        let want: Vec<String> = (0..4)
            .map(|k| format!("http://{group}-{k}.smol-workers.ml.svc:8000"))
            .collect();
        assert_eq!(peers, Some(want.join(",")));
    }
    // Scaling is whole groups: 1 replica, one StatefulSet.
    let d = desired(
        &model(json!({"source": hf(), "replicas": 1, "shards": 4})),
        &defaults(),
    )
    .unwrap();
    assert_eq!(d.groups.len(), 1);
    let d = desired(&model(json!({"source": hf(), "replicas": 0})), &defaults()).unwrap();
    assert!(d.groups.is_empty());
    // One worker per group: no peers to name.
    let d = desired(&model(json!({"source": hf()})), &defaults()).unwrap();
    assert!(
        worker(&d.groups[0])
            .env
            .as_ref()
            .unwrap()
            .iter()
            .all(|e| e.name != "TIDELOCK_SHARD_PEERS")
    );
}

/// `spec.sampling` reaches the worker as its default-sampling flags, only the fields set.
#[test]
fn the_models_sampling_defaults_become_worker_flags() {
    let d = desired(
        &model(json!({"source": hf(), "sampling": {"temperature": 0.2, "topP": 0.9}})),
        &defaults(),
    )
    .unwrap();
    let w = worker(&d.groups[0]);
    assert_eq!(arg(w, "--default-temperature"), Some("0.2"));
    assert_eq!(arg(w, "--default-top-p"), Some("0.9"));
    assert_eq!(arg(w, "--default-top-k"), None);
    let d = desired(
        &model(json!({"source": hf(), "sampling": {"topK": 40}})),
        &defaults(),
    )
    .unwrap();
    let w = worker(&d.groups[0]);
    assert_eq!(arg(w, "--default-top-k"), Some("40"));
    assert_eq!(arg(w, "--default-temperature"), None);
    let d = desired(&model(json!({"source": hf()})), &defaults()).unwrap();
    assert_eq!(arg(worker(&d.groups[0]), "--default-top-p"), None);
}

#[test]
fn the_worker_gets_its_identity_etcd_and_model_from_the_spec() {
    let d = desired(
        &model(
            json!({"source": hf(), "servedName": "smollm2", "maxContextTokens": 8192,
                      "kvCache": {"blockTokens": 128, "memoryPerWorker": "40Gi"}}),
        ),
        &defaults(),
    )
    .unwrap();
    let g = &d.groups[0];
    let w = worker(g);
    assert_eq!(w.image.as_deref(), Some("tidelock/worker:0.1.0"));
    assert_eq!(
        w.command.as_deref(),
        Some(&["tidelock-worker".to_owned()][..])
    );
    assert_eq!(arg(w, "--served-model-name"), Some("smollm2"));
    assert_eq!(arg(w, "--kv-cache"), Some("40Gi"));
    assert_eq!(arg(w, "--block-tokens"), Some("128"));
    assert_eq!(arg(w, "--max-context"), Some("8192"));
    assert_eq!(arg(w, "--worker-id"), Some("$(POD_NAME)"));
    assert_eq!(
        arg(w, "--advertise-url"),
        Some("http://$(POD_NAME).smol-workers.ml.svc:8000")
    );
    assert_eq!(
        arg(w, "--model"),
        Some("/models/hf/HuggingFaceTB/SmolLM2-135M-Instruct/abc123")
    );
    let env: BTreeMap<&str, &EnvVar> = w
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    assert_eq!(
        env["TIDELOCK_ETCD_ENDPOINTS"].value.as_deref(),
        Some("http://etcd-0.etcd:2379,http://etcd-1.etcd:2379")
    );
    assert_eq!(
        env["TIDELOCK_SHARD"]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    // The operator's own log format; no span export when the operator has no OTLP endpoint.
    assert_eq!(env["TIDELOCK_LOG_FORMAT"].value.as_deref(), Some("text"));
    assert!(!env.contains_key("TIDELOCK_OTLP_ENDPOINT"));
    // The weights are fetched by an init container into the models volume (an emptyDir here).
    // `tidelock fetch` from the worker's own image: the source's fields as arguments, no shell.
    let init = &pod(g).init_containers.as_ref().unwrap()[0];
    assert_eq!(init.image, worker(g).image);
    assert_eq!(
        init.command.as_deref(),
        Some(&["tidelock".to_owned(), "fetch".into(), "hf".into()][..])
    );
    assert_eq!(
        init.args.as_deref().unwrap(),
        [
            "--repo",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--revision",
            "abc123",
            "--dest",
            "/models/hf/HuggingFaceTB/SmolLM2-135M-Instruct/abc123"
        ]
    );
    assert!(init.env.is_none(), "no token unless the Model names one");
    let volumes = pod(g).volumes.as_ref().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v.name == "models" && v.empty_dir.is_some())
    );
    assert!(g.spec.as_ref().unwrap().volume_claim_templates.is_none());
    // Probes and the drain.
    assert_eq!(
        w.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        w.lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap()
            .sleep
            .as_ref()
            .unwrap()
            .seconds,
        5
    );
    assert_eq!(pod(g).termination_grace_period_seconds, Some(300));

    // With JSON lines and a collector, every worker of every group logs and exports the same.
    let traced = Defaults {
        log: tidelock_service::LogArgs {
            log_format: tidelock_service::LogFormat::Json,
            otlp_endpoint: Some("http://otel-collector.monitoring:4317".into()),
            ..tidelock_service::LogArgs::default()
        },
        ..defaults()
    };
    let d = desired(&model(json!({"source": hf(), "replicas": 2})), &traced).unwrap();
    assert_eq!(d.groups.len(), 2);
    for g in &d.groups {
        let env: BTreeMap<&str, Option<&str>> = worker(g)
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(env["TIDELOCK_LOG_FORMAT"], Some("json"));
        assert_eq!(
            env["TIDELOCK_OTLP_ENDPOINT"],
            Some("http://otel-collector.monitoring:4317")
        );
    }
}

#[test]
fn etcd_tls_mounts_the_models_copy_of_the_client_secret() {
    let spec = json!({"source": hf(), "replicas": 2});
    // Without a client Secret: no TLS variables, no volume.
    let plain = desired(&model(spec.clone()), &defaults()).unwrap();
    let w = worker(&plain.groups[0]);
    assert!(
        !w.env
            .iter()
            .flatten()
            .any(|e| e.name.starts_with("TIDELOCK_ETCD_") && e.name.ends_with("_FILE"))
    );
    assert!(
        !pod(&plain.groups[0])
            .volumes
            .iter()
            .flatten()
            .any(|v| v.secret.is_some())
    );

    let tls = Defaults {
        etcd_endpoints: vec!["https://etcd-0.etcd:2379".into()],
        etcd_client_secret: Some(SecretRef {
            namespace: "tidelock-system".into(),
            name: "tidelock-etcd-client".into(),
        }),
        ..defaults()
    };
    let d = desired(&model(spec), &tls).unwrap();
    for g in &d.groups {
        let w = worker(g);
        let env: BTreeMap<&str, Option<&str>> = w
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(
            env["TIDELOCK_ETCD_CA_FILE"],
            Some("/etc/tidelock/etcd-tls/ca.crt")
        );
        assert_eq!(
            env["TIDELOCK_ETCD_CERT_FILE"],
            Some("/etc/tidelock/etcd-tls/tls.crt")
        );
        assert_eq!(
            env["TIDELOCK_ETCD_KEY_FILE"],
            Some("/etc/tidelock/etcd-tls/tls.key")
        );
        assert_eq!(
            env["TIDELOCK_ETCD_ENDPOINTS"],
            Some("https://etcd-0.etcd:2379")
        );
        let mount = w
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "etcd-tls")
            .expect("the TLS mount");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (ETCD_TLS_DIR, Some(true))
        );
        // The copy in the Model's namespace (pods mount Secrets of their own namespace only).
        let volume = pod(g)
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "etcd-tls")
            .expect("the TLS volume");
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("smol-etcd-client")
        );
    }
    assert_eq!(etcd_client_secret("smol"), "smol-etcd-client");
}

/// The credential comes from the Model's copy of the Secret; each group's NetworkPolicy admits
/// its own group and the routers on the HTTP port, the monitoring namespace on the metrics port,
/// and nobody else.
#[test]
fn workers_get_the_credential_and_each_group_a_network_policy() {
    let d = desired(
        &model(json!({"source": hf(), "replicas": 2, "shards": 2})),
        &defaults(),
    )
    .unwrap();
    let w = worker(&d.groups[1]);
    let token = w
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "TIDELOCK_CLUSTER_TOKEN")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .unwrap();
    assert_eq!(
        (token.name.as_str(), token.key.as_str()),
        ("smol-cluster-token", "token")
    );
    assert_eq!(arg(w, "--metrics-listen"), Some("0.0.0.0:9100"));
    let ports: Vec<i32> = w
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(ports, [8000, 9100]);

    assert_eq!(d.policies.len(), 2);
    let policy = serde_json::to_value(&d.policies[1]).unwrap();
    assert_eq!(policy["metadata"]["name"], "smol-g1");
    assert_eq!(policy["metadata"]["ownerReferences"][0]["uid"], "1234-5678");
    let spec = &policy["spec"];
    let group = json!({"tidelock.dev/model": "smol", "tidelock.dev/group": "smol-g1"});
    assert_eq!(spec["podSelector"]["matchLabels"], group);
    assert_eq!(spec["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        spec["ingress"],
        json!([
            // Any group of the Model: its shard RPC, and KV pulls and handoffs between groups.
            {"ports": [{"port": 8000, "protocol": "TCP"}], "from": [
                {"podSelector": {"matchLabels": {"tidelock.dev/model": "smol"}}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tidelock-system"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/component": "router"}}},
                // The operator reads the load reports it autoscales on.
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tidelock-system"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}},
            ]},
            {"ports": [{"port": 9100, "protocol": "TCP"}], "from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            ]},
        ])
    );
    let off = Defaults {
        network_policy: None,
        ..defaults()
    };
    assert!(
        desired(&model(json!({"source": hf()})), &off)
            .unwrap()
            .policies
            .is_empty()
    );
}

#[test]
fn gpus_become_requests_affinity_and_a_toleration() {
    let d = desired(
        &model(json!({"source": hf(),
            "resources": {"gpus": 2, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "cpu": "8", "memory": "64Gi"},
            "placement": {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]}})),
        &defaults(),
    )
    .unwrap();
    let p = pod(&d.groups[0]);
    let r = worker(&d.groups[0]).resources.as_ref().unwrap();
    assert_eq!(
        r.limits.as_ref().unwrap()["nvidia.com/gpu"],
        Quantity("2".into())
    );
    assert_eq!(
        r.limits.as_ref().unwrap()["memory"],
        Quantity("64Gi".into())
    );
    assert_eq!(r.requests.as_ref().unwrap()["cpu"], Quantity("8".into()));
    let term = &p
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms[0];
    let req = &term.match_expressions.as_ref().unwrap()[0];
    assert_eq!(
        (req.key.as_str(), req.operator.as_str()),
        ("nvidia.com/gpu.product", "In")
    );
    assert_eq!(
        req.values.as_deref(),
        Some(&["NVIDIA-H100-80GB-HBM3".to_owned()][..])
    );
    let keys: Vec<&str> = p
        .tolerations
        .as_ref()
        .unwrap()
        .iter()
        .map(|t| t.key.as_deref().unwrap())
        .collect();
    assert_eq!(keys, ["dedicated", "nvidia.com/gpu"]);
    assert_eq!(p.node_selector.as_ref().unwrap()["pool"], "gpu");
    let spread = &p.topology_spread_constraints.as_ref().unwrap()[0];
    assert_eq!(spread.topology_key, "kubernetes.io/hostname");

    // A CPU model: no GPU limit, toleration or affinity; no spread when turned off.
    let d = desired(
        &model(json!({"source": hf(), "placement": {"spread": false}})),
        &defaults(),
    )
    .unwrap();
    let p = pod(&d.groups[0]);
    assert!(
        p.tolerations.is_none() && p.affinity.is_none() && p.topology_spread_constraints.is_none()
    );
    assert!(
        worker(&d.groups[0])
            .resources
            .as_ref()
            .unwrap()
            .limits
            .is_none()
    );
}

#[test]
fn pvc_and_url_sources_and_a_persistent_model_cache() {
    let d = desired(
        &model(
            json!({"source": {"pvc": {"claimName": "weights", "path": "smol/model.gguf"}},
                      "modelCache": {"size": "50Gi", "storageClass": "fast"}}),
        ),
        &defaults(),
    )
    .unwrap();
    let g = &d.groups[0];
    assert_eq!(arg(worker(g), "--model"), Some("/source/smol/model.gguf"));
    assert!(
        pod(g).init_containers.is_none(),
        "a PVC source needs no download"
    );
    let source = pod(g)
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "source")
        .unwrap();
    assert_eq!(
        source.persistent_volume_claim.as_ref().unwrap().claim_name,
        "weights"
    );
    let claim = &g
        .spec
        .as_ref()
        .unwrap()
        .volume_claim_templates
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        claim.spec.as_ref().unwrap().storage_class_name.as_deref(),
        Some("fast")
    );
    assert_eq!(
        claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"],
        Quantity("50Gi".into())
    );

    let sum = "a".repeat(64);
    let d = desired(
        &model(json!({"source": {"url": {"url": "https://example.org/m.gguf", "sha256": sum}}})),
        &defaults(),
    )
    .unwrap();
    let g = &d.groups[0];
    let path = arg(worker(g), "--model").unwrap().to_owned();
    assert!(
        path.starts_with("/models/url/") && path.ends_with(".gguf"),
        "{path}"
    );
    // Another URL, another file: a kept model cache never serves the old one.
    let other = desired(
        &model(json!({"source": {"url": {"url": "https://example.org/other.gguf"}}})),
        &defaults(),
    )
    .unwrap();
    assert_ne!(
        arg(worker(&other.groups[0]), "--model"),
        Some(path.as_str())
    );
    let init = &pod(g).init_containers.as_ref().unwrap()[0];
    assert_eq!(
        init.args.as_deref().unwrap(),
        [
            "--url",
            "https://example.org/m.gguf",
            "--sha256",
            &"a".repeat(64),
            "--dest",
            &path
        ]
    );
}

#[test]
fn a_source_reaches_the_fetch_step_as_arguments_and_a_token_from_a_secret() {
    // Shell metacharacters in a revision stay one argument: nothing interprets them.
    let revision = "v1'; touch /tmp/owned; echo '";
    let d = desired(
        &model(json!({"source": {"huggingFace": {
            "repo": "meta-llama/Llama-3.1-8B-Instruct", "revision": revision,
            "tokenSecret": {"name": "hf-token"}}}})),
        &defaults(),
    )
    .unwrap();
    let init = &pod(&d.groups[0]).init_containers.as_ref().unwrap()[0];
    let args = init.args.as_deref().unwrap();
    assert_eq!(args[3], revision);
    assert!(init.command.as_ref().unwrap().iter().all(|c| c != "sh"));
    let token = init
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "HF_TOKEN")
        .unwrap();
    let from = token
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (from.name.as_str(), from.key.as_str()),
        ("hf-token", "token")
    );
    assert!(
        token.value.is_none(),
        "the token itself is never in the pod spec"
    );
}

#[test]
fn the_service_is_headless_and_the_budget_allows_one_worker_down() {
    let d = desired(&model(json!({"source": hf(), "replicas": 2})), &defaults()).unwrap();
    let s = d.service.spec.as_ref().unwrap();
    assert_eq!(d.service.metadata.name.as_deref(), Some("smol-workers"));
    assert_eq!(s.cluster_ip.as_deref(), Some("None"));
    assert_eq!(s.selector.as_ref().unwrap()[labels::MODEL], "smol");
    let b = d.budget.spec.as_ref().unwrap();
    assert_eq!(b.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        b.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow"),
        "workers that do not serve never block a drain"
    );
    assert_eq!(
        b.selector.as_ref().unwrap().match_labels.as_ref().unwrap()[labels::MODEL],
        "smol"
    );
}

#[test]
fn a_model_without_identity_or_source_is_an_error() {
    let mut m = model(json!({"source": hf()}));
    m.metadata.uid = None;
    assert_eq!(desired(&m, &defaults()), Err(BuildError::Missing("uid")));
    let m = model(json!({"source": {}}));
    assert_eq!(desired(&m, &defaults()), Err(BuildError::Source));
}

#[test]
fn pods_meet_pod_security_restricted_and_request_resources() {
    for source in [
        hf(),
        json!({"url": {"url": "https://models.example/m.gguf"}}),
    ] {
        let d = desired(&model(json!({"source": source})), &defaults()).unwrap();
        let pod = pod(&d.groups[0]);
        let security = pod.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert!(security.run_as_user.is_some_and(|u| u > 0));
        assert_eq!(
            security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let containers = pod.init_containers.iter().flatten().chain(&pod.containers);
        let mut seen = 0;
        for c in containers {
            seen += 1;
            let s = c.security_context.as_ref().unwrap();
            assert_eq!(s.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(s.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(
                s.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_owned()][..]),
                "{}",
                c.name
            );
            assert!(s.privileged.is_none() && s.run_as_user.is_none());
            let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
            assert!(
                requests.contains_key("cpu") && requests.contains_key("memory"),
                "{}: {requests:?}",
                c.name
            );
            // A read-only root: scratch space is a mounted volume.
            let mounts: Vec<&str> = c
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.as_str())
                .collect();
            assert!(mounts.contains(&"/tmp"), "{}: {mounts:?}", c.name);
        }
        assert_eq!(seen, 2, "the fetch step and the worker");
    }
}

#[test]
fn a_cpu_workers_default_memory_request_holds_its_kv_cache() {
    let memory = |spec: Value| {
        let d = desired(&model(spec), &defaults()).unwrap();
        let resources = worker(&d.groups[0]).resources.clone().unwrap();
        (
            resources.requests.unwrap()["memory"].0.clone(),
            resources.limits.and_then(|l| l.get("memory").cloned()),
        )
    };
    // 8Gi of KV cache by default plus 1Gi for the rest; no limit unless the Model sets one.
    assert_eq!(memory(json!({"source": hf()})), ("9216Mi".into(), None));
    assert_eq!(
        memory(json!({"source": hf(), "kvCache": {"memoryPerWorker": "512Mi"}})).0,
        "1536Mi"
    );
    // On GPUs the KV cache is device memory.
    assert_eq!(
        memory(json!({"source": hf(), "resources": {"gpus": 1}})).0,
        "1024Mi"
    );
    assert_eq!(
        memory(json!({"source": hf(), "resources": {"memory": "64Gi"}})),
        ("64Gi".into(), Some(Quantity("64Gi".into())))
    );
}

#[test]
fn a_long_load_is_covered_by_the_startup_probe_not_killed_by_liveness() {
    let probes = |spec: Value| {
        let d = desired(&model(spec), &defaults()).unwrap();
        let w = worker(&d.groups[0]).clone();
        (w.startup_probe.unwrap(), w.liveness_probe.unwrap())
    };
    let (startup, liveness) = probes(json!({"source": hf()}));
    let budget = |p: &Probe| p.period_seconds.unwrap() * p.failure_threshold.unwrap();
    // 30 minutes by default to load, on /readyz (200 once loaded and registered); a hung
    // load is restarted after it. Liveness is /healthz, which a loading worker answers.
    assert_eq!(budget(&startup), 1800);
    assert_eq!(
        startup.http_get.as_ref().unwrap().path.as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        liveness.http_get.as_ref().unwrap().path.as_deref(),
        Some("/healthz")
    );
    // Kubernetes runs liveness only after the startup probe passed: no initial delay needed.
    assert_eq!(liveness.initial_delay_seconds, None);
    let (startup, _) = probes(json!({"source": hf(), "startupTimeoutSeconds": 7205}));
    assert_eq!(budget(&startup), 7210, "rounded up to whole periods");
}

#[test]
fn the_spec_hash_follows_the_spec_and_nothing_else() {
    let hash = |spec: Value| {
        let d = desired(&model(spec), &defaults()).unwrap();
        d.groups
            .iter()
            .map(|g| g.annotations()[tidelock_api::annotations::SPEC_HASH].clone())
            .collect::<Vec<_>>()
    };
    let base = hash(json!({"source": hf(), "replicas": 2}));
    assert_eq!(base, hash(json!({"source": hf(), "replicas": 2})));
    assert_ne!(base[0], base[1], "each group's spec names its group");
    let changed =
        hash(json!({"source": hf(), "replicas": 2, "kvCache": {"memoryPerWorker": "2Gi"}}));
    assert!(base.iter().zip(&changed).all(|(a, b)| a != b));
    // More groups leave the existing groups' specs as they were.
    assert_eq!(hash(json!({"source": hf(), "replicas": 3}))[..2], base[..]);
    // How many groups may be down at once is the rollout's business, not the pods'.
    assert_eq!(
        hash(json!({"source": hf(), "replicas": 2, "rollout": {"maxUnavailableGroups": 2}})),
        base
    );
}

#[test]
fn group_indices_keep_the_groups_that_exist() {
    assert_eq!(group_indices([], 3, &[]), [0, 1, 2]);
    // The autoscaler removed g1: the others keep their names.
    assert_eq!(group_indices([0, 1, 2], 2, &[1]), [0, 2]);
    assert_eq!(group_indices([0, 2], 2, &[1]), [0, 2]);
    // Marked groups go only while there are too many.
    assert_eq!(group_indices([0, 1, 2], 2, &[0, 2]), [1, 2]);
    assert_eq!(group_indices([0, 1, 2], 3, &[0, 2]), [0, 1, 2]);
    // Scaling up again fills the hole first.
    assert_eq!(group_indices([0, 2], 3, &[1]), [0, 1, 2]);
    assert_eq!(group_indices([0, 2], 4, &[]), [0, 1, 2, 3]);
    // Scaling down by hand drops the highest.
    assert_eq!(group_indices([0, 2, 5], 2, &[]), [0, 2]);
    assert_eq!(group_index("smol", "smol-g12"), Some(12));
    assert_eq!(group_index("smol", "smol-long-g1"), None);
    let d = desired_groups(
        &model(json!({"source": hf(), "replicas": 2})),
        &defaults(),
        &[0, 2],
    )
    .unwrap();
    let names: Vec<_> = d.groups.iter().map(|g| g.name_any()).collect();
    assert_eq!(names, ["smol-g0", "smol-g2"]);
    let policies: Vec<_> = d.policies.iter().map(|g| g.name_any()).collect();
    assert_eq!(policies, ["smol-g0", "smol-g2"]);
}

#[test]
fn model_cache_claims_follow_their_group_unless_retained() {
    let policy = |cache: Value| {
        let d = desired(
            &model(json!({"source": hf(), "modelCache": cache})),
            &defaults(),
        )
        .unwrap();
        d.groups[0]
            .spec
            .as_ref()
            .unwrap()
            .persistent_volume_claim_retention_policy
            .clone()
            .map(|p| (p.when_deleted.unwrap(), p.when_scaled.unwrap()))
    };
    assert_eq!(
        policy(json!({"size": "50Gi"})),
        Some(("Delete".into(), "Delete".into()))
    );
    assert_eq!(
        policy(json!({"size": "50Gi", "retain": true})),
        Some(("Retain".into(), "Retain".into()))
    );
    // No claims (an emptyDir): nothing to retain.
    assert_eq!(policy(json!({})), None);
}

#[test]
fn gpu_workers_compute_on_their_gpu_with_the_kv_dtype_asked() {
    let args = |spec: Value| -> Vec<String> {
        let d = desired(&model(spec), &defaults()).unwrap();
        worker(&d.groups[0]).args.clone().unwrap()
    };
    let after = |args: &[String], flag: &str| -> Option<String> {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).cloned()
    };
    // CPU, no dtype: the packed f32 kernels, nothing to say.
    let cpu = args(json!({"source": hf()}));
    for flag in ["--device", "--backend", "--kv-dtype"] {
        assert_eq!(after(&cpu, flag), None, "{flag}");
    }
    let cpu = args(json!({"source": hf(), "kvCache": {"dtype": "f32"}}));
    assert_eq!(after(&cpu, "--backend"), None);
    // CPU with a half-precision cache: the candle backend holds it.
    let half = args(json!({"source": hf(), "kvCache": {"dtype": "bf16"}}));
    assert_eq!(after(&half, "--backend").as_deref(), Some("candle"));
    assert_eq!(after(&half, "--kv-dtype").as_deref(), Some("bf16"));
    assert_eq!(after(&half, "--device"), None);
    // GPUs: the first GPU, f16 unless asked otherwise.
    let gpu = args(json!({"source": hf(), "resources": {"gpus": 1}}));
    assert_eq!(after(&gpu, "--device").as_deref(), Some("cuda:0"));
    assert_eq!(after(&gpu, "--kv-dtype").as_deref(), Some("f16"));
    let gpu = args(json!({"source": hf(), "resources": {"gpus": 1}, "kvCache": {"dtype": "f32"}}));
    assert_eq!(after(&gpu, "--kv-dtype").as_deref(), Some("f32"));
}

/// `kvCache.spill`: each worker's own claim (kept across restarts), mounted where `--kv-disk`
/// points, 90% of it for blocks; the grace period covers writing the whole cache there.
#[test]
fn a_spill_tier_is_a_claim_per_worker_wired_to_the_disk_tier() {
    let spilled = model(json!({
        "source": hf(),
        "kvCache": {"memoryPerWorker": "40Gi", "spill": {"size": "200Gi", "storageClass": "fast-nvme"}},
    }));
    let d = desired(&spilled, &defaults()).unwrap();
    let set = &d.groups[0];
    let w = worker(set);
    assert_eq!(arg(w, "--kv-disk"), Some(KV_SPILL_DIR));
    let size: u64 = arg(w, "--kv-disk-size").unwrap().parse().unwrap();
    assert_eq!(size, (200u64 << 30) / 10 * 9);
    let mount = w
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "kv-spill")
        .expect("the spill volume is mounted");
    assert_eq!(mount.mount_path, KV_SPILL_DIR);
    let claims = set
        .spec
        .as_ref()
        .unwrap()
        .volume_claim_templates
        .as_ref()
        .unwrap();
    let claim = claims
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("kv-spill"))
        .expect("a claim template: the volume follows its pod across restarts");
    let claim_spec = claim.spec.as_ref().unwrap();
    assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast-nvme"));
    assert_eq!(
        claim_spec
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "200Gi"
    );
    // 40 GiB at 100 MiB/s is 410 s of writing, plus 30: above the default 300.
    assert_eq!(pod(set).termination_grace_period_seconds, Some(440));
    // The worker's drain budget leaves the preStop pause and a margin to exit.
    assert_eq!(arg(w, "--drain-secs"), Some("430"));

    // Without a spill tier: no disk tier, no claim, the Model's grace period.
    let plain = desired(&model(json!({"source": hf()})), &defaults()).unwrap();
    let set = &plain.groups[0];
    assert_eq!(arg(worker(set), "--kv-disk"), None);
    assert!(set.spec.as_ref().unwrap().volume_claim_templates.is_none());
    assert_eq!(pod(set).termination_grace_period_seconds, Some(300));
    assert_eq!(arg(worker(set), "--drain-secs"), Some("290"));
}
