//! KeyProvider `Ready` for a gateway: the upstream is an origin the gateway can reach with the
//! configured trust, and the key Secret holds a key. The upstream is not called: without an
//! ApiKey's path there is nothing meaningful to ask it.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::KEY;
use crate::crd::{GatewayProvider, SecretRef};
use crate::providers::aws::check::ca_certificates;

/// Why a gateway provider is not usable. Messages never contain key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("spec.gateway.upstream {upstream:?}: {detail}")]
    Upstream { upstream: String, detail: String },
    #[error("spec.gateway.caBundle: {detail}")]
    CaBundle { detail: String },
    #[error("key Secret {namespace}/{name}: {detail}")]
    KeySecret {
        namespace: String,
        name: String,
        detail: String,
    },
}

impl Problem {
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::Upstream { .. } => "UpstreamInvalid",
            Problem::CaBundle { .. } => "CABundleInvalid",
            Problem::KeySecret { .. } => "KeySecretInvalid",
        }
    }
}

/// The upstream's origin, parsed: what the gateway connects to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// `scheme://host[:port]` as the upstream's `Host` and URLs want it.
    pub fn authority(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses `spec.gateway.upstream`: an origin only; plain http only on loopback.
pub fn origin(upstream: &str) -> Result<Origin, Problem> {
    let bad = |detail: &str| Problem::Upstream {
        upstream: upstream.to_owned(),
        detail: detail.to_owned(),
    };
    let uri: hyper::Uri = upstream.parse().map_err(|_| bad("is not a URL"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("must start with https://")),
    };
    let host = uri.host().ok_or_else(|| bad("has no host"))?.to_owned();
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        || upstream.contains('@')
    {
        return Err(bad(
            "must be an origin only (scheme, host, port): no path, query or user info",
        ));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !https && !loopback {
        return Err(bad("must be https:// (plain http only on loopback)"));
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(Origin { https, host, port })
}

/// Reads the current key from the provider's Secret. The error never contains the key.
pub async fn key(kube: &kube::Client, gateway: &GatewayProvider) -> Result<Keys, Problem> {
    let r = &gateway.key_secret_ref;
    let secrets = Api::<Secret>::namespaced(kube.clone(), &r.namespace);
    key_secret(&secrets, r).await.map(|(_, keys)| keys)
}

/// The key Secret `r` (read through `secrets`, an Api of its namespace) and the keys in it:
/// the Secret too, for a writer that needs its resourceVersion.
pub async fn key_secret(secrets: &Api<Secret>, r: &SecretRef) -> Result<(Secret, Keys), Problem> {
    let problem = |detail: String| Problem::KeySecret {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        detail,
    };
    let secret = secrets
        .get_opt(&r.name)
        .await
        .map_err(|e| {
            tracing::warn!(namespace = %r.namespace, name = %r.name, error = %e, "reading the gateway's key Secret");
            problem("cannot be read by the operator; its log has the apiserver's answer".into())
        })?
        .ok_or_else(|| problem("does not exist; create it with the upstream's key under data key `key`".into()))?;
    let keys = keys_of(&secret).map_err(problem)?;
    Ok((secret, keys))
}

/// The keys a Secret holds: `key`, and `previousKey` during a rotation.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub current: String,
    pub previous: Option<String>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("current", &"<redacted>")
            .field("previous", &self.previous.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The keys in `secret`, or what is wrong with it (never the key itself).
pub fn keys_of(secret: &Secret) -> Result<Keys, String> {
    let data = secret.data.as_ref();
    let read = |name: &str| -> Result<Option<String>, String> {
        match data.and_then(|d| d.get(name)) {
            None => Ok(None),
            Some(bytes) => {
                let text = std::str::from_utf8(&bytes.0)
                    .map_err(|_| format!("data key `{name}` is not UTF-8 text"))?
                    .trim()
                    .to_owned();
                if text.is_empty() {
                    return Err(format!("data key `{name}` is empty"));
                }
                if text.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    return Err(format!(
                        "data key `{name}` holds spaces or control characters; store the key alone"
                    ));
                }
                Ok(Some(text))
            }
        }
    };
    let current = read(KEY)?.ok_or_else(|| format!("has no data key `{KEY}`"))?;
    let previous = read(super::PREVIOUS_KEY)?.filter(|p| *p != current);
    Ok(Keys { current, previous })
}

/// `Ready` for a gateway provider.
pub async fn verify(kube: &kube::Client, gateway: &GatewayProvider) -> Result<String, Problem> {
    let origin = origin(&gateway.upstream)?;
    if let Some(bundle) = &gateway.ca_bundle {
        ca_certificates(bundle).map_err(|p| Problem::CaBundle {
            detail: match p {
                crate::providers::aws::check::Problem::CaBundle { detail } => detail,
                other => other.summary(),
            },
        })?;
    }
    let keys = key(kube, gateway).await?;
    Ok(format!(
        "the gateway forwards to {}://{} with the key from Secret {}/{}{}",
        if origin.https { "https" } else { "http" },
        origin.authority(),
        gateway.key_secret_ref.namespace,
        gateway.key_secret_ref.name,
        if keys.previous.is_some() {
            " (a previous key is kept for the rotation)"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    #[test]
    fn upstreams_are_origins_and_plain_http_only_on_loopback() {
        assert_eq!(
            origin("https://api.example.com").unwrap(),
            Origin {
                https: true,
                host: "api.example.com".into(),
                port: 443
            }
        );
        assert_eq!(origin("http://127.0.0.1:8080").unwrap().port, 8080);
        assert_eq!(
            origin("https://gitea.corp:3000").unwrap().authority(),
            "gitea.corp:3000"
        );
        for bad in [
            "http://api.example.com",
            "https://api.example.com/v1",
            "https://api.example.com?x=1",
            "https://user@api.example.com",
            "ftp://api.example.com",
            "api.example.com",
        ] {
            assert!(origin(bad).is_err(), "{bad}");
        }
    }

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn key_secrets_say_what_is_wrong_without_the_key() {
        let keys = keys_of(&secret(&[
            ("key", "s3cr3t-current\n"),
            ("previousKey", "old"),
        ]))
        .unwrap();
        assert_eq!(keys.current, "s3cr3t-current");
        assert_eq!(keys.previous.as_deref(), Some("old"));
        assert!(!format!("{keys:?}").contains("s3cr3t"));
        let same = keys_of(&secret(&[("key", "k"), ("previousKey", "k")])).unwrap();
        assert_eq!(same.previous, None);
        for (bad, why) in [
            (secret(&[]), "has no data key `key`"),
            (secret(&[("key", "  ")]), "is empty"),
            (secret(&[("key", "two words-s3cr3t")]), "spaces"),
        ] {
            let e = keys_of(&bad).unwrap_err();
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }
}
