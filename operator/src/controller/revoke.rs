//! The controller's side of provider-side revocation: finalizers that let it revoke before an
//! ApiKey or KeyProvider disappears, the call to the provider when a recorded grant is
//! withdrawn, a second sweep shortly after (for a credential a lagging broker replica minted
//! under the old grant just after the first call), and one audit record per revocation.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::Error;
use crate::crd::{ApiKey, KeyProvider};
use crate::providers;
use crate::revocation::Cause;

/// Set on every ApiKey and KeyProvider the controller has seen: removed only after the
/// credentials they could have minted were revoked at the provider.
pub const FINALIZER: &str = "keybroker.dev/revoke-at-provider";
/// When the second sweep of a withdrawn grant runs.
const SWEEP_AFTER: Duration = Duration::from_secs(3);

/// Whether `obj` carries [`FINALIZER`].
pub fn has_finalizer<K: Resource>(obj: &K) -> bool {
    obj.meta()
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// Adds [`FINALIZER`] (a JSON patch that fails if the object changed meanwhile, so the next
/// reconcile sees the new version).
pub async fn add_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = match &obj.meta().finalizers {
        Some(list) => serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ]),
        None => serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj.meta().resource_version},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
    };
    patch_finalizers(api, obj, patch).await
}

/// Removes [`FINALIZER`], keeping every other finalizer.
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let list = obj.meta().finalizers.clone().unwrap_or_default();
    let Some(index) = list.iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch = serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]);
    patch_finalizers(api, obj, patch).await
}

async fn patch_finalizers<K>(api: &Api<K>, obj: &K, patch: serde_json::Value) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| Error::Finalizer {
        name: obj.name_any(),
        detail: e.to_string(),
    })?;
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Gone already: nothing left to hold.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::Finalizer {
            name: obj.name_any(),
            detail: e.to_string(),
        }),
    }
}

/// Revokes the credentials of ApiKey `namespace/name` minted under `grant` at `provider`, and
/// writes the audit record. `Err` means the provider could not be told: the caller retries
/// and keeps the grant recorded meanwhile (the broker mints nothing new under a changed key).
pub async fn revoke_grant(
    client: &kube::Client,
    provider: &KeyProvider,
    namespace: &str,
    name: &str,
    grant: &str,
    cause: Cause,
) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let outcome = providers::revoke(client, provider, namespace, name, grant).await;
    let elapsed_ms = started.elapsed().as_millis();
    match &outcome {
        Ok(done) => info!(
            target: "keybroker::audit",
            outcome = "revoked",
            api_key = name,
            namespace,
            provider = %provider.name_any(),
            grant,
            cause = cause.as_str(),
            at_provider = done.at_provider,
            provider_answer = %done.answer,
            elapsed_ms,
            "credentials revoked"
        ),
        Err(detail) => warn!(
            target: "keybroker::audit",
            outcome = "revocation_failed",
            api_key = name,
            namespace,
            provider = %provider.name_any(),
            grant,
            cause = cause.as_str(),
            provider_answer = %detail,
            elapsed_ms,
            "revoking credentials at the provider failed; retrying"
        ),
    }
    outcome.map(|_| ()).map_err(|detail| Error::Revoke {
        name: format!("{namespace}/{name}"),
        detail,
    })
}

/// Revokes `grant` once more after [`SWEEP_AFTER`], unless the ApiKey's recorded grant is
/// `grant` again by then. A broker replica whose cache lagged may have minted under the old
/// grant just after the first call; this catches it. Best effort: failures are logged.
pub fn sweep_later(
    client: kube::Client,
    keys: Store<DeserializeGuard<ApiKey>>,
    provider: Arc<KeyProvider>,
    namespace: String,
    name: String,
    grant: String,
) {
    tokio::spawn(async move {
        tokio::time::sleep(SWEEP_AFTER).await;
        let current = keys
            .get(&ObjectRef::new(&name).within(&namespace))
            .and_then(|guard| guard.0.as_ref().ok().and_then(|k| k.status.clone()))
            .and_then(|status| status.grant);
        if current.as_deref() == Some(grant.as_str()) {
            return;
        }
        if let Err(e) = providers::revoke(&client, &provider, &namespace, &name, &grant).await {
            warn!(api_key = %name, %namespace, error = %e, "second revocation sweep failed");
        }
    });
}
