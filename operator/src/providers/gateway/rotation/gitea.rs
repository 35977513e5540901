//! Gitea's (and Forgejo's) access-token API for one user, with basic auth: what the rotation
//! calls at the upstream. Every call is bounded in time and answer size; Gitea's own error text
//! goes to the operator's log only.

use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde::Deserialize;
use tracing::warn;

use super::{CALL_TIMEOUT, MAX_ANSWER_BYTES, MAX_PAGES, RotationError};
use crate::crd::{GatewayProvider, GiteaRotation};
use crate::providers::gateway::check::{self, Origin};

/// A token as Gitea lists it (never with its value).
#[derive(Clone, Debug, Deserialize)]
pub(super) struct Token {
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub token_last_eight: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// A created token: Gitea shows its value once.
#[derive(Deserialize)]
struct Created {
    id: i64,
    sha1: String,
}

/// Gitea's token API for one user, with basic auth.
pub(super) struct Gitea {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    pub origin: Origin,
    pub user: String,
    authorization: String,
}

impl Gitea {
    pub(super) async fn connect(
        kube: &kube::Client,
        gateway: &GatewayProvider,
        rotation: &GiteaRotation,
    ) -> Result<Self, RotationError> {
        let r = &rotation.credentials_secret_ref;
        let bad = |detail: &str| RotationError::Credentials {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            detail: detail.to_owned(),
        };
        let secret = Api::<Secret>::namespaced(kube.clone(), &r.namespace)
            .get_opt(&r.name)
            .await
            .map_err(|e| {
                warn!(namespace = %r.namespace, name = %r.name, error = %e, "reading the rotation credentials");
                bad("cannot be read by the operator")
            })?
            .ok_or_else(|| bad("does not exist"))?;
        let field = |k: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(k))
                .and_then(|b| std::str::from_utf8(&b.0).ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        let user = field("username").ok_or_else(|| bad("has no data key `username`"))?;
        if !user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad("`username` is not a Gitea user name"));
        }
        let password = field("password").ok_or_else(|| bad("has no data key `password`"))?;
        let origin = check::origin(&gateway.upstream)?;
        let client = crate::providers::http::client(gateway.ca_bundle.as_deref())
            .map_err(|detail| check::Problem::CaBundle { detail })?;
        let authorization = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        Ok(Self {
            client,
            origin,
            user,
            authorization,
        })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}://{}/api/v1/users/{}/tokens{path}",
            if self.origin.https { "https" } else { "http" },
            self.origin.authority(),
            self.user
        )
    }

    /// `(status, body)` of one call; the body bounded.
    async fn call(
        &self,
        action: &'static str,
        method: hyper::Method,
        url: String,
        body: Option<String>,
    ) -> Result<(u16, Bytes), RotationError> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header(hyper::header::AUTHORIZATION, &self.authorization)
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|_| RotationError::Unreachable { action })?;
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => {
                warn!(upstream = %self.origin.authority(), action, %error, "Gitea's token API unreachable");
                Err(RotationError::Unreachable { action })
            }
            Err(_) => {
                warn!(upstream = %self.origin.authority(), action, "Gitea's token API did not answer in time");
                Err(RotationError::Unreachable { action })
            }
        }
    }

    fn refused(&self, action: &'static str, status: u16, body: &Bytes) -> RotationError {
        warn!(
            upstream = %self.origin.authority(),
            action,
            status,
            answer = %String::from_utf8_lossy(&body[..body.len().min(512)]),
            "Gitea refused a token call"
        );
        RotationError::Refused {
            action,
            user: self.user.clone(),
            status,
        }
    }

    /// Every token of the user (names, scopes, last eight characters).
    pub(super) async fn tokens(&self) -> Result<Vec<Token>, RotationError> {
        const ACTION: &str = "listing the access tokens";
        let mut all = Vec::new();
        for page in 1..=MAX_PAGES {
            let (status, body) = self
                .call(
                    ACTION,
                    hyper::Method::GET,
                    self.url(&format!("?page={page}&limit=50")),
                    None,
                )
                .await?;
            if status != 200 {
                return Err(self.refused(ACTION, status, &body));
            }
            let tokens: Vec<Token> =
                serde_json::from_slice(&body).map_err(|_| self.refused(ACTION, status, &body))?;
            let last = tokens.len() < 50;
            all.extend(tokens);
            if last {
                break;
            }
        }
        Ok(all)
    }

    /// Creates token `name` with `scopes`: `(id, value)`.
    pub(super) async fn create(
        &self,
        name: &str,
        scopes: &[String],
    ) -> Result<(i64, String), RotationError> {
        const ACTION: &str = "creating an access token";
        let body = serde_json::json!({"name": name, "scopes": scopes}).to_string();
        let (status, answer) = self
            .call(ACTION, hyper::Method::POST, self.url(""), Some(body))
            .await?;
        if status != 201 {
            return Err(self.refused(ACTION, status, &answer));
        }
        let created = serde_json::from_slice::<Created>(&answer)
            .ok()
            .filter(|c| !c.sha1.is_empty())
            .ok_or_else(|| {
                warn!(upstream = %self.origin.authority(), "Gitea's answer to a token creation has no id and value");
                RotationError::Refused {
                    action: ACTION,
                    user: self.user.clone(),
                    status,
                }
            })?;
        Ok((created.id, created.sha1))
    }

    /// Deletes token `id`; one already gone counts as deleted.
    pub(super) async fn delete(&self, id: i64) -> Result<(), RotationError> {
        const ACTION: &str = "deleting an access token";
        let (status, body) = self
            .call(
                ACTION,
                hyper::Method::DELETE,
                self.url(&format!("/{id}")),
                None,
            )
            .await?;
        match status {
            204 | 404 => Ok(()),
            _ => Err(self.refused(ACTION, status, &body)),
        }
    }
}
