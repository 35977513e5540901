//! Proofs against a real Keycloak (26.7.3 in dev mode, `keybroker_e2e::keycloak`) that the
//! OAuth2 provider's authorization server does what the broker will rely on: discovery, client
//! credentials, RFC 8693 exchange to one audience and scope, RFC 7662 introspection, RFC 7009
//! revocation, and a stop and restart with the same realm. Along the way it pins the facts of
//! Keycloak's answers the broker's code depends on (the shape of `aud`, what an exchange may
//! ask for, the error texts), so that a Keycloak upgrade that changes one fails here first.
//! One test: the steps share one Keycloak (16-30 s to start) and the restart is one of them.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use nix::sys::signal::Signal;

use keybroker_e2e::keycloak::{
    ACCESS_TOKEN_TYPE, Audience, CallError, Claims, Keycloak, Realm, TOKEN_EXCHANGE, Tokens,
};

/// The broker's client: 5 s tokens, audiences by scope.
const BROKER: &str = "keybroker";
/// A broker client whose every token carries every resource server (audience mappers on the
/// client), with long-lived tokens: the restart checks and the introspection `aud` pitfall.
const WIDE: &str = "keybroker-wide";
const INTROSPECTOR: &str = "introspector";
const REPORTS: &str = "reports-api";
const BILLING: &str = "billing-api";
const LIFESPAN: Duration = Duration::from_secs(5);

fn realm() -> Realm {
    Realm::new("keybroker")
        .resource_server(REPORTS, &["reports:read", "reports:write"])
        .resource_server(BILLING, &["billing:read"])
        .broker(BROKER, LIFESPAN)
        .broker_with_every_audience(WIDE, Duration::from_secs(300))
        .introspector(INTROSPECTOR)
}

#[tokio::test]
async fn keycloak_issues_exchanges_introspects_revokes_and_comes_back_after_a_restart()
-> anyhow::Result<()> {
    let dir = keybroker_e2e::run_dir()?;
    let realm = realm();
    let started = Instant::now();
    let mut keycloak = Keycloak::start_in(&dir, &realm).await?;
    eprintln!(
        "Keycloak ready in {:?}, java RSS {} MiB",
        started.elapsed(),
        rss_mib(&keycloak)
    );
    let outcome = checks(&mut keycloak, &realm).await;
    if outcome.is_err() {
        eprintln!("--- Keycloak log ---\n{}", keycloak.log_tail(40));
    }
    outcome
}

async fn checks(keycloak: &mut Keycloak, realm: &Realm) -> anyhow::Result<()> {
    discovery(keycloak).await?;
    issue_exchange_introspect_revoke(keycloak, realm).await?;
    what_an_exchange_may_ask_for(keycloak, realm).await?;
    error_answers(keycloak, realm).await?;
    introspection_of_a_broker_with_every_audience(keycloak, realm).await?;
    restart(keycloak, realm).await?;
    killed_launcher_takes_java_with_it(keycloak)
}

async fn discovery(keycloak: &Keycloak) -> anyhow::Result<()> {
    let doc = keycloak.discovery().await?;
    ensure!(doc.issuer == keycloak.issuer(), "issuer {}", doc.issuer);
    ensure!(doc.token_endpoint == keycloak.token_endpoint(), "{doc:?}");
    ensure!(
        doc.introspection_endpoint == keycloak.introspection_endpoint(),
        "{doc:?}"
    );
    ensure!(
        doc.revocation_endpoint == keycloak.revocation_endpoint(),
        "{doc:?}"
    );
    ensure!(doc.jwks_uri.starts_with(&keycloak.issuer()), "{doc:?}");
    for grant in ["client_credentials", TOKEN_EXCHANGE] {
        ensure!(
            doc.grant_types_supported.iter().any(|g| g == grant),
            "{grant} not in {:?}",
            doc.grant_types_supported
        );
    }
    // The bootstrap admin's random credentials work (master realm, admin-cli).
    let admin = keycloak.admin_token().await?.claims()?;
    ensure!(
        admin.iss == Some(format!("{}/realms/master", keycloak.url())),
        "{admin:?}"
    );
    ensure!(admin.azp.as_deref() == Some("admin-cli"), "{admin:?}");
    // A user's token has a session (`sid`), unlike the service accounts' below.
    ensure!(admin.sid.is_some(), "{admin:?}");
    Ok(())
}

async fn issue_exchange_introspect_revoke(
    keycloak: &Keycloak,
    realm: &Realm,
) -> anyhow::Result<()> {
    let secret = realm.secret(BROKER)?;

    // Client credentials: the scope asked for, its resource server as aud, no session.
    let subject = keycloak
        .client_credentials(BROKER, secret, Some("reports:read"))
        .await?;
    ensure!(subject.token_type == "Bearer", "{subject:?}");
    ensure!(lives_lifespan(&subject), "{subject:?}");
    ensure!(
        subject.scope.as_deref() == Some("reports:read"),
        "{subject:?}"
    );
    let claims = subject.claims()?;
    ensure!(
        claims.iss.as_deref() == Some(keycloak.issuer().as_str()),
        "{claims:?}"
    );
    ensure!(claims.azp.as_deref() == Some(BROKER), "{claims:?}");
    ensure!(
        claims.aud == Some(Audience::One(REPORTS.into())),
        "{claims:?}"
    );
    ensure!(
        claims.sid.is_none(),
        "client credentials make no session: {claims:?}"
    );
    ensure!(
        claims
            .jti
            .as_deref()
            .is_some_and(|j| j.starts_with("trrtcc:")),
        "{claims:?}"
    );
    ensure!(
        claims.exp.zip(claims.iat).map(|(e, i)| e - i) == Some(LIFESPAN.as_secs()),
        "{claims:?}"
    );
    // Without a scope: neither scope nor aud.
    let bare = keycloak.client_credentials(BROKER, secret, None).await?;
    ensure!(bare.scope.as_deref() == Some(""), "{bare:?}");
    ensure!(bare.claims()?.aud.is_none(), "{:?}", bare.claims()?);

    // The exchange: exactly the audience and scope asked for.
    let exchanged = keycloak
        .exchange(
            BROKER,
            secret,
            &subject.access_token,
            &[REPORTS],
            Some("reports:read"),
        )
        .await?;
    ensure!(
        exchanged.issued_token_type.as_deref() == Some(ACCESS_TOKEN_TYPE),
        "{exchanged:?}"
    );
    ensure!(lives_lifespan(&exchanged), "{exchanged:?}");
    let claims = exchanged.claims()?;
    ensure!(
        claims.aud == Some(Audience::One(REPORTS.into())),
        "{claims:?}"
    );
    ensure!(
        claims.scope.as_deref() == Some("reports:read"),
        "{claims:?}"
    );
    ensure!(claims.azp.as_deref() == Some(BROKER), "{claims:?}");
    ensure!(
        claims
            .jti
            .as_deref()
            .is_some_and(|j| j.starts_with("trrtte:")),
        "{claims:?}"
    );
    ensure!(claims.sid.is_none(), "{claims:?}");
    ensure!(
        claims.sub == subject.claims()?.sub,
        "the subject's sub: {claims:?}"
    );
    eprintln!("exchanged token's claims: {claims:?}");

    let seen = keycloak.introspect(&exchanged.access_token).await?;
    ensure!(seen.active, "{seen:?}");
    ensure!(
        seen.claims.aud == Some(Audience::One(REPORTS.into())),
        "{seen:?}"
    );
    ensure!(
        seen.claims.scope.as_deref() == Some("reports:read"),
        "{seen:?}"
    );
    ensure!(claim(&seen.claims, "client_id") == Some(BROKER), "{seen:?}");
    ensure!(
        claim(&seen.claims, "username") == Some(format!("service-account-{BROKER}").as_str()),
        "{seen:?}"
    );
    // A resource server introspecting as itself sees only tokens addressed to it.
    let as_reports = keycloak
        .introspect_as(REPORTS, realm.secret(REPORTS)?, &exchanged.access_token)
        .await?;
    ensure!(as_reports.active, "{as_reports:?}");
    let as_billing = keycloak
        .introspect_as(BILLING, realm.secret(BILLING)?, &exchanged.access_token)
        .await?;
    ensure!(!as_billing.active, "{as_billing:?}");

    // RFC 7009: revoked, then inactive at once (the bound is 1 s).
    keycloak.revoke(&exchanged.access_token).await?;
    let revoked = Instant::now();
    loop {
        if !keycloak.introspect(&exchanged.access_token).await?.active {
            break;
        }
        ensure!(
            revoked.elapsed() < Duration::from_secs(1),
            "still active 1 s after its revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "revoked token inactive {:?} after the revocation",
        revoked.elapsed()
    );

    // Revoking a subject token leaves what was exchanged from it active; the revoked subject
    // can no longer be exchanged.
    let subject = keycloak
        .client_credentials(BROKER, secret, Some("reports:read"))
        .await?;
    let exchanged = keycloak
        .exchange(
            BROKER,
            secret,
            &subject.access_token,
            &[REPORTS],
            Some("reports:read"),
        )
        .await?;
    keycloak.revoke(&subject.access_token).await?;
    ensure!(!keycloak.introspect(&subject.access_token).await?.active);
    ensure!(
        keycloak.introspect(&exchanged.access_token).await?.active,
        "revoking the subject revoked the exchanged token too"
    );
    let again = keycloak
        .exchange(
            BROKER,
            secret,
            &subject.access_token,
            &[REPORTS],
            Some("reports:read"),
        )
        .await;
    expect_refusal(again, 400, "invalid_request", "Invalid token")?;
    Ok(())
}

async fn what_an_exchange_may_ask_for(keycloak: &Keycloak, realm: &Realm) -> anyhow::Result<()> {
    let secret = realm.secret(BROKER)?;
    // Each from a fresh 5 s subject token with scope reports:read, so that a slow machine's
    // calls never meet an expired one.
    let exchange = |audience: &'static [&'static str], scope: Option<&'static str>| async move {
        let subject = keycloak
            .client_credentials(BROKER, secret, Some("reports:read"))
            .await?;
        keycloak
            .exchange(BROKER, secret, &subject.access_token, audience, scope)
            .await
    };

    // `audience` repeated: one token for both, aud an array (in no particular order).
    let both = exchange(&[REPORTS, BILLING], Some("reports:read billing:read")).await?;
    let claims = both.claims()?;
    ensure!(
        claims.aud.as_ref().map(Audience::sorted) == Some(vec![BILLING, REPORTS])
            && matches!(claims.aud, Some(Audience::Many(_))),
        "{claims:?}"
    );
    ensure!(
        scopes(&both) == ["billing:read", "reports:read"],
        "{both:?}"
    );

    // Keycloak does not narrow: a scope (and so an audience) the subject token lacks is
    // granted if the client may have it at all. The broker must enforce narrowing itself.
    let wider = exchange(&[REPORTS], Some("reports:write")).await?;
    ensure!(wider.scope.as_deref() == Some("reports:write"), "{wider:?}");
    let elsewhere = exchange(&[BILLING], Some("billing:read")).await?;
    ensure!(
        elsewhere.claims()?.aud == Some(Audience::One(BILLING.into())),
        "{elsewhere:?}"
    );

    // An audience comes only with a scope that maps to it.
    expect_refusal(
        exchange(&[REPORTS, BILLING], Some("reports:read")).await,
        400,
        "invalid_request",
        "Requested audience not available: billing-api",
    )?;
    expect_refusal(
        exchange(&[REPORTS], None).await,
        400,
        "invalid_request",
        "Requested audience not available: reports-api",
    )?;
    // No audience: the scopes' audiences.
    let unaddressed = exchange(&[], Some("reports:read")).await?;
    ensure!(
        unaddressed.claims()?.aud == Some(Audience::One(REPORTS.into())),
        "{:?}",
        unaddressed.claims()?
    );

    // The exchanged token lives its own lifespan from the exchange, not capped by the
    // subject's expiry.
    let subject = keycloak
        .client_credentials(BROKER, secret, Some("reports:read"))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = keycloak
        .exchange(
            BROKER,
            secret,
            &subject.access_token,
            &[REPORTS],
            Some("reports:read"),
        )
        .await?;
    let (subject_exp, later_claims) = (subject.claims()?.exp, later.claims()?);
    ensure!(lives_lifespan(&later), "{later:?}");
    ensure!(
        later_claims.exp > subject_exp,
        "exp {:?} vs the subject's {subject_exp:?}",
        later_claims.exp
    );
    Ok(())
}

async fn error_answers(keycloak: &Keycloak, realm: &Realm) -> anyhow::Result<()> {
    let secret = realm.secret(BROKER)?;
    let exchange = |audience: &'static [&'static str], scope: Option<&'static str>| async move {
        let subject = keycloak
            .client_credentials(BROKER, secret, Some("reports:read"))
            .await?;
        keycloak
            .exchange(BROKER, secret, &subject.access_token, audience, scope)
            .await
    };
    expect_refusal(
        exchange(&["nope-api"], Some("reports:read")).await,
        400,
        "invalid_client",
        "Audience not found",
    )?;
    expect_refusal(
        exchange(&[INTROSPECTOR], Some("reports:read")).await,
        400,
        "invalid_request",
        "Requested audience not available: introspector",
    )?;
    expect_refusal(
        exchange(&[REPORTS], Some("nope:scope")).await,
        400,
        "invalid_scope",
        "Invalid scopes: nope:scope",
    )?;
    expect_refusal(
        keycloak
            .client_credentials(BROKER, secret, Some("nope:scope"))
            .await,
        400,
        "invalid_scope",
        "Invalid scopes: nope:scope",
    )?;
    expect_refusal(
        keycloak
            .exchange(
                BROKER,
                secret,
                "not.a.token",
                &[REPORTS],
                Some("reports:read"),
            )
            .await,
        400,
        "invalid_request",
        "Invalid token",
    )?;
    expect_refusal(
        keycloak
            .client_credentials(BROKER, "wrong-secret", None)
            .await,
        401,
        "unauthorized_client",
        "Invalid client or Invalid client credentials",
    )?;
    // Revocation is by the token's own client only; an unknown token is "revoked" (200).
    let token = keycloak
        .client_credentials(WIDE, realm.secret(WIDE)?, None)
        .await?
        .access_token;
    let other = keycloak
        .revoke_as(INTROSPECTOR, realm.secret(INTROSPECTOR)?, &token)
        .await;
    match other {
        Err(CallError::Refused {
            status: 400, error, ..
        }) if error.error == "invalid_request"
            && error.error_description.as_deref() == Some("Unmatching clients") => {}
        other => anyhow::bail!("revocation by another client: {other:?}"),
    }
    ensure!(keycloak.introspect(&token).await?.active);
    keycloak
        .revoke_as(BROKER, secret, "not.a.token")
        .await
        .context("revoking an unknown token")?;
    Ok(())
}

/// With audience mappers on the client, an exchange still narrows the token's `aud` to the
/// audience asked for, but introspection recomputes `aud` from the client's mappers and
/// answers all of them: a resource server must not take introspection's `aud` as the
/// token's. (The broker's realm maps audiences by scope, where both agree.)
async fn introspection_of_a_broker_with_every_audience(
    keycloak: &Keycloak,
    realm: &Realm,
) -> anyhow::Result<()> {
    let secret = realm.secret(WIDE)?;
    let subject = keycloak.client_credentials(WIDE, secret, None).await?;
    ensure!(
        subject.claims()?.aud.as_ref().map(Audience::sorted) == Some(vec![BILLING, REPORTS]),
        "{:?}",
        subject.claims()?
    );
    let narrowed = keycloak
        .exchange(
            WIDE,
            secret,
            &subject.access_token,
            &[REPORTS],
            Some("reports:read"),
        )
        .await?;
    ensure!(
        narrowed.claims()?.aud == Some(Audience::One(REPORTS.into())),
        "{:?}",
        narrowed.claims()?
    );
    let seen = keycloak.introspect(&narrowed.access_token).await?;
    ensure!(
        seen.active
            && seen.claims.aud.as_ref().map(Audience::sorted) == Some(vec![BILLING, REPORTS]),
        "{seen:?}"
    );
    // The audience check of a resource server's own introspection is against the token.
    let as_billing = keycloak
        .introspect_as(BILLING, realm.secret(BILLING)?, &narrowed.access_token)
        .await?;
    ensure!(!as_billing.active, "{as_billing:?}");
    Ok(())
}

async fn restart(keycloak: &mut Keycloak, realm: &Realm) -> anyhow::Result<()> {
    let secret = realm.secret(WIDE)?;
    let kept = keycloak.client_credentials(WIDE, secret, None).await?;
    let revoked = keycloak.client_credentials(WIDE, secret, None).await?;
    keycloak.revoke(&revoked.access_token).await?;
    ensure!(!keycloak.introspect(&revoked.access_token).await?.active);

    let stopped_in = keycloak.stop();
    eprintln!("Keycloak stopped in {stopped_in:?}");
    match tokio::net::TcpStream::connect(keycloak.addr()).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => anyhow::bail!("a stopped Keycloak: {other:?}"),
    }
    match keycloak.discovery().await {
        Err(e) => eprintln!("discovery while stopped: {e:#}"),
        Ok(doc) => anyhow::bail!("a stopped Keycloak served {doc:?}"),
    }

    let started = Instant::now();
    keycloak.start().await?;
    eprintln!(
        "Keycloak back in {:?} (same ports, database kept), java RSS {} MiB",
        started.elapsed(),
        rss_mib(keycloak)
    );
    let doc = keycloak.discovery().await?;
    ensure!(doc.issuer == keycloak.issuer(), "{doc:?}");
    // The same realm: the same clients and secrets, and the same signing keys (a token from
    // before the restart is still active); the admin too.
    let fresh = keycloak
        .client_credentials(BROKER, realm.secret(BROKER)?, Some("reports:read"))
        .await?;
    ensure!(lives_lifespan(&fresh), "{fresh:?}");
    ensure!(keycloak.introspect(&kept.access_token).await?.active);
    keycloak.admin_token().await?;
    // A revocation outlives the restart (Keycloak keeps revoked tokens in its database).
    let after = keycloak.introspect(&revoked.access_token).await?;
    ensure!(
        !after.active,
        "revoked before the restart, active after it: {after:?}"
    );

    // Secrets and tokens stay out of the log, and secrets out of the command lines.
    let log = std::fs::read_to_string(keycloak.dir().join("keycloak.log"))?;
    let java = keycloak.java_pid().context("no java process under kc.sh")?;
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{java}/cmdline"))?).into_owned();
    let mut secrets = vec![keycloak.admin_password()];
    for client in [BROKER, WIDE, INTROSPECTOR, REPORTS, BILLING] {
        secrets.push(realm.secret(client)?);
    }
    for secret in secrets {
        ensure!(!log.contains(secret), "a secret is in the log");
        ensure!(
            !cmdline.contains(secret),
            "a secret is on java's command line"
        );
    }
    for token in [&kept, &revoked, &fresh] {
        ensure!(!log.contains(&token.access_token), "a token is in the log");
    }
    Ok(())
}

/// The test process's death reaches kc.sh by its parent-death signal; java, kc.sh's child,
/// has one of its own (`build.sh`'s java wrapper), so nothing is left for the reaper to wait on.
fn killed_launcher_takes_java_with_it(keycloak: &mut Keycloak) -> anyhow::Result<()> {
    let java = keycloak.java_pid().context("no java process under kc.sh")?;
    let home = keycloak.dir().join("keycloak-home").display().to_string();
    ensure!(
        keybroker_e2e::process::pids_with_marker(&home).contains(&java),
        "java's command line does not name the run directory"
    );
    keycloak.signal_launcher(Signal::SIGKILL);
    let killed = Instant::now();
    while !keybroker_e2e::process::pids_with_marker(&home).is_empty() {
        ensure!(
            killed.elapsed() < Duration::from_secs(5),
            "processes naming {home} outlived kc.sh: {:?}",
            keybroker_e2e::process::pids_with_marker(&home)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("java gone {:?} after kc.sh's SIGKILL", killed.elapsed());
    Ok(())
}

fn expect_refusal<T: std::fmt::Debug>(
    outcome: Result<T, CallError>,
    status: u16,
    error: &str,
    description: &str,
) -> anyhow::Result<()> {
    match &outcome {
        Err(e) => match e.refusal() {
            Some((got, body))
                if got == status
                    && body.error == error
                    && body.error_description.as_deref() == Some(description) =>
            {
                Ok(())
            }
            _ => anyhow::bail!("wanted {status} {error}: {description}; got {e}"),
        },
        Ok(answer) => anyhow::bail!("wanted {status} {error}: {description}; got {answer:?}"),
    }
}

/// `expires_in` is counted from the answer, not from `iat`, rounded down: it is the lifespan, or
/// one second less when a second boundary passed in between (seen with two Keycloaks on 2 cores).
fn lives_lifespan(tokens: &Tokens) -> bool {
    (LIFESPAN.as_secs() - 1..=LIFESPAN.as_secs()).contains(&tokens.expires_in)
}

/// A string claim outside the named ones.
fn claim<'a>(claims: &'a Claims, name: &str) -> Option<&'a str> {
    claims.other.get(name).and_then(|v| v.as_str())
}

fn scopes(tokens: &Tokens) -> Vec<&str> {
    let mut all: Vec<&str> = tokens
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    all.sort_unstable();
    all
}

fn rss_mib(keycloak: &Keycloak) -> u64 {
    keycloak
        .java_pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches(" kB")
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kib| kib / 1024)
}
