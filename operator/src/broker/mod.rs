//! The broker role: exchanges a pod's bound service-account token for short-lived credentials
//! scoped by its ApiKey. It authenticates (TokenReview), authorizes against the live ApiKey,
//! Pod and KeyProvider (fail closed: anything it cannot verify is refused), mints at the
//! provider, and writes one audit record per issuance or refusal, never a secret.

pub mod anomaly;
mod audit;
pub mod authn;
pub mod authz;
mod oauth2;
pub mod pollers;
pub mod server;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use keybroker_contract::wire::{
    ExchangeRequest, ExchangeResponse, GatewaySession, RENEWED_AT_ANNOTATION, Refusal,
};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use tracing::warn;

use crate::budget::{BudgetError, Budgets, Counted};
use crate::crd::{AnomalyAction, ApiKey, AwsProvider, KeyProvider};
use crate::events::{EventType, Publisher};
use crate::metrics::Metrics;
use crate::providers::aws::{self, mint};
use crate::providers::gateway::session::{Claims, SessionKey};
use crate::providers::oauth2::issued::Issued;
use crate::providers::oauth2::mint::Minter;
use crate::providers::{self, Kind};
use crate::revocation;
use crate::watch_cache_with;
use audit::Issuance;
use authn::{Authenticator, AuthnError};
use authz::{Denial, Grant, PodIdentity};
use pollers::Pollers;

/// Issuances per minute per ApiKey when the provider does not say.
pub const DEFAULT_ISSUANCES_PER_MINUTE: u32 = 60;

/// How long an STS client (with the broker's credentials read from its Secret) is reused.
const STS_CLIENT_TTL: Duration = Duration::from_secs(60);

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
    #[error(
        "ApiKey {name} was just changed and the controller has not yet confirmed its new rights; retry in a moment"
    )]
    GrantPending { name: String },
    #[error("{0}")]
    TooManyPolls(#[from] pollers::Full),
    #[error(
        "ApiKey {name} uses a gateway provider, but this broker has no gateway; the platform team enables the chart's gateway"
    )]
    NoGateway { name: String },
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
            ExchangeError::GrantPending { .. } => "GrantPending",
            ExchangeError::TooManyPolls(_) => "TooManyPolls",
            ExchangeError::NoGateway { .. } => "GatewayNotConfigured",
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
                | ExchangeError::GrantPending { .. }
                | ExchangeError::TooManyPolls(_)
        )
    }

    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            ExchangeError::Authn(AuthnError::Unavailable(_)) => 503,
            ExchangeError::Authn(_) => 401,
            ExchangeError::Denied(_) => 403,
            ExchangeError::Lookup { .. }
            | ExchangeError::ProviderUnavailable(_)
            | ExchangeError::GrantPending { .. }
            | ExchangeError::NoGateway { .. } => 503,
            ExchangeError::ProviderRefused { .. } => 502,
            ExchangeError::RateLimited { .. } | ExchangeError::TooManyPolls(_) => 429,
        }
    }

    /// The refusal the pod sees: the reason and what to change. Provider and apiserver texts
    /// (they name the broker's own principal and role) stay in the operator's log and audit.
    pub fn to_refusal(&self) -> Refusal {
        let message = match self {
            ExchangeError::Authn(AuthnError::Rejected { audience, .. }) => format!(
                "the token was not accepted for audience {audience}: it is expired, was not issued by this cluster, or is for another audience; send the pod's projected token"
            ),
            ExchangeError::Authn(AuthnError::Unavailable(_)) => {
                "the broker could not verify the token with the apiserver right now; retrying".into()
            }
            ExchangeError::Lookup { what, .. } => {
                format!("the broker could not read {what} right now; retrying")
            }
            ExchangeError::ProviderRefused { .. } => {
                "the provider refused to mint credentials; the platform team finds the provider's answer in the keybroker operator's log".into()
            }
            ExchangeError::ProviderUnavailable(_) => {
                "the provider is unavailable right now; retrying".into()
            }
            other => other.to_string(),
        };
        Refusal {
            reason: self.reason().into(),
            message,
            retryable: self.retryable(),
        }
    }
}

/// The exchange logic, independent of the HTTP server around it.
pub struct Broker {
    client: kube::Client,
    authn: Authenticator,
    /// `maxIssuancesPerMinute`, counted across every broker replica.
    issuances: Budgets,
    keys: Store<ApiKey>,
    providers: Store<KeyProvider>,
    namespaces: Store<Namespace>,
    /// Opted-in pods, whole (less managedFields): the broker checks their spec.
    pods: Store<Pod>,
    /// keybroker's sidecar image: only a sidecar of its repository may hold a pod's token.
    sidecar_image: String,
    /// STS clients per provider (name and resourceVersion), built with the broker's own
    /// credentials; rebuilt after [`STS_CLIENT_TTL`] so rotated credential Secrets are picked up.
    sts: Mutex<HashMap<(String, String), (aws_sdk_sts::Client, Instant)>>,
    /// The revocation long-polls, woken by the cache events that touch their ApiKey.
    pollers: Arc<Pollers>,
    metrics: Arc<Metrics>,
    /// Where gateway sessions are used, and the key that signs them (see [`Broker::link_gateway`]).
    gateway: std::sync::OnceLock<GatewayLink>,
    /// The oauth2 tokens this replica handed out, revoked at the identity provider once their
    /// grant is withdrawn.
    issued: Arc<Issued>,
    /// Mints oauth2 tokens, reusing per provider what can be.
    minter: Arc<Minter>,
    /// The anomaly rules' counts.
    anomalies: anomaly::Watch,
    /// Events about ApiKeys whose anomaly rules fired.
    events: Publisher,
}

/// What the broker needs to issue gateway sessions: the gateway's URL as pods reach it, and
/// the signing key the gateway verifies with.
#[derive(Clone, Debug)]
pub struct GatewayLink {
    pub url: String,
    pub key: Arc<SessionKey>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("authn", &self.authn)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Starts the watch caches (ApiKeys, KeyProviders, Namespaces, and opted-in Pods) and
    /// returns once they are filled, so every exchange is decided without an API
    /// read. Changes reach the caches within milliseconds; revocation pollers are woken then.
    /// `sidecar_image` is the image the webhook injects (`--sidecar-image`).
    /// Issuances are counted (`maxIssuancesPerMinute`) with the other replicas through
    /// ConfigMaps in `namespace`, the operator's own.
    pub async fn start(client: kube::Client, namespace: &str, sidecar_image: &str) -> Arc<Self> {
        Self::start_with_metrics(
            client,
            namespace,
            sidecar_image,
            Arc::new(Metrics::default()),
        )
        .await
    }

    /// [`Broker::start`], counting exchanges in `metrics`.
    pub async fn start_with_metrics(
        client: kube::Client,
        namespace: &str,
        sidecar_image: &str,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let pollers = Arc::new(Pollers::default());
        let issued = Arc::new(Issued::default());
        let minter = Arc::new(Minter::new(client.clone()));
        let keys = {
            let (pollers, issued) = (Arc::clone(&pollers), Arc::clone(&issued));
            watch_cache_with(
                Api::<ApiKey>::all(client.clone()),
                watcher::Config::default(),
                move |key: Option<&ApiKey>| match key {
                    Some(key) => {
                        let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
                        pollers.wake(&ns, &name);
                        issued.changed(Some((&ns, &name)));
                    }
                    None => {
                        pollers.wake_where(|_, _| true);
                        issued.changed(None);
                    }
                },
            )
        };
        let providers = {
            let pollers = Arc::clone(&pollers);
            let keys = keys.clone();
            watch_cache_with(
                Api::<KeyProvider>::all(client.clone()),
                watcher::Config::default(),
                move |provider: Option<&KeyProvider>| {
                    let name = provider.map(ResourceExt::name_any);
                    pollers.wake_where(|ns, key| {
                        name.as_ref().is_none_or(|name| {
                            keys.get(&ObjectRef::new(key).within(ns))
                                .is_some_and(|k| k.spec.provider_ref.name == *name)
                        })
                    });
                },
            )
        };
        let namespaces = {
            let pollers = Arc::clone(&pollers);
            watch_cache_with(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
                move |namespace: Option<&Namespace>| {
                    let name = namespace.map(ResourceExt::name_any);
                    pollers.wake_where(|ns, _| name.as_ref().is_none_or(|name| ns == name));
                },
            )
        };
        let pods = {
            let pollers = Arc::clone(&pollers);
            watch_cache_with(
                Api::<Pod>::all(client.clone()),
                watcher::Config::default().labels(&format!("{}=true", authz::INJECT_LABEL)),
                move |pod: Option<&Pod>| match pod {
                    // A changed pod (an image swapped, an ephemeral container) may lose its
                    // rights: its own pollers answer at once.
                    Some(pod) => {
                        let ns = pod.namespace().unwrap_or_default();
                        let listed = pod.annotations().get(authz::APIKEYS_ANNOTATION);
                        for key in listed.into_iter().flat_map(|l| authz::listed_api_keys(l)) {
                            pollers.wake(&ns, key);
                        }
                    }
                    None => pollers.wake_where(|_, _| true),
                },
            )
        };
        let broker = Arc::new(Self {
            authn: Authenticator::new(client.clone(), keybroker_contract::wire::AUDIENCE),
            issuances: Budgets::new(client.clone(), namespace, Counted::Issuances),
            client: client.clone(),
            keys,
            providers,
            namespaces,
            pods,
            sidecar_image: sidecar_image.to_owned(),
            sts: Mutex::default(),
            pollers,
            metrics,
            gateway: std::sync::OnceLock::new(),
            issued: Arc::clone(&issued),
            minter: Arc::clone(&minter),
            anomalies: anomaly::Watch::default(),
            events: Publisher::new(
                client.clone(),
                "keybroker-broker",
                &std::env::var("HOSTNAME").unwrap_or_else(|_| "keybroker-broker".into()),
            ),
        });
        tokio::spawn(oauth2::revoke_withdrawn_tokens(
            broker.keys.clone(),
            issued,
            minter,
        ));
        let _ = tokio::join!(
            broker.keys.wait_until_ready(),
            broker.providers.wait_until_ready(),
            broker.namespaces.wait_until_ready(),
            broker.pods.wait_until_ready(),
        );
        broker
    }

    /// A revocation long-poll: waits up to `wait` while the pod behind `token` may still use
    /// ApiKey `name` with what it `held` (the grant and renewal mark its credentials were
    /// issued under). Answers `Revoked` the moment it may not, `Renew` the moment its rights
    /// changed (credentials of the new grant are ready to be fetched) or a renewal was asked
    /// for, `Quiet` after the wait. Authorized like an
    /// exchange: only a pod that may use the ApiKey waits; any other is answered `Revoked` at
    /// once.
    pub async fn poll(
        &self,
        token: &str,
        name: &str,
        held: Held<'_>,
        wait: Duration,
    ) -> Result<PollAnswer, ExchangeError> {
        let identity = self.authn.authenticate(token).await?;
        // Decided before taking a slot, so that polls for keys a pod may not use cost nothing.
        if let Err(ExchangeError::Denied(_)) = self.authorize(&identity, name).await {
            return Ok(PollAnswer::Revoked);
        }
        let slot = self
            .pollers
            .enter(&identity.namespace, name, &identity.pod_uid)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = slot.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.authorize(&identity, name).await {
                Err(ExchangeError::Denied(_)) => return Ok(PollAnswer::Revoked),
                Err(e) => return Err(e),
                Ok((key, grant)) => {
                    let changed = held.grant.is_some_and(|held| held != grant.id);
                    if changed && recorded_grant(&key) == Some(grant.id.as_str()) {
                        return Ok(PollAnswer::Renew);
                    }
                    if held.renewal.is_some_and(|mark| mark != renewal_mark(&key)) {
                        return Ok(PollAnswer::Renew);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(PollAnswer::Quiet);
            }
        }
    }

    /// Lets the broker issue sessions for gateway ApiKeys (set once; later calls are ignored).
    pub fn link_gateway(&self, link: GatewayLink) {
        let _ = self.gateway.set(link);
    }

    /// The caches of ApiKeys, KeyProviders, Namespaces and opted-in Pods, shared with the
    /// gateway in the same process (one watch per resource).
    pub fn stores(&self) -> Stores {
        Stores {
            keys: self.keys.clone(),
            providers: self.providers.clone(),
            namespaces: self.namespaces.clone(),
            pods: self.pods.clone(),
            sidecar_image: self.sidecar_image.clone(),
        }
    }

    /// Revocation polls waiting now.
    pub fn waiting_polls(&self) -> usize {
        self.pollers.total()
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
                self.watch_anomalies(&identity, &request.api_key, result.as_ref().map(drop));
                match &result {
                    Ok((grant, issued)) => {
                        audit::issuance(&identity, &request.api_key, client_addr, grant, issued)
                    }
                    Err(e) => audit::refusal(Some(&identity), &request.api_key, client_addr, e),
                }
                result.map(|(_, issued)| issued.response)
            }
            Err(e) => {
                let e = ExchangeError::from(e);
                audit::refusal(None, &request.api_key, client_addr, &e);
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

    /// Counts an exchange's outcome for the ApiKey's anomaly rules (its own, else its
    /// provider's) and acts on each that fires. Only authorization refusals count: an outage
    /// of the provider or the apiserver is no tenant's anomaly.
    fn watch_anomalies(
        &self,
        identity: &PodIdentity,
        name: &str,
        outcome: Result<(), &ExchangeError>,
    ) {
        let ns = identity.namespace.as_str();
        let Some(key) = self.keys.get(&ObjectRef::new(name).within(ns)) else {
            return;
        };
        let policy = key.spec.anomalies.clone().or_else(|| {
            self.providers
                .get(&ObjectRef::new(&key.spec.provider_ref.name))
                .and_then(|p| p.spec.anomalies.clone())
        });
        let Some(policy) = policy else { return };
        let seen = match outcome {
            Ok(()) => anomaly::Seen::Issued,
            Err(ExchangeError::Denied(Denial::PodGone { .. })) => anomaly::Seen::RefusedPodGone,
            Err(ExchangeError::Denied(_)) => anomaly::Seen::Refused,
            Err(_) => return,
        };
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        for firing in self.anomalies.observe((ns, name), seen, &policy, now) {
            self.metrics.anomaly(firing.rule.name(), firing.action);
            audit::anomaly(identity, name, &firing);
            tokio::spawn(act_on_anomaly(
                self.client.clone(),
                self.events.clone(),
                Arc::clone(&key),
                firing,
            ));
        }
    }

    /// Decides from the caches (a pod missing there is read live once) whether `identity`
    /// may use ApiKey `name`, and under which grant.
    async fn authorize(
        &self,
        identity: &PodIdentity,
        name: &str,
    ) -> Result<(Arc<ApiKey>, Grant), ExchangeError> {
        let ns = &identity.namespace;
        let key = self.keys.get(&ObjectRef::new(name).within(ns));
        // Only opted-in pods are cached; a miss (a pod without the label, or one created a
        // moment ago) is read live, so the answer is right either way.
        let pod = match self
            .pods
            .get(&ObjectRef::new(&identity.pod_name).within(ns))
        {
            Some(pod) => Some(pod),
            None => Api::<Pod>::namespaced(self.client.clone(), ns)
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
            pod.as_deref(),
            provider.as_deref(),
            &labels,
            &self.sidecar_image,
        )?;
        let key = key.ok_or_else(|| ExchangeError::Lookup {
            what: format!("ApiKey {name}"),
            detail: "vanished".into(),
        })?;
        Ok((key, grant))
    }

    async fn authorized_mint(
        &self,
        identity: &PodIdentity,
        name: &str,
    ) -> Result<(Grant, Issuance), ExchangeError> {
        let ns = &identity.namespace;
        let (key, grant) = self.authorize(identity, name).await?;
        minted_under_recorded_grant(&key, &grant)?;
        let provider = self
            .providers
            .get(&ObjectRef::new(&key.spec.provider_ref.name))
            .ok_or_else(|| ExchangeError::Lookup {
                what: "KeyProvider".into(),
                detail: "vanished".into(),
            })?;
        let per_minute = provider
            .spec
            .guardrails
            .max_issuances_per_minute
            .unwrap_or(DEFAULT_ISSUANCES_PER_MINUTE);
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        self.issuances
            .try_acquire(ns, name, per_minute, u64::MAX, now)
            .await
            .map_err(|e| match e {
                BudgetError::Exhausted(exhausted) => ExchangeError::RateLimited {
                    name: name.to_owned(),
                    retry_after: exhausted.retry_after,
                },
                BudgetError::Unavailable => ExchangeError::Lookup {
                    what: format!("the issuance count of ApiKey {name}"),
                    detail: "the shared count's ConfigMap (see the warning logged)".into(),
                },
            })?;
        let mut issued: Issuance = match providers::kind(&provider) {
            Ok(Kind::Aws(aws)) => self.mint(identity, name, aws, &grant).await?.into(),
            Ok(Kind::Gateway(_)) => self.session(identity, name, &grant)?.into(),
            Ok(Kind::OAuth2(oauth2)) => self.token(identity, name, oauth2, &grant).await?,
            Err(e) => {
                return Err(ExchangeError::Denied(Denial::ApiKeyNotReady {
                    name: name.to_owned(),
                    detail: e.to_string(),
                }));
            }
        };
        issued.response.renewal = renewal_mark(&key);
        Ok((grant, issued))
    }

    /// A gateway session for the pod and ApiKey, valid for the grant's TTL.
    fn session(
        &self,
        identity: &PodIdentity,
        name: &str,
        grant: &Grant,
    ) -> Result<ExchangeResponse, ExchangeError> {
        let link = self.gateway.get().ok_or_else(|| ExchangeError::NoGateway {
            name: name.to_owned(),
        })?;
        let now = k8s_openapi::jiff::Timestamp::now();
        let ttl = i64::try_from(grant.ttl.as_secs()).unwrap_or(i64::MAX / 4);
        let exp = now.as_second().saturating_add(ttl);
        let token = link.key.issue(&Claims {
            namespace: identity.namespace.clone(),
            api_key: name.to_owned(),
            pod: identity.pod_name.clone(),
            pod_uid: identity.pod_uid.clone(),
            service_account: identity.service_account.clone(),
            grant: grant.id.clone(),
            exp,
        });
        let at = |secs: i64| {
            k8s_openapi::jiff::Timestamp::from_second(secs)
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        Ok(ExchangeResponse {
            credentials: None,
            token: None,
            session: Some(GatewaySession {
                token,
                url: format!(
                    "{}{}",
                    link.url.trim_end_matches('/'),
                    keybroker_contract::paths::FORWARD
                ),
                expiration: at(exp),
            }),
            refresh_at: at(now.as_second().saturating_add(ttl * 2 / 3)),
            grant: grant.id.clone(),
            renewal: String::new(),
        })
    }

    async fn sts_client(
        &self,
        provider: &KeyProvider,
        aws: &AwsProvider,
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
        let client = aws::sts_client(&self.client, aws)
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
        name: &str,
        aws: &AwsProvider,
        grant: &Grant,
    ) -> Result<ExchangeResponse, ExchangeError> {
        let provider = self
            .providers
            .get(&ObjectRef::new(&grant.provider))
            .ok_or_else(|| ExchangeError::Lookup {
                what: "KeyProvider".into(),
                detail: "vanished".into(),
            })?;
        let sts = self.sts_client(&provider, aws).await?;
        let tag = revocation::revoke_tag(&identity.namespace, name, &grant.id);
        let source_identity = revocation::aws_source_identity(&identity.namespace, name);
        let minted = mint::assume_role(
            &sts,
            aws,
            mint::Request {
                session_name: authz::role_session_name(identity),
                session_policy: &grant.session_policy,
                ttl: grant.ttl,
                revoke_tag: &tag,
                source_identity: &source_identity,
            },
        )
        .await
        .map_err(|e| match e {
            mint::MintError::Refused { code, message } => {
                ExchangeError::ProviderRefused { code, message }
            }
            mint::MintError::Unavailable(detail) => ExchangeError::ProviderUnavailable(detail),
        })?;
        Ok(ExchangeResponse {
            credentials: Some(minted.credentials),
            session: None,
            token: None,
            refresh_at: minted.refresh_at,
            grant: grant.id.clone(),
            renewal: String::new(),
        })
    }
}

/// The broker's caches, for the gateway in the same process.
#[derive(Clone)]
pub struct Stores {
    pub keys: Store<ApiKey>,
    pub providers: Store<KeyProvider>,
    pub namespaces: Store<Namespace>,
    pub pods: Store<Pod>,
    pub sidecar_image: String,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

/// What a revocation long-poll answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollAnswer {
    /// Nothing changed within the wait.
    Quiet,
    /// The pod may no longer use the ApiKey.
    Revoked,
    /// The ApiKey's rights changed; credentials of the new grant can be fetched.
    Renew,
}

/// The annotation naming what revoked an ApiKey, when keybroker did (`anomaly:<rule>`).
pub const REVOKED_BY_ANNOTATION: &str = "keybroker.dev/revoked-by";

/// Revokes the ApiKey if the firing rule says so, and publishes an Event naming the rule.
async fn act_on_anomaly(
    client: kube::Client,
    events: Publisher,
    key: Arc<ApiKey>,
    firing: anomaly::Firing,
) {
    let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
    let revoke = firing.action == AnomalyAction::Revoke;
    if revoke {
        let patch = serde_json::json!({
            "metadata": {"annotations": {
                REVOKED_BY_ANNOTATION: format!("anomaly:{}", firing.rule.name())
            }},
            "spec": {"revoked": true},
        });
        if let Err(e) = Api::<ApiKey>::namespaced(client, &ns)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(namespace = ns, api_key = name, rule = firing.rule.name(), error = %e, "revoking an ApiKey for an anomaly failed");
        }
    }
    let reason = if revoke {
        "AnomalyRevoked"
    } else {
        "AnomalyDetected"
    };
    if let Err(e) = events
        .publish(
            &key.object_ref(&()),
            EventType::Warning,
            reason,
            firing.rule.name(),
            &firing.note(),
        )
        .await
    {
        warn!(namespace = ns, api_key = name, error = %e, "publishing an anomaly Event failed");
    }
}

/// What a revocation poll says the pod's credentials were issued under.
#[derive(Clone, Copy, Debug, Default)]
pub struct Held<'a> {
    pub grant: Option<&'a str>,
    /// `None` from a sidecar that does not know renewals.
    pub renewal: Option<&'a str>,
}

/// The renewal mark of `key`: a digest of its renewal annotation (empty without one), so that
/// any annotation value is a short hex string on the wire.
pub fn renewal_mark(key: &ApiKey) -> String {
    use sha2::Digest;
    match key.annotations().get(RENEWED_AT_ANNOTATION) {
        None => String::new(),
        Some(value) => sha2::Sha256::digest(value.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}

/// The grant the controller recorded for `key`, if any.
fn recorded_grant(key: &ApiKey) -> Option<&str> {
    key.status.as_ref().and_then(|s| s.grant.as_deref())
}

/// Refuses `grant` while the controller has recorded other rights for `key`: the broker mints
/// only under a grant the controller knows, so every tag at the provider is one it will revoke
/// (see `revocation`). `kubectl keybroker check` asks the same.
pub(crate) fn minted_under_recorded_grant(
    key: &ApiKey,
    grant: &Grant,
) -> Result<(), ExchangeError> {
    match recorded_grant(key) {
        Some(recorded) if recorded != grant.id => Err(ExchangeError::GrantPending {
            name: key.name_any(),
        }),
        _ => Ok(()),
    }
}
