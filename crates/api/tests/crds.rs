//! The CRDs as a cluster would see them: `crds/` is exactly what the types generate; the schema
//! is structural, documented everywhere, defaulted, with printer columns and a status
//! subresource; and the CEL rules accept good objects and refuse bad ones (evaluated here with
//! kube's client-side CEL validator, the same rules the API server runs).

use std::path::Path;

use kube::CustomResourceExt;
use serde_json::{Value, json};
use tidelock_api::{Model, Tenant};

#[test]
fn crds_folder_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds");
    for (name, yaml) in tidelock_api::crd::all_yaml() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            committed == yaml,
            "crds/{name} is stale: run `cargo run -p tidelock-cli -- crds --write crds` and commit it"
        );
    }
}

/// Every property of every object schema under `path` has a description (`kubectl explain`).
fn assert_documented(schema: &Value, path: &str) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            let top =
                ["apiVersion", "kind", "metadata"].contains(&name.as_str()) && path.is_empty();
            assert!(
                top || prop
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.is_empty()),
                "{here} has no description"
            );
            assert_documented(prop, &here);
        }
    }
    if let Some(items) = schema.get("items") {
        assert_documented(items, &format!("{path}[]"));
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        assert!(
            schema.get(key).is_none() || path.contains("tolerations"),
            "{path}: {key} is not structural"
        );
    }
}

fn version(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(&crd.spec.versions[0]).unwrap()
}

#[test]
fn model_crd_is_documented_defaulted_and_printable() {
    let crd = Model::crd();
    assert_eq!(crd.spec.group, "tidelock.dev");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["tlm".to_owned()][..])
    );
    let v = version(&crd);
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    let columns: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Served", "Ready", "Updated", "Context", "Age"]);
    let schema = &v["schema"]["openAPIV3Schema"];
    assert_documented(schema, "");
    let spec = &schema["properties"]["spec"]["properties"];
    assert_eq!(spec["replicas"]["default"], 1);
    assert_eq!(spec["shards"]["minimum"], 1.0);
    assert_eq!(spec["kvCache"]["properties"]["blockTokens"]["default"], 64);
    assert_eq!(
        spec["kvCache"]["properties"]["dtype"]["enum"],
        json!(["f32", "f16", "bf16"])
    );
    assert_eq!(spec["terminationGracePeriodSeconds"]["default"], 300);
    assert_eq!(spec["startupTimeoutSeconds"]["default"], 1800);
    let scale = &v["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    let autoscaling = &spec["autoscaling"]["properties"];
    assert_eq!(autoscaling["scaleDownStabilizationSeconds"]["default"], 300);
    assert_eq!(autoscaling["targetKvUtilizationPercent"]["maximum"], 100.0);
    assert_eq!(
        spec["rollout"]["properties"]["maxUnavailableGroups"]["default"],
        1
    );
    assert_eq!(
        spec["rollout"]["properties"]["maxUnavailableGroups"]["minimum"],
        1.0
    );
}

#[test]
fn tenant_crd_is_documented_and_printable() {
    let crd = Tenant::crd();
    let v = version(&crd);
    assert!(v["subresources"]["status"].is_object());
    let schema = &v["schema"]["openAPIV3Schema"];
    assert_documented(schema, "");
    assert_eq!(
        schema["properties"]["spec"]["properties"]["apiKeySecrets"]["minItems"],
        1
    );
    assert_eq!(
        schema["properties"]["spec"]["properties"]["apiKeySecrets"]["items"]["properties"]["key"]["default"],
        "apiKey"
    );
}

fn model(spec: Value) -> Model {
    serde_json::from_value(json!({
        "apiVersion": "tidelock.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "smollm", "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

fn refusal(m: &Model) -> String {
    match Model::validate_cel(m) {
        Ok(()) => panic!("accepted: {:?}", m.spec),
        Err(e) => format!("{e:?}"),
    }
}

#[test]
fn a_minimal_model_takes_every_default_and_passes() {
    let m =
        model(json!({"source": {"huggingFace": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}}}));
    assert_eq!((m.spec.replicas, m.spec.shards), (1, 1));
    assert_eq!(m.spec.kv_cache.block_tokens, 64);
    assert_eq!(
        m.spec.source.hugging_face.as_ref().unwrap().revision,
        "main"
    );
    assert!(m.spec.placement.spread);
    Model::validate_cel(&m).unwrap();
    let full = model(json!({
        "source": {"pvc": {"claimName": "models", "path": "smollm2/model.gguf"}},
        "servedName": "org/smollm2", "replicas": 2, "shards": 4, "maxContextTokens": 1048576,
        "kvCache": {"blockTokens": 128, "memoryPerWorker": "40Gi", "dtype": "bf16"},
        "resources": {"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "cpu": "8", "memory": "64Gi"},
        "modelCache": {"size": "50Gi"},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
    }));
    Model::validate_cel(&full).unwrap();
    let spilled = model(json!({
        "source": {"pvc": {"claimName": "models", "path": "smollm2/model.gguf"}},
        "kvCache": {"spill": {"size": "200Gi", "storageClass": "fast"}},
    }));
    Model::validate_cel(&spilled).unwrap();
}

#[test]
fn cel_rules_refuse_bad_models_with_their_message() {
    let hf = json!({"huggingFace": {"repo": "a/b"}});
    let cases = [
        (
            json!({"source": {}}),
            "exactly one of huggingFace, pvc or url",
        ),
        (
            json!({"source": {"huggingFace": {"repo": "a/b"}, "url": {"url": "https://x/m.gguf"}}}),
            "exactly one",
        ),
        (
            json!({"source": hf, "shards": 2, "kvCache": {"spill": {"size": "100Gi"}}}),
            "kvCache.spill needs shards: 1",
        ),
        (
            json!({"source": {"huggingFace": {"repo": "no-slash"}}}),
            "owner/name",
        ),
        (
            json!({"source": {"pvc": {"claimName": "c", "path": "../etc/passwd"}}}),
            "without '..'",
        ),
        (
            json!({"source": {"url": {"url": "ftp://x", "sha256": "abc"}}}),
            "http(s) URL",
        ),
        (
            json!({"source": hf, "kvCache": {"blockTokens": 48}}),
            "power of two",
        ),
        (
            json!({"source": hf, "kvCache": {"memoryPerWorker": "lots"}}),
            "positive quantity",
        ),
        (
            json!({"source": hf, "kvCache": {"memoryPerWorker": "0"}}),
            "positive quantity",
        ),
        (
            json!({"source": hf, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),
            "minReplicas must not exceed",
        ),
        (
            json!({"source": hf, "servedName": "a/b/c"}),
            "at most one '/'",
        ),
    ];
    for (spec, needle) in cases {
        let why = refusal(&model(spec.clone()));
        assert!(why.contains(needle), "{spec}: expected {needle:?} in {why}");
    }
}

/// The chart's examples (charts/tidelock/examples) pass the CEL rules the API server runs. Their
/// structural schema, unknown fields included, is checked by tests/chart.rs.
#[test]
fn the_charts_examples_pass_the_cel_rules() {
    use serde::Deserialize;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/tidelock/examples");
    let mut checked = Vec::new();
    for file in [
        "model-cpu.yaml",
        "model-gpu.yaml",
        "model-sharded.yaml",
        "tenant.yaml",
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap();
            let name = format!("{file}: {}/{}", value["kind"], value["metadata"]["name"]);
            match value["kind"].as_str() {
                Some("Model") => {
                    let m: Model = serde_json::from_value(value).unwrap();
                    Model::validate_cel(&m).unwrap_or_else(|e| panic!("{name}: {e:?}"));
                }
                Some("Tenant") => {
                    let t: Tenant = serde_json::from_value(value).unwrap();
                    Tenant::validate_cel(&t).unwrap_or_else(|e| panic!("{name}: {e:?}"));
                }
                _ => continue,
            }
            checked.push(name);
        }
    }
    assert_eq!(checked.len(), 4, "three Models and a Tenant: {checked:?}");
}
