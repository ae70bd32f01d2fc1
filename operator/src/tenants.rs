//! A `Tenant` and its Secrets to the record routers read from `tenants/<tenant>`: key hashes
//! (never keys), allowed models, limits, cache sharing. Pure: the reconciler fetches the Secrets
//! and writes the record; this decides what the record is, or why there is none. A missing or
//! malformed Secret fails the whole record (and names the Secret), so a router never sees a
//! tenant with some of its keys.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use tidelock_api::{Tenant, reasons};
use tidelock_protocol::{KeyLayout, ModelName, TenantId, TenantLimits, TenantRecord};
use tidelock_state::{StateError, StateStore};

/// API keys shorter than this are refused: they are meant to be long random strings (the store
/// keeps an unsalted fast hash, which is only safe for such keys).
pub const MIN_KEY_CHARS: usize = 16;

/// Why a Tenant has no record (reported as a `Degraded` condition with [`TenantError::reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    #[error("Secret {namespace}/{name} does not exist")]
    SecretMissing { namespace: String, name: String },
    #[error("Secret {namespace}/{name}: {problem}")]
    SecretMalformed {
        namespace: String,
        name: String,
        problem: String,
    },
    #[error("{0}")]
    InvalidSpec(String),
}

impl TenantError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            TenantError::SecretMissing { .. } => reasons::SECRET_MISSING,
            TenantError::SecretMalformed { .. } => reasons::SECRET_MALFORMED,
            TenantError::InvalidSpec(_) => reasons::INVALID_SPEC,
        }
    }
}

/// The tenant's id in the cluster state: `<namespace>/<name>` (the key layout escapes the `/`).
pub fn tenant_id(tenant: &Tenant) -> Result<TenantId, TenantError> {
    let namespace = tenant.namespace().unwrap_or_default();
    TenantId::new(format!("{namespace}/{}", tenant.name_any()))
        .map_err(|e| TenantError::InvalidSpec(format!("tenant id: {e}")))
}

/// The record for `tenant`, with its keys read from `secrets` (by name, in its namespace).
pub fn tenant_record(
    tenant: &Tenant,
    secrets: &BTreeMap<String, Secret>,
) -> Result<TenantRecord, TenantError> {
    let namespace = tenant.namespace().unwrap_or_default();
    let mut key_hashes = Vec::new();
    for reference in &tenant.spec.api_key_secrets {
        let malformed = |problem: String| TenantError::SecretMalformed {
            namespace: namespace.clone(),
            name: reference.name.clone(),
            problem,
        };
        let secret = secrets
            .get(&reference.name)
            .ok_or_else(|| TenantError::SecretMissing {
                namespace: namespace.clone(),
                name: reference.name.clone(),
            })?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&reference.key))
            .map(|b| b.0.clone())
            .ok_or_else(|| malformed(format!("has no key `{}`", reference.key)))?;
        let key = String::from_utf8(bytes)
            .map_err(|_| malformed(format!("`{}` is not UTF-8 text", reference.key)))?;
        let key = key.trim();
        if key.chars().count() < MIN_KEY_CHARS {
            return Err(malformed(format!(
                "`{}` holds a key shorter than {MIN_KEY_CHARS} characters",
                reference.key
            )));
        }
        let hash = TenantRecord::hash_api_key(key);
        if !key_hashes.contains(&hash) {
            key_hashes.push(hash);
        }
    }
    let allowed_models = tenant
        .spec
        .allowed_models
        .iter()
        .map(|m| {
            ModelName::new(m.clone())
                .map_err(|e| TenantError::InvalidSpec(format!("allowedModels: `{m}`: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let limits = &tenant.spec.limits;
    let positive = |name: &str, v: Option<i64>| {
        v.map(|v| {
            u64::try_from(v)
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| TenantError::InvalidSpec(format!("limits.{name} must be positive")))
        })
        .transpose()
    };
    let small = |name: &str, v: Option<i64>| {
        positive(name, v)?
            .map(|v| {
                u32::try_from(v).map_err(|_| {
                    TenantError::InvalidSpec(format!("limits.{name} is larger than {}", u32::MAX))
                })
            })
            .transpose()
    };
    Ok(TenantRecord {
        key_hashes,
        allowed_models,
        limits: TenantLimits {
            requests_per_minute: small("requestsPerMinute", limits.requests_per_minute)?,
            tokens_per_minute: positive("tokensPerMinute", limits.tokens_per_minute)?,
            max_concurrent: small("maxConcurrent", limits.max_concurrent)?,
            max_context_tokens: positive("maxContextTokens", limits.max_context_tokens)?,
        },
        share_cache: tenant.spec.share_cache,
    })
}

/// Writes `record` as tenant `id`'s entry in the cluster state, unless it is already there;
/// returns whether anything changed (the reconciler emits an Event when it did).
pub async fn write(
    store: &dyn StateStore,
    layout: &KeyLayout,
    id: &TenantId,
    record: &TenantRecord,
) -> Result<bool, StateError> {
    let key = layout.tenant(id);
    let value =
        serde_json::to_vec(record).map_err(|e| StateError::InvalidRequest(e.to_string()))?;
    if store.get(&key).await?.is_some_and(|kv| kv.value == value) {
        return Ok(false);
    }
    store.put(&key, value, None).await?;
    Ok(true)
}

/// Removes tenant `id` from the cluster state (its keys stop working on every router); returns
/// whether it was there. The Tenant's finalizer calls this before the resource goes.
pub async fn remove(
    store: &dyn StateStore,
    layout: &KeyLayout,
    id: &TenantId,
) -> Result<bool, StateError> {
    Ok(store.delete(&layout.tenant(id)).await?.is_some())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use serde_json::json;

    use super::*;

    fn tenant(spec: serde_json::Value) -> Tenant {
        serde_json::from_value(json!({
            "apiVersion": "tidelock.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "team-a", "namespace": "ml", "uid": "u-1"},
            "spec": spec,
        }))
        .unwrap()
    }

    /// A Secret's data: key to bytes.
    type Data<'a> = &'a [(&'a str, &'a [u8])];

    fn secret(name: &str, data: Data<'_>) -> (String, Secret) {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.data = Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                .collect(),
        );
        (name.to_owned(), s)
    }

    const KEY_1: &[u8] = b"sk-team-a-0123456789abcdef\n";
    const KEY_2: &[u8] = b"sk-team-a-fedcba9876543210";

    #[test]
    fn keys_become_hashes_and_the_spec_the_record() {
        let t = tenant(json!({
            "apiKeySecrets": [{"name": "a-keys"}, {"name": "a-keys", "key": "rotated"}, {"name": "b"}],
            "allowedModels": ["smollm2"],
            "limits": {"requestsPerMinute": 600, "tokensPerMinute": 2000000, "maxConcurrent": 8, "maxContextTokens": 131072},
            "shareCache": true,
        }));
        let secrets = BTreeMap::from([
            secret("a-keys", &[("apiKey", KEY_1), ("rotated", KEY_2)]),
            secret("b", &[("apiKey", KEY_2)]),
        ]);
        let record = tenant_record(&t, &secrets).unwrap();
        // Trimmed, hashed, and the same key twice is one hash.
        assert_eq!(
            record.key_hashes,
            [
                TenantRecord::hash_api_key("sk-team-a-0123456789abcdef"),
                TenantRecord::hash_api_key("sk-team-a-fedcba9876543210")
            ]
        );
        assert!(record.accepts_key("sk-team-a-0123456789abcdef"));
        assert!(
            !serde_json::to_string(&record)
                .unwrap()
                .contains("sk-team-a"),
            "no key is stored"
        );
        assert_eq!(record.allowed_models, [ModelName::new("smollm2").unwrap()]);
        assert_eq!(record.limits.requests_per_minute, Some(600));
        assert_eq!(record.limits.tokens_per_minute, Some(2_000_000));
        assert_eq!(record.limits.max_concurrent, Some(8));
        assert_eq!(record.limits.max_context_tokens, Some(131_072));
        assert!(record.share_cache);
        assert_eq!(tenant_id(&t).unwrap().as_str(), "ml/team-a");
    }

    #[test]
    fn a_missing_or_malformed_secret_names_itself_and_gives_no_record() {
        let t = tenant(json!({"apiKeySecrets": [{"name": "a-keys"}, {"name": "gone"}]}));
        let ok = secret("a-keys", &[("apiKey", KEY_1)]);
        let e = tenant_record(&t, &BTreeMap::from([ok.clone()])).unwrap_err();
        assert_eq!(e.to_string(), "Secret ml/gone does not exist");
        assert_eq!(e.reason(), "SecretMissing");
        let cases: [(Data<'_>, &str); 4] = [
            (&[("other", KEY_1)], "has no key `apiKey`"),
            (
                &[("apiKey", b"\xff\xfe-not-text-at-all-really")],
                "is not UTF-8 text",
            ),
            (&[("apiKey", b"short")], "shorter than 16 characters"),
            (&[("apiKey", b"   \n")], "shorter than 16 characters"),
        ];
        for (data, needle) in cases {
            let bad = secret("gone", data);
            let e = tenant_record(&t, &BTreeMap::from([ok.clone(), bad])).unwrap_err();
            assert_eq!(e.reason(), "SecretMalformed");
            let text = e.to_string();
            assert!(
                text.starts_with("Secret ml/gone: ") && text.contains(needle),
                "{text}"
            );
        }
    }

    #[test]
    fn out_of_range_limits_and_bad_model_names_are_invalid_specs() {
        let secrets = BTreeMap::from([secret("k", &[("apiKey", KEY_1)])]);
        for (spec, needle) in [
            (
                json!({"apiKeySecrets": [{"name": "k"}], "limits": {"requestsPerMinute": 0}}),
                "requestsPerMinute must be positive",
            ),
            (
                json!({"apiKeySecrets": [{"name": "k"}], "limits": {"maxConcurrent": 5_000_000_000i64}}),
                "maxConcurrent is larger than",
            ),
            (
                json!({"apiKeySecrets": [{"name": "k"}], "allowedModels": [""]}),
                "allowedModels",
            ),
        ] {
            let e = tenant_record(&tenant(spec), &secrets).unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
