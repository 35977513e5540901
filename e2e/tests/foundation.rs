//! Proofs that the harness runs real components: the apiserver serves and authenticates, the
//! controller manager reconciles, bound service-account tokens behave as the broker will rely
//! on, and MinIO enforces STS session policies.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use aws_sdk_s3::primitives::ByteStream;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};

use keybroker_e2e::{eventually, fixtures, in_namespace, shared};

const AUDIENCE: &str = "keybroker";

#[tokio::test]
async fn a_client_lists_namespaces() -> anyhow::Result<()> {
    let cluster = shared().await?;
    let namespaces = Api::<Namespace>::all(cluster.client().await?)
        .list(&ListParams::default())
        .await?;
    let names: Vec<String> = namespaces.iter().map(|ns| ns.name_any()).collect();
    for expected in ["default", "kube-system", "kube-public"] {
        ensure!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn issuer_discovery_is_reachable_anonymously() -> anyhow::Result<()> {
    let cluster = shared().await?;
    let doc: serde_json::Value =
        serde_json::from_str(&anonymous_get(cluster, "/.well-known/openid-configuration").await?)?;
    ensure!(
        doc["issuer"] == cluster.server.as_str(),
        "issuer {} != {}",
        doc["issuer"],
        cluster.server
    );
    let jwks: serde_json::Value =
        serde_json::from_str(&anonymous_get(cluster, "/openid/v1/jwks").await?)?;
    ensure!(
        jwks["keys"].as_array().is_some_and(|k| !k.is_empty()),
        "no signing keys published: {jwks}"
    );
    Ok(())
}

#[tokio::test]
async fn b_new_namespace_gets_default_service_account() -> anyhow::Result<()> {
    let cluster = shared().await?;
    in_namespace(cluster, "sa", |client, ns| async move {
        let sas: Api<ServiceAccount> = Api::namespaced(client, &ns);
        eventually(
            "the default service account",
            Duration::from_secs(30),
            || async { sas.get_opt("default").await.ok().flatten() },
        )
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn c_deployment_produces_a_pod() -> anyhow::Result<()> {
    let cluster = shared().await?;
    in_namespace(cluster, "deploy", |client, ns| async move {
        let pod = deployment_pod(&client, &ns, "web").await?;
        let owner = pod.owner_references().first().context("pod has no owner")?;
        ensure!(owner.kind == "ReplicaSet", "pod owned by {}", owner.kind);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn d_e_pod_bound_token_is_valid_until_the_pod_is_deleted() -> anyhow::Result<()> {
    let cluster = shared().await?;
    in_namespace(cluster, "token", |client, ns| async move {
        let pod = deployment_pod(&client, &ns, "app").await?;
        let pod_name = pod.name_any();
        let pod_uid = pod.uid().context("pod without uid")?;
        let token = bound_token(&client, &ns, "default", &pod_name).await?;

        // d: the review accepts it and names the pod.
        let review = review(&client, &token, AUDIENCE).await?;
        ensure!(
            review.authenticated == Some(true),
            "not authenticated: {review:?}"
        );
        let user = review.user.context("no user in review")?;
        ensure!(
            user.username.as_deref() == Some(&format!("system:serviceaccount:{ns}:default")),
            "username {:?}",
            user.username
        );
        let extra = user.extra.unwrap_or_default();
        ensure!(
            extra.get("authentication.kubernetes.io/pod-name") == Some(&vec![pod_name.clone()]),
            "pod-name extra: {extra:?}"
        );
        ensure!(
            extra.get("authentication.kubernetes.io/pod-uid") == Some(&vec![pod_uid.clone()]),
            "pod-uid extra: {extra:?}"
        );
        ensure!(
            review.audiences.unwrap_or_default() == vec![AUDIENCE.to_owned()],
            "audience not echoed"
        );
        // The audience binding holds: the same token is refused for the apiserver's audience.
        let other = self::review(&client, &token, "https://kubernetes.default.svc").await?;
        ensure!(other.authenticated != Some(true), "wrong audience accepted");

        // e: once the pod is gone, the token is refused.
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.delete(&pod_name, &DeleteParams::default()).await?;
        eventually("the pod to be deleted", Duration::from_secs(30), || async {
            matches!(pods.get_opt(&pod_name).await, Ok(None)).then_some(())
        })
        .await?;
        // The apiserver caches successful token authentications for 10 s, so the refusal can
        // lag the deletion by that much (the broker checks the pod itself for this reason).
        let refused = eventually(
            "the token of the deleted pod to be refused",
            Duration::from_secs(30),
            || async {
                let after = self::review(&client, &token, AUDIENCE).await.ok()?;
                (after.authenticated != Some(true)).then_some(after)
            },
        )
        .await?;
        ensure!(
            refused.user.and_then(|u| u.username).is_none(),
            "a refused review still names a user"
        );
        ensure!(
            refused.error.is_some_and(|e| e.contains("invalidated")),
            "refused for another reason than the deleted pod"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn f_minio_session_policy_limits_assumed_role_credentials() -> anyhow::Result<()> {
    let cluster = shared().await?;
    let minio = cluster.minio.as_ref().context("MinIO not started")?;
    let bucket = "foundation";

    // The broker-like user may do anything in S3; the session policy is the only narrowing.
    let broker = minio.create_s3_user("broker-foundation")?;
    let root_s3 = fixtures::s3_client(
        &minio.endpoint,
        &minio.root.access_key_id,
        &minio.root.secret_access_key,
        None,
    );
    root_s3.create_bucket().bucket(bucket).send().await?;

    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("us-east-1"))
            .endpoint_url(&minio.endpoint)
            .credentials_provider(aws_sdk_sts::config::Credentials::new(
                &broker.access_key_id,
                &broker.secret_access_key,
                None,
                None,
                "e2e",
            ))
            .build(),
    );
    let session_policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": ["s3:PutObject"],
            "Resource": [format!("arn:aws:s3:::{bucket}/team-a/*")]
        }]
    });
    let assumed = sts
        .assume_role()
        .role_arn("arn:aws:iam::000000000000:role/keybroker-e2e")
        .role_session_name("foundation")
        .policy(session_policy.to_string())
        .duration_seconds(900)
        .send()
        .await
        .context("AssumeRole")?;
    let creds = assumed.credentials().context("no credentials returned")?;
    ensure!(
        creds.access_key_id() != broker.access_key_id,
        "got the user's own keys back"
    );
    let scoped = fixtures::s3_client(
        &minio.endpoint,
        creds.access_key_id(),
        creds.secret_access_key(),
        Some(creds.session_token()),
    );

    scoped
        .put_object()
        .bucket(bucket)
        .key("team-a/report.csv")
        .body(ByteStream::from_static(b"inside scope"))
        .send()
        .await
        .context("PutObject inside the session policy")?;

    let denied = scoped
        .put_object()
        .bucket(bucket)
        .key("team-b/report.csv")
        .body(ByteStream::from_static(b"outside scope"))
        .send()
        .await;
    let code = match denied {
        Ok(_) => bail!("PutObject under team-b/ succeeded with team-a credentials"),
        Err(e) => e.into_service_error().meta().code().map(str::to_owned),
    };
    ensure!(
        code.as_deref() == Some("AccessDenied"),
        "expected AccessDenied, got {code:?}"
    );

    // Reading is outside the session policy too, although the user itself may read.
    let read = scoped
        .get_object()
        .bucket(bucket)
        .key("team-a/report.csv")
        .send()
        .await;
    ensure!(
        read.is_err(),
        "GetObject allowed by a PutObject-only session policy"
    );
    // And the object really landed.
    root_s3
        .head_object()
        .bucket(bucket)
        .key("team-a/report.csv")
        .send()
        .await
        .context("the object written inside scope is missing")?;
    Ok(())
}

/// Creates a one-replica Deployment and returns the Pod the controller manager made for it.
async fn deployment_pod(client: &Client, ns: &str, name: &str) -> anyhow::Result<Pod> {
    // The ServiceAccount admission plugin refuses pods until `default` exists.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    eventually(
        "the default service account",
        Duration::from_secs(30),
        || async { sas.get_opt("default").await.ok().flatten() },
    )
    .await?;
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] }
            }
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &deployment)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = ListParams::default().labels(&format!("app={name}"));
    eventually(
        "a pod of the deployment",
        Duration::from_secs(60),
        || async { pods.list(&selector).await.ok()?.items.into_iter().next() },
    )
    .await
}

/// A token for `sa` with the keybroker audience, bound to `pod`, as the kubelet would project.
async fn bound_token(client: &Client, ns: &str, sa: &str, pod: &str) -> anyhow::Result<String> {
    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "spec": {
            "audiences": [AUDIENCE],
            "expirationSeconds": 600,
            "boundObjectRef": { "kind": "Pod", "apiVersion": "v1", "name": pod }
        }
    }))?;
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await?;
    issued
        .status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")
}

async fn review(
    client: &Client,
    token: &str,
    audience: &str,
) -> anyhow::Result<k8s_openapi::api::authentication::v1::TokenReviewStatus> {
    let review: TokenReview = serde_json::from_value(serde_json::json!({
        "spec": { "token": token, "audiences": [audience] }
    }))?;
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    reviewed.status.context("TokenReview without status")
}

/// GET `path` from the apiserver without any credentials, trusting only the cluster CA.
async fn anonymous_get(cluster: &keybroker_e2e::Cluster, path: &str) -> anyhow::Result<String> {
    let mut config = kube::Config::new(cluster.server.parse()?);
    config.root_cert = Some(vec![pem_to_der(&std::fs::read_to_string(
        &cluster.ca_cert,
    )?)?]);
    let anonymous = Client::try_from(config)?;
    let request = http::Request::get(path).body(Vec::new())?;
    Ok(anonymous.request_text(request).await?)
}

fn pem_to_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(body)?)
}
