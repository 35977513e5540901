//! The gateway role: forwards the pods' calls for gateway ApiKeys to their upstream, adding the
//! upstream's key, which never leaves this process.
//!
//! `ANY /v1/forward/<upstream path>` with `Authorization: Bearer <gateway session>`:
//!
//! 1. the session is verified offline (HMAC, expiry; see `providers::gateway::session`);
//! 2. the pod and ApiKey are authorized from the caches exactly as for an exchange (revoked,
//!    deleted, pod gone or changed, service account or namespace no longer allowed: refused at
//!    once), and the session's grant must still be the ApiKey's;
//! 3. the path must be canonical, and method and path within the ApiKey's scope;
//! 4. the body within the guardrails' size limit, the call within the ApiKey's budget (shared
//!    by every gateway replica, see [`crate::budget`]);
//! 5. then the call goes to the upstream with the key added, the app's own credentials and
//!    hop-by-hop headers removed; the answer streams back as it arrives, the key redacted
//!    wherever the upstream echoes it. A 401 to the current key is retried once with the
//!    previous key during a rotation (calls with a body of at most 64 KiB).
//!
//! Refusals are JSON `{reason, message, retryable}` and never reach the upstream. One audit
//! record per call: ApiKey, namespace, pod, method, path, upstream status, bytes, duration,
//! outcome; never the key, never bodies.

mod authorized;
mod bodies;
pub mod server;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use self::authorized::{Authorization, Authorizations, Inputs};
use self::bodies::{Capped, Redacting};
use crate::broker::Stores;
use crate::broker::authz::{self, PodIdentity};
use crate::budget::{BudgetError, Budgets, Counted};
use crate::crd::{GatewayProvider, KeyProvider};
use crate::metrics::Metrics;
use crate::providers::gateway::check::{self, Keys, Origin};
use crate::providers::gateway::forward::{self, Redactor};
use crate::providers::gateway::scope;
use crate::providers::gateway::session::{Claims, SessionError, SessionKey};

/// The body of every answer: the upstream's, streamed, or a refusal.
pub type GatewayBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, GatewayBody>;

/// How long the key and the upstream client of a provider are reused before the key Secret is
/// read again: a rotated key is picked up within this.
const UPSTREAM_TTL: Duration = Duration::from_secs(5);
/// The upstream's response-header timeout when the provider does not set one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A refused call's body is read (and dropped) up to this much, for this long, before the
/// refusal is sent: a server that answers and closes with unread data in its socket resets the
/// connection, and the client may then lose the answer itself. Past that, it closes.
const DRAIN_BYTES: usize = 256 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// While a rotation keeps the previous key, a body up to this size is read before the call is
/// sent, so that a 401 to the current key can be retried with the previous one; larger bodies
/// stream and are not retried.
const REPLAY_BYTES: u64 = 64 * 1024;
/// What all calls together may hold that way (KiB): past it, a body streams without a retry, so
/// a rotation cannot make the gateway hold 64 KiB for each of its calls in flight.
const REPLAY_BUDGET_KIB: usize = 8 * 1024;

/// Reads `body` to its end within [`DRAIN_BYTES`] and [`DRAIN_TIME`]; whether it ended.
async fn drained(body: Incoming) -> bool {
    if body.is_end_stream() {
        return true;
    }
    if body
        .size_hint()
        .exact()
        .is_some_and(|n| n > DRAIN_BYTES as u64)
    {
        return false;
    }
    let read = http_body_util::Limited::new(body, DRAIN_BYTES).collect();
    matches!(tokio::time::timeout(DRAIN_TIME, read).await, Ok(Ok(_)))
}

/// Why a call was refused: the HTTP status, a stable reason, and what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub retryable: bool,
    pub retry_after: Option<u64>,
    /// The request's body was read in part and dropped: the connection cannot carry another
    /// call.
    pub closes: bool,
}

impl Refused {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            retryable: false,
            retry_after: None,
            closes: false,
        }
    }

    fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    /// The JSON answer; never reaches the upstream.
    pub fn response(&self) -> Response<GatewayBody> {
        let body = serde_json::json!({
            "reason": self.reason,
            "message": self.message,
            "retryable": self.retryable,
        });
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(reason) = HeaderValue::from_str(self.reason) {
            response
                .headers_mut()
                .insert(keybroker_contract::REFUSAL_HEADER, reason);
        }
        if self.closes {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(seconds) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

fn full(bytes: Bytes) -> GatewayBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

/// A provider's upstream, ready to call.
struct Upstream {
    resource_version: String,
    loaded: Instant,
    origin: Origin,
    client: UpstreamClient,
    keys: Keys,
    timeout: Duration,
}

/// The forwarding logic, independent of the HTTP server around it.
pub struct Gateway {
    kube: kube::Client,
    stores: Stores,
    sessions: Arc<SessionKey>,
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
    authorizations: Authorizations,
    /// KiB of request bodies held for a retry with the previous key, across all calls.
    replay_budget: Arc<tokio::sync::Semaphore>,
    budgets: Budgets,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// What the audit record of one call holds.
#[derive(Debug, Default)]
struct Call {
    api_key: String,
    namespace: String,
    pod: String,
    method: String,
    path: String,
    client: String,
}

impl Gateway {
    /// A gateway over the broker's caches (shared, so each resource is watched once per
    /// process) and the session key the broker signs with.
    /// Budgets are shared with the other replicas through ConfigMaps in `namespace` (the
    /// operator's own).
    pub fn new(
        kube: kube::Client,
        stores: Stores,
        sessions: Arc<SessionKey>,
        namespace: &str,
    ) -> Arc<Self> {
        Self::with_metrics(
            kube,
            stores,
            sessions,
            namespace,
            Arc::new(Metrics::default()),
        )
    }

    /// [`Gateway::new`], counting calls in `metrics`.
    pub fn with_metrics(
        kube: kube::Client,
        stores: Stores,
        sessions: Arc<SessionKey>,
        namespace: &str,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            budgets: Budgets::new(kube.clone(), namespace, Counted::Calls),
            kube,
            stores,
            sessions,
            upstreams: Mutex::default(),
            authorizations: Authorizations::default(),
            replay_budget: Arc::new(tokio::sync::Semaphore::new(REPLAY_BUDGET_KIB)),
            metrics,
        })
    }

    /// Handles one call end to end; every outcome is a response.
    pub async fn handle(&self, req: Request<Incoming>, client: &str) -> Response<GatewayBody> {
        let started = Instant::now();
        let mut call = Call {
            method: req.method().as_str().to_owned(),
            path: req.uri().path().to_owned(),
            client: client.to_owned(),
            ..Call::default()
        };
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        match self.forward(parts, &mut body, &mut call, started).await {
            Ok(response) => {
                self.metrics
                    .gateway_call(None, response.status().as_u16(), started.elapsed());
                response
            }
            Err(refused) => {
                self.metrics
                    .gateway_call(Some(refused.reason), 0, started.elapsed());
                audit(&call, "refused", refused.reason, 0, 0, 0, started);
                let mut response = refused.response();
                if let Some(unread) = body
                    && !drained(unread).await
                {
                    // The rest of the body is still coming: the connection cannot carry another
                    // call, and saying so keeps the sidecar from reusing it.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        }
    }

    /// Forwards the call; takes `body` only once the call is going upstream, so that a refusal
    /// leaves it to [`Self::handle`] to drain.
    async fn forward(
        &self,
        req: hyper::http::request::Parts,
        body: &mut Option<Incoming>,
        call: &mut Call,
        started: Instant,
    ) -> Result<Response<GatewayBody>, Refused> {
        let Some(rest) = req
            .uri
            .path()
            .strip_prefix(keybroker_contract::paths::FORWARD)
            .map(str::to_owned)
        else {
            return Err(Refused::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "the gateway serves {}/<upstream path>",
                    keybroker_contract::paths::FORWARD
                ),
            ));
        };
        call.path = rest.clone();
        let claims = self.session(&req)?;
        call.api_key = claims.api_key.clone();
        call.namespace = claims.namespace.clone();
        call.pod = claims.pod.clone();
        let authorization = self.authorize(&claims, &call.client).await?;
        let (provider, scope) = (&authorization.provider, &authorization.scope);
        let Some(gateway) = provider.spec.gateway.as_ref() else {
            return Err(Refused::new(
                StatusCode::FORBIDDEN,
                "ApiKeyNotReady",
                format!("ApiKey {}'s provider is not a gateway", claims.api_key),
            ));
        };
        forward::check_path(&rest).map_err(|e| {
            Refused::new(StatusCode::BAD_REQUEST, "PathNotCanonical", e.to_string())
        })?;
        if req
            .uri
            .query()
            .is_some_and(|q| q.len() > forward::MAX_PATH_BYTES)
        {
            return Err(Refused::new(
                StatusCode::URI_TOO_LONG,
                "QueryTooLong",
                format!("the query is longer than {} bytes", forward::MAX_PATH_BYTES),
            ));
        }
        if !scope.allows(req.method.as_str(), &rest) {
            return Err(Refused::new(
                StatusCode::FORBIDDEN,
                "OutsideScope",
                format!(
                    "{} {rest} is not within ApiKey {}'s scope; widen its scope.actions or scope.resources (within the provider's guardrails)",
                    req.method, claims.api_key
                ),
            ));
        }
        let declared = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > scope.max_request_bytes) {
            return Err(too_large(scope.max_request_bytes));
        }
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        self.budgets
            .try_acquire(
                &claims.namespace,
                &claims.api_key,
                scope.requests_per_minute,
                scope.requests_per_day,
                now,
            )
            .await
            .map_err(|e| match e {
                BudgetError::Exhausted(exhausted) => {
                    let mut refused = Refused::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "BudgetExhausted",
                        format!(
                            "ApiKey {} used its budget of {} requests per {}; retry after {} s or raise spec.budget (within the provider's guardrails)",
                            claims.api_key,
                            exhausted.limit,
                            exhausted.window,
                            exhausted.retry_after.as_secs().max(1)
                        ),
                    )
                    .retryable();
                    refused.retry_after = Some(exhausted.retry_after.as_secs().max(1));
                    refused
                }
                BudgetError::Unavailable => Refused::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "BudgetUnavailable",
                    "the gateway could not count the call against the ApiKey's budget right now; retrying",
                )
                .retryable(),
            })?;
        let upstream = self.upstream(provider, gateway).await?;
        let bodyless = declared == Some(0)
            || (declared.is_none()
                && matches!(
                    req.method,
                    hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
                )
                && body.as_ref().is_none_or(Body::is_end_stream));
        let method = req.method.clone();
        let parts = req;
        let incoming = body.take().ok_or_else(|| {
            Refused::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal",
                "the request body was already taken",
            )
        })?;
        // What is sent first, what can be sent again with the previous key, and where the rest
        // of a body past the limit comes back.
        let (first, replay, overflow): (GatewayBody, Option<Bytes>, _) = if bodyless {
            (full(Bytes::new()), Some(Bytes::new()), None)
        } else if let Some(_held) = upstream
            .keys
            .previous
            .as_ref()
            .and(declared)
            .filter(|n| *n <= REPLAY_BYTES)
            .and_then(|n| {
                let kib = u32::try_from(n.div_ceil(1024)).ok()?;
                Arc::clone(&self.replay_budget)
                    .try_acquire_many_owned(kib)
                    .ok()
            })
        {
            let read = tokio::time::timeout(upstream.timeout, incoming.collect()).await;
            let Ok(Ok(read)) = read else {
                let mut refused = Refused::new(
                    StatusCode::BAD_REQUEST,
                    "RequestBodyIncomplete",
                    "the request body did not arrive whole; send it again",
                );
                refused.closes = true;
                return Err(refused);
            };
            let bytes = read.to_bytes();
            (full(bytes.clone()), Some(bytes), None)
        } else {
            let (capped, overflow) = Capped::new(incoming, scope.max_request_bytes);
            (capped.boxed(), None, Some(overflow))
        };
        let send = |key: &str, body: GatewayBody| {
            let request = upstream_request(&parts, &rest, gateway, &upstream.origin, key, body);
            let client = upstream.client.clone();
            let timeout = upstream.timeout;
            async move {
                let request = request?;
                match tokio::time::timeout(timeout, client.request(request)).await {
                    Ok(Ok(response)) => Ok(response),
                    Ok(Err(e)) => {
                        if !bodies::cut_at_limit(&e) {
                            warn!(error = %e, "the upstream did not answer");
                        }
                        Err(Refused::new(
                            StatusCode::BAD_GATEWAY,
                            "UpstreamUnreachable",
                            "the upstream could not be reached; the platform team finds the error in the keybroker gateway's log",
                        )
                        .retryable())
                    }
                    Err(_) => Err(Refused::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "UpstreamTimeout",
                        format!(
                            "the upstream sent no answer within {} s (the provider's spec.gateway.timeout)",
                            timeout.as_secs()
                        ),
                    )
                    .retryable()),
                }
            }
        };
        let sent = send(&upstream.keys.current, first).await;
        // A body that grew past the limit (chunked, no length declared): 413, and the rest of
        // it is drained by `handle` like any refused call's.
        if let Some(rest) = overflow.and_then(|o| o.lock().ok()?.take()) {
            *body = Some(rest);
            return Err(too_large(scope.max_request_bytes));
        }
        let mut response = sent?;
        if response.status() == StatusCode::UNAUTHORIZED
            && let (Some(previous), Some(replay)) = (&upstream.keys.previous, replay)
        {
            info!(api_key = %claims.api_key, namespace = %claims.namespace, "the upstream refused the current key; retrying once with the previous one");
            response = send(previous, full(replay)).await?;
        }
        let keys: Vec<&str> = std::iter::once(upstream.keys.current.as_str())
            .chain(upstream.keys.previous.as_deref())
            .collect();
        let status = response.status();
        let (parts, body) = response.into_parts();
        let mut answer = Response::new(
            Redacting::new(
                body,
                Redactor::new(&keys),
                std::mem::take(call),
                status.as_u16(),
                started,
            )
            .boxed(),
        );
        *answer.status_mut() = status;
        *answer.headers_mut() = forward::response_headers(&parts.headers, &keys);
        // Redaction can change the body's length: the answer goes out chunked instead (a HEAD
        // answer has no body and keeps the upstream's length).
        if method != hyper::Method::HEAD {
            answer.headers_mut().remove(header::CONTENT_LENGTH);
        }
        Ok(answer)
    }

    fn session(&self, req: &hyper::http::request::Parts) -> Result<Claims, Refused> {
        let token = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(SessionError::Missing);
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        token
            .and_then(|t| self.sessions.verify(t, now))
            .map_err(|e| {
                let refused =
                    Refused::new(StatusCode::UNAUTHORIZED, "SessionInvalid", e.to_string());
                if e == SessionError::Expired {
                    refused.retryable()
                } else {
                    refused
                }
            })
    }

    /// Authorizes the session's pod, calling from `client`, for its ApiKey from the caches,
    /// like an exchange, and compiles the ApiKey's gateway scope; memoized by the objects'
    /// versions (see [`authorized`]).
    async fn authorize(
        &self,
        claims: &Claims,
        client: &str,
    ) -> Result<Arc<Authorization>, Refused> {
        let ns = &claims.namespace;
        let key = self
            .stores
            .keys
            .get(&ObjectRef::new(&claims.api_key).within(ns));
        let pod = match self
            .stores
            .pods
            .get(&ObjectRef::new(&claims.pod).within(ns))
        {
            Some(pod) => Some(pod),
            None => kube::Api::<Pod>::namespaced(self.kube.clone(), ns)
                .get_opt(&claims.pod)
                .await
                .map_err(|e| {
                    warn!(error = %e, "reading a pod for a gateway call");
                    Refused::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "LookupFailed",
                        "the gateway could not read the pod right now; retrying",
                    )
                    .retryable()
                })?
                .map(Arc::new),
        };
        let provider = key.as_ref().and_then(|k| {
            self.stores
                .providers
                .get(&ObjectRef::new(&k.spec.provider_ref.name))
        });
        if let Some(pod) = pod.as_deref()
            && pod.metadata.uid.as_deref() == Some(claims.pod_uid.as_str())
            && !authorized::sent_by(pod, client)
        {
            return Err(Refused::new(
                StatusCode::FORBIDDEN,
                "SessionNotThisPod",
                format!(
                    "this session is pod {}'s and was sent from {client}, not from the pod: each pod's sidecar holds its own",
                    claims.pod
                ),
            ));
        }
        let namespace = self.stores.namespaces.get(&ObjectRef::new(ns));
        let inputs = Inputs::of(
            claims,
            key.as_deref(),
            pod.as_deref(),
            provider.as_deref(),
            namespace.as_deref(),
        );
        let memoized = inputs.as_ref().and_then(|i| self.authorizations.get(i));
        let authorization = match memoized {
            Some(hit) => hit,
            None => {
                let labels: BTreeMap<String, String> = namespace
                    .as_ref()
                    .map(|n| n.labels().clone())
                    .unwrap_or_default();
                let identity = PodIdentity {
                    namespace: ns.clone(),
                    service_account: claims.service_account.clone(),
                    pod_name: claims.pod.clone(),
                    pod_uid: claims.pod_uid.clone(),
                };
                let grant = authz::authorize(
                    &identity,
                    &claims.api_key,
                    key.as_deref(),
                    pod.as_deref(),
                    provider.as_deref(),
                    &labels,
                    &self.stores.sidecar_image,
                )
                .map_err(|denial| {
                    Refused::new(StatusCode::FORBIDDEN, denial.reason(), denial.to_string())
                })?;
                let (Some(key), Some(provider)) = (key, provider) else {
                    return Err(Refused::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "LookupFailed",
                        "the ApiKey or its provider vanished; retrying",
                    )
                    .retryable());
                };
                let (_, scope) = scope::compile(&key.spec, &provider.spec.guardrails, ns)
                    .map_err(|r| Refused::new(StatusCode::FORBIDDEN, r.reason(), r.to_string()))?;
                let authorization = Arc::new(Authorization {
                    provider,
                    scope,
                    grant: grant.id,
                });
                if let Some(inputs) = inputs {
                    self.authorizations
                        .insert(inputs, Arc::clone(&authorization));
                }
                authorization
            }
        };
        if authorization.grant != claims.grant {
            return Err(Refused::new(
                StatusCode::FORBIDDEN,
                "SessionSuperseded",
                format!(
                    "ApiKey {}'s rights changed since this session was issued; the sidecar fetches a new one",
                    claims.api_key
                ),
            )
            .retryable());
        }
        Ok(authorization)
    }

    /// The provider's upstream client and key, reloaded after [`UPSTREAM_TTL`] or when the
    /// provider changed.
    async fn upstream(
        &self,
        provider: &KeyProvider,
        gateway: &GatewayProvider,
    ) -> Result<Arc<Upstream>, Refused> {
        let name = provider.name_any();
        let version = provider.resource_version().unwrap_or_default();
        if let Ok(cache) = self.upstreams.lock()
            && let Some(upstream) = cache.get(&name)
            && upstream.resource_version == version
            && upstream.loaded.elapsed() < UPSTREAM_TTL
        {
            return Ok(Arc::clone(upstream));
        }
        let unavailable = |detail: String| {
            warn!(provider = %name, %detail, "the gateway's upstream is not usable");
            Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ProviderUnavailable",
                format!("KeyProvider {name} is not usable right now; its status says why"),
            )
            .retryable()
        };
        let origin = check::origin(&gateway.upstream).map_err(|e| unavailable(e.to_string()))?;
        let keys = check::key(&self.kube, gateway)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let client =
            crate::providers::http::client(gateway.ca_bundle.as_deref()).map_err(unavailable)?;
        let timeout = gateway
            .timeout
            .as_deref()
            .and_then(|t| crate::policy::parse_ttl("timeout", t).ok())
            .unwrap_or(DEFAULT_TIMEOUT);
        let upstream = Arc::new(Upstream {
            resource_version: version,
            loaded: Instant::now(),
            origin,
            client,
            keys,
            timeout,
        });
        if let Ok(mut cache) = self.upstreams.lock() {
            cache.insert(name, Arc::clone(&upstream));
        }
        Ok(upstream)
    }
}

/// The request to the upstream: its origin and the app's path and query, the app's headers
/// less its credentials and hop-by-hop ones, and the key as the provider presents it.
fn upstream_request(
    parts: &hyper::http::request::Parts,
    path: &str,
    gateway: &GatewayProvider,
    origin: &Origin,
    key: &str,
    body: GatewayBody,
) -> Result<Request<GatewayBody>, Refused> {
    let header_name = gateway
        .presentation
        .header
        .as_ref()
        .and_then(|h| HeaderName::from_bytes(h.name.as_bytes()).ok());
    let query = match &gateway.presentation.query_parameter {
        Some(name) => Some(forward::query_with_key(parts.uri.query(), name, key)),
        None => parts.uri.query().map(str::to_owned),
    };
    let scheme = if origin.https { "https" } else { "http" };
    let uri = match &query {
        Some(q) => format!("{scheme}://{}{path}?{q}", origin.authority()),
        None => format!("{scheme}://{}{path}", origin.authority()),
    };
    let bad = || {
        Refused::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the request could not be forwarded as sent (path or query)",
        )
    };
    let uri: Uri = uri.parse().map_err(|_| bad())?;
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = forward::request_headers(&parts.headers, header_name.as_ref());
    if let (Some(name), Some(presentation)) = (header_name, &gateway.presentation.header) {
        let value = format!("{}{key}", presentation.prefix.as_deref().unwrap_or(""));
        let mut value = HeaderValue::from_str(&value).map_err(|_| bad())?;
        value.set_sensitive(true);
        request.headers_mut().insert(name, value);
    }
    Ok(request)
}

fn too_large(max: u64) -> Refused {
    Refused::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestTooLarge",
        format!(
            "the request body is larger than the provider's guardrails.maxRequestBytes ({max} bytes)"
        ),
    )
}

/// One audit record per call: identifiers, status, sizes and time; never the key or a body.
fn audit(
    call: &Call,
    outcome: &str,
    reason: &str,
    upstream_status: u16,
    bytes: u64,
    redacted: u64,
    started: Instant,
) {
    info!(
        target: "keybroker::audit",
        outcome,
        reason,
        api_key = %call.api_key,
        namespace = %call.namespace,
        pod = %call.pod,
        method = %call.method,
        path = %call.path,
        upstream_status,
        response_bytes = bytes,
        redacted,
        duration_ms = started.elapsed().as_millis() as u64,
        client = %call.client,
        "gateway call"
    );
}
