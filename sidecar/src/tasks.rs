//! The two tasks of each ApiKey:
//!
//! - [`refresher`]: exchange, write, sleep until the next refresh (or the next retry, removing
//!   the credentials if they expire first);
//! - [`revocation_poller`]: while credentials are held, long-polls the broker; removes them
//!   the moment it answers "revoked" (or refuses the poll for good), and has the refresher
//!   fetch new ones the moment it answers "renew" (the rights changed and the held credentials
//!   were revoked at the provider).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, error, info, warn};

use crate::atomic::Writer;
use crate::broker::Broker;
use crate::files;
use crate::random;
use crate::schedule::{self, TRANSIENT, WITHDRAWN};
use crate::state::{Installed, Key, Removal};

/// Each revocation poll waits this long at the broker (its limit is 60 s): one idle request
/// per minute per ApiKey.
const POLL_WAIT: Duration = Duration::from_secs(55);
/// After a "renew", the longest wait for the new credentials before polling again.
const RENEW_SETTLE: Duration = Duration::from_secs(5);

/// Removes the credentials of a revoked (or no longer usable) ApiKey.
fn remove_revoked(ctx: &Ctx, key: &Key) {
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
        }
        let delay = attempt(&ctx, key, &mut failures).await;
        next = Instant::now() + delay;
    }
}

/// One exchange and its consequences; returns the delay until the next one.
async fn attempt(ctx: &Ctx, key: &Key, failures: &mut u32) -> Duration {
    let epoch = key.epoch();
    let failed = |failures: &mut u32, policy| {
        let delay = schedule::backoff(policy, *failures, random::unit());
        *failures = failures.saturating_add(1);
        delay
    };
    let response = match ctx.broker.exchange(&key.name).await {
        Ok(response) => response,
        Err(e) => {
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
                return failed(failures, WITHDRAWN);
            }
            let delay = failed(failures, TRANSIENT).max(e.retry_after().unwrap_or_default());
            let message = if key.expiry().is_some() {
                "refresh failed; keeping the current credentials until they expire"
            } else {
                "fetching credentials failed; retrying"
            };
            warn!(apikey = key.name, reason = e.reason(), error = %e, retry_in_seconds = delay.as_secs_f64(), "{message}");
            return delay;
        }
    };
    if let Some(session) = &response.session {
        return install_session(ctx, key, epoch, session, &response, failures);
    }
    let checked = response
        .credentials
        .as_ref()
        .ok_or(files::Error::Invalid {
            field: "credentials",
            why: "missing from the answer",
        })
        .and_then(files::validate);
    let creds = match checked {
        Ok(creds) => creds,
        Err(e) => {
            key.failed("InvalidCredentials".into());
            let delay = failed(failures, TRANSIENT);
            warn!(apikey = key.name, error = %e, retry_in_seconds = delay.as_secs_f64(), "refresh failed");
            return delay;
        }
    };
    let (access_key_id, expiration) = (creds.access_key_id.clone(), creds.expiration);
    match key.install(epoch, creds, response.grant.clone(), &ctx.writer) {
        Ok(Installed::Written) => {
            *failures = 0;
            let delay = next_refresh(ctx, &response.refresh_at, expiration);
            info!(
                apikey = key.name,
                access_key_id,
                expiration = %expiration,
                refresh_in_seconds = delay.as_secs_f64(),
                "credentials written"
            );
            delay
        }
        Ok(Installed::Superseded) => {
            info!(
                apikey = key.name,
                access_key_id, "discarded credentials from an exchange overtaken by a revocation"
            );
            failed(failures, WITHDRAWN)
        }
        Err(e) => {
            key.failed("WriteFailed".into());
            let delay = failed(failures, TRANSIENT);
            error!(apikey = key.name, error = %e, retry_in_seconds = delay.as_secs_f64(), "writing credentials failed; the previous ones stay in place");
            delay
        }
    }
}

/// When to exchange again for what expires at `expiration`: the broker's `refresh_at` if it is
/// in the future, within the refresh fraction of the lifetime.
fn next_refresh(ctx: &Ctx, refresh_at: &str, expiration: Timestamp) -> Duration {
    let broker_says = refresh_at
        .parse::<Timestamp>()
        .ok()
        .filter(|t| *t > Timestamp::now())
        .map(until);
    schedule::refresh_in(
        until(expiration),
        broker_says,
        ctx.refresh_fraction,
        random::unit(),
    )
}

/// Holds a gateway session (a gateway ApiKey: nothing is written); the delay until the next
/// exchange.
fn install_session(
    ctx: &Ctx,
    key: &Key,
    epoch: u64,
    session: &keybroker_contract::wire::GatewaySession,
    response: &keybroker_contract::wire::ExchangeResponse,
    failures: &mut u32,
) -> Duration {
    let mut failed = |policy| {
        let delay = schedule::backoff(policy, *failures, random::unit());
        *failures = failures.saturating_add(1);
        delay
    };
    let session = match crate::gateway::validate_session(session) {
        Ok(session) => session,
        Err(e) => {
            key.failed("InvalidSession".into());
            let delay = failed(TRANSIENT);
            warn!(apikey = key.name, error = %e, retry_in_seconds = delay.as_secs_f64(), "refresh failed");
            return delay;
        }
    };
    let expiration = session.expiration;
    match key.install_session(epoch, session, response.grant.clone()) {
        Installed::Written => {
            *failures = 0;
            let delay = next_refresh(ctx, &response.refresh_at, expiration);
            info!(apikey = key.name, expiration = %expiration, refresh_in_seconds = delay.as_secs_f64(), "gateway session held");
            delay
        }
        Installed::Superseded => failed(WITHDRAWN),
    }
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
            .poll(&key.name, key.grant().as_deref(), POLL_WAIT)
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
