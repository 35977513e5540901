//! The tokens this broker replica handed out, kept until they expire so they can be revoked at
//! the identity provider (RFC 7009) the moment their ApiKey no longer holds the grant they were
//! minted under (revoked, deleted, narrowed, its provider changed). Only the replica that minted
//! a token holds it, so each replica revokes its own; a token of a replica that died lives out
//! its lifetime (short: at most the ApiKey's ttl). Held in memory only, never written anywhere.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::crd::OAuth2Provider;

/// Tokens kept per ApiKey at most (every pod's latest, and a refresh or two each); past it the
/// oldest is dropped (it then lives out its lifetime if revoked).
const MAX_PER_KEY: usize = 4096;

/// One token handed out. `Debug` hides the token.
#[derive(Clone)]
pub struct Token {
    pub grant: String,
    pub pod: String,
    /// The JWT's `jti`, for the audit record; empty for an opaque token.
    pub id: String,
    pub token: String,
    /// Unix seconds.
    pub expires: i64,
    /// Where to revoke it, even once its KeyProvider is gone.
    pub provider: OAuth2Provider,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("grant", &self.grant)
            .field("pod", &self.pod)
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

/// ApiKey namespace and name.
type KeyName = (String, String);

/// The tokens handed out, by ApiKey, and the ApiKeys to look at again.
#[derive(Debug, Default)]
pub struct Issued {
    tokens: Mutex<HashMap<KeyName, Vec<Token>>>,
    changed: Mutex<HashSet<KeyName>>,
    pub wake: Notify,
}

impl Issued {
    /// Remembers `token`, handed out for ApiKey `namespace/name`.
    pub fn record(&self, namespace: &str, name: &str, token: Token, now: i64) {
        let Ok(mut tokens) = self.tokens.lock() else {
            return;
        };
        let held = tokens
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default();
        held.retain(|t| t.expires > now);
        if held.len() >= MAX_PER_KEY {
            held.remove(0);
        }
        held.push(token);
    }

    /// Marks ApiKey `namespace/name` changed (or every ApiKey with tokens, for `None`: a
    /// deletion or a restarted watch) and wakes the revoker, if tokens are held for it.
    pub fn changed(&self, key: Option<(&str, &str)>) {
        let Ok(tokens) = self.tokens.lock() else {
            return;
        };
        let Ok(mut changed) = self.changed.lock() else {
            return;
        };
        match key {
            Some((ns, name)) => {
                let key = (ns.to_owned(), name.to_owned());
                if !tokens.contains_key(&key) {
                    return;
                }
                changed.insert(key);
            }
            None => changed.extend(tokens.keys().cloned()),
        }
        drop((tokens, changed));
        self.wake.notify_one();
    }

    /// The ApiKeys marked changed since the last call.
    pub fn take_changed(&self) -> Vec<KeyName> {
        self.changed
            .lock()
            .map(|mut c| c.drain().collect())
            .unwrap_or_default()
    }

    /// Removes and returns the unexpired tokens of ApiKey `namespace/name` that were not
    /// minted under `valid` (all of them when it holds no grant now).
    pub fn withdraw(
        &self,
        namespace: &str,
        name: &str,
        valid: Option<&str>,
        now: i64,
    ) -> Vec<Token> {
        let Ok(mut tokens) = self.tokens.lock() else {
            return Vec::new();
        };
        let key = (namespace.to_owned(), name.to_owned());
        let Some(held) = tokens.get_mut(&key) else {
            return Vec::new();
        };
        let (kept, withdrawn): (Vec<Token>, Vec<Token>) = held
            .drain(..)
            .filter(|t| t.expires > now)
            .partition(|t| valid == Some(t.grant.as_str()));
        *held = kept;
        if held.is_empty() {
            tokens.remove(&key);
        }
        withdrawn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SecretRef;

    fn token(grant: &str, pod: &str, expires: i64) -> Token {
        Token {
            grant: grant.into(),
            pod: pod.into(),
            id: format!("jti-{pod}"),
            token: format!("eyJ.{pod}.sig"),
            expires,
            provider: OAuth2Provider {
                issuer: "https://idp.example/realms/a".into(),
                ca_bundle: None,
                client_secret_ref: Some(SecretRef {
                    namespace: "keybroker-system".into(),
                    name: "client".into(),
                }),
                client_service_account: None,
            },
        }
    }

    #[test]
    fn tokens_of_a_withdrawn_grant_are_handed_back_once_and_expired_ones_never() {
        let issued = Issued::default();
        issued.record("team-a", "reports", token("g1", "a", 100), 0);
        issued.record("team-a", "reports", token("g1", "b", 10), 0);
        issued.record("team-a", "reports", token("g2", "c", 100), 0);
        issued.record("team-b", "reports", token("g1", "d", 100), 0);
        // The ApiKey moved to g2: g1's unexpired token is withdrawn, g2's kept.
        let withdrawn = issued.withdraw("team-a", "reports", Some("g2"), 20);
        assert_eq!(
            withdrawn.iter().map(|t| t.pod.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert!(
            issued
                .withdraw("team-a", "reports", Some("g2"), 20)
                .is_empty()
        );
        // Revoked: no grant is valid, every token goes; the other namespace's stays.
        let withdrawn = issued.withdraw("team-a", "reports", None, 20);
        assert_eq!(withdrawn.len(), 1);
        assert_eq!(withdrawn[0].pod, "c");
        assert_eq!(
            issued.withdraw("team-b", "reports", Some("g1"), 20).len(),
            0
        );
        assert_eq!(issued.withdraw("team-b", "reports", None, 20).len(), 1);
        assert!(!format!("{:?}", token("g", "p", 1)).contains("eyJ"));
    }

    #[test]
    fn only_apikeys_with_tokens_are_marked_and_a_deletion_marks_them_all() {
        let issued = Issued::default();
        issued.changed(Some(("team-a", "none")));
        assert!(issued.take_changed().is_empty());
        issued.record("team-a", "reports", token("g1", "a", 100), 0);
        issued.record("team-b", "other", token("g1", "b", 100), 0);
        issued.changed(Some(("team-a", "reports")));
        assert_eq!(
            issued.take_changed(),
            [("team-a".to_owned(), "reports".to_owned())]
        );
        issued.changed(None);
        let mut all = issued.take_changed();
        all.sort();
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn an_apikey_holds_a_bounded_number_of_tokens() {
        let issued = Issued::default();
        for i in 0..MAX_PER_KEY + 10 {
            issued.record("ns", "k", token("g", &i.to_string(), 100), 0);
        }
        let all = issued.withdraw("ns", "k", None, 0);
        assert_eq!(all.len(), MAX_PER_KEY);
        assert_eq!(all[0].pod, "10", "the oldest were dropped");
    }
}
