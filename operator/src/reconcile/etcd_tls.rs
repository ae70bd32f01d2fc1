//! The workers' etcd TLS files. A pod mounts Secrets of its own namespace only, and workers run
//! in their Model's namespace, so the operator copies its client Secret (`--etcd-client-secret`,
//! in the operator's namespace: `ca.crt`, `tls.crt`, `tls.key`) into the Model's namespace as
//! `<model>-etcd-client` (`builders::etcd_client_secret`), which the worker pods mount.
//!
//! Invariants: the copy holds exactly those three keys; it is owned by the Model (controller
//! reference), so the garbage collector removes it with the Model; it is re-applied, with
//! server-side apply, on every reconcile before the StatefulSets, so it exists before any worker
//! pod mounts it and a rotated source reaches it within one requeue (at most the steady five
//! minutes). Workers read the files when they start: after a rotation they pick the new files up
//! on their next restart (see the chart's README).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::Api;
use kube::{Resource, ResourceExt};
use tidelock_api::{Model, labels};

use super::{Context, Error};
use crate::builders::{self, SecretRef};

/// The keys the workers read (`builders::ETCD_TLS_DIR`), as cert-manager and `kubernetes.io/tls`
/// Secrets name them.
pub const KEYS: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];

/// Why the operator's etcd client Secret cannot be copied for a Model's workers; the message
/// names the Secret and its flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientSecretError {
    /// The Secret `--etcd-client-secret` names does not exist.
    #[error("Secret {}/{} (--etcd-client-secret) not found", .0.namespace, .0.name)]
    NotFound(SecretRef),
    /// The Secret lacks one of [`KEYS`], or holds it empty.
    #[error(
        "Secret {}/{} (--etcd-client-secret) has no {key} (it needs {})",
        secret.namespace,
        secret.name,
        KEYS.join(", ")
    )]
    MissingKey {
        secret: SecretRef,
        key: &'static str,
    },
}

/// Copies the operator's etcd client Secret into `model`'s namespace, when there is one.
pub async fn copy_client_secret(model: &Model, ctx: &Context) -> Result<(), Error> {
    let Some(source) = &ctx.defaults.etcd_client_secret else {
        return Ok(());
    };
    let namespace = model.namespace().ok_or(Error::Missing("namespace"))?;
    let owner = model
        .controller_owner_ref(&())
        .ok_or(Error::Missing("uid"))?;
    let found = Api::<Secret>::namespaced(ctx.client.clone(), &source.namespace)
        .get_opt(&source.name)
        .await?
        .ok_or_else(|| ClientSecretError::NotFound(source.clone()))?;
    let copy = copy(source, &found, &model.name_any(), &namespace, owner)?;
    super::apply_secret(ctx, &copy).await
}

/// The Model's copy of `found` (the Secret `source` names): its three keys, or which is missing.
pub fn copy(
    source: &SecretRef,
    found: &Secret,
    model: &str,
    namespace: &str,
    owner: OwnerReference,
) -> Result<Secret, ClientSecretError> {
    let data = found.data.clone().unwrap_or_default();
    let mut copied: BTreeMap<String, ByteString> = BTreeMap::new();
    for key in KEYS {
        match data.get(key) {
            Some(value) if !value.0.is_empty() => {
                copied.insert(key.to_owned(), value.clone());
            }
            _ => {
                return Err(ClientSecretError::MissingKey {
                    secret: source.clone(),
                    key,
                });
            }
        }
    }
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(builders::etcd_client_secret(model)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (labels::MODEL.to_owned(), model.to_owned()),
                (
                    labels::MANAGED_BY.to_owned(),
                    labels::MANAGED_BY_VALUE.to_owned(),
                ),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(copied),
        ..Secret::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SecretRef {
        SecretRef {
            namespace: "tidelock-system".into(),
            name: "tidelock-etcd-client".into(),
        }
    }

    fn secret(keys: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                keys.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "tidelock.dev/v1alpha1".into(),
            kind: "Model".into(),
            name: "smol".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn the_copy_has_the_three_keys_and_is_owned_by_the_model() {
        let found = secret(&[
            ("ca.crt", "CA"),
            ("tls.crt", "CERT"),
            ("tls.key", "KEY"),
            ("other", "not copied"),
        ]);
        let copy = copy(&source(), &found, "smol", "ml", owner()).unwrap();
        assert_eq!(copy.metadata.name.as_deref(), Some("smol-etcd-client"));
        assert_eq!(copy.metadata.namespace.as_deref(), Some("ml"));
        assert_eq!(copy.metadata.owner_references, Some(vec![owner()]));
        assert_eq!(
            copy.metadata.labels.as_ref().unwrap()[labels::MODEL],
            "smol"
        );
        let data = copy.data.unwrap();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["ca.crt", "tls.crt", "tls.key"]
        );
        assert_eq!(data["tls.key"].0, b"KEY");
    }

    #[test]
    fn a_missing_or_empty_key_is_named() {
        for keys in [
            &[("ca.crt", "CA"), ("tls.crt", "CERT")][..],
            &[("ca.crt", "CA"), ("tls.crt", "CERT"), ("tls.key", "")][..],
        ] {
            let error = copy(&source(), &secret(keys), "smol", "ml", owner()).unwrap_err();
            assert_eq!(
                error,
                ClientSecretError::MissingKey {
                    secret: source(),
                    key: "tls.key"
                }
            );
            assert_eq!(
                error.to_string(),
                "Secret tidelock-system/tidelock-etcd-client (--etcd-client-secret) has no \
                 tls.key (it needs ca.crt, tls.crt, tls.key)"
            );
        }
    }
}
