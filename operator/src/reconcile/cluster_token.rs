//! The cluster credential: one random token in a Secret of the operator's namespace
//! (`--cluster-token-secret`, key `token`) that the routers mount, and a copy in each Model's
//! namespace (`<model>-cluster-token`, owned by the Model) that its workers read. Pods can use
//! Secrets of their own namespace only, hence the copies.
//!
//! The operator creates the Secret when it is missing (at start, so the routers can start before
//! any Model exists, and before every Model's reconcile), never overwrites one that exists, and
//! tolerates another replica creating it first. Rotation: replace the Secret's `token` (or
//! delete it, and a new one is made); copies follow within one reconcile, and routers and
//! workers read it when they start, so restart them (the chart's README).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};
use tidelock_api::{Model, labels};
use tidelock_protocol::ClusterToken;

use super::{Context, Error};
use crate::builders::{self, CLUSTER_TOKEN_KEY, SecretRef};

/// The token in `source`, created (with a fresh random token) when the Secret does not exist.
pub async fn ensure(client: &Client, source: &SecretRef) -> Result<ByteString, Error> {
    let secrets = Api::<Secret>::namespaced(client.clone(), &source.namespace);
    loop {
        if let Some(found) = secrets.get_opt(&source.name).await? {
            return token_of(&found).ok_or_else(|| {
                Error::ClusterToken(format!(
                    "Secret {}/{} (--cluster-token-secret) has no valid `{CLUSTER_TOKEN_KEY}` \
                     (at least {} visible ASCII characters)",
                    source.namespace,
                    source.name,
                    ClusterToken::MIN_CHARS
                ))
            });
        }
        let fresh = Secret {
            metadata: ObjectMeta {
                name: Some(source.name.clone()),
                namespace: Some(source.namespace.clone()),
                labels: Some(managed()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                CLUSTER_TOKEN_KEY.to_owned(),
                ByteString(ClusterToken::generate().expose().as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        match secrets.create(&PostParams::default(), &fresh).await {
            Ok(created) => {
                tracing::info!(secret = %source.name, namespace = %source.namespace, "created the cluster credential");
                return token_of(&created).ok_or(Error::Missing("token"));
            }
            // Another replica made it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes `model`'s copy of the credential into its namespace.
pub async fn copy_to_model(model: &Model, ctx: &Context) -> Result<(), Error> {
    let token = ensure(&ctx.client, &ctx.defaults.cluster_token_secret).await?;
    let namespace = model.namespace().ok_or(Error::Missing("namespace"))?;
    let owner = model
        .controller_owner_ref(&())
        .ok_or(Error::Missing("uid"))?;
    let name = builders::cluster_token_secret(&model.name_any());
    let mut labels = managed();
    labels.insert(labels::MODEL.to_owned(), model.name_any());
    let copy = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(CLUSTER_TOKEN_KEY.to_owned(), token)])),
        ..Secret::default()
    };
    super::apply_secret(ctx, &copy).await
}

fn managed() -> BTreeMap<String, String> {
    BTreeMap::from([(
        labels::MANAGED_BY.to_owned(),
        labels::MANAGED_BY_VALUE.to_owned(),
    )])
}

/// The Secret's token, if it holds a valid one.
fn token_of(secret: &Secret) -> Option<ByteString> {
    let value = secret.data.as_ref()?.get(CLUSTER_TOKEN_KEY)?;
    let text = std::str::from_utf8(&value.0).ok()?;
    ClusterToken::new(text).ok()?;
    Some(value.clone())
}
