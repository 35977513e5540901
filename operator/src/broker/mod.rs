//! The broker role: exchanges a pod's bound service-account token for short-lived credentials
//! scoped by its ApiKey. It authenticates (TokenReview), authorizes against the live ApiKey,
//! Pod and KeyProvider (fail closed: anything it cannot verify is refused), mints at the
//! provider, and writes one audit record per issuance or refusal, never a secret.

pub mod authn;
pub mod authz;
pub mod ratelimit;
pub mod server;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_sts::error::ProvideErrorMetadata;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::jiff::Timestamp;
use keybroker_sidecar::wire::{Credentials, ExchangeRequest, ExchangeResponse, Refusal};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::Notify;
use tracing::info;

use crate::crd::{ApiKey, KeyProvider};
use crate::metrics::Metrics;
use crate::provider_check;
use crate::watch_cache;
use authn::{Authenticator, AuthnError};
use authz::{Denial, Grant, PodIdentity};
use ratelimit::IssuanceCap;

/// Issuances per minute per ApiKey when the provider does not say.
pub const DEFAULT_ISSUANCES_PER_MINUTE: u32 = 60;

/// How long an STS client (with the broker's credentials read from its Secret) is reused.
const STS_CLIENT_TTL: Duration = Duration::from_secs(60);

/// Every provider call must finish within this.
const MINT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an exchange failed, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Authn(#[from] AuthnError),
    #[error(transparent)]
    Denied(#[from] Denial),
    #[error("the broker could not read {what}: {detail}")]
    Lookup { what: String, detail: String },
    #[error("the provider refused to mint ({code}): {message}")]
    ProviderRefused { code: String, message: String },
    #[error("the provider is unavailable: {0}")]
    ProviderUnavailable(String),
    #[error("ApiKey {name} reached its provider's maxIssuancesPerMinute; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { name: String, retry_after: Duration },
}

impl ExchangeError {
    pub fn reason(&self) -> &'static str {
        match self {
            ExchangeError::Authn(e) => e.reason(),
            ExchangeError::Denied(d) => d.reason(),
            ExchangeError::Lookup { .. } => "LookupFailed",
            ExchangeError::ProviderRefused { .. } => "ProviderRefused",
            ExchangeError::ProviderUnavailable(_) => "ProviderUnavailable",
            ExchangeError::RateLimited { .. } => "RateLimited",
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ExchangeError::Authn(AuthnError::Unavailable(_))
                | ExchangeError::Lookup { .. }
                | ExchangeError::ProviderUnavailable(_)
                | ExchangeError::RateLimited { .. }
        )
    }

    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            ExchangeError::Authn(AuthnError::Unavailable(_)) => 503,
            ExchangeError::Authn(_) => 401,
            ExchangeError::Denied(_) => 403,
            ExchangeError::Lookup { .. } | ExchangeError::ProviderUnavailable(_) => 503,
            ExchangeError::ProviderRefused { .. } => 502,
            ExchangeError::RateLimited { .. } => 429,
        }
    }

    pub fn to_refusal(&self) -> Refusal {
        Refusal {
            reason: self.reason().into(),
            message: self.to_string(),
            retryable: self.retryable(),
        }
    }
}

/// The exchange logic, independent of the HTTP server around it.
pub struct Broker {
    client: kube::Client,
    authn: Authenticator,
    cap: IssuanceCap,
    keys: Store<ApiKey>,
    providers: Store<KeyProvider>,
    namespaces: Store<Namespace>,
    pods: Store<PartialObjectMeta<Pod>>,
    /// STS clients per provider (name and resourceVersion), built with the broker's own
    /// credentials; rebuilt after [`STS_CLIENT_TTL`] so rotated credential Secrets are picked up.
    sts: Mutex<HashMap<(String, String), (aws_sdk_sts::Client, Instant)>>,
    /// Woken on every cache change (revocation long-polls wait on it).
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("authn", &self.authn)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Starts the watch caches (ApiKeys, KeyProviders, Namespaces, and the metadata of opted-in
    /// Pods) and returns once they are filled, so every exchange is decided without an API
    /// read. Changes reach the caches within milliseconds; revocation pollers are woken then.
    pub async fn start(client: kube::Client) -> Arc<Self> {
        Self::start_with_metrics(client, Arc::new(Metrics::default())).await
    }

    /// [`Broker::start`], counting exchanges in `metrics`.
    pub async fn start_with_metrics(client: kube::Client, metrics: Arc<Metrics>) -> Arc<Self> {
        let changed = Arc::new(Notify::new());
        let keys = watch_cache(
            Api::<ApiKey>::all(client.clone()),
            watcher::Config::default(),
            &changed,
        );
        let providers = watch_cache(
            Api::<KeyProvider>::all(client.clone()),
            watcher::Config::default(),
            &changed,
        );
        let namespaces = watch_cache(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            &changed,
        );
        let pods = watch_cache(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            watcher::Config::default().labels(&format!("{}=true", authz::INJECT_LABEL)),
            &changed,
        );
        let broker = Arc::new(Self {
            authn: Authenticator::new(client.clone(), keybroker_sidecar::wire::AUDIENCE),
            client,
            cap: IssuanceCap::default(),
            keys,
            providers,
            namespaces,
            pods,
            sts: Mutex::default(),
            changed,
            metrics,
        });
        let _ = tokio::join!(
            broker.keys.wait_until_ready(),
            broker.providers.wait_until_ready(),
            broker.namespaces.wait_until_ready(),
            broker.pods.wait_until_ready(),
        );
        broker
    }

    /// Waits up to `wait` for ApiKey `name` (in the token's namespace) to be revoked or
    /// deleted; true when it is. Answers within milliseconds of the change.
    pub async fn wait_revoked(
        &self,
        token: &str,
        name: &str,
        wait: Duration,
    ) -> Result<bool, ExchangeError> {
        let identity = self.authn.authenticate(token).await?;
        let key = ObjectRef::<ApiKey>::new(name).within(&identity.namespace);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.keys.get(&key) {
                None => return Ok(true),
                Some(k) if k.spec.revoked => return Ok(true),
                Some(_) => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(false);
            }
        }
    }

    /// Exchanges `token` for credentials of `request.api_key`; audits the outcome.
    pub async fn exchange(
        &self,
        token: &str,
        request: &ExchangeRequest,
        client_addr: &str,
    ) -> Result<ExchangeResponse, ExchangeError> {
        let started = Instant::now();
        let result = match self.authn.authenticate(token).await {
            Ok(identity) => {
                let result = self.authorized_mint(&identity, &request.api_key).await;
                match &result {
                    Ok((grant, response)) => {
                        audit_issuance(&identity, &request.api_key, client_addr, grant, response)
                    }
                    Err(e) => audit_refusal(Some(&identity), &request.api_key, client_addr, e),
                }
                result.map(|(_, response)| response)
            }
            Err(e) => {
                let e = ExchangeError::from(e);
                audit_refusal(None, &request.api_key, client_addr, &e);
                Err(e)
            }
        };
        let (outcome, reason) = match &result {
            Ok(_) => ("issued", ""),
            Err(e) => ("refused", e.reason()),
        };
        self.metrics.exchange(outcome, reason, started.elapsed());
        result
    }

    async fn authorized_mint(
        &self,
        identity: &PodIdentity,
        name: &str,
    ) -> Result<(Grant, ExchangeResponse), ExchangeError> {
        let ns = &identity.namespace;
        let key = self.keys.get(&ObjectRef::new(name).within(ns));
        // Only opted-in pods are cached; a miss (a pod without the label, or one created a
        // moment ago) is read live, so the answer is right either way.
        let pod = match self
            .pods
            .get(&ObjectRef::new(&identity.pod_name).within(ns))
        {
            Some(pod) => Some(pod),
            None => Api::<PartialObjectMeta<Pod>>::namespaced(self.client.clone(), ns)
                .get_opt(&identity.pod_name)
                .await
                .map_err(|e| ExchangeError::Lookup {
                    what: format!("Pod {}", identity.pod_name),
                    detail: e.to_string(),
                })?
                .map(Arc::new),
        };
        let provider = key.as_ref().and_then(|k| {
            self.providers
                .get(&ObjectRef::new(&k.spec.provider_ref.name))
        });
        let labels: BTreeMap<String, String> = self
            .namespaces
            .get(&ObjectRef::new(ns))
            .map(|n| n.labels().clone())
            .unwrap_or_default();
        let grant = authz::authorize(
            identity,
            name,
            key.as_deref(),
            pod.as_ref().map(|p| &p.metadata),
            provider.as_deref(),
            &labels,
        )?;
        let provider = provider.ok_or_else(|| ExchangeError::Lookup {
            what: "KeyProvider".into(),
            detail: "vanished".into(),
        })?;
        let per_minute = provider
            .spec
            .guardrails
            .max_issuances_per_minute
            .unwrap_or(DEFAULT_ISSUANCES_PER_MINUTE);
        self.cap
            .try_acquire(&format!("{ns}/{name}"), per_minute, Instant::now())
            .map_err(|retry_after| ExchangeError::RateLimited {
                name: name.to_owned(),
                retry_after,
            })?;
        let response = self.mint(identity, &provider, &grant).await?;
        Ok((grant, response))
    }

    async fn sts_client(
        &self,
        provider: &KeyProvider,
    ) -> Result<aws_sdk_sts::Client, ExchangeError> {
        let key = (
            provider.name_any(),
            provider.resource_version().unwrap_or_default(),
        );
        if let Ok(cache) = self.sts.lock()
            && let Some((client, built)) = cache.get(&key)
            && built.elapsed() < STS_CLIENT_TTL
        {
            return Ok(client.clone());
        }
        let client = provider_check::sts_client(&self.client, &provider.spec.aws)
            .await
            .map_err(|p| ExchangeError::ProviderUnavailable(p.to_string()))?;
        if let Ok(mut cache) = self.sts.lock() {
            cache
                .retain(|(name, _), (_, built)| *name != key.0 && built.elapsed() < STS_CLIENT_TTL);
            cache.insert(key, (client.clone(), Instant::now()));
        }
        Ok(client)
    }

    async fn mint(
        &self,
        identity: &PodIdentity,
        provider: &KeyProvider,
        grant: &Grant,
    ) -> Result<ExchangeResponse, ExchangeError> {
        let sts = self.sts_client(provider).await?;
        let ttl_secs = i32::try_from(grant.ttl.as_secs()).unwrap_or(i32::MAX);
        let call = sts
            .assume_role()
            .role_arn(&provider.spec.aws.role_arn)
            .role_session_name(authz::role_session_name(identity))
            .policy(&grant.session_policy)
            .duration_seconds(ttl_secs)
            .send();
        let out = tokio::time::timeout(MINT_TIMEOUT, call)
            .await
            .map_err(|_| {
                ExchangeError::ProviderUnavailable(format!("no answer within {MINT_TIMEOUT:?}"))
            })?
            .map_err(|e| match &e {
                aws_sdk_sts::error::SdkError::ServiceError(s) => {
                    let code = s.err().code().unwrap_or("Unknown").to_owned();
                    let message = s.err().message().unwrap_or("").to_owned();
                    if matches!(
                        code.as_str(),
                        "Throttling"
                            | "ThrottlingException"
                            | "ServiceUnavailable"
                            | "InternalError"
                    ) {
                        ExchangeError::ProviderUnavailable(format!("{code}: {message}"))
                    } else {
                        ExchangeError::ProviderRefused { code, message }
                    }
                }
                other => ExchangeError::ProviderUnavailable(innermost(other)),
            })?;
        let creds = out
            .credentials()
            .ok_or_else(|| ExchangeError::ProviderRefused {
                code: "NoCredentials".into(),
                message: "AssumeRole returned no credentials".into(),
            })?;
        let expiration = SystemTime::try_from(*creds.expiration())
            .ok()
            .and_then(|t| Timestamp::try_from(t).ok())
            .ok_or_else(|| ExchangeError::ProviderRefused {
                code: "BadExpiration".into(),
                message: "AssumeRole returned an unusable expiration".into(),
            })?;
        let now = Timestamp::now();
        let lifetime = expiration.duration_since(now);
        let refresh_at = now
            .checked_add(
                lifetime
                    .checked_mul(2)
                    .and_then(|d| d.checked_div(3))
                    .unwrap_or(lifetime),
            )
            .unwrap_or(now);
        Ok(ExchangeResponse {
            credentials: Credentials {
                access_key_id: creds.access_key_id().to_owned(),
                secret_access_key: creds.secret_access_key().to_owned(),
                session_token: creds.session_token().to_owned(),
                expiration: expiration.to_string(),
            },
            refresh_at: refresh_at.to_string(),
        })
    }
}

fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// The audit record of an issuance: identifiers only, never the secret key or session token.
fn audit_issuance(
    id: &PodIdentity,
    api_key: &str,
    client: &str,
    grant: &Grant,
    response: &ExchangeResponse,
) {
    info!(
        target: "keybroker::audit",
        outcome = "issued",
        api_key,
        namespace = %id.namespace,
        pod = %id.pod_name,
        pod_uid = %id.pod_uid,
        service_account = %id.service_account,
        provider = %grant.provider,
        scope_hash = %grant.scope_hash,
        access_key_id = %response.credentials.access_key_id,
        expiration = %response.credentials.expiration,
        client,
        "credentials issued"
    );
}

/// The audit record of a refusal, with its reason.
fn audit_refusal(id: Option<&PodIdentity>, api_key: &str, client: &str, error: &ExchangeError) {
    info!(
        target: "keybroker::audit",
        outcome = "refused",
        reason = error.reason(),
        api_key,
        namespace = id.map(|i| i.namespace.as_str()).unwrap_or(""),
        pod = id.map(|i| i.pod_name.as_str()).unwrap_or(""),
        pod_uid = id.map(|i| i.pod_uid.as_str()).unwrap_or(""),
        service_account = id.map(|i| i.service_account.as_str()).unwrap_or(""),
        client,
        detail = %error,
        "exchange refused"
    );
}
