//! What the sidecar holds per ApiKey, shared by the key's refresh task and revocation poller,
//! the credentials endpoint, the probes and `/metrics`.
//!
//! Every change to the files happens under the key's lock and without awaiting, so "write",
//! "revoke", "expire" and "shut down" are totally ordered: an exchange that was in flight when
//! the ApiKey was revoked cannot bring its credentials back (see [`Key::install`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};

use jiff::Timestamp;
use tokio::sync::{Notify, watch};

use crate::atomic::{self, Writer};
use crate::files;
use crate::gateway::ValidSession;
use crate::token;

/// Why credentials were removed before the sidecar stopped (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Removal {
    /// The broker pushed a revocation (ApiKey revoked or deleted).
    Revoked,
    /// An exchange was refused for good (403, not retryable).
    Refused,
    /// They expired while refreshes kept failing.
    Expired,
}

impl Removal {
    fn label(self) -> &'static str {
        match self {
            Removal::Revoked => "revoked",
            Removal::Refused => "refused",
            Removal::Expired => "expired",
        }
    }
}

/// An ApiKey's provider kind, as the broker's last answer for it showed: what the endpoints
/// can serve for it, and what to tell an app that asks the wrong one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Aws,
    Gateway,
    OAuth2,
}

/// What an ApiKey holds: files for the app (AWS credentials, an OAuth2 token) or a session for
/// the local gateway. One at a time, so an ApiKey whose provider changed kind keeps nothing of
/// the old one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    Aws(files::Valid),
    Token(token::Valid),
    Session(ValidSession),
}

impl Held {
    pub fn kind(&self) -> Kind {
        match self {
            Held::Aws(_) => Kind::Aws,
            Held::Token(_) => Kind::OAuth2,
            Held::Session(_) => Kind::Gateway,
        }
    }

    pub fn expiration(&self) -> Timestamp {
        match self {
            Held::Aws(c) => c.expiration,
            Held::Token(t) => t.expiration,
            Held::Session(s) => s.expiration,
        }
    }

    /// The files of `<output-dir>/<apikey>/`; none for a session.
    fn files(&self) -> Option<Vec<(&'static str, Vec<u8>)>> {
        match self {
            Held::Aws(c) => Some(files::render(c)),
            Held::Token(t) => Some(token::render(t)),
            Held::Session(_) => None,
        }
    }
}

/// What [`Key::install`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    Written,
    /// A revocation or shutdown happened since the exchange started; nothing was written.
    Superseded,
}

#[derive(Debug, Default)]
struct Inner {
    held: Option<Held>,
    /// The kind of what was last held; kept after a removal, so that an endpoint can still
    /// say why it serves nothing for this ApiKey.
    kind: Option<Kind>,
    /// The broker's grant the held credentials were minted under.
    grant: Option<String>,
    /// The ApiKey's renewal mark when they were issued.
    renewal: String,
    /// Why access was last taken away for good (revoked, refused), until access is held
    /// again: what the local gateway tells the app instead of "try again".
    withdrawn: Option<Removal>,
    /// Bumped on every removal; an exchange that started under an older epoch is stale.
    epoch: u64,
    /// First credentials were written once (the startup probe).
    started: bool,
    stopping: bool,
    refreshes: u64,
    failures: BTreeMap<String, u64>,
    removals: BTreeMap<Removal, u64>,
}

/// What the broker issued credentials under: sent back in the revocation poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub grant: String,
    pub renewal: String,
}

#[cfg(test)]
impl From<&str> for Origin {
    fn from(grant: &str) -> Self {
        Self {
            grant: grant.to_owned(),
            renewal: String::new(),
        }
    }
}

/// One ApiKey's credentials and counters.
#[derive(Debug)]
pub struct Key {
    pub name: String,
    inner: Mutex<Inner>,
    holding: watch::Sender<bool>,
    /// Wakes the refresh task at once (the broker said the rights changed).
    renew: Notify,
    /// Tells the refresh task the revocation poll removed the credentials.
    revoked: Notify,
}

impl Key {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            inner: Mutex::default(),
            holding: watch::Sender::new(false),
            renew: Notify::new(),
            revoked: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave Inner half-updated in a way that matters here.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// To pass to [`Key::install`]: read before starting an exchange.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Holds `held`, publishing its files (a session has none), unless something removed the
    /// key's access since `epoch` was read. On a write error what was held stays held (a failed
    /// publish leaves the previous files in place).
    pub fn install(
        &self,
        epoch: u64,
        held: Held,
        origin: Origin,
        writer: &Writer,
    ) -> Result<Installed, atomic::Error> {
        let mut inner = self.lock();
        if inner.epoch != epoch || inner.stopping {
            return Ok(Installed::Superseded);
        }
        let had_files = (inner.held.as_ref()).is_some_and(|h| h.kind() != Kind::Gateway);
        match held.files() {
            Some(files) => writer.publish(&self.name, &files)?,
            // A session after files: the ApiKey changed kind, and its old files must not stay.
            None if had_files => writer.remove(&self.name)?,
            None => {}
        }
        inner.kind = Some(held.kind());
        inner.held = Some(held);
        inner.withdrawn = None;
        inner.grant = Some(origin.grant).filter(|g| !g.is_empty());
        inner.renewal = origin.renewal;
        inner.started = true;
        inner.refreshes += 1;
        self.holding.send_replace(true);
        Ok(Installed::Written)
    }

    /// Why access was taken away for good, while none is held again (see [`Removal`]).
    pub fn withdrawn(&self) -> Option<Removal> {
        self.lock().withdrawn
    }

    /// The session the local gateway forwards with, if one is held.
    pub fn session(&self) -> Option<ValidSession> {
        match &self.lock().held {
            Some(Held::Session(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The kind of what this key holds or last held; none before its first answer.
    pub fn kind(&self) -> Option<Kind> {
        self.lock().kind
    }

    /// Removes the files and forgets the credentials; true if any were held.
    pub fn remove(&self, cause: Removal, writer: &Writer) -> Result<bool, atomic::Error> {
        let mut inner = self.lock();
        inner.epoch += 1;
        let held = inner.held.take().is_some();
        inner.grant = None;
        if cause != Removal::Expired {
            inner.withdrawn = Some(cause);
        }
        self.holding.send_replace(false);
        if held {
            *inner.removals.entry(cause).or_default() += 1;
        }
        writer.remove(&self.name).map(|()| held)
    }

    /// Removes the credentials if they expired by `now`; true if it did.
    pub fn expire(&self, now: Timestamp, writer: &Writer) -> Result<bool, atomic::Error> {
        if self.expiry().is_some_and(|e| e <= now) {
            self.remove(Removal::Expired, writer)
        } else {
            Ok(false)
        }
    }

    /// Removes the files for good: nothing is written after this.
    pub fn stop(&self, writer: &Writer) -> Result<(), atomic::Error> {
        let mut inner = self.lock();
        inner.stopping = true;
        inner.epoch += 1;
        inner.held = None;
        self.holding.send_replace(false);
        writer.remove(&self.name)
    }

    /// The grant of the credentials held, for the revocation poll.
    pub fn grant(&self) -> Option<String> {
        self.lock().grant.clone()
    }

    /// Credential generations installed so far (each exchange answer held).
    pub fn refreshes(&self) -> u64 {
        self.lock().refreshes
    }

    /// The renewal mark of the credentials held, for the revocation poll.
    pub fn renewal(&self) -> String {
        self.lock().renewal.clone()
    }

    /// Asks the refresh task to fetch new credentials now.
    pub fn request_renewal(&self) {
        self.renew.notify_one();
    }

    /// Resolves when a renewal was requested (a request made while nobody waited is kept).
    pub async fn renewal_requested(&self) {
        self.renew.notified().await;
    }

    /// Tells the refresh task that the revocation poll removed the credentials.
    pub fn tell_revoked(&self) {
        self.revoked.notify_one();
    }

    /// Resolves when the revocation poll removed the credentials (kept until awaited).
    pub async fn revoked(&self) {
        self.revoked.notified().await;
    }

    pub fn expiry(&self) -> Option<Timestamp> {
        self.lock().held.as_ref().map(Held::expiration)
    }

    /// The container-credentials answer, if AWS credentials are held.
    pub fn container_answer(&self) -> Option<Vec<u8>> {
        match &self.lock().held {
            Some(Held::Aws(c)) => Some(files::container_credentials(c)),
            _ => None,
        }
    }

    pub fn started(&self) -> bool {
        self.lock().started
    }

    /// Counts a failed refresh under `reason` (a bounded label, see `broker::Error::reason`).
    pub fn failed(&self, reason: String) {
        *self.lock().failures.entry(reason).or_default() += 1;
    }

    /// Changes to "credentials are held", for the revocation poller.
    pub fn holding(&self) -> watch::Receiver<bool> {
        self.holding.subscribe()
    }

    fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            name: self.name.clone(),
            expiry: inner.held.as_ref().map(|h| h.expiration().as_second()),
            refreshes: inner.refreshes,
            failures: inner.failures.clone(),
            removals: inner
                .removals
                .iter()
                .map(|(cause, n)| (cause.label(), *n))
                .collect(),
        }
    }
}

/// Counters of one key at one moment, for [`render_metrics`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    pub expiry: Option<i64>,
    pub refreshes: u64,
    pub failures: BTreeMap<String, u64>,
    pub removals: BTreeMap<&'static str, u64>,
}

/// `/metrics` for all keys.
pub fn metrics(keys: &[Key]) -> String {
    render_metrics(&keys.iter().map(Key::snapshot).collect::<Vec<_>>())
}

/// The Prometheus text format (0.0.4). Label values are ApiKey names (DNS names) and bounded
/// reason words, so they need no escaping; no value here is ever a secret.
pub fn render_metrics(keys: &[Snapshot]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    family(
        "keybroker_sidecar_credentials_expiry_timestamp_seconds",
        "gauge",
        "When the credentials in place expire (Unix time); absent while none are held.",
        keys.iter()
            .filter_map(|k| Some((format!("apikey=\"{}\"", k.name), k.expiry?.to_string())))
            .collect(),
    );
    family(
        "keybroker_sidecar_refreshes_total",
        "counter",
        "Credentials fetched from the broker and written.",
        keys.iter()
            .map(|k| (format!("apikey=\"{}\"", k.name), k.refreshes.to_string()))
            .collect(),
    );
    family(
        "keybroker_sidecar_refresh_failures_total",
        "counter",
        "Failed refreshes, by reason (the broker's refusal reason, or BrokerUnreachable, BrokerTimeout, TokenUnreadable, MalformedResponse, InvalidCredentials, InvalidSession, InvalidToken, WriteFailed).",
        keys.iter()
            .flat_map(|k| {
                k.failures.iter().map(|(reason, n)| {
                    (
                        format!("apikey=\"{}\",reason=\"{reason}\"", k.name),
                        n.to_string(),
                    )
                })
            })
            .collect(),
    );
    family(
        "keybroker_sidecar_credentials_removed_total",
        "counter",
        "Credentials removed before shutdown, by cause (revoked, refused, expired).",
        keys.iter()
            .flat_map(|k| {
                k.removals.iter().map(|(cause, n)| {
                    (
                        format!("apikey=\"{}\",cause=\"{cause}\"", k.name),
                        n.to_string(),
                    )
                })
            })
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use keybroker_contract::wire::{AccessToken, Credentials, GatewaySession};

    use super::*;

    fn valid(id: &str, expiration: &str) -> Held {
        Held::Aws(
            files::validate(&Credentials {
                access_key_id: id.into(),
                secret_access_key: "SECRETVALUE".into(),
                session_token: "SESSIONVALUE".into(),
                expiration: expiration.into(),
            })
            .unwrap(),
        )
    }

    fn access_token(token: &str, expiration: &str) -> Held {
        Held::Token(
            token::validate(&AccessToken {
                access_token: token.into(),
                token_type: "Bearer".into(),
                expiration: expiration.into(),
                scope: vec!["reports:read".into()],
                audience: vec!["reports-api".into()],
            })
            .unwrap(),
        )
    }

    fn root(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kb-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_withdrawal_is_remembered_until_access_is_held_again() {
        let dir = root("withdrawn");
        let writer = Writer::new(&dir, 0o440);
        let key = Key::new("k");
        assert_eq!(key.withdrawn(), None);
        key.remove(Removal::Refused, &writer).unwrap();
        assert_eq!(key.withdrawn(), Some(Removal::Refused));
        let epoch = key.epoch();
        key.install(
            epoch,
            valid("AK1", "2030-01-01T00:00:00Z"),
            "g1".into(),
            &writer,
        )
        .unwrap();
        assert_eq!(key.withdrawn(), None);
        // Expiry while refreshes fail is not final: the app may retry.
        key.remove(Removal::Expired, &writer).unwrap();
        assert_eq!(key.withdrawn(), None);
        key.remove(Removal::Revoked, &writer).unwrap();
        assert_eq!(key.withdrawn(), Some(Removal::Revoked));
    }

    #[test]
    fn an_exchange_overtaken_by_a_revocation_writes_nothing() {
        let dir = root("revoke");
        let writer = Writer::new(&dir, 0o440);
        let key = Key::new("k");
        let epoch = key.epoch();
        assert_eq!(
            key.install(
                epoch,
                valid("AK1", "2030-01-01T00:00:00Z"),
                "g1".into(),
                &writer
            )
            .unwrap(),
            Installed::Written
        );
        let in_flight = key.epoch();
        assert!(key.remove(Removal::Revoked, &writer).unwrap());
        assert_eq!(
            key.install(
                in_flight,
                valid("AK2", "2030-01-01T00:00:00Z"),
                "g1".into(),
                &writer
            )
            .unwrap(),
            Installed::Superseded
        );
        assert!(!dir.join("k").exists());
        assert!(key.container_answer().is_none());
        assert!(key.started(), "the startup probe stays passed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn expired_credentials_are_removed_and_stop_is_final() {
        let dir = root("expire");
        let writer = Writer::new(&dir, 0o440);
        let key = Key::new("k");
        key.install(
            key.epoch(),
            valid("AK1", "2030-01-01T00:00:00Z"),
            "g1".into(),
            &writer,
        )
        .unwrap();
        let before: Timestamp = "2029-12-31T23:59:59Z".parse().unwrap();
        assert!(!key.expire(before, &writer).unwrap());
        assert!(dir.join("k/credentials").exists());
        let after: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        assert!(key.expire(after, &writer).unwrap());
        assert!(!dir.join("k").exists());

        key.install(
            key.epoch(),
            valid("AK3", "2030-01-01T00:00:00Z"),
            "g1".into(),
            &writer,
        )
        .unwrap();
        let epoch = key.epoch();
        key.stop(&writer).unwrap();
        assert!(!dir.join("k").exists());
        assert_eq!(
            key.install(
                epoch,
                valid("AK4", "2030-01-01T00:00:00Z"),
                "g1".into(),
                &writer
            )
            .unwrap(),
            Installed::Superseded
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_token_is_written_replaced_and_removed_like_credentials() {
        use std::os::unix::fs::PermissionsExt;
        let dir = root("token");
        let writer = Writer::new(&dir, 0o440);
        let key = Key::new("reports");
        let install = |token, expiration| {
            key.install(
                key.epoch(),
                access_token(token, expiration),
                "g1".into(),
                &writer,
            )
            .unwrap()
        };
        assert_eq!(
            install("TOKEN.ONE", "2030-01-01T00:00:00Z"),
            Installed::Written
        );
        assert_eq!(
            std::fs::read(dir.join("reports/token")).unwrap(),
            b"TOKEN.ONE"
        );
        assert_eq!(
            std::fs::read(dir.join("reports/expiration")).unwrap(),
            b"2030-01-01T00:00:00Z\n"
        );
        assert!(dir.join("reports/token.json").exists());
        assert!(!dir.join("reports/credentials").exists());
        let mode = std::fs::metadata(dir.join("reports/token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o440);
        assert!(key.started());
        assert_eq!(key.kind(), Some(Kind::OAuth2));
        assert!(key.container_answer().is_none() && key.session().is_none());

        // A refresh replaces the files; expiry is the new token's.
        install("TOKEN.TWO", "2031-01-01T00:00:00Z");
        assert_eq!(
            std::fs::read(dir.join("reports/token")).unwrap(),
            b"TOKEN.TWO"
        );
        let before: Timestamp = "2030-06-01T00:00:00Z".parse().unwrap();
        assert!(!key.expire(before, &writer).unwrap());
        assert!(dir.join("reports/token").exists());
        let after: Timestamp = "2031-01-01T00:00:00Z".parse().unwrap();
        assert!(key.expire(after, &writer).unwrap());
        assert!(!dir.join("reports").exists());
        assert_eq!(
            key.kind(),
            Some(Kind::OAuth2),
            "the kind outlives the token"
        );

        install("TOKEN.THREE", "2031-01-01T00:00:00Z");
        let in_flight = key.epoch();
        assert!(key.remove(Removal::Revoked, &writer).unwrap());
        assert!(!dir.join("reports").exists());
        assert_eq!(
            key.install(
                in_flight,
                access_token("TOKEN.FOUR", "2031-01-01T00:00:00Z"),
                "g1".into(),
                &writer
            )
            .unwrap(),
            Installed::Superseded
        );
        assert!(!dir.join("reports").exists());
        let text = metrics(&[key]);
        assert!(text.contains("cause=\"expired\"} 1") && text.contains("cause=\"revoked\"} 1"));
        assert!(!text.contains("TOKEN."), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_change_of_kind_leaves_nothing_of_the_old_one() {
        let dir = root("kind");
        let writer = Writer::new(&dir, 0o440);
        let key = Key::new("k");
        let install = |held| {
            key.install(key.epoch(), held, "g1".into(), &writer)
                .unwrap()
        };
        install(valid("AK1", "2030-01-01T00:00:00Z"));
        assert!(dir.join("k/credentials").exists());
        let session = crate::gateway::validate_session(&GatewaySession {
            token: "kbs1.session".into(),
            url: "https://gateway:8444/v1/forward".into(),
            expiration: "2030-01-01T00:00:00Z".into(),
        })
        .unwrap();
        install(Held::Session(session));
        assert!(!dir.join("k").exists(), "a session has no files");
        assert!(key.session().is_some() && key.container_answer().is_none());
        assert_eq!(key.kind(), Some(Kind::Gateway));
        install(access_token("TOKEN.ONE", "2030-01-01T00:00:00Z"));
        assert!(key.session().is_none());
        assert!(dir.join("k/token").exists());
        install(valid("AK2", "2030-01-01T00:00:00Z"));
        assert!(dir.join("k/credentials").exists() && !dir.join("k/token").exists());
        assert_eq!(key.kind(), Some(Kind::Aws));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_text() {
        let dir = root("metrics");
        let writer = Writer::new(&dir, 0o440);
        let key = Key::new("uploader");
        key.install(
            key.epoch(),
            valid("AKID", "2030-01-01T00:00:00Z"),
            "g1".into(),
            &writer,
        )
        .unwrap();
        key.failed("BrokerUnreachable".into());
        key.failed("BrokerUnreachable".into());
        key.remove(Removal::Revoked, &writer).unwrap();
        key.install(
            key.epoch(),
            valid("AKID", "2030-01-01T00:00:00Z"),
            "g1".into(),
            &writer,
        )
        .unwrap();
        let text = metrics(&[key, Key::new("idle")]);
        assert_eq!(
            text,
            "# HELP keybroker_sidecar_credentials_expiry_timestamp_seconds When the credentials in place expire (Unix time); absent while none are held.\n\
             # TYPE keybroker_sidecar_credentials_expiry_timestamp_seconds gauge\n\
             keybroker_sidecar_credentials_expiry_timestamp_seconds{apikey=\"uploader\"} 1893456000\n\
             # HELP keybroker_sidecar_refreshes_total Credentials fetched from the broker and written.\n\
             # TYPE keybroker_sidecar_refreshes_total counter\n\
             keybroker_sidecar_refreshes_total{apikey=\"uploader\"} 2\n\
             keybroker_sidecar_refreshes_total{apikey=\"idle\"} 0\n\
             # HELP keybroker_sidecar_refresh_failures_total Failed refreshes, by reason (the broker's refusal reason, or BrokerUnreachable, BrokerTimeout, TokenUnreadable, MalformedResponse, InvalidCredentials, InvalidSession, InvalidToken, WriteFailed).\n\
             # TYPE keybroker_sidecar_refresh_failures_total counter\n\
             keybroker_sidecar_refresh_failures_total{apikey=\"uploader\",reason=\"BrokerUnreachable\"} 2\n\
             # HELP keybroker_sidecar_credentials_removed_total Credentials removed before shutdown, by cause (revoked, refused, expired).\n\
             # TYPE keybroker_sidecar_credentials_removed_total counter\n\
             keybroker_sidecar_credentials_removed_total{apikey=\"uploader\",cause=\"revoked\"} 1\n"
        );
        assert!(!text.contains("SECRETVALUE") && !text.contains("SESSIONVALUE"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
