//! The keybroker API (`keybroker.dev/v1alpha1`): `KeyProvider` (cluster-scoped, owned by the
//! platform team) and `ApiKey` (namespaced, owned by the app team).
//!
//! What can be checked without context (formats, bounds, non-empty lists) is in the schema and
//! CEL rules, so the apiserver refuses it at apply time; what needs the provider's guardrails is
//! checked by the controller and reported in `status`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// CEL rule shared by every TTL field: a Go duration between STS's 15-minute floor and 12 hours.
const TTL_RULE: &str = "duration(self) >= duration('15m') && duration(self) <= duration('12h')";
const TTL_MESSAGE: &str = "must be a duration such as 15m, 1h or 1h30m, between 15m and 12h";

/// How credentials are minted, and the guardrails every ApiKey that uses this provider must stay
/// within. Owned by the platform team.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keybroker.dev",
    version = "v1alpha1",
    kind = "KeyProvider",
    doc = "A way to give pods short-lived, narrowly scoped access (STS sessions of a role, calls through keybroker's gateway to an upstream whose key never leaves the broker, or OAuth2 access tokens narrowed by token exchange) and the guardrails that bound every ApiKey using it. Cluster-scoped; owned by the platform team.",
    shortname = "kp",
    status = "KeyProviderStatus",
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.aws.roleArn"}"#,
    printcolumn = r#"{"name":"Upstream","type":"string","jsonPath":".spec.gateway.upstream"}"#,
    printcolumn = r#"{"name":"Issuer","type":"string","jsonPath":".spec.oauth2.issuer"}"#,
    printcolumn = r#"{"name":"Max TTL","type":"string","jsonPath":".spec.guardrails.maxTTL"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.guardrails.defaultTTL) || !has(self.guardrails.maxTTL) || duration(self.guardrails.defaultTTL) <= duration(self.guardrails.maxTTL)").message("guardrails.defaultTTL must not exceed guardrails.maxTTL"))]
#[x_kube(validation = Rule::new("[has(self.aws), has(self.gateway), has(self.oauth2)].filter(k, k).size() == 1").message("set exactly one provider kind: aws, gateway or oauth2"))]
#[x_kube(validation = Rule::new("!has(self.gateway) || self.guardrails.allowedActions.all(a, a.matches('^[A-Z*?]+$'))").message("a gateway's guardrails.allowedActions are HTTP methods such as GET or POST, or * for all"))]
#[x_kube(validation = Rule::new("!has(self.gateway) || self.guardrails.allowedResources.all(r, r.startsWith('/'))").message("a gateway's guardrails.allowedResources are URL path patterns starting with /, e.g. /api/v1/repos/{namespace}/*"))]
#[serde(rename_all = "camelCase")]
pub struct KeyProviderSpec {
    /// Mint AWS credentials with STS AssumeRole (AWS, or any STS-compatible service such as
    /// MinIO or Ceph RGW).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsProvider>,
    /// Forward the pods' calls to an upstream API through keybroker's gateway, which adds the
    /// upstream's key: for keys the upstream cannot mint short-lived (LLM, payment, SaaS,
    /// source-forge tokens). The key never reaches a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayProvider>,
    /// Mint OAuth2 access tokens with the broker's own client at an identity provider, each
    /// narrowed to its ApiKey's audiences and scopes by token exchange (RFC 8693); the client's
    /// secret never reaches a pod. Guardrails: `allowedActions` are the scopes and
    /// `allowedResources` the audiences an ApiKey may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Provider>,
    /// Namespaces whose ApiKeys may use this provider. `{}` selects every namespace.
    pub namespace_selector: LabelSelector,
    /// Upper bounds for every ApiKey that uses this provider.
    pub guardrails: Guardrails,
    /// Anomaly rules for every ApiKey of this provider that sets none of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomalies: Option<AnomalyPolicy>,
}

/// An STS endpoint and the role the broker assumes there.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AwsProvider {
    /// ARN of the role to assume, e.g. `arn:aws:iam::123456789012:role/app-uploads`. Its trust
    /// policy must allow the broker's identity; the role needs only the rights the guardrails allow.
    #[x_kube(validation = Rule::new("self.startsWith('arn:')").message("must be an ARN (arn:partition:iam::account:role/name)"))]
    #[schemars(length(min = 20, max = 2048))]
    pub role_arn: String,
    /// STS region, e.g. `eu-west-1` (MinIO accepts any, conventionally `us-east-1`).
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub region: String,
    /// STS endpoint URL; omit for AWS's regional endpoint. `https://` except on loopback.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://127.0.0.1') || self.startsWith('http://localhost')").message("must be an https:// URL (plain http only on loopback)"))]
    #[schemars(length(max = 2048))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// PEM certificates (CAs) that `endpoint`'s TLS certificate must chain to, instead of the
    /// system's roots: an STS service with a private CA, such as an in-cluster MinIO. Used for
    /// every call to `endpoint` (AssumeRole, the readiness check, MinIO's revocation).
    #[x_kube(validation = Rule::new("self.contains('-----BEGIN CERTIFICATE-----')").message("must hold PEM certificates (-----BEGIN CERTIFICATE-----)"))]
    #[schemars(length(max = 65536))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Secret with the broker's own keys (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`). Omit to
    /// use the standard AWS credential chain, i.e. the broker's own workload identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// How credentials already issued are revoked when an ApiKey loses a right (revoked,
    /// deleted, scope or service accounts narrowed, namespace unselected, provider removed or
    /// tightened). `MinIO`: every session is tagged with a `TokenRevokeType` naming its ApiKey and
    /// grant, and revoked through MinIO's self-service `revoke-tokens` admin call with the
    /// broker's own keys. `IAMRolePolicy` (AWS): every session carries a `SourceIdentity` naming
    /// its ApiKey (the role's trust policy must allow `sts:SetSourceIdentity`), and revocation
    /// writes an inline deny on the role for that ApiKey's sessions issued before the change
    /// (the broker needs `iam:PutRolePolicy` on the role). `FilesOnly` (default): only the pods'
    /// files are removed; a leaked credential keeps working until it expires.
    #[serde(default)]
    pub revocation: Revocation,
}

/// An upstream API reached through keybroker's gateway, and the key the gateway adds.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayProvider {
    /// The upstream's origin, e.g. `https://api.example.com` or `https://gitea.corp:3000`:
    /// scheme, host and port only, the one place the gateway forwards to. `https://` except on
    /// loopback.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://127.0.0.1') || self.startsWith('http://localhost')").message("must be an https:// origin (plain http only on loopback)"))]
    #[x_kube(validation = Rule::new("self.split('://')[1].indexOf('/') == -1 && !self.contains('?') && !self.contains('#') && !self.contains('@')").message("must be an origin only (scheme, host, port): no path, query, fragment or user info; ApiKeys name the paths"))]
    #[schemars(length(min = 8, max = 2048))]
    pub upstream: String,
    /// PEM certificates (CAs) the upstream's TLS certificate must chain to, instead of the
    /// system's roots: an upstream with a private CA.
    #[x_kube(validation = Rule::new("self.contains('-----BEGIN CERTIFICATE-----')").message("must hold PEM certificates (-----BEGIN CERTIFICATE-----)"))]
    #[schemars(length(max = 65536))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Secret holding the upstream's key: data key `key`, and optionally `previousKey` during a
    /// rotation (tried once when the upstream answers 401 to `key`). Updates are picked up
    /// without a restart.
    pub key_secret_ref: SecretRef,
    /// How the gateway presents the key to the upstream.
    pub presentation: KeyPresentation,
    /// The environment variable set in the pod's app containers to the gateway's local URL for
    /// the ApiKey (the sidecar, on loopback), e.g. `OPENAI_BASE_URL`, so SDKs that read their
    /// base URL from the environment need no change. Default `KEYBROKER_<APIKEY>_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_env: Option<AppEnv>,
    /// How long the gateway waits for the upstream's response headers, e.g. `30s`; the app
    /// gets a 504 after it. Default 30s, at most 10m.
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('10m')").message("must be a duration between 1s and 10m, such as 30s"))]
    #[schemars(length(min = 2, max = 16), regex(pattern = r"^([0-9]+m)?([0-9]+s)?$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Rotate the key on a schedule through the upstream's own key-management API: mint a new
    /// key with the current one's scopes, make it `key` (the old one stays as `previousKey`),
    /// and after the grace window delete the old one at the upstream. The operator then owns the
    /// key Secret's `key` and `previousKey`, and needs `update` on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<KeyRotation>,
}

/// An OAuth2 identity provider and the broker's client there.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.clientSecretRef), has(self.clientServiceAccount)].filter(k, k).size() == 1").message("set exactly one of clientSecretRef and clientServiceAccount"))]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Provider {
    /// The issuer, e.g. `https://keycloak.corp/realms/apps`: its discovery document
    /// (`/.well-known/openid-configuration`) names the token endpoint. `https://` except on
    /// loopback.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://127.0.0.1') || self.startsWith('http://localhost')").message("must be an https:// URL (plain http only on loopback)"))]
    #[x_kube(validation = Rule::new("!self.contains('?') && !self.contains('#') && !self.contains('@')").message("must be the issuer URL only: no query, fragment or user info"))]
    #[schemars(length(min = 8, max = 2048))]
    pub issuer: String,
    /// PEM certificates (CAs) the identity provider's TLS certificate must chain to, instead
    /// of the system's roots.
    #[x_kube(validation = Rule::new("self.contains('-----BEGIN CERTIFICATE-----')").message("must hold PEM certificates (-----BEGIN CERTIFICATE-----)"))]
    #[schemars(length(max = 65536))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Secret with the broker's confidential client: data keys `clientId` and `clientSecret`.
    /// The client needs the client-credentials grant and token exchange, and may hold every
    /// scope and audience of the guardrails; each token the broker hands out is narrowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretRef>,
    /// The broker's client authenticates with a token of this Kubernetes service account
    /// (an RFC 7523 client assertion) instead of a secret: no secret exists anywhere, where the
    /// identity provider trusts the cluster's service-account issuer (Keycloak's Kubernetes
    /// identity provider, for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_service_account: Option<ClientServiceAccount>,
}

/// The broker's client at the identity provider, authenticated by a service-account token.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientServiceAccount {
    /// The client's id at the identity provider.
    #[schemars(length(min = 1, max = 255))]
    pub client_id: String,
    /// Namespace of the service account (the chart lets the operator request tokens in its
    /// own namespace only, for the names in `oauth2ClientServiceAccounts`).
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the service account.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The `aud` of its tokens, as the identity provider expects it; default the issuer.
    #[schemars(length(min = 1, max = 2048))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

/// A rotation schedule and the upstream's key-management API: exactly one kind.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.gitea)].filter(k, k).size() == 1").message("set exactly one rotation kind: gitea"))]
#[x_kube(validation = Rule::new("duration(has(self.grace) ? self.grace : '10m') < duration(self.every)").message("grace (default 10m) must be shorter than every"))]
#[serde(rename_all = "camelCase")]
pub struct KeyRotation {
    /// How often a new key is minted, e.g. `720h` (30 days). At least 1m.
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m') && duration(self) <= duration('87600h')").message("must be a duration such as 720h or 24h, at least 1m"))]
    #[schemars(
        length(min = 2, max = 16),
        regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$")
    )]
    pub every: String,
    /// How long the previous key keeps working after the new one became current, e.g. `10m`:
    /// calls already on their way with it, and gateway replicas that have not reread the
    /// Secret yet (they do within 5 s). Default 10m, at least 30s.
    #[x_kube(validation = Rule::new("duration(self) >= duration('30s')").message("must be a duration such as 10m, at least 30s"))]
    #[schemars(
        length(min = 2, max = 16),
        regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$")
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
    /// Gitea (or Forgejo) personal access tokens, managed through `/api/v1/users/{user}/tokens`
    /// on the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gitea: Option<GiteaRotation>,
}

/// Rotating a Gitea access token.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GiteaRotation {
    /// Secret with the Gitea account that owns the token, data keys `username` and `password`:
    /// Gitea creates and deletes access tokens only under basic auth.
    pub credentials_secret_ref: SecretRef,
}

/// How the key is presented: exactly one of a header or a query parameter.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.header), has(self.queryParameter)].filter(k, k).size() == 1").message("set exactly one of header or queryParameter"))]
#[serde(rename_all = "camelCase")]
pub struct KeyPresentation {
    /// A request header, e.g. `Authorization` with prefix `Bearer `.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderPresentation>,
    /// A query parameter name, e.g. `key`.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_parameter: Option<String>,
}

/// The key in a request header.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct HeaderPresentation {
    /// Header name, e.g. `Authorization`, `X-Api-Key`.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub name: String,
    /// Text before the key, e.g. `Bearer ` or `token `.
    #[schemars(length(max = 32), regex(pattern = r"^[ -~]*$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// An environment variable pointing apps at the gateway.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppEnv {
    /// Variable name, e.g. `OPENAI_BASE_URL`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// Path appended to the local URL, e.g. `/v1` when SDKs expect the base URL to include it.
    #[schemars(length(max = 256), regex(pattern = r"^(/[A-Za-z0-9._~-]+)*$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_suffix: Option<String>,
}

/// How issued credentials are revoked at the provider.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum Revocation {
    /// MinIO's `TokenRevokeType` on AssumeRole and its `revoke-tokens` admin call.
    #[serde(rename = "MinIO")]
    MinIo,
    /// An inline deny on the AWS role for sessions issued before the revocation.
    #[serde(rename = "IAMRolePolicy")]
    IamRolePolicy,
    /// The provider cannot revoke: only the files in the pods are removed.
    #[default]
    FilesOnly,
}

/// A Secret in a given namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct SecretRef {
    /// Namespace of the Secret (usually the operator's own).
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What any ApiKey using the provider may ask for.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Guardrails {
    /// Actions an ApiKey may request, e.g. `s3:GetObject`; `*` and `?` wildcards allowed. An
    /// ApiKey's action must lie entirely within one of these (`s3:Get*` is not within `s3:GetObject`).
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 128)))]
    pub allowed_actions: Vec<String>,
    /// Resource ARN patterns an ApiKey may request; `*` and `?` wildcards allowed, `{namespace}`
    /// expands to the ApiKey's namespace, e.g. `arn:aws:s3:::corp-data/{namespace}/*`.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 512)))]
    pub allowed_resources: Vec<String>,
    /// TTL for ApiKeys that do not set one. Default 1h (capped at maxTTL).
    #[serde(
        rename = "defaultTTL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[x_kube(validation = Rule::new(TTL_RULE).message(TTL_MESSAGE))]
    #[schemars(
        length(min = 2, max = 16),
        regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$")
    )]
    pub default_ttl: Option<String>,
    /// Longest TTL an ApiKey may set. Default 1h.
    #[serde(rename = "maxTTL", default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(TTL_RULE).message(TTL_MESSAGE))]
    #[schemars(
        length(min = 2, max = 16),
        regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$")
    )]
    pub max_ttl: Option<String>,
    /// Credential issuances per minute per ApiKey, a cap against runaway clients and billing
    /// abuse. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_issuances_per_minute: Option<u32>,
    /// Gateway: the largest request body the gateway forwards, in bytes. Default 1 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1073741824))]
    pub max_request_bytes: Option<u64>,
    /// Gateway: the most requests per minute an ApiKey's budget may ask for. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_requests_per_minute: Option<u32>,
    /// Gateway: the most requests per day an ApiKey's budget may ask for. Default 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000))]
    pub max_requests_per_day: Option<u64>,
}

/// Observed state of a KeyProvider.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyProviderStatus {
    /// `Ready`: the STS endpoint answered and the broker's identity works there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What revoking a credential does with this provider, in plain words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<String>,
    /// The key's rotation (`spec.gateway.rotation`): when the current key became current, what
    /// is due next and when, and the last problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationStatus>,
}

/// Where a key rotation stands. Changes only when a step is taken or fails.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// When the current key became current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// `Rotate` (mint a new key) or `RetirePrevious` (delete the previous key at the upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_step: Option<String>,
    /// When the next step is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_step_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Why the last step failed, and what to change; cleared by the next step that succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A request for short-lived credentials, used by the pods of the listed service accounts.
/// Owned by the app team; bounded by its KeyProvider's guardrails.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keybroker.dev",
    version = "v1alpha1",
    kind = "ApiKey",
    doc = "A request for short-lived, narrowly scoped credentials for the pods of the listed service accounts, minted by a KeyProvider within its guardrails. Namespaced; owned by the app team.",
    namespaced,
    shortname = "ak",
    status = "ApiKeyStatus",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".spec.providerRef.name"}"#,
    printcolumn = r#"{"name":"TTL","type":"string","jsonPath":".status.effectiveTTL"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Revoked","type":"boolean","jsonPath":".spec.revoked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySpec {
    /// The KeyProvider that mints the credentials.
    pub provider_ref: ProviderRef,
    /// Service accounts (in this namespace) whose pods may use this ApiKey.
    #[schemars(
        length(min = 1, max = 64),
        inner(
            length(min = 1, max = 253),
            regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
        )
    )]
    pub service_account_names: Vec<String>,
    /// What the credentials may do.
    pub scope: Scope,
    /// Credential lifetime, e.g. `15m` or `1h`; default: the provider's defaultTTL. For
    /// `oauth2` the identity provider sets a token's lifetime and this is its upper bound: the
    /// broker hands out no token that lives longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(TTL_RULE).message(TTL_MESSAGE))]
    #[schemars(
        length(min = 2, max = 16),
        regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$")
    )]
    pub ttl: Option<String>,
    /// Revoke without deleting: no new credentials are issued and running sidecars delete theirs
    /// within a second.
    #[serde(default)]
    pub revoked: bool,
    /// Gateway ApiKeys: how many calls the ApiKey's pods may make together; past it the gateway
    /// answers 429 with `Retry-After`. Default: the provider's maxRequestsPerMinute and
    /// maxRequestsPerDay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Rules over what the broker sees for this ApiKey, each raising a metric, an Event and an
    /// audit record when it fires, and revoking the ApiKey if `action` is `Revoke`. Default:
    /// the KeyProvider's `anomalies`, else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomalies: Option<AnomalyPolicy>,
}

/// Anomaly rules (opt-in). Counts are per broker replica and per minute.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AnomalyPolicy {
    /// `RefusalSpike`: more refused exchanges than this for the ApiKey within one minute (a
    /// misconfiguration, or someone probing with tokens that do not qualify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub refusals_per_minute: Option<u32>,
    /// `IssuanceBurst`: more credentials issued than this for the ApiKey within one minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub issuances_per_minute: Option<u32>,
    /// `TokenAfterPodGone`: a pod's token presented after the pod was deleted (a token copied
    /// out of a pod).
    #[serde(default)]
    pub token_after_pod_gone: bool,
    /// What a firing rule does beyond the metric, Event and audit record: `Alert` (default) or
    /// `Revoke` (sets spec.revoked, naming the rule in the annotation
    /// `keybroker.dev/revoked-by`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<AnomalyAction>,
}

/// What a firing anomaly rule does.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum AnomalyAction {
    #[default]
    Alert,
    Revoke,
}

/// Calls per minute and per day, for all of an ApiKey's pods together.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000))]
    pub requests_per_day: Option<u64>,
}

/// Reference to a cluster-scoped KeyProvider.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct ProviderRef {
    /// Name of the KeyProvider.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Actions and resources, in the provider's terms: for `aws`, IAM actions and ARNs; for a
/// gateway, HTTP methods and URL paths; for `oauth2`, scopes and audiences.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct Scope {
    /// Actions, e.g. `s3:PutObject` (aws), `GET` (gateway) or the scope `reports:read`
    /// (oauth2); `*` and `?` wildcards allowed within the guardrails (not for oauth2, whose
    /// tokens name exact scopes).
    #[schemars(
        length(min = 1, max = 64),
        inner(
            length(min = 1, max = 128),
            regex(pattern = r"^([A-Za-z0-9*?-]+:[A-Za-z0-9*?]+|[A-Z*?]+)$")
        )
    )]
    pub actions: Vec<String>,
    /// Resource patterns, e.g. `arn:aws:s3:::corp-data/team-a/invoices/*` (aws),
    /// `/api/v1/repos/team-a/*` (gateway) or the audience `reports-api` (oauth2, exact);
    /// `{namespace}` expands to this ApiKey's namespace.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 512)))]
    pub resources: Vec<String>,
}

/// Observed state of an ApiKey.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    /// `Ready`: the ApiKey is within its provider's guardrails and credentials can be issued.
    /// When False, the reason and message say what to change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What every issuance allows, as compiled: for `aws` the session policy the broker attaches
    /// (IAM JSON); for a gateway the methods and paths it forwards (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_policy: Option<String>,
    /// SHA-256 of the session policy, as recorded in audit records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_hash: Option<String>,
    /// The credential lifetime issued, after defaults and guardrails.
    #[serde(
        rename = "effectiveTTL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub effective_ttl: Option<String>,
    /// Identifies the rights of the credentials issued now (provider, session policy, TTL,
    /// service accounts). Every credential is tagged with it at the provider; when it changes,
    /// credentials tagged with the previous one are revoked there and running pods are told to
    /// fetch new ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// What the ApiKey used today (UTC), as its broker and gateway replicas counted it;
    /// refreshed every few seconds while it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ApiKeyUsage>,
}

/// An ApiKey's usage in one UTC day.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyUsage {
    /// The UTC day counted, e.g. `2026-12-02`.
    pub day: String,
    /// Gateway calls counted against the budget today. Includes calls a gateway replica
    /// reserved and has not made yet (at most a fiftieth of the minute's budget per replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<u64>,
    /// Credentials (aws) or gateway sessions issued today.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuances: Option<u64>,
}
