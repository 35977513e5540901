//! The oauth2 kind: the broker holds one confidential client at an identity provider (the
//! secret stays in the operator's namespace) and hands each pod an access token narrowed to
//! its ApiKey by token exchange (RFC 8693): audience and scope only ever shrink, and the broker
//! checks that they did. The pod gets the token as files; never a refresh token or the secret.

pub mod check;
pub mod issued;
pub mod mint;
pub mod scope;
pub mod token;

/// What revoking does with an oauth2 provider (the KeyProvider's `status.revocation`).
pub const REVOCATION: &str = "the pods' token files are removed, no new token is issued, and the broker replica that issued each token revokes it at the identity provider (RFC 7009): resource servers that introspect refuse it at once; those that only check signatures accept it until it expires (at most the ApiKey's ttl)";
