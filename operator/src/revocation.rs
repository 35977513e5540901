//! Provider-side revocation, the pure part.
//!
//! Every credential is minted under a *grant*: an identifier of the rights it carries (the
//! ApiKey and provider objects, the session policy, the TTL, the service accounts). The provider
//! tags the credential with [`revoke_tag`] (MinIO: its `TokenRevokeType`). The controller records
//! the grant it has judged in the ApiKey's `status.grant`, and the broker mints only under the
//! grant recorded there, so every tag that exists at the provider is one the controller knew.
//! When the grant changes (a right withdrawn or widened, the key revoked, deleted, or no longer
//! Ready) the controller revokes the previous tag at the provider, and the pods still entitled
//! fetch credentials under the new grant at once (the broker's long-poll tells them).

use std::time::Duration;

use sha2::{Digest, Sha256};

/// The grant of credentials for one ApiKey: the same inputs always give the same identifier.
pub fn grant_id(
    apikey_uid: &str,
    provider_uid: &str,
    session_policy: &str,
    ttl: Duration,
    service_accounts: &[String],
) -> String {
    let mut accounts: Vec<&str> = service_accounts.iter().map(String::as_str).collect();
    accounts.sort_unstable();
    accounts.dedup();
    let mut hash = Sha256::new();
    for part in [apikey_uid, provider_uid, session_policy] {
        hash.update(part.len().to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.update(ttl.as_secs().to_be_bytes());
    for account in accounts {
        hash.update(account.len().to_be_bytes());
        hash.update(account.as_bytes());
    }
    hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The tag a credential of `grant` carries at the provider: it names the ApiKey (so an audit
/// of the provider's sessions reads as keybroker's) and the grant (so revoking one grant
/// leaves the ApiKey's next grant, and every other ApiKey, untouched).
pub fn revoke_tag(namespace: &str, name: &str, grant: &str) -> String {
    format!("keybroker:{namespace}/{name}:{grant}")
}

/// Why an ApiKey's credentials were revoked: a stable, low-cardinality word for the audit
/// record and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The ApiKey was deleted.
    Deleted,
    /// The KeyProvider was deleted.
    ProviderDeleted,
    /// The ApiKey is no longer Ready (revoked, namespace unselected, provider tightened...):
    /// the verdict's reason says which.
    NotReady(&'static str),
    /// Still Ready, but with other rights (scope, TTL or service accounts changed).
    GrantChanged,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Deleted => "ApiKeyDeleted",
            Cause::ProviderDeleted => "ProviderDeleted",
            Cause::NotReady(reason) => reason,
            Cause::GrantChanged => "GrantChanged",
        }
    }
}

/// What the controller must do about an ApiKey's recorded grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition<'a> {
    /// Nothing was issued under another grant: record `to` (if any) and go on.
    Keep,
    /// Credentials of `from` may exist: revoke them at the provider, then record `to`.
    Revoke { from: &'a str },
}

/// Compares the recorded grant with the one just judged.
pub fn transition<'a>(recorded: Option<&'a str>, judged: Option<&str>) -> Transition<'a> {
    match recorded {
        Some(from) if judged != Some(from) => Transition::Revoke { from },
        _ => Transition::Keep,
    }
}

/// The inline policy that revokes, on an AWS role, every session of one ApiKey issued before
/// `before` (RFC 3339): AWS's documented "revoke older sessions", narrowed to the sessions
/// whose `SourceIdentity` names that ApiKey so that the role's other users are unaffected.
pub fn aws_deny_older_sessions(source_identity: &str, before: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "KeybrokerRevokeOlderSessions",
            "Effect": "Deny",
            "Action": ["*"],
            "Resource": ["*"],
            "Condition": {
                "StringEquals": {"aws:SourceIdentity": source_identity},
                "DateLessThan": {"aws:TokenIssueTime": before},
            },
        }],
    })
    .to_string()
}

/// The `SourceIdentity` of an ApiKey's AWS sessions: `<namespace>.<name>` when it fits STS's
/// rules (2-64 characters of `[\w+=,.@-]`), else a digest of it with a readable prefix.
pub fn aws_source_identity(namespace: &str, name: &str) -> String {
    let readable = format!("{namespace}.{name}");
    if readable.len() <= 64 {
        return readable;
    }
    let digest = Sha256::digest(readable.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = readable.chars().take(64 - 1 - hex.len()).collect();
    format!("{prefix}-{hex}")
}

/// The name of the inline policy revoking one ApiKey's older sessions (IAM: at most 128
/// characters of `[\w+=,.@-]`).
pub fn aws_policy_name(source_identity: &str) -> String {
    format!("keybroker-revoke-{source_identity}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(policy: &str, accounts: &[&str]) -> String {
        let accounts: Vec<String> = accounts.iter().map(|a| (*a).to_owned()).collect();
        grant_id(
            "key-uid",
            "provider-uid",
            policy,
            Duration::from_secs(900),
            &accounts,
        )
    }

    #[test]
    fn the_grant_changes_with_every_right_and_only_with_them() {
        let base = grant("{p}", &["a", "b"]);
        assert_eq!(base.len(), 16);
        assert_eq!(
            base,
            grant("{p}", &["b", "a", "a"]),
            "order and duplicates do not matter"
        );
        assert_ne!(base, grant("{q}", &["a", "b"]), "the scope");
        assert_ne!(base, grant("{p}", &["a"]), "the service accounts");
        let accounts = vec!["a".to_owned(), "b".to_owned()];
        assert_ne!(
            base,
            grant_id(
                "key-uid",
                "provider-uid",
                "{p}",
                Duration::from_secs(901),
                &accounts
            ),
            "the TTL"
        );
        assert_ne!(
            base,
            grant_id(
                "other-key",
                "provider-uid",
                "{p}",
                Duration::from_secs(900),
                &accounts
            ),
            "a recreated ApiKey"
        );
        assert_ne!(
            base,
            grant_id(
                "key-uid",
                "other-provider",
                "{p}",
                Duration::from_secs(900),
                &accounts
            ),
            "a recreated provider"
        );
        // Field boundaries are unambiguous.
        assert_ne!(
            grant_id("ab", "c", "", Duration::ZERO, &[]),
            grant_id("a", "bc", "", Duration::ZERO, &[])
        );
    }

    #[test]
    fn a_recorded_grant_is_revoked_whenever_the_judged_one_differs() {
        assert_eq!(transition(None, None), Transition::Keep);
        assert_eq!(transition(None, Some("g1")), Transition::Keep);
        assert_eq!(transition(Some("g1"), Some("g1")), Transition::Keep);
        assert_eq!(
            transition(Some("g1"), Some("g2")),
            Transition::Revoke { from: "g1" }
        );
        assert_eq!(
            transition(Some("g1"), None),
            Transition::Revoke { from: "g1" }
        );
    }

    #[test]
    fn the_tag_names_the_apikey_and_the_grant() {
        assert_eq!(
            revoke_tag("team-a", "uploader", "0123456789abcdef"),
            "keybroker:team-a/uploader:0123456789abcdef"
        );
    }

    #[test]
    fn the_aws_deny_covers_only_older_sessions_of_one_apikey() {
        let doc: serde_json::Value = serde_json::from_str(&aws_deny_older_sessions(
            "team-a.uploader",
            "2026-12-01T10:00:00Z",
        ))
        .unwrap();
        let statement = &doc["Statement"][0];
        assert_eq!(doc["Version"], "2012-10-17");
        assert_eq!(statement["Effect"], "Deny");
        assert_eq!(statement["Action"], serde_json::json!(["*"]));
        assert_eq!(
            statement["Condition"]["StringEquals"]["aws:SourceIdentity"],
            "team-a.uploader"
        );
        assert_eq!(
            statement["Condition"]["DateLessThan"]["aws:TokenIssueTime"],
            "2026-12-01T10:00:00Z"
        );
        assert_eq!(
            statement["Condition"].as_object().map(|c| c.len()),
            Some(2),
            "no other condition may widen or narrow it"
        );
    }

    #[test]
    fn source_identities_fit_sts_rules() {
        let ok = |s: &str| {
            (2..=64).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        };
        assert_eq!(aws_source_identity("team-a", "uploader"), "team-a.uploader");
        let long = aws_source_identity(&"n".repeat(63), &"k".repeat(253));
        assert!(ok(&long), "{long}");
        assert_ne!(long, aws_source_identity(&"n".repeat(63), &"k".repeat(252)));
        let name = aws_policy_name(&long);
        assert!(name.len() <= 128, "{name}");
    }
}
