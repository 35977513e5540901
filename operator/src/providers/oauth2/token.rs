//! Talking to the identity provider: its discovery document, and its token endpoint with the
//! broker's client (client credentials, token exchange). Bounded in time and size; an error
//! never carries the client's secret or a token.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use serde::Deserialize;

use crate::crd::{ClientServiceAccount, OAuth2Provider, SecretRef};

/// How long one call to the identity provider may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from it.
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Data keys of the client Secret.
pub const CLIENT_ID: &str = "clientId";
pub const CLIENT_SECRET: &str = "clientSecret";

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Why the identity provider cannot be used. Messages never contain the secret or a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("spec.oauth2.issuer {issuer:?}: {detail}")]
    Issuer { issuer: String, detail: String },
    #[error("spec.oauth2.caBundle: {detail}")]
    CaBundle { detail: String },
    #[error("client Secret {namespace}/{name}: {detail}")]
    ClientSecret {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("client service account {namespace}/{name}: {detail}")]
    ServiceAccount {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("the identity provider refused the broker's client: {detail}")]
    ClientRefused { detail: String },
    #[error("the identity provider cannot exchange tokens: {detail}")]
    NoTokenExchange { detail: String },
}

impl Problem {
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::Issuer { .. } => "IssuerUnavailable",
            Problem::CaBundle { .. } => "CABundleInvalid",
            Problem::ClientSecret { .. } => "ClientSecretInvalid",
            Problem::ServiceAccount { .. } => "ServiceAccountTokenUnavailable",
            Problem::ClientRefused { .. } => "ClientRefused",
            Problem::NoTokenExchange { .. } => "TokenExchangeUnsupported",
        }
    }
}

/// The broker's client at the identity provider and how it proves itself. `Debug` hides the
/// secret and the token.
#[derive(Clone)]
pub enum ClientAuth {
    /// `client_secret_basic` (RFC 6749 section 2.3.1).
    Secret { id: String, secret: String },
    /// A service-account token as the client assertion (RFC 7523 section 2.2).
    Assertion { id: String, token: String },
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, id) = match self {
            ClientAuth::Secret { id, .. } => ("secret", id),
            ClientAuth::Assertion { id, .. } => ("service-account token", id),
        };
        f.debug_struct("ClientAuth")
            .field("id", id)
            .field("by", &kind)
            .finish_non_exhaustive()
    }
}

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long the service-account tokens the broker requests live (the API's minimum).
const ASSERTION_SECONDS: i64 = 600;

impl ClientAuth {
    pub fn id(&self) -> &str {
        match self {
            ClientAuth::Secret { id, .. } | ClientAuth::Assertion { id, .. } => id,
        }
    }

    /// The `Authorization` header, for a client with a secret (both parts form-encoded first).
    fn basic(&self) -> Option<String> {
        let ClientAuth::Secret { id, secret } = self else {
            return None;
        };
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let pair = format!("{}:{}", encode(id), encode(secret));
        Some(format!("Basic {}", STANDARD.encode(pair)))
    }

    /// The form fields that authenticate the client, for a client assertion.
    fn form_fields(&self) -> Vec<(&str, &str)> {
        match self {
            ClientAuth::Secret { .. } => Vec::new(),
            ClientAuth::Assertion { id, token } => vec![
                ("client_id", id.as_str()),
                ("client_assertion_type", JWT_BEARER_ASSERTION),
                ("client_assertion", token.as_str()),
            ],
        }
    }
}

/// The broker's client of `oauth2`: from its client Secret, or a fresh token of its service
/// account.
pub async fn client_auth(
    kube: &kube::Client,
    oauth2: &OAuth2Provider,
) -> Result<ClientAuth, Problem> {
    match (&oauth2.client_secret_ref, &oauth2.client_service_account) {
        (Some(r), None) => client_secret(kube, r).await,
        (None, Some(sa)) => service_account_token(kube, sa, &oauth2.issuer).await,
        _ => Err(Problem::ClientSecret {
            namespace: String::new(),
            name: String::new(),
            detail: "set exactly one of spec.oauth2.clientSecretRef and clientServiceAccount"
                .into(),
        }),
    }
}

/// Reads the broker's client from the Secret `r`.
async fn client_secret(kube: &kube::Client, r: &SecretRef) -> Result<ClientAuth, Problem> {
    let bad = |detail: String| Problem::ClientSecret {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        detail,
    };
    let secret = Api::<Secret>::namespaced(kube.clone(), &r.namespace)
        .get_opt(&r.name)
        .await
        .map_err(|e| bad(format!("cannot be read: {e}")))?
        .ok_or_else(|| bad("does not exist".into()))?;
    let data = secret.data.unwrap_or_default();
    let value = |key: &str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                bad(format!(
                    "has no data key {key:?} (set {CLIENT_ID} and {CLIENT_SECRET})"
                ))
            })
    };
    Ok(ClientAuth::Secret {
        id: value(CLIENT_ID)?,
        secret: value(CLIENT_SECRET)?,
    })
}

/// A token of service account `sa` addressed to the identity provider (TokenRequest).
async fn service_account_token(
    kube: &kube::Client,
    sa: &ClientServiceAccount,
    issuer: &str,
) -> Result<ClientAuth, Problem> {
    let audience = sa.audience.clone().unwrap_or_else(|| issuer.to_owned());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience]),
            expiration_seconds: Some(ASSERTION_SECONDS),
            bound_object_ref: None,
        }),
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(kube.clone(), &sa.namespace)
        .create_token_request(&sa.name, &PostParams::default(), &request)
        .await
        .map_err(|e| Problem::ServiceAccount {
            namespace: sa.namespace.clone(),
            name: sa.name.clone(),
            detail: format!("no token could be requested: {e}"),
        })?
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Problem::ServiceAccount {
            namespace: sa.namespace.clone(),
            name: sa.name.clone(),
            detail: "the token request returned no token".into(),
        })?;
    Ok(ClientAuth::Assertion {
        id: sa.client_id.clone(),
        token,
    })
}

/// The identity provider as its discovery document describes it.
#[derive(Clone, Debug)]
pub struct Idp {
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    pub token_endpoint: String,
    /// `grant_types_supported`, when the document lists it.
    pub grant_types: Option<Vec<String>>,
    /// RFC 7009's endpoint, when the identity provider has one.
    pub revocation_endpoint: Option<String>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    token_endpoint: String,
    #[serde(default)]
    grant_types_supported: Option<Vec<String>>,
    #[serde(default)]
    revocation_endpoint: Option<String>,
}

/// A token endpoint's answer. `Debug` hides the token.
#[derive(Clone, Deserialize)]
pub struct TokenAnswer {
    pub access_token: String,
    #[serde(default)]
    pub token_type: String,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub scope: Option<String>,
}

impl std::fmt::Debug for TokenAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAnswer")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Why a token request failed: refused by the identity provider (its OAuth2 error, for the
/// operator's log), or the identity provider could not be reached or answered nonsense.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{error}: {description}")]
    Refused { error: String, description: String },
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// Reads `oauth2`'s discovery document; its issuer must be the configured one (OpenID
/// Connect Discovery, section 4.3), so a document served for another issuer is not trusted.
pub async fn discover(oauth2: &OAuth2Provider) -> Result<Idp, Problem> {
    let issuer = oauth2.issuer.trim_end_matches('/');
    let bad = |detail: String| Problem::Issuer {
        issuer: oauth2.issuer.clone(),
        detail,
    };
    let http = crate::providers::http::client(oauth2.ca_bundle.as_deref())
        .map_err(|detail| Problem::CaBundle { detail })?;
    let url = format!("{issuer}/.well-known/openid-configuration");
    let request = Request::get(&url)
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| bad(format!("{url} is not a usable URL: {e}")))?;
    let (status, body) = call(&http, request)
        .await
        .map_err(|e| bad(format!("{url}: {e}")))?;
    if status != 200 {
        return Err(bad(format!("{url} answered {status}")));
    }
    let document: Discovery = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("{url} is not a discovery document: {e}")))?;
    if document.issuer.trim_end_matches('/') != issuer {
        return Err(bad(format!(
            "the discovery document names issuer {:?}; set spec.oauth2.issuer to exactly that",
            document.issuer
        )));
    }
    Ok(Idp {
        http,
        token_endpoint: document.token_endpoint,
        grant_types: document.grant_types_supported,
        revocation_endpoint: document.revocation_endpoint,
    })
}

impl Idp {
    /// One request to the token endpoint with `client`'s credentials and `form`.
    pub async fn token(
        &self,
        client: &ClientAuth,
        form: &[(&str, &str)],
    ) -> Result<TokenAnswer, TokenError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .extend_pairs(client.form_fields())
            .finish();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(&self.token_endpoint)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        if let Some(basic) = client.basic() {
            request = request.header(header::AUTHORIZATION, basic);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| TokenError::Unavailable(format!("the token endpoint's URL: {e}")))?;
        let (status, body) = call(&self.http, request)
            .await
            .map_err(|e| TokenError::Unavailable(format!("{}: {e}", self.token_endpoint)))?;
        if status == 200 {
            return serde_json::from_slice(&body).map_err(|_| {
                TokenError::Unavailable(format!(
                    "{} answered 200 without a token",
                    self.token_endpoint
                ))
            });
        }
        match serde_json::from_slice::<ErrorAnswer>(&body) {
            Ok(e) if (400..500).contains(&status) && !e.error.is_empty() => {
                Err(TokenError::Refused {
                    error: e.error,
                    description: e.error_description,
                })
            }
            _ => Err(TokenError::Unavailable(format!(
                "{} answered {status}",
                self.token_endpoint
            ))),
        }
    }
}

impl Idp {
    /// Revokes access token `token` (RFC 7009) with `client`'s credentials.
    pub async fn revoke(&self, client: &ClientAuth, token: &str) -> Result<(), TokenError> {
        let endpoint = self.revocation_endpoint.as_deref().ok_or_else(|| {
            TokenError::Unavailable("the discovery document names no revocation_endpoint".into())
        })?;
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs([("token", token), ("token_type_hint", "access_token")])
            .extend_pairs(client.form_fields())
            .finish();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(endpoint)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(basic) = client.basic() {
            request = request.header(header::AUTHORIZATION, basic);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| TokenError::Unavailable(format!("the revocation endpoint's URL: {e}")))?;
        let (status, body) = call(&self.http, request)
            .await
            .map_err(|e| TokenError::Unavailable(format!("{endpoint}: {e}")))?;
        match status {
            200 => Ok(()),
            _ => match serde_json::from_slice::<ErrorAnswer>(&body) {
                Ok(e) if !e.error.is_empty() => Err(TokenError::Refused {
                    error: e.error,
                    description: e.error_description,
                }),
                _ => Err(TokenError::Unavailable(format!(
                    "{endpoint} answered {status}"
                ))),
            },
        }
    }
}

async fn call(
    http: &Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<(u16, Bytes), String> {
    let answer = async {
        let response = http.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(CALL_TIMEOUT, answer)
        .await
        .map_err(|_| format!("no answer within {}s", CALL_TIMEOUT.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_sent_form_encoded_and_never_shown() {
        let client = ClientAuth::Secret {
            id: "kb broker".into(),
            secret: "s3:cr+t".into(),
        };
        let basic = client.basic().unwrap();
        let decoded = STANDARD.decode(basic.trim_start_matches("Basic ")).unwrap();
        assert_eq!(decoded, b"kb+broker:s3%3Acr%2Bt");
        assert!(client.form_fields().is_empty());
        assert!(!format!("{client:?}").contains("s3:cr"));
        // A client assertion goes in the form, with the client id, and no Authorization.
        let client = ClientAuth::Assertion {
            id: "keybroker".into(),
            token: "eyJsa.token.sig".into(),
        };
        assert_eq!(client.basic(), None);
        assert_eq!(
            client.form_fields(),
            vec![
                ("client_id", "keybroker"),
                ("client_assertion_type", JWT_BEARER_ASSERTION),
                ("client_assertion", "eyJsa.token.sig"),
            ]
        );
        assert!(!format!("{client:?}").contains("eyJsa"));
        let answer: TokenAnswer =
            serde_json::from_str(r#"{"access_token":"eyJsecret","expires_in":60}"#).unwrap();
        assert!(!format!("{answer:?}").contains("eyJsecret"));
    }
}
