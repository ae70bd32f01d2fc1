//! The `Tenant` custom resource: who may call the router, with which keys, within which limits.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A tenant of the router: its API keys (in Secrets), the models it may use and its limits.
/// The operator writes the keys' hashes, never the keys, with the limits to the cluster state,
/// where every router picks them up.
// Each printer column repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tidelock.dev",
    version = "v1alpha1",
    kind = "Tenant",
    namespaced,
    status = "TenantStatus",
    shortname = "tlt",
    category = "tidelock",
    cel,
    doc = "A tenant of the router: API keys from Secrets, allowed models and limits.",
    printcolumn(
        name = "Keys",
        type_ = "integer",
        json_path = ".status.keys",
        description = "API keys loaded from the Secrets"
    ),
    printcolumn(
        name = "Models",
        type_ = "string",
        json_path = ".spec.allowedModels",
        description = "Models it may use (empty: all)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Secrets in the Tenant's namespace holding its API keys, one key per entry. Rotate a key by
    /// changing the Secret: the new key works and the old one stops within seconds.
    #[schemars(length(min = 1, max = 16))]
    pub api_key_secrets: Vec<SecretKeyRef>,
    /// Served model names the tenant may use; empty means every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_models: Vec<String>,
    /// The tenant's limits; each one absent means unlimited.
    #[serde(default)]
    pub limits: TenantLimitsSpec,
    /// Share cached KV blocks with other tenants that opt in too. Off by default: prefix-cache
    /// timing would otherwise let tenants learn each other's prompts.
    #[serde(default)]
    pub share_cache: bool,
}

/// One key of one Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key inside the Secret's data.
    #[serde(default = "default_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_key() -> String {
    "apiKey".into()
}

/// Per-tenant limits, enforced by every router replica.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TenantLimitsSpec {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<i64>,
    /// Prompt plus completion tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<i64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<i64>,
    /// Longest context (prompt plus completion) of one request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_context_tokens: Option<i64>,
}

/// What the operator observed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// `Ready` and `Degraded` (a Secret missing or malformed, named in the message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// API keys loaded and written (as hashes) to the cluster state.
    #[serde(default)]
    pub keys: i32,
}
