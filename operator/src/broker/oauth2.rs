//! The oauth2 kind in the broker: a narrowed access token per exchange, remembered so that it
//! can be revoked at the identity provider the moment its ApiKey no longer holds its grant.

use std::sync::Arc;

use futures::StreamExt;
use keybroker_contract::wire::ExchangeResponse;
use kube::runtime::reflector::{ObjectRef, Store};

use super::audit::{self, Issuance, TokenIds};
use super::authz::{Grant, PodIdentity};
use super::{Broker, ExchangeError, recorded_grant};
use crate::crd::{ApiKey, OAuth2Provider};
use crate::providers::oauth2::issued::{Issued, Token as IssuedToken};
use crate::providers::oauth2::mint::{MintError, Minter};
use crate::providers::oauth2::scope::Narrowed;

/// Revocations sent to identity providers at once, so an ApiKey of many pods is cut off in one
/// round trip or a few.
const REVOCATIONS_AT_ONCE: usize = 16;

impl Broker {
    /// An access token narrowed to the grant's audiences and scopes, remembered for its
    /// revocation.
    pub(super) async fn token(
        &self,
        identity: &PodIdentity,
        name: &str,
        oauth2: &OAuth2Provider,
        grant: &Grant,
    ) -> Result<Issuance, ExchangeError> {
        let narrowed = Narrowed::from_policy(&grant.session_policy).ok_or_else(|| {
            ExchangeError::ProviderUnavailable("the grant holds no oauth2 scope".into())
        })?;
        let minted = self
            .minter
            .mint(oauth2, &narrowed, grant.ttl)
            .await
            .map_err(|e| match e {
                MintError::Refused { code, message } => {
                    ExchangeError::ProviderRefused { code, message }
                }
                MintError::Wider(detail) => ExchangeError::ProviderRefused {
                    code: "TokenWiderThanApiKey".into(),
                    message: detail,
                },
                MintError::Unavailable(detail) => ExchangeError::ProviderUnavailable(detail),
            })?;
        self.issued.record(
            &identity.namespace,
            name,
            IssuedToken {
                grant: grant.id.clone(),
                pod: identity.pod_name.clone(),
                id: minted.id.clone(),
                token: minted.token.access_token.clone(),
                expires: minted.expires,
                provider: oauth2.clone(),
            },
            k8s_openapi::jiff::Timestamp::now().as_second(),
        );
        Ok(Issuance {
            response: ExchangeResponse {
                credentials: None,
                session: None,
                token: Some(minted.token),
                refresh_at: minted.refresh_at,
                grant: grant.id.clone(),
                renewal: String::new(),
            },
            token_ids: Some(TokenIds {
                id: minted.id,
                client: minted.client,
            }),
        })
    }
}

/// Revokes at the identity provider, as soon as the ApiKey cache shows it, every oauth2 token
/// this replica handed out whose ApiKey no longer holds the token's grant (revoked, deleted, or
/// its rights changed). Runs as long as the process.
pub(super) async fn revoke_withdrawn_tokens(
    keys: Store<ApiKey>,
    issued: Arc<Issued>,
    minter: Arc<Minter>,
) {
    loop {
        issued.wake.notified().await;
        for (ns, name) in issued.take_changed() {
            let key = keys.get(&ObjectRef::new(&name).within(&ns));
            let valid = key
                .as_deref()
                .filter(|k| !k.spec.revoked)
                .and_then(recorded_grant);
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            let withdrawn = issued.withdraw(&ns, &name, valid, now);
            futures::stream::iter(withdrawn)
                .for_each_concurrent(REVOCATIONS_AT_ONCE, |token| {
                    let (minter, ns, name) = (&minter, &ns, &name);
                    async move {
                        let outcome = minter.revoke(&token.provider, &token.token).await;
                        audit::token_revocation(ns, name, &token, outcome.err().as_ref());
                    }
                })
                .await;
        }
    }
}
