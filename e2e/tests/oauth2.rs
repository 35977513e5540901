//! The oauth2 kind against a real Keycloak: a KeyProvider holding the broker's confidential
//! client, ApiKeys asking for one audience and scope, the controller, the broker and the
//! sidecar (a process, as in the gateway tests) writing the token files of the pod. The token
//! the app reads is accepted by a resource server that introspects it at Keycloak and carries
//! exactly the ApiKey's audience and scope; an ApiKey asking for more than the guardrails is
//! refused with a reason naming it; a provider whose client authenticates with a service
//! account's token (no secret) mints the same narrowed token, another account's token is refused; a MinIO trusting Keycloak sells the token read rights
//! and nothing more, and refuses the pod's token for another audience; a client whose tokens carry a scope not asked for (a default
//! client scope) gets no token at all (the broker never hands out a wider one); a revoked ApiKey's files are
//! gone; neither the client secret nor a token is in the sidecar's output.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use keybroker_e2e::gateway_rig;
use keybroker_e2e::keycloak::{Keycloak, Realm, jwt_claims};
use keybroker_e2e::minio::OpenIdMinio;
use keybroker_e2e::sidecar::binary;
use keybroker_e2e::{eventually, in_namespace, shared_with_crds};
use keybroker_operator::crd::{
    ApiKey, ApiKeySpec, ClientServiceAccount, Guardrails, KeyProvider, KeyProviderSpec,
    OAuth2Provider, ProviderRef, Scope, SecretRef,
};

const BROKER: &str = "keybroker";
/// A broker client whose every token carries `billing:read` (and so `billing-api`), asked for
/// or not.
const WIDE: &str = "keybroker-wide";
/// A broker client with 10 s tokens: the outage steps.
const SHORT: &str = "keybroker-short";
const REPORTS: &str = "reports-api";
const BILLING: &str = "billing-api";
const CLIENT_SECRET: &str = "keycloak-client";
/// A broker client authenticated by a token of service account [`CLIENT_SA`], no secret.
const SA_BROKER: &str = "keybroker-by-sa";
const CLIENT_SA: &str = "keybroker-client";
/// An ApiKey of the provider with that client.
const SA_KEY: &str = "sa-reports";
/// The ApiKey of the pod.
const READER: &str = "reports";
/// Another ApiKey of the pod, for the billing audience.
const BILLING_KEY: &str = "billing";

/// `issuer`: the cluster's service-account issuer, whose tokens of `ns`'s [`CLIENT_SA`] the
/// [`SA_BROKER`] client takes instead of a secret.
fn realm(issuer: &str, ns: &str) -> Realm {
    Realm::new("keybroker")
        .trusting_kubernetes(issuer)
        .broker_by_service_account(SA_BROKER, Duration::from_secs(60), (ns, CLIENT_SA))
        .resource_server(REPORTS, &["reports:read", "reports:write"])
        .resource_server(BILLING, &["billing:read"])
        .broker(BROKER, Duration::from_secs(60))
        .broker_with_default_scope(WIDE, Duration::from_secs(60), "billing:read")
        .broker(SHORT, Duration::from_secs(10))
        .introspector("introspector")
}

/// Labelled `e2e-scope=<ns>`, the KeyProviders the test's controller watches.
fn provider(name: &str, ns: &str, issuer: String) -> KeyProvider {
    let mut kp = KeyProvider::new(
        name,
        KeyProviderSpec {
            aws: None,
            gateway: None,
            oauth2: Some(OAuth2Provider {
                issuer,
                ca_bundle: None,
                client_secret_ref: Some(SecretRef {
                    namespace: ns.to_owned(),
                    name: format!("{CLIENT_SECRET}-{name}"),
                }),
                client_service_account: None,
            }),
            namespace_selector: LabelSelector {
                match_labels: Some([("kubernetes.io/metadata.name".into(), ns.into())].into()),
                ..LabelSelector::default()
            },
            guardrails: Guardrails {
                allowed_actions: vec!["reports:read".into(), "billing:read".into()],
                allowed_resources: vec![REPORTS.into(), BILLING.into()],
                default_ttl: None,
                max_ttl: Some("15m".into()),
                max_issuances_per_minute: None,
                max_request_bytes: None,
                max_requests_per_minute: None,
                max_requests_per_day: None,
            },
            anomalies: None,
        },
    );
    kp.metadata.labels = Some([("e2e-scope".to_owned(), ns.to_owned())].into());
    kp
}

fn apikey(name: &str, provider: &str, scope: &str, audience: &str) -> ApiKey {
    ApiKey::new(
        name,
        ApiKeySpec {
            provider_ref: ProviderRef {
                name: provider.into(),
            },
            service_account_names: vec!["app".into()],
            scope: Scope {
                actions: vec![scope.into()],
                resources: vec![audience.into()],
            },
            ttl: None,
            revoked: false,
            budget: None,
            anomalies: None,
        },
    )
}

async fn client_secret(
    client: &kube::Client,
    ns: &str,
    provider: &str,
    id: &str,
    secret: &str,
) -> anyhow::Result<()> {
    let stored = Secret {
        metadata: ObjectMeta {
            name: Some(format!("{CLIENT_SECRET}-{provider}")),
            ..ObjectMeta::default()
        },
        string_data: Some(
            [
                ("clientId".to_owned(), id.to_owned()),
                ("clientSecret".to_owned(), secret.to_owned()),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &stored)
        .await?;
    Ok(())
}

/// The Ready condition of `key`: status, reason, message.
async fn ready(api: &Api<ApiKey>, name: &str) -> Option<(String, String, String)> {
    let key = api.get(name).await.ok()?;
    let c = key
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status, c.reason, c.message))
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_reads_a_token_narrowed_to_its_apikey_and_nothing_wider_is_ever_handed_out()
-> anyhow::Result<()> {
    keybroker_e2e::logs::capture();
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "oauth2", |client, ns| async move {
        let realm = realm(&cluster.server, &ns);
        let mut keycloak = Keycloak::start_in_trusting(
            &keybroker_e2e::run_dir()?,
            &realm,
            Some(&cluster.ca_cert),
        )
        .await?;
        let (name, wide_name) = (format!("keycloak-{ns}"), format!("keycloak-wide-{ns}"));
        let short_name = format!("keycloak-short-{ns}");
        let broker_secret = realm.secret(BROKER)?.to_owned();
        client_secret(&client, &ns, &name, BROKER, &broker_secret).await?;
        client_secret(&client, &ns, &wide_name, WIDE, realm.secret(WIDE)?).await?;
        client_secret(&client, &ns, &short_name, SHORT, realm.secret(SHORT)?).await?;
        for provider_name in [&wide_name, &short_name] {
            Api::<KeyProvider>::all(client.clone())
                .create(
                    &PostParams::default(),
                    &provider(provider_name, &ns, keycloak.issuer()),
                )
                .await?;
        }

        // The pod's ApiKey, through the broker and the sidecar: the rig waits for the
        // sidecar's /startupz, i.e. for the token files. (The rig's gateway is not used.)
        let rig = gateway_rig::start(
            cluster,
            &binary().await?,
            &client,
            &ns,
            ("unused-gateway-key", "unused"),
            provider(&name, &ns, keycloak.issuer()),
            vec![
                apikey(READER, &name, "reports:read", REPORTS),
                apikey("short", &short_name, "reports:read", REPORTS),
            ],
        )
        .await?;
        let dir = rig.out.join(READER);
        let token = read(&dir.join("token")).context("no token file")?;
        let claims = jwt_claims(&token)?;
        ensure!(
            claims.aud.as_ref().map(|a| a.sorted()) == Some(vec![REPORTS]),
            "{claims:?}"
        );
        ensure!(
            claims.scope.as_deref() == Some("reports:read"),
            "{claims:?}"
        );
        ensure!(claims.azp.as_deref() == Some(BROKER), "{claims:?}");
        let json: serde_json::Value =
            serde_json::from_str(&read(&dir.join("token.json")).context("no token.json")?)?;
        ensure!(
            json["token"] == token.as_str(),
            "token.json holds another token"
        );
        ensure!(json["scope"] == "reports:read", "{}", json["scope"]);
        ensure!(
            json["audience"] == serde_json::json!([REPORTS]),
            "{}",
            json["audience"]
        );
        ensure!(
            read(&dir.join("expiration")).is_some(),
            "no expiration file"
        );

        // A resource server that checks with Keycloak accepts it, as the ApiKey's rights.
        let seen = keycloak.introspect(&token).await?;
        ensure!(seen.active, "Keycloak says the pod's token is inactive");
        ensure!(
            seen.claims.scope.as_deref() == Some("reports:read"),
            "{seen:?}"
        );

        // Wider than the guardrails: refused by the controller, naming what to change.
        let keys = Api::<ApiKey>::namespaced(client.clone(), &ns);
        keys.create(
            &PostParams::default(),
            &apikey("writer", &name, "reports:write", REPORTS),
        )
        .await?;
        let (status, reason, message) =
            eventually("the writer ApiKey refused", Duration::from_secs(30), || {
                ready(&keys, "writer")
            })
            .await?;
        ensure!(
            status == "False"
                && reason == "ScopeExceedsGuardrails"
                && message.contains(
                    r#"scope "reports:write" is not within the provider's allowedActions"#
                ),
            "{status} {reason}: {message}"
        );

        // A client whose tokens carry a scope by default: the broker refuses to hand one out.
        keys.create(
            &PostParams::default(),
            &apikey("wide", &wide_name, "reports:read", REPORTS),
        )
        .await?;
        keybroker_e2e::fixtures::recorded_grant(&client, &ns, "wide", None).await?;
        keys.create(
            &PostParams::default(),
            &apikey(BILLING_KEY, &name, "billing:read", BILLING),
        )
        .await?;
        keybroker_e2e::fixtures::recorded_grant(&client, &ns, BILLING_KEY, None).await?;
        // The pod lists them too (annotations may change on a running pod).
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
            .patch(
                "app",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                    "keybroker.dev/apikeys": format!("{READER},short,wide,{BILLING_KEY},{SA_KEY}")}}})),
            )
            .await?;
        let broker = keybroker_e2e::https::Client::new(
            format!("127.0.0.1:{}", rig.broker_port).parse()?,
            &rig.ca_cert,
        )?;
        let body = serde_json::to_vec(&keybroker_contract::wire::ExchangeRequest {
            api_key: "wide".into(),
        })?;
        let refused = broker
            .send("POST", "/v1/exchange", Some(&rig.pod_token), body)
            .await?;
        let text = String::from_utf8_lossy(&refused.body).into_owned();
        ensure!(
            refused.status.as_u16() == 502 && text.contains("ProviderRefused"),
            "{} {text}",
            refused.status
        );
        ensure!(
            !text.contains("billing"),
            "the provider's detail reached the pod: {text}"
        );

        // By use: a MinIO trusting Keycloak's tokens addressed to reports-api sells the pod's
        // token its role's rights (read) and nothing more; a token of the same pod for another
        // audience buys nothing.
        let minio = OpenIdMinio::start(
            &keybroker_e2e::run_dir()?,
            &keycloak.issuer(),
            REPORTS,
            "readonly",
        )
        .await?;
        let root = minio.root_client();
        root.create_bucket().bucket("reports").send().await?;
        root.put_object()
            .bucket("reports")
            .key("q1.csv")
            .body(b"region,total\n".to_vec().into())
            .send()
            .await?;
        let s3 = minio
            .s3_for_token(&token)
            .await
            .map_err(|e| anyhow::anyhow!("MinIO refused the pod's token: {e}"))?;
        let object = s3
            .get_object()
            .bucket("reports")
            .key("q1.csv")
            .send()
            .await?;
        ensure!(
            object.body.collect().await?.into_bytes().as_ref() == b"region,total\n",
            "the object read back differs"
        );
        let written = s3
            .put_object()
            .bucket("reports")
            .key("q2.csv")
            .body(b"x".to_vec().into())
            .send()
            .await;
        let code = written.map_err(|e| e.into_service_error().meta().code().map(str::to_owned));
        ensure!(
            matches!(&code, Err(Some(c)) if c == "AccessDenied"),
            "a write outside the role's policy was not denied: {code:?}"
        );
        let body = serde_json::to_vec(&keybroker_contract::wire::ExchangeRequest {
            api_key: BILLING_KEY.into(),
        })?;
        let billing = broker
            .send("POST", "/v1/exchange", Some(&rig.pod_token), body)
            .await?;
        ensure!(
            billing.status.as_u16() == 200,
            "no billing token: {}",
            billing.status
        );
        let billing: keybroker_contract::wire::ExchangeResponse =
            serde_json::from_slice(&billing.body)?;
        let billing = billing
            .token
            .context("no token in the answer")?
            .access_token;
        let refusal = minio.s3_for_token(&billing).await.err();
        ensure!(
            refusal.is_some(),
            "MinIO sold S3 rights to a token addressed to {BILLING}"
        );
        eprintln!("MinIO refused the {BILLING} token: {refusal:?}");

        // No secret at all: a provider whose client authenticates with a token of a service
        // account (Keycloak checks its signature against the cluster's keys and its subject).
        // Another service account's token is refused, so the provider is not Ready.
        let providers = Api::<KeyProvider>::all(client.clone());
        for sa in [CLIENT_SA, "intruder"] {
            keybroker_e2e::fixtures::service_account(&client, &ns, sa).await?;
        }
        let by_sa = |name: &str, sa: &str| {
            let mut kp = provider(name, &ns, keycloak.issuer());
            if let Some(oauth2) = kp.spec.oauth2.as_mut() {
                oauth2.client_secret_ref = None;
                oauth2.client_service_account = Some(ClientServiceAccount {
                    client_id: SA_BROKER.into(),
                    namespace: ns.clone(),
                    name: sa.into(),
                    audience: None,
                });
            }
            kp
        };
        // Both ways at once: refused by the apiserver, naming the choice.
        let mut both = by_sa(&format!("keycloak-both-{ns}"), CLIENT_SA);
        if let Some(oauth2) = both.spec.oauth2.as_mut() {
            oauth2.client_secret_ref = Some(SecretRef {
                namespace: ns.clone(),
                name: format!("{CLIENT_SECRET}-{name}"),
            });
        }
        let refused = providers.create(&PostParams::default(), &both).await;
        ensure!(
            matches!(&refused, Err(kube::Error::Api(e)) if e.message.contains("set exactly one of clientSecretRef and clientServiceAccount")),
            "a provider with a secret and a service account: {refused:?}"
        );
        let (sa_name, intruder_name) = (format!("keycloak-sa-{ns}"), format!("keycloak-intruder-{ns}"));
        providers
            .create(&PostParams::default(), &by_sa(&sa_name, CLIENT_SA))
            .await?;
        providers
            .create(&PostParams::default(), &by_sa(&intruder_name, "intruder"))
            .await?;
        let provider_ready = |name: String| {
            let providers = providers.clone();
            async move {
                let kp = providers.get(&name).await.ok()?;
                let c = kp
                    .status?
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Ready")?;
                Some((c.status, c.reason, c.message))
            }
        };
        let (status, reason, message) = eventually(
            "the service-account provider verified",
            Duration::from_secs(30),
            || provider_ready(sa_name.clone()),
        )
        .await?;
        ensure!(status == "True", "{status} {reason}: {message}");
        let (status, reason, message) = eventually(
            "the intruder's provider refused",
            Duration::from_secs(30),
            || async {
                provider_ready(intruder_name.clone())
                    .await
                    .filter(|(status, ..)| status == "False")
            },
        )
        .await?;
        ensure!(
            reason == "ClientRefused" && message.contains(SA_BROKER),
            "{status} {reason}: {message}"
        );
        keys.create(
            &PostParams::default(),
            &apikey(SA_KEY, &sa_name, "reports:read", REPORTS),
        )
        .await?;
        keybroker_e2e::fixtures::recorded_grant(&client, &ns, SA_KEY, None).await?;
        let body = serde_json::to_vec(&keybroker_contract::wire::ExchangeRequest {
            api_key: SA_KEY.into(),
        })?;
        let answer = broker
            .send("POST", "/v1/exchange", Some(&rig.pod_token), body)
            .await?;
        ensure!(
            answer.status.as_u16() == 200,
            "no token through the service-account client: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        let answer: keybroker_contract::wire::ExchangeResponse =
            serde_json::from_slice(&answer.body)?;
        let by_sa_token = answer.token.context("no token in the answer")?.access_token;
        let sa_claims = jwt_claims(&by_sa_token)?;
        ensure!(
            sa_claims.azp.as_deref() == Some(SA_BROKER)
                && sa_claims.aud.as_ref().map(|a| a.sorted()) == Some(vec![REPORTS])
                && sa_claims.scope.as_deref() == Some("reports:read"),
            "{sa_claims:?}"
        );
        ensure!(
            keycloak.introspect(&by_sa_token).await?.active,
            "the service-account client's token is inactive"
        );

        // Revoked: the pod's files are gone, and the token the test still holds (a client that
        // cached it) is refused by the resource server that introspects: the broker revoked it
        // at Keycloak.
        let revoked_at = std::time::Instant::now();
        keys.patch(
            READER,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"revoked": true}})),
        )
        .await?;
        let inactive = eventually(
            "the token inactive at Keycloak",
            Duration::from_secs(10),
            || async {
                match keycloak.introspect(&token).await {
                    Ok(seen) if !seen.active => Some(revoked_at.elapsed()),
                    _ => None,
                }
            },
        )
        .await?;
        eprintln!("the cached token was inactive at Keycloak {inactive:?} after the patch");
        // A resource server that only checks signatures still takes it until it expires, as
        // the README says.
        ensure!(
            minio.s3_for_token(&token).await.is_ok(),
            "MinIO (offline checks) refused the revoked token before its expiry"
        );
        eventually(
            "the token files removed",
            Duration::from_secs(10),
            || async {
                (!dir.join("token").exists() && !dir.join("token.json").exists()).then_some(())
            },
        )
        .await?;

        // Keycloak stopped: the sidecar keeps the last valid token until it expires, then
        // removes it, and writes a new one once Keycloak is back.
        let short = rig.out.join("short").join("token");
        let held = read(&short).context("no token for the short ApiKey")?;
        let expires = jwt_claims(&held)?.exp.context("no exp")?;
        keycloak.stop();
        let stopped = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        eventually(
            "the short token removed at its expiry",
            Duration::from_secs(30),
            || async { (!short.exists()).then_some(()) },
        )
        .await?;
        let removed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        ensure!(
            removed + 1 >= expires,
            "the token was removed {}s before its expiry",
            expires - removed
        );
        eprintln!(
            "Keycloak down: the last token was kept {}s, until its expiry",
            removed.saturating_sub(stopped)
        );
        keycloak.start().await?;
        let fresh = eventually(
            "a new short token after the outage",
            Duration::from_secs(90),
            || async { read(&short).filter(|t| *t != held) },
        )
        .await?;
        ensure!(
            keycloak.introspect(&fresh).await?.active,
            "the token after the outage is inactive"
        );

        // The operator's log says why (the pod did not), with an audit record of the issuance;
        // nothing secret in it, nor in what the sidecar printed.
        let operator = keybroker_e2e::logs::captured();
        ensure!(
            operator.contains(r#"scope \"billing:read\" was not asked for"#),
            "the operator's log does not say why the wide token was refused"
        );
        let jti = claims.jti.clone().context("the token has no jti")?;
        for (what, message) in [
            ("issuance", "credentials issued"),
            (
                "revocation",
                "oauth2 token revoked at the identity provider",
            ),
        ] {
            let records = operator
                .lines()
                .filter(|l| {
                    l.contains("keybroker::audit")
                        && l.contains(message)
                        && l.contains(&jti)
                        && l.contains(READER)
                })
                .count();
            ensure!(
                records == 1,
                "{records} audit records of the {what} naming the token's jti, not one"
            );
        }
        let sidecar = read(&rig.sidecar_log).unwrap_or_default();
        ensure!(!sidecar.is_empty(), "no sidecar log captured");
        for (what, value) in [
            ("the client secret", broker_secret.as_str()),
            ("the wide client's secret", realm.secret(WIDE)?),
            ("the token", token.as_str()),
        ] {
            ensure!(!sidecar.contains(value), "{what} is in the sidecar's log");
            ensure!(!operator.contains(value), "{what} is in the operator's log");
        }
        Ok(())
    })
    .await
}
