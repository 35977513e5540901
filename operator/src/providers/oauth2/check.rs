//! KeyProvider `Ready` for oauth2: the issuer's discovery document names it, the identity
//! provider can exchange tokens, and the broker's client gets a token with its own secret or service-account token.

use super::token::{self, Problem, TOKEN_EXCHANGE};
use crate::crd::OAuth2Provider;

/// Proves the provider usable with real calls: the message of `Ready=True`, or the problem.
pub async fn verify(kube: &kube::Client, oauth2: &OAuth2Provider) -> Result<String, Problem> {
    let idp = token::discover(oauth2).await?;
    if let Some(grants) = &idp.grant_types
        && !grants.iter().any(|g| g == TOKEN_EXCHANGE)
    {
        return Err(Problem::NoTokenExchange {
            detail: format!(
                "its discovery document does not list {TOKEN_EXCHANGE} in grant_types_supported"
            ),
        });
    }
    let client = token::client_auth(kube, oauth2).await?;
    idp.token(&client, &[("grant_type", "client_credentials")])
        .await
        .map_err(|e| Problem::ClientRefused {
            detail: format!(
                "client credentials for client {:?} at {}: {e}; the client must be confidential with service accounts enabled",
                client.id(), idp.token_endpoint
            ),
        })?;
    Ok(format!(
        "the token endpoint {} issued a token to client {:?}",
        idp.token_endpoint,
        client.id()
    ))
}
