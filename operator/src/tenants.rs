//! A `Tenant` and its Secrets to the record routers read from `tenants/<tenant>`: key hashes
//! (never keys), allowed models, limits, cache sharing and the secret cache salt. The reconciler
//! fetches the Secrets and writes the record; [`tenant_record`] decides what the record is, or
//! why there is none. A missing or malformed Secret fails the whole record (and names the
//! Secret), so a router never sees a tenant with some of its keys.
//!
//! Cache salts ([`cache_salt`]) are random secrets, never derived from the tenant's name: a
//! tenant keeps the salt of its existing record (so its cached blocks stay reachable), a new
//! tenant gets a fresh one, and every tenant that opts into sharing gets the one salt stored at
//! `salts/shared`, created once. A record from before salts were secret has none and is given a
//! fresh one (docs: SECURITY.md, "Migration").

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use tidelock_api::{Tenant, reasons};
use tidelock_protocol::{CacheSalt, KeyLayout, ModelName, TenantId, TenantLimits, TenantRecord};
use tidelock_state::{CasOutcome, Expected, StateError, StateStore};

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

/// The record for `tenant`, with its keys read from `secrets` (by name, in its namespace) and
/// `cache_salt` (from [`cache_salt`]).
pub fn tenant_record(
    tenant: &Tenant,
    secrets: &BTreeMap<String, Secret>,
    cache_salt: CacheSalt,
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
        cache_salt,
    })
}

/// The cache salt tenant `id` is to have: the shared one when it opts into sharing, else the
/// secret salt of its current record, else (a new tenant, one that stops sharing, or a record
/// from before salts were secret) a fresh one.
pub async fn cache_salt(
    store: &dyn StateStore,
    layout: &KeyLayout,
    id: &TenantId,
    share_cache: bool,
) -> Result<CacheSalt, StateError> {
    if share_cache {
        return shared_salt(store, layout).await;
    }
    let current = store
        .get(&layout.tenant(id))
        .await?
        .and_then(|kv| serde_json::from_slice::<TenantRecord>(&kv.value).ok())
        .filter(|record| !record.share_cache && record.cache_salt.is_secret());
    Ok(current.map_or_else(CacheSalt::generate, |record| record.cache_salt))
}

/// The one salt of the tenants that share their cache, created on first use. Operators that
/// race create it once: the loser of the compare-and-swap reads the winner's.
async fn shared_salt(store: &dyn StateStore, layout: &KeyLayout) -> Result<CacheSalt, StateError> {
    let key = layout.shared_cache_salt();
    let parse = |value: &[u8]| {
        std::str::from_utf8(value)
            .ok()
            .and_then(|text| CacheSalt::new(text).ok())
            .filter(CacheSalt::is_secret)
            .ok_or_else(|| StateError::InvalidRequest(format!("{key} is not a secret cache salt")))
    };
    loop {
        if let Some(kv) = store.get(&key).await? {
            return parse(&kv.value);
        }
        let fresh = CacheSalt::generate();
        let value = fresh.as_str().as_bytes().to_vec();
        if let CasOutcome::Swapped(_) = store
            .compare_and_swap(&key, Expected::Absent, value, None)
            .await?
        {
            return Ok(fresh);
        }
    }
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
        let record = tenant_record(&t, &secrets, CacheSalt::generate()).unwrap();
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

    /// Salts are secrets the store keeps: never the tenant's name, stable across reconciles,
    /// one for all sharing tenants, fresh for a tenant that stops sharing or has an old record.
    #[tokio::test]
    async fn cache_salts_are_random_kept_and_shared_only_by_those_that_share() {
        let store = tidelock_state::MemoryStore::new();
        let layout = KeyLayout::default();
        let id = |name: &str| TenantId::new(format!("ml/{name}")).unwrap();
        let salt =
            async |name: &str, share| cache_salt(&store, &layout, &id(name), share).await.unwrap();
        let write = async |name: &str, salt: &CacheSalt, share| {
            let record = TenantRecord {
                share_cache: share,
                cache_salt: salt.clone(),
                ..TenantRecord::with_keys([])
            };
            write(&store, &layout, &id(name), &record).await.unwrap();
        };

        let a = salt("team-a", false).await;
        assert!(a.is_secret() && !a.as_str().contains("team-a"));
        write("team-a", &a, false).await;
        assert_eq!(salt("team-a", false).await, a, "kept across reconciles");
        let b = salt("team-b", false).await;
        assert_ne!(a, b, "every tenant its own");

        let shared = salt("team-c", true).await;
        assert!(shared.is_secret() && shared != a && shared != b);
        assert_eq!(
            salt("team-d", true).await,
            shared,
            "one salt for all who share"
        );
        let stored = store
            .get(&layout.shared_cache_salt())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.value, shared.as_str().as_bytes());
        write("team-c", &shared, true).await;
        let own = salt("team-c", false).await;
        assert!(
            own != shared && own.is_secret(),
            "stopping sharing: a fresh salt"
        );

        // A record from before salts were secret (none, or the tenant's name): a fresh one.
        let old = serde_json::json!({"key_hashes": [], "share_cache": false});
        store
            .put(
                &layout.tenant(&id("old")),
                old.to_string().into_bytes(),
                None,
            )
            .await
            .unwrap();
        let migrated = salt("old", false).await;
        assert!(migrated.is_secret());
        write("named", &CacheSalt::new("ml/named").unwrap(), false).await;
        assert_ne!(salt("named", false).await.as_str(), "ml/named");
    }

    #[test]
    fn a_missing_or_malformed_secret_names_itself_and_gives_no_record() {
        let t = tenant(json!({"apiKeySecrets": [{"name": "a-keys"}, {"name": "gone"}]}));
        let ok = secret("a-keys", &[("apiKey", KEY_1)]);
        let e =
            tenant_record(&t, &BTreeMap::from([ok.clone()]), CacheSalt::generate()).unwrap_err();
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
            let e = tenant_record(
                &t,
                &BTreeMap::from([ok.clone(), bad]),
                CacheSalt::generate(),
            )
            .unwrap_err();
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
            let e = tenant_record(&tenant(spec), &secrets, CacheSalt::generate()).unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
