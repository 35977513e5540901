//! The controller role: reconciles ApiKeys into compiled session policies (and KeyProviders
//! into a verified `Ready`), writing status by server-side apply only when it changed.
//!
//! Pipeline per ApiKey: dereference (provider and namespace from reflector stores, no API
//! calls) → evaluate + desired status (pure, `status.rs`) → revoke the previous grant at the
//! provider if it was withdrawn (`revoke.rs`) → apply (skipped when equal) → Event on Ready
//! transitions. A finalizer holds deleted ApiKeys and KeyProviders until their credentials
//! are revoked at the provider.

mod revoke;
pub mod usage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::crd::{ApiKey, ApiKeyStatus, KeyProvider, RotationStatus};
use crate::events::{EventType, Publisher};
use crate::metrics::Metrics;
use crate::providers;
use crate::revocation::{self, Cause, Transition};
use crate::shutdown::Shutdown;
use crate::status::{self, Verdict};
pub use revoke::FINALIZER;

/// The field manager of every status the controller writes.
pub const FIELD_MANAGER: &str = "keybroker-controller";
const APIKEY: &str = "ApiKey";
const KEYPROVIDER: &str = "KeyProvider";

/// What the controller watches.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Only ApiKeys in this namespace (default: all namespaces).
    pub namespace: Option<String>,
    /// Only KeyProviders with these labels, e.g. `tier=prod` (default: all).
    pub provider_labels: Option<String>,
    /// Where the broker and gateway keep their shared counts (the operator's namespace): read
    /// for `status.usage`. `None`: no usage in the status.
    pub counts_namespace: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status of {kind} {name}: {source}")]
    WriteStatus {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("updating the finalizer of {name}: {detail}")]
    Finalizer { name: String, detail: String },
    #[error("revoking the credentials of ApiKey {name} at the provider: {detail}")]
    Revoke { name: String, detail: String },
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::WriteStatus { .. } => "kube_api",
            Error::NoNamespace(_) => "invalid_object",
            Error::Finalizer { .. } => "kube_api",
            Error::Revoke { .. } => "provider",
        }
    }
}

/// Shared state of the reconcilers.
struct Context {
    client: Client,
    keys: Store<DeserializeGuard<ApiKey>>,
    providers: Store<KeyProvider>,
    namespaces: Store<Namespace>,
    events: Publisher,
    metrics: Arc<Metrics>,
}

/// Runs the ApiKey and KeyProvider controllers until the future is dropped.
pub async fn run(
    client: Client,
    scope: Scope,
    metrics: Arc<Metrics>,
    instance: String,
    shutdown: Shutdown,
) {
    let apikeys: Api<DeserializeGuard<ApiKey>> = match &scope.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let provider_api: Api<KeyProvider> = Api::all(client.clone());
    let provider_watch = match &scope.provider_labels {
        Some(labels) => watcher::Config::default().labels(labels),
        None => watcher::Config::default(),
    };
    let namespace_watch = match &scope.namespace {
        Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
        None => watcher::Config::default(),
    };

    let (providers, provider_writer) = reflector::store();
    let provider_reflector = reflector::reflector(
        provider_writer,
        watcher(provider_api.clone(), provider_watch.clone()),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| async {});
    let (namespaces, namespace_writer) = reflector::store();
    let namespace_reflector = reflector::reflector(
        namespace_writer,
        watcher(
            Api::<Namespace>::all(client.clone()),
            namespace_watch.clone(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| async {});

    let events = Publisher::new(client.clone(), FIELD_MANAGER, &instance);
    let (keys, keys_writer) = reflector::store();
    let usage = {
        let (client, keys, metrics) = (client.clone(), keys.clone(), Arc::clone(&metrics));
        let (counts, watched) = (scope.counts_namespace.clone(), scope.namespace.clone());
        async move {
            if let Some(counts) = counts {
                usage::run(client, counts, keys, watched, metrics).await;
            }
        }
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        keys: keys.clone(),
        providers: providers.clone(),
        namespaces: namespaces.clone(),
        events,
        metrics,
    });

    let apikey_controller = {
        let ctx = Arc::clone(&ctx);
        let shutdown = shutdown.clone();
        let provider_watch = provider_watch.clone();
        async move {
            // Judging a key before the stores are filled would flip it to ProviderNotFound.
            let (Ok(()), Ok(())) = (
                ctx.providers.wait_until_ready().await,
                ctx.namespaces.wait_until_ready().await,
            ) else {
                return;
            };
            // The cache holds every ApiKey; managedFields are most of an object's size and the
            // controller never reads them, so they are dropped before caching.
            let key_stream = watcher(apikeys, watcher::Config::default().any_semantic())
                .default_backoff()
                .modify(|key: &mut DeserializeGuard<ApiKey>| {
                    key.meta_mut().managed_fields = None;
                })
                .reflect(keys_writer)
                .touched_objects();
            let controller = Controller::for_stream(key_stream, keys.clone());
            let keys_for_providers = keys.clone();
            controller
                .watches(
                    provider_api.clone(),
                    provider_watch.clone(),
                    move |provider| {
                        keys_referencing(&keys_for_providers, |k| {
                            k.spec.provider_ref.name == provider.name_any()
                        })
                    },
                )
                .watches(
                    Api::<Namespace>::all(ctx.client.clone()),
                    namespace_watch,
                    move |ns| {
                        let name = ns.name_any();
                        keys_referencing(&keys, |k| k.namespace().as_deref() == Some(name.as_str()))
                    },
                )
                .graceful_shutdown_on(shutdown.clone().requested())
                .run(reconcile_apikey, apikey_error_policy, Arc::clone(&ctx))
                .for_each(|_| async {})
                .await;
        }
    };
    let provider_controller = {
        let ctx = Arc::clone(&ctx);
        let api: Api<DeserializeGuard<KeyProvider>> = Api::all(client);
        Controller::new(api, provider_watch)
            .graceful_shutdown_on(shutdown.clone().requested())
            .run(reconcile_provider, provider_error_policy, ctx)
            .for_each(|_| async {})
    };
    // The usage loop ends with the controllers (it has no shutdown of its own to wait for).
    tokio::select! {
        () = usage => {}
        _ = async {
            tokio::join!(
                provider_reflector,
                namespace_reflector,
                apikey_controller,
                provider_controller
            )
        } => {}
    }
}

fn keys_referencing(
    keys: &Store<DeserializeGuard<ApiKey>>,
    pred: impl Fn(&ApiKey) -> bool,
) -> Vec<ObjectRef<DeserializeGuard<ApiKey>>> {
    keys.state()
        .iter()
        .filter(|guard| guard.0.as_ref().is_ok_and(&pred))
        .map(|guard| ObjectRef::from_obj(guard.as_ref()))
        .collect()
}

async fn reconcile_apikey(
    guard: Arc<DeserializeGuard<ApiKey>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(APIKEY);
    let key = match &guard.0 {
        Ok(key) => key,
        Err(invalid) => {
            // The apiserver's schema normally prevents this; never let it stall the others.
            warn!(name = %invalid.metadata.name.as_deref().unwrap_or("?"), error = %invalid.error, "ApiKey does not match the keybroker schema");
            return Ok(Action::await_change());
        }
    };
    let name = key.name_any();
    let namespace = key
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &namespace);
    let recorded = key.status.as_ref().and_then(|s| s.grant.as_deref());

    // dereference
    let provider = ctx
        .providers
        .get(&ObjectRef::new(&key.spec.provider_ref.name));

    if key.meta().deletion_timestamp.is_some() {
        if revoke::has_finalizer(key) {
            if let Some(grant) = recorded {
                withdraw(
                    &ctx,
                    provider.as_ref(),
                    &namespace,
                    &name,
                    grant,
                    Cause::Deleted,
                )
                .await?;
            }
            revoke::remove_finalizer(&api, key).await?;
        }
        return Ok(Action::await_change());
    }
    if !revoke::has_finalizer(key) {
        // The next reconcile (triggered by this change) judges the key.
        revoke::add_finalizer(&api, key).await?;
        return Ok(Action::await_change());
    }
    let labels: BTreeMap<String, String> = ctx
        .namespaces
        .get(&ObjectRef::new(&namespace))
        .map(|ns| ns.labels().clone())
        .unwrap_or_default();

    // evaluate (pure)
    let verdict = status::evaluate(key, &namespace, &labels, provider.as_deref());
    let judged = match &verdict {
        Verdict::Ready(compiled) => Some(revocation::grant_id(
            key.uid().as_deref().unwrap_or_default(),
            provider
                .as_ref()
                .and_then(|p| p.uid())
                .as_deref()
                .unwrap_or_default(),
            &compiled.session_policy,
            compiled.ttl,
            &key.spec.service_account_names,
        )),
        Verdict::NotReady { .. } => None,
    };

    // revoke what was withdrawn, before recording the new grant
    if let Transition::Revoke { from } = revocation::transition(recorded, judged.as_deref()) {
        let cause = match &verdict {
            Verdict::Ready(_) => Cause::GrantChanged,
            Verdict::NotReady { reason, .. } => Cause::NotReady(reason),
        };
        withdraw(&ctx, provider.as_ref(), &namespace, &name, from, cause).await?;
    }

    let current = key.status.as_ref();
    let desired = status::desired_status(current, &verdict, judged, key.meta().generation, now());
    if current == Some(&desired) {
        return Ok(Action::await_change());
    }

    // apply (not the usage: the usage loop owns it)
    let applied = ApiKeyStatus {
        usage: None,
        ..desired.clone()
    };
    apply_status(&ctx, &api, APIKEY, &name, &applied).await?;

    // tell the user when the verdict changed
    let before = status::ready_condition(current).map(|c| (c.status.clone(), c.reason.clone()));
    let after =
        status::ready_condition(Some(&desired)).map(|c| (c.status.clone(), c.reason.clone()));
    if before != after {
        publish(&ctx, key, &verdict, &desired).await;
    }
    Ok(Action::await_change())
}

/// Revokes `grant` of ApiKey `namespace/name` at its provider and schedules the second sweep.
/// Without the provider object nothing can be called: its own finalizer revoked the keys'
/// grants before it went away (or it never existed), so that is logged and passed.
async fn withdraw(
    ctx: &Context,
    provider: Option<&Arc<KeyProvider>>,
    namespace: &str,
    name: &str,
    grant: &str,
    cause: Cause,
) -> Result<(), Error> {
    let Some(provider) = provider else {
        info!(api_key = %name, %namespace, grant, cause = cause.as_str(), "the KeyProvider is gone; its deletion revoked this ApiKey's credentials");
        return Ok(());
    };
    revoke::revoke_grant(&ctx.client, provider, namespace, name, grant, cause).await?;
    revoke::sweep_later(
        ctx.client.clone(),
        ctx.keys.clone(),
        Arc::clone(provider),
        namespace.to_owned(),
        name.to_owned(),
        grant.to_owned(),
    );
    Ok(())
}

async fn publish(ctx: &Context, key: &ApiKey, verdict: &Verdict, desired: &ApiKeyStatus) {
    let note = status::ready_condition(Some(desired))
        .map(|c| c.message.as_str())
        .unwrap_or_default();
    let (type_, reason) = match verdict {
        Verdict::Ready(_) => (EventType::Normal, "Ready"),
        Verdict::NotReady { reason, .. } => (EventType::Warning, *reason),
    };
    if let Err(e) = ctx
        .events
        .publish(&key.object_ref(&()), type_, reason, "Compile", note)
        .await
    {
        warn!(error = %e, "could not publish event");
    }
}

fn apikey_error_policy(
    _key: Arc<DeserializeGuard<ApiKey>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    warn!(%error, "ApiKey reconcile failed");
    ctx.metrics.error(APIKEY, error.category());
    Action::requeue(Duration::from_secs(5))
}

/// How often a KeyProvider's identity is re-verified.
const PROVIDER_RECHECK: Duration = Duration::from_secs(300);

async fn reconcile_provider(
    guard: Arc<DeserializeGuard<KeyProvider>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(KEYPROVIDER);
    let provider = match &guard.0 {
        Ok(p) => p,
        Err(invalid) => {
            warn!(name = %invalid.metadata.name.as_deref().unwrap_or("?"), error = %invalid.error, "KeyProvider does not match the keybroker schema");
            return Ok(Action::await_change());
        }
    };
    let name = provider.name_any();
    let api: Api<KeyProvider> = Api::all(ctx.client.clone());
    if provider.meta().deletion_timestamp.is_some() {
        if revoke::has_finalizer(provider) {
            revoke_all_of(&ctx, provider).await?;
            revoke::remove_finalizer(&api, provider).await?;
        }
        return Ok(Action::await_change());
    }
    if !revoke::has_finalizer(provider) {
        revoke::add_finalizer(&api, provider).await?;
        return Ok(Action::await_change());
    }
    // A rotation step first, so that the verification reads the key Secret it left.
    let current = provider.status.as_ref();
    let (rotation, requeue) = match providers::kind(provider) {
        Ok(providers::Kind::Gateway(gateway)) => match &gateway.rotation {
            Some(rotation) => {
                let pass = providers::gateway::rotation::pass(
                    &ctx.client,
                    &name,
                    gateway,
                    rotation,
                    k8s_openapi::jiff::Timestamp::now().as_second(),
                )
                .await;
                publish_rotation(
                    &ctx,
                    provider,
                    current.and_then(|s| s.rotation.as_ref()),
                    &pass,
                )
                .await;
                (Some(pass.status), pass.requeue.min(PROVIDER_RECHECK))
            }
            None => (None, PROVIDER_RECHECK),
        },
        _ => (None, PROVIDER_RECHECK),
    };
    let outcome = providers::verify(&ctx.client, provider).await;
    match &outcome {
        Ok(identity) => debug!(provider = %name, %identity, "KeyProvider verified"),
        Err(problem) => warn!(provider = %name, %problem, "KeyProvider not usable"),
    }
    let desired = providers::desired_status(provider, &outcome, rotation, now());
    if current != Some(&desired) {
        apply_status(&ctx, &api, KEYPROVIDER, &name, &desired).await?;
        info!(provider = %name, ready = outcome.is_ok(), "KeyProvider status changed");
    }
    Ok(Action::requeue(requeue))
}

/// An Event for a rotation step taken, or for a failure that is new (not one already in the
/// status, so a step failing every minute does not flood Events).
async fn publish_rotation(
    ctx: &Context,
    provider: &KeyProvider,
    before: Option<&RotationStatus>,
    pass: &providers::gateway::rotation::Pass,
) {
    let (type_, reason, action, note) = match (&pass.done, &pass.failed) {
        (Some((step, note)), _) => (EventType::Normal, "KeyRotated", step.name(), note.clone()),
        (None, Some(error)) => {
            if before.and_then(|s| s.last_error.as_ref()) == pass.status.last_error.as_ref() {
                return;
            }
            (
                EventType::Warning,
                "KeyRotationFailed",
                pass.status.next_step.as_deref().unwrap_or("Rotate"),
                error.to_string(),
            )
        }
        (None, None) => return,
    };
    if let Err(e) = ctx
        .events
        .publish(&provider.object_ref(&()), type_, reason, action, &note)
        .await
    {
        warn!(provider = %provider.name_any(), error = %e, "publishing a rotation Event");
    }
}

/// Revokes, at a KeyProvider being deleted, the recorded grant of every ApiKey using it.
async fn revoke_all_of(ctx: &Context, provider: &KeyProvider) -> Result<(), Error> {
    let name = provider.name_any();
    for guard in ctx.keys.state() {
        let Ok(key) = &guard.0 else { continue };
        let grant = key.status.as_ref().and_then(|s| s.grant.as_deref());
        if key.spec.provider_ref.name != name {
            continue;
        }
        let (Some(grant), Some(namespace)) = (grant, key.namespace()) else {
            continue;
        };
        revoke::revoke_grant(
            &ctx.client,
            provider,
            &namespace,
            &key.name_any(),
            grant,
            Cause::ProviderDeleted,
        )
        .await?;
    }
    Ok(())
}

/// Writes `status` by server-side apply under [`FIELD_MANAGER`], owning exactly its fields.
async fn apply_status<K, S>(
    ctx: &Context,
    api: &Api<K>,
    kind: &'static str,
    name: &str,
    status: &S,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": kind,
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::WriteStatus {
        kind,
        name: name.to_owned(),
        source,
    })?;
    ctx.metrics.status_write(kind);
    Ok(())
}

fn provider_error_policy(
    _provider: Arc<DeserializeGuard<KeyProvider>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    warn!(%error, "KeyProvider reconcile failed");
    ctx.metrics.error(KEYPROVIDER, error.category());
    Action::requeue(Duration::from_secs(10))
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Runs the controllers only while this replica holds the Lease (see [`crate::leader`]),
/// until `shutdown` is requested.
pub async fn run_elected(
    client: Client,
    scope: Scope,
    lease: crate::leader::LeaseConfig,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<(), crate::leader::Error> {
    let instance = lease.identity.clone();
    crate::leader::run_while_leader(
        client.clone(),
        lease,
        Arc::clone(&metrics),
        shutdown.clone(),
        || {
            run(
                client.clone(),
                scope.clone(),
                Arc::clone(&metrics),
                instance.clone(),
                shutdown.clone(),
            )
        },
    )
    .await
}
