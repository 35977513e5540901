//! Scheduled key rotation for gateway providers whose upstream has a key-management API
//! (`spec.gateway.rotation`; Gitea's access tokens today).
//!
//! The state lives in the key Secret, so a restarted or new leader carries on where the last
//! one stopped: `key`, `previousKey` during the grace window, and the annotation
//! [`KEY_SINCE_ANNOTATION`] (when `key` became current; the Secret's creation when absent, so a
//! key of unknown age is rotated early rather than late). Each pass takes at most one step:
//!
//! 1. **Rotate**, once `every` has passed: a new token with the current token's scopes is
//!    minted at the upstream, then written as `key` with the old one as `previousKey`, by an
//!    optimistic write (if it fails, the new token is deleted again). Tokens of this provider
//!    left behind by an interrupted pass are deleted first.
//! 2. **RetirePrevious**, once `grace` has passed: the previous token is deleted at the
//!    upstream, then `previousKey` is removed. In that order: a crash in between leaves a
//!    `previousKey` the upstream refuses, never a live token nobody tracks.
//!
//! The gateway rereads the Secret within 5 s, and a 401 to the current key is retried with the
//! previous one, so no call fails during a rotation. Every step is audited
//! (`keybroker::audit`); token values never reach a log, an Event or the status.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

mod gitea;
use gitea::Gitea;

use super::check::{self, Keys};
use super::{KEY, PREVIOUS_KEY};
use crate::crd::{GatewayProvider, KeyRotation, RotationStatus};
use crate::policy::parse_ttl;

/// Annotation on the key Secret: when `key` became current (RFC 3339).
pub const KEY_SINCE_ANNOTATION: &str = "keybroker.dev/key-since";
/// `grace` when the provider does not set it.
const DEFAULT_GRACE: Duration = Duration::from_secs(600);
/// The shortest schedule: the gateway rereads keys every 5 s, so grace has ample margin.
const MIN_EVERY: Duration = Duration::from_secs(60);
const MIN_GRACE: Duration = Duration::from_secs(30);
/// How long a failed step waits before it is tried again.
pub const RETRY: Duration = Duration::from_secs(60);
/// Bounds on each call to the upstream's key-management API.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Token pages read at most (50 tokens each).
const MAX_PAGES: u32 = 20;

/// The provider's schedule, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub every: Duration,
    pub grace: Duration,
}

/// What a pass does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Mint a new key and make it current.
    Rotate,
    /// Delete the previous key at the upstream and forget it.
    RetirePrevious,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Rotate => "Rotate",
            Step::RetirePrevious => "RetirePrevious",
        }
    }
}

/// Why a rotation step failed. Messages say what to change and never hold a key, a password or
/// the upstream's own error text (that goes to the operator's log).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    #[error("spec.gateway.rotation: {0}")]
    Schedule(String),
    #[error(transparent)]
    KeySecret(#[from] check::Problem),
    #[error(
        "rotation credentials Secret {namespace}/{name}: {detail}; it needs data keys `username` and `password` of the Gitea account that owns the token"
    )]
    Credentials {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error(
        "Gitea answered {status} when {action} of user {user}; check the rotation credentials and that the account owns the token (the operator's log has Gitea's answer)"
    )]
    Refused {
        action: &'static str,
        user: String,
        status: u16,
    },
    #[error(
        "Gitea could not be reached when {action}; the step is retried (the operator's log has the error)"
    )]
    Unreachable { action: &'static str },
    #[error(
        "the current key is not one of Gitea user {user}'s access tokens, so its scopes are unknown; put a token of that user in the key Secret, or name its owner in the credentials Secret"
    )]
    CurrentKeyUnknown { user: String },
    #[error(
        "the key Secret {namespace}/{name} could not be updated (the new token was deleted at Gitea again); the operator needs update on it (the chart's keyRotation.enabled), or it changed meanwhile and the step is retried"
    )]
    SecretWrite { namespace: String, name: String },
}

/// The schedule of `rotation`, checked as the CRD's rules do (for objects that skipped them).
pub fn schedule(rotation: &KeyRotation) -> Result<Schedule, RotationError> {
    let every = parse_ttl("every", &rotation.every)
        .map_err(|_| RotationError::Schedule("every must be a duration such as 720h".into()))?;
    let grace = match &rotation.grace {
        None => DEFAULT_GRACE,
        Some(g) => parse_ttl("grace", g)
            .map_err(|_| RotationError::Schedule("grace must be a duration such as 10m".into()))?,
    };
    if every < MIN_EVERY {
        return Err(RotationError::Schedule("every must be at least 1m".into()));
    }
    if grace < MIN_GRACE {
        return Err(RotationError::Schedule("grace must be at least 30s".into()));
    }
    if grace >= every {
        return Err(RotationError::Schedule(
            "grace (default 10m) must be shorter than every".into(),
        ));
    }
    if rotation.gitea.is_none() {
        return Err(RotationError::Schedule(
            "set exactly one rotation kind: gitea".into(),
        ));
    }
    Ok(Schedule { every, grace })
}

/// Pure: the next step for a key current since `since` (unix s), and when it is due (unix s).
pub fn due(schedule: &Schedule, since: i64, has_previous: bool) -> (Step, i64) {
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    if has_previous {
        (
            Step::RetirePrevious,
            since.saturating_add(secs(schedule.grace)),
        )
    } else {
        (Step::Rotate, since.saturating_add(secs(schedule.every)))
    }
}

/// When the key in `secret` became current (unix s): the annotation, else the Secret's creation.
pub fn key_since(secret: &Secret) -> Option<i64> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(KEY_SINCE_ANNOTATION))
        .and_then(|v| v.parse::<Timestamp>().ok())
        .or_else(|| secret.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .map(|t| t.as_second())
}

/// The name of a token this provider mints at `now`; [`is_ours`] recognizes it.
pub fn token_name(provider: &str, now: i64) -> String {
    format!("{}{now}", token_prefix(provider))
}

fn token_prefix(provider: &str) -> String {
    let short: String = provider.chars().take(100).collect();
    format!("keybroker-{short}-")
}

/// Whether `name` is a token [`token_name`] made for `provider`.
pub fn is_ours(provider: &str, name: &str) -> bool {
    name.strip_prefix(&token_prefix(provider))
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

/// What a pass did: the status to publish, when to come back, and the step taken or failed.
#[derive(Debug)]
pub struct Pass {
    pub status: RotationStatus,
    pub requeue: Duration,
    /// The step taken, and a note for the KeyProvider's Event.
    pub done: Option<(Step, String)>,
    pub failed: Option<RotationError>,
}

/// One pass of `provider`'s rotation at `now` (unix s): a step if one is due.
pub async fn pass(
    kube: &kube::Client,
    provider: &str,
    gateway: &GatewayProvider,
    rotation: &KeyRotation,
    now: i64,
) -> Pass {
    let failed = |error: RotationError, status: RotationStatus| {
        warn!(provider, %error, "key rotation step failed");
        Pass {
            status: RotationStatus {
                last_error: Some(error.to_string()),
                ..status
            },
            requeue: RETRY,
            done: None,
            failed: Some(error),
        }
    };
    let schedule = match schedule(rotation) {
        Ok(s) => s,
        Err(e) => return failed(e, RotationStatus::default()),
    };
    let secrets = Api::<Secret>::namespaced(kube.clone(), &gateway.key_secret_ref.namespace);
    let (secret, keys) = match check::key_secret(&secrets, &gateway.key_secret_ref).await {
        Ok(read) => read,
        Err(e) => return failed(e.into(), RotationStatus::default()),
    };
    let since = key_since(&secret).unwrap_or(now);
    let (step, at) = due(&schedule, since, keys.previous.is_some());
    let waiting = status(since, step, at, None);
    if now < at {
        return Pass {
            requeue: Duration::from_secs(u64::try_from(at - now).unwrap_or(1)),
            status: waiting,
            done: None,
            failed: None,
        };
    }
    let Some(gitea_rotation) = &rotation.gitea else {
        return failed(
            RotationError::Schedule("set exactly one rotation kind: gitea".into()),
            waiting,
        );
    };
    let gitea = match Gitea::connect(kube, gateway, gitea_rotation).await {
        Ok(g) => g,
        Err(e) => return failed(e, waiting),
    };
    let taken = match step {
        Step::Rotate => rotate(&gitea, &secrets, provider, gateway, secret, &keys, now).await,
        Step::RetirePrevious => retire(&gitea, &secrets, provider, gateway, secret, &keys).await,
    };
    match taken {
        Ok((since, note)) => {
            let has_previous = step == Step::Rotate;
            let (next, at) = due(&schedule, since, has_previous);
            Pass {
                status: status(since, next, at, None),
                requeue: Duration::from_secs(u64::try_from(at - now).unwrap_or(1).max(1)),
                done: Some((step, note)),
                failed: None,
            }
        }
        Err(e) => failed(e, waiting),
    }
}

fn status(since: i64, step: Step, at: i64, last_error: Option<String>) -> RotationStatus {
    let time = |s: i64| Timestamp::from_second(s).ok().map(Time);
    RotationStatus {
        key_since: time(since),
        next_step: Some(step.name().to_owned()),
        next_step_at: time(at),
        last_error,
    }
}

/// Mints the new token and makes it current: `(since, note)`.
async fn rotate(
    gitea: &Gitea,
    secrets: &Api<Secret>,
    provider: &str,
    gateway: &GatewayProvider,
    mut secret: Secret,
    keys: &Keys,
    now: i64,
) -> Result<(i64, String), RotationError> {
    let tokens = gitea.tokens().await?;
    let current = tokens
        .iter()
        .find(|t| last_eight(&keys.current) == Some(t.token_last_eight.as_str()))
        .ok_or_else(|| RotationError::CurrentKeyUnknown {
            user: gitea.user.clone(),
        })?;
    for orphan in tokens
        .iter()
        .filter(|t| t.id != current.id && is_ours(provider, &t.name))
    {
        gitea.delete(orphan.id).await?;
        audit(
            provider,
            gitea,
            "orphan_deleted",
            &orphan.name,
            "deleted a token an interrupted rotation left at the upstream",
        );
    }
    let name = token_name(provider, now);
    let (id, value) = gitea.create(&name, &current.scopes).await?;
    audit(
        provider,
        gitea,
        "minted",
        &name,
        "minted a new token with the current token's scopes",
    );
    let data = secret.data.get_or_insert_with(Default::default);
    data.insert(KEY.into(), ByteString(value.clone().into_bytes()));
    data.insert(
        PREVIOUS_KEY.into(),
        ByteString(keys.current.clone().into_bytes()),
    );
    secret
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(KEY_SINCE_ANNOTATION.into(), rfc3339(now));
    if let Err(e) = write(secrets, gateway, &secret).await
        && !holds_key(secrets, gateway, &value).await
    {
        if gitea.delete(id).await.is_ok() {
            audit(
                provider,
                gitea,
                "minted_deleted",
                &name,
                "deleted the new token again: the key Secret could not be updated",
            );
        }
        return Err(e);
    }
    audit(
        provider,
        gitea,
        "made_current",
        &name,
        "the new token is the key; the previous one is kept for the grace window",
    );
    Ok((
        now,
        format!(
            "minted Gitea token {name} with the scopes of {} and made it the key; the previous token is deleted after the grace window",
            current.name
        ),
    ))
}

/// Deletes the previous token at the upstream, then forgets it: `(since, note)`.
async fn retire(
    gitea: &Gitea,
    secrets: &Api<Secret>,
    provider: &str,
    gateway: &GatewayProvider,
    mut secret: Secret,
    keys: &Keys,
) -> Result<(i64, String), RotationError> {
    let since = key_since(&secret).unwrap_or_default();
    let previous = keys.previous.as_deref().and_then(last_eight);
    let tokens = gitea.tokens().await?;
    let found = tokens.iter().find(|t| {
        previous == Some(t.token_last_eight.as_str())
            && last_eight(&keys.current) != Some(t.token_last_eight.as_str())
    });
    let note = match found {
        Some(token) => {
            gitea.delete(token.id).await?;
            audit(
                provider,
                gitea,
                "previous_deleted",
                &token.name,
                "deleted the previous token at the upstream",
            );
            format!(
                "deleted the previous Gitea token {} after the grace window",
                token.name
            )
        }
        None => {
            audit(
                provider,
                gitea,
                "previous_absent",
                "",
                "the previous key is not a token at the upstream; nothing to delete",
            );
            "the previous key was no longer a token at Gitea; nothing to delete".to_owned()
        }
    };
    if let Some(data) = secret.data.as_mut() {
        data.remove(PREVIOUS_KEY);
    }
    write(secrets, gateway, &secret).await?;
    audit(
        provider,
        gitea,
        "previous_forgotten",
        "",
        "removed previousKey from the key Secret",
    );
    Ok((since, note))
}

/// Whether the key Secret holds `value` as `key`: a write whose answer was lost may have
/// landed, and then the new token must not be deleted.
async fn holds_key(secrets: &Api<Secret>, gateway: &GatewayProvider, value: &str) -> bool {
    secrets
        .get_opt(&gateway.key_secret_ref.name)
        .await
        .ok()
        .flatten()
        .and_then(|s| check::keys_of(&s).ok())
        .is_some_and(|keys| keys.current == value)
}

/// Replaces the key Secret; fails if it changed since it was read.
async fn write(
    secrets: &Api<Secret>,
    gateway: &GatewayProvider,
    secret: &Secret,
) -> Result<(), RotationError> {
    let r = &gateway.key_secret_ref;
    secrets
        .replace(&r.name, &PostParams::default(), secret)
        .await
        .map(drop)
        .map_err(|e| {
            warn!(namespace = %r.namespace, name = %r.name, error = %e, "writing the rotated key Secret");
            RotationError::SecretWrite {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            }
        })
}

fn audit(provider: &str, gitea: &Gitea, step: &'static str, token: &str, message: &'static str) {
    info!(
        target: "keybroker::audit",
        outcome = step,
        provider,
        upstream = %gitea.origin.authority(),
        user = %gitea.user,
        token_name = token,
        "key rotation: {message}"
    );
}

fn rfc3339(unix: i64) -> String {
    Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The last eight characters of a key, which Gitea lists for each token.
fn last_eight(key: &str) -> Option<&str> {
    key.len().checked_sub(8).and_then(|start| key.get(start..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{GiteaRotation, SecretRef};

    fn rotation(every: &str, grace: Option<&str>) -> KeyRotation {
        KeyRotation {
            every: every.into(),
            grace: grace.map(str::to_owned),
            gitea: Some(GiteaRotation {
                credentials_secret_ref: SecretRef {
                    namespace: "keybroker".into(),
                    name: "gitea-admin".into(),
                },
            }),
        }
    }

    #[test]
    fn schedules_need_a_grace_shorter_than_the_period_and_sane_floors() {
        assert_eq!(
            schedule(&rotation("720h", None)).unwrap(),
            Schedule {
                every: Duration::from_secs(720 * 3600),
                grace: DEFAULT_GRACE
            }
        );
        assert_eq!(
            schedule(&rotation("1m", Some("30s"))).unwrap().grace,
            Duration::from_secs(30)
        );
        for (every, grace, says) in [
            ("5m", None, "shorter than every"),
            ("30s", Some("10s"), "at least 1m"),
            ("1h", Some("10s"), "at least 30s"),
            ("soon", None, "such as 720h"),
        ] {
            let e = schedule(&rotation(every, grace)).unwrap_err().to_string();
            assert!(e.contains(says), "{every}/{grace:?}: {e}");
        }
        let mut none = rotation("1h", None);
        none.gitea = None;
        assert!(schedule(&none).unwrap_err().to_string().contains("gitea"));
    }

    #[test]
    fn a_key_is_rotated_after_every_and_its_predecessor_retired_after_grace() {
        let s = Schedule {
            every: Duration::from_secs(3600),
            grace: Duration::from_secs(600),
        };
        assert_eq!(due(&s, 1000, false), (Step::Rotate, 4600));
        assert_eq!(due(&s, 1000, true), (Step::RetirePrevious, 1600));
    }

    #[test]
    fn the_key_age_comes_from_the_annotation_or_the_secrets_creation() {
        let mut secret = Secret::default();
        assert_eq!(key_since(&secret), None);
        secret.metadata.creation_timestamp = Some(Time(Timestamp::from_second(100).unwrap()));
        assert_eq!(key_since(&secret), Some(100));
        secret.metadata.annotations =
            Some([(KEY_SINCE_ANNOTATION.to_owned(), rfc3339(5000))].into());
        assert_eq!(key_since(&secret), Some(5000));
        secret.metadata.annotations =
            Some([(KEY_SINCE_ANNOTATION.to_owned(), "garbage".to_owned())].into());
        assert_eq!(
            key_since(&secret),
            Some(100),
            "a bad annotation: the creation"
        );
    }

    #[test]
    fn only_tokens_this_provider_named_count_as_its_leftovers() {
        let name = token_name("gitea-team", 1_800_000_000);
        assert_eq!(name, "keybroker-gitea-team-1800000000");
        assert!(is_ours("gitea-team", &name));
        assert!(!is_ours("gitea", &name), "another provider's prefix");
        assert!(!is_ours("gitea-team", "keybroker-gitea-team-"));
        assert!(!is_ours("gitea-team", "keybroker-gitea-team-12x"));
        assert!(!is_ours("gitea-team", "ci-token"));
        assert!(token_name(&"p".repeat(253), 1).len() < 130);
    }

    #[test]
    fn last_eight_is_what_gitea_lists() {
        assert_eq!(last_eight("0123456789abcdef"), Some("89abcdef"));
        assert_eq!(last_eight("short"), None);
    }

    #[test]
    fn errors_say_what_to_change_without_secrets() {
        let e = RotationError::Refused {
            action: "creating an access token",
            user: "admin".into(),
            status: 401,
        };
        assert!(
            e.to_string()
                .contains("answered 401 when creating an access token of user admin")
        );
        let e = RotationError::SecretWrite {
            namespace: "keybroker".into(),
            name: "gitea-key".into(),
        };
        assert!(e.to_string().contains("keyRotation.enabled"));
    }
}
