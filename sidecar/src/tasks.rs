//! The two tasks of each ApiKey:
//!
//! - [`refresher`]: exchange, write (AWS credentials, an OAuth2 token) or hold (a gateway
//!   session), sleep until the next refresh (or the next retry, removing what is held if it
//!   expires first);
//! - [`revocation_poller`]: while credentials are held, long-polls the broker; removes them
//!   the moment it answers "revoked" (or refuses the poll for good), and has the refresher
//!   fetch new ones the moment it answers "renew" (the rights changed and the held credentials
//!   were revoked at the provider).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use keybroker_contract::wire::ExchangeResponse;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, info, warn};

use crate::atomic::Writer;
use crate::broker::Broker;
use crate::schedule::{self, Backoff, TRANSIENT, WITHDRAWN};
use crate::state::{Held, Installed, Key, Origin, Removal};
use crate::{files, gateway, random, reload, token};

/// Each revocation poll waits this long at the broker (its limit is 60 s): one idle request
/// per minute per ApiKey.
const POLL_WAIT: Duration = Duration::from_secs(55);
/// After a "renew", the longest wait for the new credentials before polling again.
const RENEW_SETTLE: Duration = Duration::from_secs(5);

/// Removes the credentials of a revoked (or no longer usable) ApiKey, and has the refresh task
/// ask again on the withdrawn schedule, so a restored ApiKey works again without a restart.
fn remove_revoked(ctx: &Ctx, key: &Key) {
    key.tell_revoked();
    match key.remove(Removal::Revoked, &ctx.writer) {
        Ok(_) => warn!(
            apikey = key.name,
            "the ApiKey was revoked, deleted or withdrawn from this pod: credentials removed"
        ),
        Err(e) => {
            error!(apikey = key.name, error = %e, "the ApiKey was revoked; removing the credentials failed")
        }
    }
}

/// What the tasks share.
#[derive(Debug)]
pub struct Ctx {
    pub broker: Broker,
    pub writer: Writer,
    pub refresh_fraction: f64,
    /// The app's loopback URL told of each new credential generation.
    pub reload: Option<keybroker_contract::reload::Target>,
}

/// Time from now until `t` by the wall clock (zero if past), rounded up so that a wake-up is
/// never early.
fn until(t: Timestamp) -> Duration {
    let nanos = t.as_nanosecond() - Timestamp::now().as_nanosecond();
    Duration::from_nanos(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
}

pub async fn refresher(ctx: Arc<Ctx>, keys: Arc<[Key]>, index: usize) {
    let key = &keys[index];
    let mut failures: u32 = 0;
    let mut next = Instant::now();
    loop {
        // Wait for the next attempt; credentials that expire before it are removed on time.
        while let Some(expiry) = key.expiry().map(|e| Instant::now() + until(e))
            && expiry < next
        {
            sleep_until(expiry).await;
            match key.expire(Timestamp::now(), &ctx.writer) {
                Ok(true) => warn!(
                    apikey = key.name,
                    "credentials expired while refreshes failed: removed"
                ),
                Ok(false) => {}
                Err(e) => {
                    error!(apikey = key.name, error = %e, "removing expired credentials failed")
                }
            }
        }
        tokio::select! {
            () = sleep_until(next) => {}
            () = key.renewal_requested() => failures = 0,
            // Nothing is held any more: the next attempt is a withdrawn-access retry, not the
            // refresh that was scheduled (up to two thirds of a lifetime away).
            () = key.revoked() => {
                next = Instant::now() + retry(WITHDRAWN, &mut failures);
                continue;
            }
        }
        let delay = attempt(&ctx, key, &mut failures).await;
        next = Instant::now() + delay;
    }
}

/// The delay before the next try under `policy`, counting this failure.
fn retry(policy: Backoff, failures: &mut u32) -> Duration {
    let delay = schedule::backoff(policy, *failures, random::unit());
    *failures = failures.saturating_add(1);
    delay
}

/// One exchange and its consequences; returns the delay until the next one.
async fn attempt(ctx: &Ctx, key: &Key, failures: &mut u32) -> Duration {
    let epoch = key.epoch();
    let e = match ctx.broker.exchange(&key.name).await {
        Ok(response) => {
            let generation = key.refreshes();
            let delay = answered(
                &ctx.writer,
                ctx.refresh_fraction,
                key,
                epoch,
                &response,
                failures,
            );
            if let Some(target) = &ctx.reload
                && key.refreshes() != generation
            {
                let expiration = key.expiry().map(|e| e.to_string()).unwrap_or_default();
                tokio::spawn(reload::notify(target.clone(), key.name.clone(), expiration));
            }
            return delay;
        }
        Err(e) => e,
    };
    key.failed(e.reason());
    if e.withdraws_access() {
        match key.remove(Removal::Refused, &ctx.writer) {
            Ok(true) => {
                warn!(apikey = key.name, error = %e, "the broker withdrew access: credentials removed")
            }
            Ok(false) => {
                warn!(apikey = key.name, error = %e, "the broker refused credentials")
            }
            Err(re) => {
                error!(apikey = key.name, error = %e, remove_error = %re, "the broker withdrew access; removing the credentials failed")
            }
        }
        return retry(WITHDRAWN, failures);
    }
    let delay = retry(TRANSIENT, failures).max(e.retry_after().unwrap_or_default());
    let message = if key.expiry().is_some() {
        "refresh failed; keeping the current credentials until they expire"
    } else {
        "fetching credentials failed; retrying"
    };
    warn!(apikey = key.name, reason = e.reason(), error = %e, retry_in_seconds = delay.as_secs_f64(), "{message}");
    delay
}

/// Why an exchange answer cannot be used. Names fields, never their values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum Unusable {
    #[error(
        "the broker's answer carries {0} of credentials, session and token; it must carry exactly one"
    )]
    Kinds(&'static str),
    #[error(transparent)]
    Credentials(files::Error),
    #[error(transparent)]
    Session(files::Error),
    #[error(transparent)]
    Token(#[from] token::Error),
}

impl Unusable {
    /// The failure's label in `/metrics`.
    fn reason(&self) -> &'static str {
        match self {
            Unusable::Kinds(_) => "MalformedResponse",
            Unusable::Credentials(_) => "InvalidCredentials",
            Unusable::Session(_) => "InvalidSession",
            Unusable::Token(_) => "InvalidToken",
        }
    }
}

/// What an exchange answer gives the ApiKey: exactly one of AWS credentials, a gateway
/// session and an access token, checked.
fn check(response: &ExchangeResponse) -> Result<Held, Unusable> {
    match (&response.credentials, &response.session, &response.token) {
        (Some(c), None, None) => files::validate(c)
            .map(Held::Aws)
            .map_err(Unusable::Credentials),
        (None, Some(s), None) => gateway::validate_session(s)
            .map(Held::Session)
            .map_err(Unusable::Session),
        (None, None, Some(t)) => Ok(Held::Token(token::validate(t)?)),
        (None, None, None) => Err(Unusable::Kinds("none")),
        _ => Err(Unusable::Kinds("more than one")),
    }
}

/// Holds (and writes) what an exchange begun under `epoch` answered, or counts why it cannot;
/// returns the delay until the next exchange. An unusable answer changes nothing held: the
/// last valid credentials stay until they expire.
fn answered(
    writer: &Writer,
    refresh_fraction: f64,
    key: &Key,
    epoch: u64,
    response: &ExchangeResponse,
    failures: &mut u32,
) -> Duration {
    let held = match check(response) {
        Ok(held) => held,
        Err(e) => {
            key.failed(e.reason().into());
            let delay = retry(TRANSIENT, failures);
            warn!(apikey = key.name, reason = e.reason(), error = %e, retry_in_seconds = delay.as_secs_f64(), "refresh failed");
            return delay;
        }
    };
    // What the log may show: the kind, and the AWS key id (no secret); never a token.
    let (what, done, access_key_id) = match &held {
        Held::Aws(c) => ("credentials", "written", Some(c.access_key_id.clone())),
        Held::Token(_) => ("access token", "written", None),
        Held::Session(_) => ("gateway session", "held", None),
    };
    let expiration = held.expiration();
    let origin = Origin {
        grant: response.grant.clone(),
        renewal: response.renewal.clone(),
    };
    match key.install(epoch, held, origin, writer) {
        Ok(Installed::Written) => {
            *failures = 0;
            let delay = next_refresh(refresh_fraction, &response.refresh_at, expiration);
            info!(
                apikey = key.name,
                access_key_id,
                expiration = %expiration,
                refresh_in_seconds = delay.as_secs_f64(),
                "{what} {done}"
            );
            delay
        }
        Ok(Installed::Superseded) => {
            info!(
                apikey = key.name,
                access_key_id, "discarded {what} from an exchange overtaken by a revocation"
            );
            retry(WITHDRAWN, failures)
        }
        Err(e) => {
            key.failed("WriteFailed".into());
            let delay = retry(TRANSIENT, failures);
            error!(apikey = key.name, error = %e, retry_in_seconds = delay.as_secs_f64(), "{what} not {done}: changing the files failed, the previous ones stay in place");
            delay
        }
    }
}

/// When to exchange again for what expires at `expiration`: the broker's `refresh_at` if it is
/// in the future, within the refresh fraction of the lifetime.
fn next_refresh(refresh_fraction: f64, refresh_at: &str, expiration: Timestamp) -> Duration {
    let broker_says = refresh_at
        .parse::<Timestamp>()
        .ok()
        .filter(|t| *t > Timestamp::now())
        .map(until);
    schedule::refresh_in(
        until(expiration),
        broker_says,
        refresh_fraction,
        random::unit(),
    )
}

pub async fn revocation_poller(ctx: Arc<Ctx>, keys: Arc<[Key]>, index: usize) {
    let key = &keys[index];
    let mut holding = key.holding();
    let mut failures: u32 = 0;
    loop {
        // Nothing to revoke until credentials are in place.
        if holding.wait_for(|held| *held).await.is_err() {
            return;
        }
        match ctx
            .broker
            .poll(&key.name, key.grant().as_deref(), &key.renewal(), POLL_WAIT)
            .await
        {
            Ok(answer) if answer.revoked => {
                failures = 0;
                remove_revoked(&ctx, key);
            }
            Ok(answer) if answer.renew => {
                failures = 0;
                info!(
                    apikey = key.name,
                    "the ApiKey's rights changed: fetching new credentials now"
                );
                key.request_renewal();
                // Poll again once the new credentials are in (or after a while): asking with
                // the old grant would only hear "renew" again.
                let _ = tokio::time::timeout(RENEW_SETTLE, holding.changed()).await;
            }
            Err(e) if e.withdraws_access() => {
                failures = 0;
                remove_revoked(&ctx, key);
            }
            Ok(_) => failures = 0,
            Err(e) => {
                let delay = schedule::backoff(TRANSIENT, failures, random::unit());
                if failures == 0 {
                    warn!(apikey = key.name, error = %e, "revocation poll failed; retrying");
                } else {
                    debug!(apikey = key.name, error = %e, "revocation poll failed again");
                }
                failures = failures.saturating_add(1);
                // New credentials mean the broker is back: poll again at once rather than
                // leave them unwatched for the rest of the backoff.
                tokio::select! {
                    () = sleep(delay) => {}
                    _ = holding.changed() => failures = 0,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use jiff::SignedDuration;
    use keybroker_contract::wire::{AccessToken, Credentials, GatewaySession};

    use super::*;

    fn in_seconds(s: i64) -> String {
        Timestamp::now()
            .checked_add(SignedDuration::from_secs(s))
            .unwrap()
            .to_string()
    }

    fn access_token(token: &str, token_type: &str) -> AccessToken {
        AccessToken {
            access_token: token.into(),
            token_type: token_type.into(),
            expiration: in_seconds(3600),
            scope: vec!["reports:read".into()],
            audience: vec!["reports-api".into()],
        }
    }

    fn answer(token: Option<AccessToken>, refresh_at: String) -> ExchangeResponse {
        ExchangeResponse {
            credentials: None,
            session: None,
            token,
            refresh_at,
            grant: "g1".into(),
            renewal: "5eed".into(),
        }
    }

    fn credentials() -> Credentials {
        Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: "SECRETVALUE".into(),
            session_token: "SESSIONVALUE".into(),
            expiration: in_seconds(3600),
        }
    }

    fn session() -> GatewaySession {
        GatewaySession {
            token: "kbs1.SESSIONVALUE".into(),
            url: "https://gateway:8444/v1/forward".into(),
            expiration: in_seconds(3600),
        }
    }

    #[test]
    fn an_answer_carries_exactly_one_kind() {
        let kinds = |c: bool, s: bool, t: bool| {
            let mut a = answer(
                t.then(|| access_token("TOKENVALUE", "Bearer")),
                String::new(),
            );
            a.credentials = c.then(credentials);
            a.session = s.then(session);
            check(&a).map(|held| held.kind())
        };
        assert_eq!(kinds(true, false, false), Ok(crate::state::Kind::Aws));
        assert_eq!(kinds(false, true, false), Ok(crate::state::Kind::Gateway));
        assert_eq!(kinds(false, false, true), Ok(crate::state::Kind::OAuth2));
        assert_eq!(kinds(false, false, false), Err(Unusable::Kinds("none")));
        for (c, s, t) in [
            (true, true, false),
            (true, false, true),
            (false, true, true),
            (true, true, true),
        ] {
            let e = kinds(c, s, t).unwrap_err();
            assert_eq!(e, Unusable::Kinds("more than one"), "{c} {s} {t}");
            assert_eq!(e.reason(), "MalformedResponse");
            let shown = e.to_string();
            assert!(shown.contains("exactly one"), "{shown}");
            assert!(!shown.contains("VALUE"), "{shown}");
        }
    }

    #[test]
    fn an_invalid_token_is_counted_as_such_and_never_shown() {
        let e = check(&answer(
            Some(access_token("TOKEN\nVALUE", "Bearer")),
            String::new(),
        ))
        .unwrap_err();
        assert_eq!(e.reason(), "InvalidToken");
        let shown = e.to_string();
        assert!(
            shown.contains("token.accessToken") && !shown.contains("VALUE"),
            "{shown}"
        );
        let mut bad_credentials = answer(None, String::new());
        bad_credentials.credentials = Some(Credentials {
            session_token: String::new(),
            ..credentials()
        });
        assert_eq!(
            check(&bad_credentials).unwrap_err().reason(),
            "InvalidCredentials"
        );
    }

    #[test]
    fn a_token_answer_is_written_refreshed_kept_on_failure_and_never_revived() {
        let dir = std::env::temp_dir().join(format!("kb-tasks-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let writer = Writer::new(&dir, 0o440);
        let key = Key::new("reports");
        let mut failures = 3;
        let answer_with = |token: &str, token_type: &str| {
            answer(Some(access_token(token, token_type)), in_seconds(100))
        };
        let token_file = || std::fs::read(dir.join("reports/token")).unwrap();

        // Written, and the next exchange at the broker's refreshAt (up to 10 % earlier).
        let delay = answered(
            &writer,
            2.0 / 3.0,
            &key,
            key.epoch(),
            &answer_with("TOKEN.ONE", "Bearer"),
            &mut failures,
        );
        assert_eq!(failures, 0);
        assert!(
            delay > Duration::from_secs(88) && delay <= Duration::from_secs(100),
            "{delay:?}"
        );
        assert_eq!(token_file(), b"TOKEN.ONE");
        // What it was issued under goes back in the revocation poll.
        assert_eq!(key.grant().as_deref(), Some("g1"));
        assert_eq!(key.renewal(), "5eed");
        assert!(key.started());

        // An unusable answer keeps the last valid token and retries soon.
        for broken in [
            answer_with("TOKEN.BAD", "MAC"),
            ExchangeResponse {
                credentials: Some(credentials()),
                ..answer_with("TOKEN.BAD", "Bearer")
            },
        ] {
            let delay = answered(
                &writer,
                2.0 / 3.0,
                &key,
                key.epoch(),
                &broken,
                &mut failures,
            );
            assert!(delay <= Duration::from_secs(2), "{delay:?}");
            assert_eq!(token_file(), b"TOKEN.ONE");
        }
        assert_eq!(failures, 2);

        // A refresh replaces it.
        answered(
            &writer,
            2.0 / 3.0,
            &key,
            key.epoch(),
            &answer_with("TOKEN.TWO", "bearer"),
            &mut failures,
        );
        assert_eq!((token_file().as_slice(), failures), (&b"TOKEN.TWO"[..], 0));

        // An exchange overtaken by a revocation brings nothing back, and backs off for long.
        let in_flight = key.epoch();
        assert!(key.remove(Removal::Revoked, &writer).unwrap());
        let delay = answered(
            &writer,
            2.0 / 3.0,
            &key,
            in_flight,
            &answer_with("TOKEN.THREE", "Bearer"),
            &mut failures,
        );
        assert!(delay >= Duration::from_secs(15), "{delay:?}");
        assert!(!dir.join("reports").exists());

        let text = crate::state::metrics(std::slice::from_ref(&key));
        assert!(
            text.contains("reason=\"InvalidToken\"} 1")
                && text.contains("reason=\"MalformedResponse\"} 1"),
            "{text}"
        );
        assert!(!text.contains("TOKEN."), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_past_or_unreadable_refresh_at_falls_back_to_the_lifetime() {
        let expiration = in_seconds(900).parse::<Timestamp>().unwrap();
        for refresh_at in [in_seconds(-10), "soon".into(), String::new()] {
            let delay = next_refresh(2.0 / 3.0, &refresh_at, expiration);
            assert!(
                delay > Duration::from_secs(535) && delay <= Duration::from_secs(600),
                "{refresh_at:?}: {delay:?}"
            );
        }
        // Expired already: one second (the refresher removes it before then).
        let past = in_seconds(-1).parse::<Timestamp>().unwrap();
        assert_eq!(
            next_refresh(2.0 / 3.0, &in_seconds(-10), past),
            Duration::from_secs(1)
        );
    }
}
