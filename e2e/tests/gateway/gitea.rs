//! Gitea (from the Go module proxy) behind the gateway: a team reads its repository with no
//! key, is refused writes and other teams' repositories, and the operator rotates the token on
//! its schedule while the app calls in a loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use keybroker_e2e::{in_namespace, shared_with_crds};
use keybroker_operator::crd::{GiteaRotation, KeyProvider, KeyRotation, SecretRef};

use crate::rig::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_team_reads_its_gitea_repository_through_the_gateway_and_the_scheduled_rotation_fails_no_call()
-> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    keybroker_e2e::logs::capture();
    in_namespace(cluster, "gw-gitea", |client, ns| async move {
        let gitea = keybroker_e2e::gitea::Gitea::start().await?;
        // The namespace's organization, and another team's; the token may write to both.
        gitea.create_org(&ns).await?;
        gitea
            .create_repo_with_file(&ns, "docs", "README.md", b"# team docs\n")
            .await?;
        gitea.create_org("other-team").await?;
        gitea
            .create_repo_with_file("other-team", "secret", "README.md", b"# theirs\n")
            .await?;
        let (old_id, old_token) = gitea
            .create_token("keybroker", &["write:repository"])
            .await?;
        let provider_name = format!("gitea-{ns}");
        // The account that owns the token, for the operator's rotation (basic auth).
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(
                &PostParams::default(),
                &Secret {
                    metadata: ObjectMeta {
                        name: Some("gitea-admin".into()),
                        ..ObjectMeta::default()
                    },
                    string_data: Some(
                        [
                            ("username".to_owned(), gitea.admin_user().to_owned()),
                            ("password".to_owned(), gitea.admin_password().to_owned()),
                        ]
                        .into(),
                    ),
                    ..Secret::default()
                },
            )
            .await?;
        let rotated = |name: &str, key_secret: &str, credentials: &str| {
            let mut provider = gitea_provider(name, &ns, gitea.url());
            if let Some(gateway) = provider.spec.gateway.as_mut() {
                gateway.key_secret_ref.name = key_secret.into();
                gateway.rotation = Some(KeyRotation {
                    every: "1m".into(),
                    grace: Some("30s".into()),
                    gitea: Some(GiteaRotation {
                        credentials_secret_ref: SecretRef {
                            namespace: ns.clone(),
                            name: credentials.into(),
                        },
                    }),
                });
            }
            provider
        };
        let provider = rotated(&provider_name, "gitea-key", "gitea-admin");
        // A second provider whose rotation credentials are wrong: its step fails, says so,
        // and its key stays as it was.
        let (_, kept_token) = gitea.create_token("kept", &["read:repository"]).await?;
        let secret = |name: &str, data: &[(&str, &str)]| Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            string_data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Secret::default()
        };
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
        secrets
            .create(
                &PostParams::default(),
                &secret(
                    "gitea-wrong",
                    &[("username", gitea.admin_user()), ("password", "wrong")],
                ),
            )
            .await?;
        secrets
            .create(
                &PostParams::default(),
                &secret("gitea-kept", &[("key", &kept_token)]),
            )
            .await?;
        let broken_name = format!("gitea-broken-{ns}");
        Api::<KeyProvider>::all(client.clone())
            .create(
                &PostParams::default(),
                &rotated(&broken_name, "gitea-kept", "gitea-wrong"),
            )
            .await?;
        let mut reader = apikey("docs", &provider_name, None);
        reader.spec.scope.resources = vec!["/api/v1/repos/{namespace}/docs/*".into()];
        let mut rig = rig(
            &client,
            &ns,
            ("gitea-key", &old_token),
            provider,
            vec![reader],
        )
        .await?;
        let port = rig.local_port;
        let readme = format!("/docs/api/v1/repos/{ns}/docs/raw/README.md");

        let (status, _, body) = call(port, "GET", &readme, &[], b"").await?;
        ensure!(status == 200 && body == "# team docs\n", "{status}: {body}");
        // Writing, and the other team's repository: refused by the gateway, though the token
        // itself could do both.
        let write = serde_json::json!({"content": "eA==", "message": "x"}).to_string();
        for (method, path, body) in [
            (
                "POST",
                format!("/docs/api/v1/repos/{ns}/docs/contents/new.md"),
                write.as_bytes(),
            ),
            (
                "GET",
                "/docs/api/v1/repos/other-team/secret/raw/README.md".to_owned(),
                &b""[..],
            ),
        ] {
            let (status, _, answer) = call(
                port,
                method,
                &path,
                &[("content-type", "application/json")],
                body,
            )
            .await?;
            ensure!(
                status == 403 && reason(&answer) == "OutsideScope",
                "{method} {path}: {status} {answer}"
            );
        }
        // The key reaches Gitea only through the gateway: without it the repository is hidden,
        // and a wrong key is refused by Gitea itself.
        let raw = format!("/api/v1/repos/{ns}/docs/raw/README.md");
        let anonymous = gitea
            .send(
                hyper::Method::GET,
                &raw,
                keybroker_e2e::gitea::Auth::None,
                None,
            )
            .await?;
        ensure!(anonymous.status == 404, "{}", anonymous.status);
        let wrong = format!("{}x", &old_token[..old_token.len() - 1]);
        let forged = gitea
            .send(
                hyper::Method::GET,
                &raw,
                keybroker_e2e::gitea::Auth::Token(&wrong),
                None,
            )
            .await?;
        ensure!(forged.status == 401, "a wrong key: {}", forged.status);

        // The scheduled rotation (every minute from the key Secret's creation, 30 s of grace)
        // while the app calls in a loop: a new token with the same scopes becomes the key, and
        // after the grace window the old one is deleted at Gitea.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looping = {
            let (stop, readme) = (Arc::clone(&stop), readme.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match call(port, "GET", &readme, &[], b"").await {
                        Ok((200, _, _)) => ok += 1,
                        Ok((status, _, body)) => failed.push(format!("{status} {body}")),
                        Err(e) => failed.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (ok, failed)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        let new_token = loop {
            let secret = secrets.get("gitea-key").await?;
            let field = |k: &str| {
                secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            };
            let tokens = gitea.list_tokens().await?;
            let key = field("key").unwrap_or_default();
            if key != old_token
                && field("previousKey").is_none()
                && !tokens.iter().any(|t| t.id == old_id)
            {
                break key;
            }
            ensure!(
                Instant::now() < deadline,
                "no rotation within 3 minutes: {tokens:?}, status {:?}",
                Api::<KeyProvider>::all(client.clone())
                    .get(&provider_name)
                    .await?
                    .status
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = looping.await?;
        ensure!(
            failed.is_empty(),
            "calls failed during the rotation: {failed:?}"
        );
        ensure!(ok >= 200, "only {ok} calls during the rotation");
        // At Gitea: the old token refused, the new one the operator's, with the old one's scopes.
        let old = gitea
            .send(
                hyper::Method::GET,
                &raw,
                keybroker_e2e::gitea::Auth::Token(&old_token),
                None,
            )
            .await?;
        ensure!(
            old.status == 401,
            "the old token still works at Gitea: {}",
            old.status
        );
        let tokens = gitea.list_tokens().await?;
        let minted = tokens
            .iter()
            .find(|t| new_token.ends_with(&t.token_last_eight))
            .context("the new key is not a Gitea token")?;
        ensure!(
            minted
                .name
                .starts_with(&format!("keybroker-{provider_name}-"))
                && minted.scopes == ["write:repository"],
            "{minted:?}"
        );
        // The KeyProvider says where the rotation stands; an Event per step.
        let rotation = Api::<KeyProvider>::all(client.clone())
            .get(&provider_name)
            .await?
            .status
            .and_then(|s| s.rotation)
            .context("no rotation status")?;
        ensure!(
            rotation.next_step.as_deref() == Some("Rotate") && rotation.last_error.is_none(),
            "{rotation:?}"
        );
        let events =
            Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), "default")
                .list(&kube::api::ListParams::default())
                .await?;
        let steps: Vec<String> = events
            .items
            .iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(provider_name.as_str())
            })
            .map(|e| {
                format!(
                    "{}/{}",
                    e.reason.as_deref().unwrap_or(""),
                    e.action.as_deref().unwrap_or("")
                )
            })
            .collect();
        for step in ["KeyRotated/Rotate", "KeyRotated/RetirePrevious"] {
            ensure!(
                steps.iter().any(|s| s == step),
                "no {step} Event: {steps:?}"
            );
        }
        for event in &events.items {
            let note = event.note.as_deref().unwrap_or("");
            ensure!(
                !note.contains(&new_token) && !note.contains(&old_token),
                "an Event holds a key"
            );
        }
        // The broken provider: the step failed with what to change, the key is unchanged.
        let broken = Api::<KeyProvider>::all(client.clone())
            .get(&broken_name)
            .await?
            .status
            .and_then(|s| s.rotation)
            .context("no rotation status on the broken provider")?;
        let error = broken.last_error.unwrap_or_default();
        ensure!(
            error.contains("Gitea answered 401 when listing the access tokens")
                && error.contains("check the rotation credentials")
                && !error.contains("wrong"),
            "{error}"
        );
        let kept = secrets.get("gitea-kept").await?;
        ensure!(
            kept.data
                .as_ref()
                .and_then(|d| d.get("key"))
                .map(|b| b.0.as_slice())
                == Some(kept_token.as_bytes())
                && kept
                    .data
                    .as_ref()
                    .is_some_and(|d| !d.contains_key("previousKey")),
            "the broken provider's key Secret changed"
        );
        ensure!(
            events.items.iter().any(|e| {
                e.reason.as_deref() == Some("KeyRotationFailed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                        == Some(broken_name.as_str())
            }),
            "no KeyRotationFailed Event"
        );
        // Each step is an audit record naming the token, never its value; no log line holds
        // a token or the account's password.
        let logs = keybroker_e2e::logs::captured();
        let record = |outcome: &str| {
            logs.lines()
                .find(|l| {
                    l.contains("key rotation") && l.contains(&format!("\"outcome\":\"{outcome}\""))
                })
                .map(str::to_owned)
        };
        for outcome in [
            "minted",
            "made_current",
            "previous_deleted",
            "previous_forgotten",
        ] {
            ensure!(
                record(outcome).is_some(),
                "no audit record {outcome:?} of the rotation"
            );
        }
        ensure!(
            record("minted").is_some_and(|l| l.contains(&minted.name)),
            "the audit record of the mint does not name the token"
        );
        for secret in [&old_token, &new_token, &kept_token] {
            ensure!(!logs.contains(secret.as_str()), "a log line holds a token");
        }
        ensure!(
            !logs.contains(gitea.admin_password()),
            "a log line holds the rotation password"
        );
        println!("gateway: {ok} calls through a scheduled key rotation, 0 failed");

        rig.sidecar.stop(Duration::from_secs(5));
        let log = std::fs::read_to_string(&rig.sidecar_log)?;
        for secret in [&old_token, &new_token] {
            ensure!(
                !log.contains(secret.as_str()),
                "the sidecar's log holds a key"
            );
            ensure!(
                !contents(&rig.out).contains(secret.as_str()),
                "the pod's volume holds a key"
            );
        }
        Ok(())
    })
    .await
}
