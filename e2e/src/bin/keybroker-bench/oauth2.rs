//! `oauth2`: tokens of an oauth2 ApiKey through the release operator's broker (pod token →
//! broker → one RFC 8693 exchange at Keycloak) vs. the same exchange sent to Keycloak's token
//! endpoint directly by a client that already holds the broker client's own token, at
//! concurrency 1/16/64; then the CPU each process spent per token, which bounds throughput on
//! a machine whose cores are all busy.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ObjectMeta, PostParams};

use keybroker_e2e::fixtures;
use keybroker_e2e::keycloak::{Keycloak, Realm};
use keybroker_operator::crd::{
    ApiKey, ApiKeySpec, Guardrails, KeyProvider, KeyProviderSpec, OAuth2Provider, ProviderRef,
    Scope, SecretRef,
};

use super::*;
use crate::broker::{brokered_load, first_exchange, spawn_broker};

const BROKER: &str = "keybroker";
const REPORTS: &str = "reports-api";
const SCOPE: &str = "reports:read";
const APIKEY: &str = "reports";
/// Tokens minted on each path before the measured rounds.
const WARM_UP: usize = 3000;

pub(crate) async fn oauth2(requests: usize, operator: &Path) -> anyhow::Result<()> {
    let operator = std::path::absolute(operator)?;
    ensure!(
        operator.exists(),
        "{} missing: run `cargo build --release -p keybroker-operator`",
        operator.display()
    );
    let (dir, cluster, client) = start_cluster().await?;
    eprintln!("starting Keycloak...");
    let realm = Realm::new("keybroker")
        .resource_server(REPORTS, &[SCOPE])
        .broker(BROKER, Duration::from_secs(300));
    let keycloak = Arc::new(Keycloak::start_in(&dir, &realm).await?);
    let secret = realm.secret(BROKER)?.to_owned();

    let ns = "bench";
    create_namespace(&client, ns).await?;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("keycloak-client".into()),
                    ..ObjectMeta::default()
                },
                string_data: Some(
                    [
                        ("clientId".to_owned(), BROKER.to_owned()),
                        ("clientSecret".to_owned(), secret.clone()),
                    ]
                    .into(),
                ),
                ..Secret::default()
            },
        )
        .await?;
    Api::<KeyProvider>::all(client.clone())
        .create(
            &PostParams::default(),
            &KeyProvider::new(
                "keycloak",
                KeyProviderSpec {
                    aws: None,
                    gateway: None,
                    oauth2: Some(OAuth2Provider {
                        issuer: keycloak.issuer(),
                        ca_bundle: None,
                        client_secret_ref: Some(SecretRef {
                            namespace: ns.into(),
                            name: "keycloak-client".into(),
                        }),
                        client_service_account: None,
                    }),
                    namespace_selector: LabelSelector {
                        match_labels: Some(
                            [("kubernetes.io/metadata.name".into(), ns.into())].into(),
                        ),
                        ..LabelSelector::default()
                    },
                    guardrails: Guardrails {
                        allowed_actions: vec![SCOPE.into()],
                        allowed_resources: vec![REPORTS.into()],
                        max_ttl: Some("15m".into()),
                        max_issuances_per_minute: Some(100_000),
                        ..Guardrails::default()
                    },
                    anomalies: None,
                },
            ),
        )
        .await?;
    Api::<ApiKey>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &ApiKey::new(
                APIKEY,
                ApiKeySpec {
                    provider_ref: ProviderRef {
                        name: "keycloak".into(),
                    },
                    service_account_names: vec!["app".into()],
                    scope: Scope {
                        actions: vec![SCOPE.into()],
                        resources: vec![REPORTS.into()],
                    },
                    ttl: None,
                    revoked: false,
                    budget: None,
                    anomalies: None,
                },
            ),
        )
        .await?;
    fixtures::service_account(&client, ns, "app").await?;
    fixtures::injected_pod(&client, ns, "app", "app", APIKEY).await?;
    let token = fixtures::token(
        &client,
        ns,
        "app",
        keybroker_contract::wire::AUDIENCE,
        Some("app"),
    )
    .await?;

    let (mut component, _, client_https) = spawn_broker(&dir, &cluster, &operator)?;
    let body = first_exchange(&mut component, &client_https, &token, APIKEY).await?;

    // Keycloak's JIT warms up over the first few thousand tokens: both paths are run before
    // the measured rounds, so neither is measured against a cold JVM.
    eprintln!("warming up Keycloak...");
    let own = keycloak
        .client_credentials(BROKER, &secret, None)
        .await?
        .access_token;
    direct_exchanges(&keycloak, &secret, &own, 16, WARM_UP).await?;
    brokered_load(16, WARM_UP, &client_https, &token, &body).await?;

    let pids = [
        ("bench", std::process::id()),
        ("broker", component.pid()),
        (
            "Keycloak",
            keycloak.java_pid().context("Keycloak's JVM not found")?,
        ),
    ];
    let cpu = || -> anyhow::Result<Vec<u64>> { pids.iter().map(|(_, p)| cpu_ticks(*p)).collect() };
    let mut summary = Vec::new();
    let mut cpu_rows = Vec::new();
    load_table_header();
    for level in LEVELS {
        // The floor: the exchange the broker makes, sent by a client that holds the broker
        // client's own token already (as the broker does between refreshes).
        let own = keycloak
            .client_credentials(BROKER, &secret, None)
            .await?
            .access_token;
        let before = cpu()?;
        let direct = direct_exchanges(&keycloak, &secret, &own, level, requests).await?;
        let between = cpu()?;
        let brokered = brokered_load(level, requests, &client_https, &token, &body).await?;
        let after = cpu()?;
        load_table_row("direct token exchange", level, requests, &direct);
        load_table_row("broker token (TLS)", level, requests, &brokered);
        let spent = |a: &[u64], b: &[u64]| -> Vec<u64> {
            a.iter().zip(b).map(|(a, b)| a.saturating_sub(*b)).collect()
        };
        cpu_rows.push((level, spent(&between, &before), spent(&after, &between)));
        summary.push((
            level,
            brokered.p50_ms - direct.p50_ms,
            brokered.rate / direct.rate,
        ));
    }

    // CPU per token: the broker's work (TLS, the TokenReview cache, authorization, the
    // exchange's client side) is added to Keycloak's on the same two cores, so the throughput
    // ceiling is direct CPU per token over brokered CPU per token.
    println!();
    println!(
        "| concurrency | direct CPU µs/token (bench, Keycloak) | brokered CPU µs/token (bench, broker, Keycloak) | ceiling vs direct |"
    );
    println!("|---|---|---|---|");
    let per_token = |ticks: u64| ticks as f64 / USER_HZ * 1e6 / requests as f64;
    for (level, direct, brokered) in cpu_rows {
        let (d, b) = (direct.iter().sum::<u64>(), brokered.iter().sum::<u64>());
        println!(
            "| {level} | {:.0} ({:.0}, {:.0}) | {:.0} ({:.0}, {:.0}, {:.0}) | {:.0} % |",
            per_token(d),
            per_token(direct[0]),
            per_token(direct[2]),
            per_token(b),
            per_token(brokered[0]),
            per_token(brokered[1]),
            per_token(brokered[2]),
            100.0 * d as f64 / b.max(1) as f64,
        );
    }
    println!();
    for (level, overhead, ratio) in summary {
        println!(
            "concurrency {level:>2}: broker overhead p50 {overhead:.2} ms (target < 1 ms), throughput {:.0}% of direct token exchange (target >= 90%)",
            ratio * 100.0
        );
    }
    println!(
        "broker RSS after the run: {} MiB",
        rss_kib(component.pid())? / 1024
    );
    component.stop(Duration::from_secs(5));
    drop(keycloak);
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// `total` token exchanges sent straight to Keycloak by `workers` clients, with the broker's
/// client secret and its own token `own`: what the broker sends for each pod's token.
async fn direct_exchanges(
    keycloak: &Arc<Keycloak>,
    secret: &str,
    own: &str,
    workers: usize,
    total: usize,
) -> anyhow::Result<LoadResult> {
    let (keycloak, secret, own) = (Arc::clone(keycloak), secret.to_owned(), own.to_owned());
    load(workers, total, move |_| {
        let (keycloak, secret, own) = (Arc::clone(&keycloak), secret.clone(), own.clone());
        async move {
            keycloak
                .exchange(BROKER, &secret, &own, &[REPORTS], Some(SCOPE))
                .await
                .map(drop)
                .map_err(|e| anyhow::anyhow!("{e}"))
        }
    })
    .await
}
