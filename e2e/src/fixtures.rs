//! Fluent-enough builders for the objects keybroker tests need: a tenant namespace with its
//! own KeyProvider backed by MinIO, ApiKeys, opted-in pods, bound tokens and S3 clients.

use anyhow::Context;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};

use keybroker_operator::broker::authz::{APIKEYS_ANNOTATION, INJECT_LABEL, listed_api_keys};
use keybroker_operator::webhook::inject;

use crate::Cluster;

/// The bucket every tenant's prefix lives in.
pub const BUCKET: &str = "corp-data";
const FIELD_MANAGER: &str = "keybroker-e2e";

/// Labels `ns` as a tenant, gives the broker a MinIO user whose keys sit in Secret
/// `broker-keys` in `ns`, and creates KeyProvider `<ns>-s3` (labelled `e2e-scope=<ns>`) that lets
/// the namespace Get/Put under `corp-data/<ns>/`. Returns the provider's name.
pub async fn tenant(cluster: &Cluster, client: &Client, ns: &str) -> anyhow::Result<String> {
    let minio = cluster.minio.as_ref().context("no MinIO")?;
    tenant_with(cluster, client, ns, &minio.endpoint, (ns, "broker-keys")).await
}

/// [`tenant`] with the provider's STS `endpoint` and the broker keys' Secret (namespace, name)
/// given: an operator installed by the chart reads Secrets of its own namespace only, and
/// reaches MinIO by its in-cluster name.
pub async fn tenant_with(
    cluster: &Cluster,
    client: &Client,
    ns: &str,
    endpoint: &str,
    keys_secret: (&str, &str),
) -> anyhow::Result<String> {
    label_namespace(client, ns, "true").await?;
    let minio = cluster.minio.as_ref().context("no MinIO")?;
    let keys = minio.create_s3_user(&format!("broker-{ns}"))?;
    secret(
        client,
        keys_secret.0,
        keys_secret.1,
        &keys.access_key_id,
        &keys.secret_access_key,
    )
    .await?;
    let name = format!("{ns}-s3");
    let ca_bundle = minio.ca_pem().filter(|_| endpoint.starts_with("https://"));
    provider_at(
        client,
        ns,
        &name,
        Sts {
            endpoint,
            ca_bundle: ca_bundle.as_deref(),
            keys_secret,
        },
        &["s3:GetObject", "s3:PutObject"],
        ("keybroker.dev/tenant", "true"),
    )
    .await?;
    let root = minio.root_client();
    if let Err(e) = root.create_bucket().bucket(BUCKET).send().await {
        let code = e.into_service_error().meta().code().map(str::to_owned);
        anyhow::ensure!(
            matches!(
                code.as_deref(),
                Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
            ),
            "creating bucket {BUCKET}: {code:?}"
        );
    }
    Ok(name)
}

/// A tenant namespace with ApiKey `uploader` (PutObject under `corp-data/<ns>/reports/*`),
/// service account `uploader`, and an opted-in pod `app` running as it.
pub async fn uploader(cluster: &Cluster, client: &Client, ns: &str) -> anyhow::Result<()> {
    uploader_key(cluster, client, ns).await?;
    injected_pod(client, ns, "app", "uploader", "uploader").await?;
    Ok(())
}

/// [`uploader`] without the pod: the tenant, ApiKey `uploader` and service account `uploader`.
pub async fn uploader_key(cluster: &Cluster, client: &Client, ns: &str) -> anyhow::Result<()> {
    let provider = tenant(cluster, client, ns).await?;
    apikey(
        client,
        ns,
        "uploader",
        &provider,
        &["s3:PutObject"],
        &[object_arn(ns, "reports/*")],
        Some("15m"),
    )
    .await?;
    service_account(client, ns, "uploader").await
}

/// Sets `spec.revoked: true` on ApiKey `name`.
pub async fn revoke(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    Api::<keybroker_operator::crd::ApiKey>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"revoked": true}})),
        )
        .await?;
    Ok(())
}

/// The sidecar the webhook injected into `pod`, if any.
pub fn injected_sidecar(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .as_ref()?
        .iter()
        .find(|c| c.name == inject::SIDECAR_NAME)
}

/// Sets the namespace's `keybroker.dev/tenant` label.
pub async fn label_namespace(client: &Client, ns: &str, tenant: &str) -> anyhow::Result<()> {
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"keybroker.dev/tenant": tenant}}
            })),
        )
        .await?;
    Ok(())
}

/// A Secret holding AWS-style keys.
pub async fn secret(
    client: &Client,
    ns: &str,
    name: &str,
    id: &str,
    secret: &str,
) -> anyhow::Result<()> {
    let s: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": id, "AWS_SECRET_ACCESS_KEY": secret}
    }))?;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await?;
    Ok(())
}

/// Applies KeyProvider `name` (labelled `e2e-scope=<ns>`) over MinIO with the keys in Secret
/// `<ns>/<secret>`, allowing `actions` under `corp-data/{namespace}/*` for namespaces whose
/// label `selector.0` is `selector.1`.
pub async fn provider(
    client: &Client,
    ns: &str,
    name: &str,
    endpoint: &str,
    secret: &str,
    actions: &[&str],
    selector: (&str, &str),
) -> anyhow::Result<()> {
    let sts = Sts {
        endpoint,
        ca_bundle: None,
        keys_secret: (ns, secret),
    };
    provider_at(client, ns, name, sts, actions, selector).await
}

/// Where a KeyProvider's STS service is, and the broker's keys for it.
#[derive(Clone, Copy, Debug)]
pub struct Sts<'a> {
    pub endpoint: &'a str,
    /// `spec.aws.caBundle`: the CA of an https endpoint with a private CA.
    pub ca_bundle: Option<&'a str>,
    /// The Secret (namespace, name) with the broker's keys.
    pub keys_secret: (&'a str, &'a str),
}

/// [`provider`] at `sts`.
pub async fn provider_at(
    client: &Client,
    ns: &str,
    name: &str,
    sts: Sts<'_>,
    actions: &[&str],
    selector: (&str, &str),
) -> anyhow::Result<()> {
    let Sts {
        endpoint,
        ca_bundle,
        keys_secret,
    } = sts;
    let mut object = serde_json::json!({
        "apiVersion": "keybroker.dev/v1alpha1", "kind": "KeyProvider",
        "metadata": {"name": name, "labels": {"e2e-scope": ns}},
        "spec": {
            "aws": {
                "roleArn": "arn:aws:iam::000000000000:role/keybroker-e2e",
                "region": "us-east-1",
                "endpoint": endpoint,
                "credentialsSecretRef": {"namespace": keys_secret.0, "name": keys_secret.1},
                "revocation": "MinIO"
            },
            "namespaceSelector": {"matchLabels": {selector.0: selector.1}},
            "guardrails": {
                "allowedActions": actions,
                "allowedResources": [format!("arn:aws:s3:::{BUCKET}/{{namespace}}/*")],
                "defaultTTL": "30m",
                "maxTTL": "1h"
            }
        }
    });
    if let Some(pem) = ca_bundle {
        object["spec"]["aws"]["caBundle"] = pem.into();
    }
    Api::<keybroker_operator::crd::KeyProvider>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?;
    Ok(())
}

/// Creates ApiKey `name` for service account `uploader`.
pub async fn apikey(
    client: &Client,
    ns: &str,
    name: &str,
    provider: &str,
    actions: &[&str],
    resources: &[String],
    ttl: Option<&str>,
) -> anyhow::Result<()> {
    let mut spec = serde_json::json!({
        "providerRef": {"name": provider},
        "serviceAccountNames": ["uploader"],
        "scope": {"actions": actions, "resources": resources}
    });
    if let Some(ttl) = ttl {
        spec["ttl"] = ttl.into();
    }
    let key: keybroker_operator::crd::ApiKey = serde_json::from_value(serde_json::json!({
        "apiVersion": "keybroker.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name}, "spec": spec
    }))?;
    Api::<keybroker_operator::crd::ApiKey>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &key)
        .await?;
    Ok(())
}

/// Sets ApiKey `name`'s anomaly rules to `policy` (a merge patch of `spec.anomalies`).
pub async fn set_anomalies(
    client: &Client,
    ns: &str,
    name: &str,
    policy: &keybroker_operator::crd::AnomalyPolicy,
) -> anyhow::Result<()> {
    Api::<keybroker_operator::crd::ApiKey>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"anomalies": policy}})),
        )
        .await?;
    Ok(())
}

/// `arn:aws:s3:::corp-data/<ns>/<rest>`.
pub fn object_arn(ns: &str, rest: &str) -> String {
    format!("arn:aws:s3:::{BUCKET}/{ns}/{rest}")
}

/// Creates service account `name`.
pub async fn service_account(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await?;
    Ok(())
}

/// The namespace in-process brokers and gateways keep their shared counts in (the operator's
/// own in a cluster): every control plane has it.
pub const COUNTS_NAMESPACE: &str = "default";

/// The sidecar image the tests' webhooks inject and their brokers accept.
pub const SIDECAR_IMAGE: &str = "registry.invalid/keybroker-sidecar:test";

/// The injection settings of the tests' webhooks (and of [`injected_pod`]).
pub fn inject_settings() -> inject::Settings {
    inject::Settings {
        image: SIDECAR_IMAGE.into(),
        ..inject::Settings::default()
    }
}

/// `pod` (as its owner writes it) as the webhook stores it with `settings`, the ApiKeys it
/// lists allowing its service account: for tests without a webhook, whose brokers refuse any
/// pod that does not carry the injection.
pub fn as_injected(
    pod: serde_json::Value,
    ns: &str,
    settings: &inject::Settings,
) -> anyhow::Result<Pod> {
    as_injected_with(pod, ns, settings, |_| None)
}

/// [`as_injected`], with `gateway(name)` saying which ApiKeys are of gateway providers (and
/// how apps find them).
pub fn as_injected_with(
    pod: serde_json::Value,
    ns: &str,
    settings: &inject::Settings,
    gateway: impl Fn(&str) -> Option<inject::GatewayFacts>,
) -> anyhow::Result<Pod> {
    let facts = inject::KeyFacts {
        service_account_names: vec![
            pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
        ],
        ready: true,
        revoked: false,
        region: Some("us-east-1".into()),
        gateway: None,
        token_env: None,
    };
    let listed = pod["metadata"]["annotations"][APIKEYS_ANNOTATION]
        .as_str()
        .unwrap_or_default();
    let keys = listed_api_keys(listed)
        .map(|name| {
            let mut facts = facts.clone();
            facts.gateway = gateway(name);
            if facts.gateway.is_some() {
                facts.region = None;
            }
            (name.to_owned(), facts)
        })
        .collect();
    let injected = inject::admitted(&pod, ns, &keys, settings)
        .map_err(|denial| anyhow::anyhow!("the webhook would refuse the pod: {denial}"))?;
    Ok(serde_json::from_value(injected)?)
}

/// Creates pod `name` running as `sa`, opted in for `apikeys`, stored as the webhook would have
/// injected it (see [`as_injected`]).
pub async fn injected_pod(
    client: &Client,
    ns: &str,
    name: &str,
    sa: &str,
    apikeys: &str,
) -> anyhow::Result<Pod> {
    let pod = as_injected(written_pod(name, sa, Some(apikeys)), ns, &inject_settings())?;
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?)
}

/// Pod `name` as its owner writes it: one app container running as `sa`; `apikeys` (if any)
/// opts it in for those ApiKeys.
fn written_pod(name: &str, sa: &str, apikeys: Option<&str>) -> serde_json::Value {
    let mut meta = serde_json::json!({"name": name});
    if let Some(keys) = apikeys {
        meta["labels"] = serde_json::json!({(INJECT_LABEL): "true"});
        meta["annotations"] = serde_json::json!({(APIKEYS_ANNOTATION): keys});
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": meta,
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
    })
}

/// Creates pod `name` as written (see [`written_pod`]): a webhook registered for the namespace
/// injects it, nothing else does.
pub async fn pod(
    client: &Client,
    ns: &str,
    name: &str,
    sa: &str,
    apikeys: Option<&str>,
) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(written_pod(name, sa, apikeys))?;
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?)
}

/// A token for `sa` with `audience`, bound to `pod` when given, as the kubelet projects it.
pub async fn token(
    client: &Client,
    ns: &str,
    sa: &str,
    audience: &str,
    pod: Option<&str>,
) -> anyhow::Result<String> {
    let mut spec = serde_json::json!({"audiences": [audience], "expirationSeconds": 600});
    if let Some(pod) = pod {
        spec["boundObjectRef"] =
            serde_json::json!({"kind": "Pod", "apiVersion": "v1", "name": pod});
    }
    let request: TokenRequest = serde_json::from_value(serde_json::json!({"spec": spec}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")
}

/// An S3 client for MinIO with the given keys.
pub fn s3_client(
    endpoint: &str,
    access_key: &str,
    secret_key: &str,
    session_token: Option<&str>,
) -> aws_sdk_s3::Client {
    s3_client_trusting(endpoint, access_key, secret_key, session_token, None)
}

/// [`s3_client`] for an endpoint whose TLS certificate chains to the CA in `ca` (MinIO with a
/// node), instead of the system's roots.
pub fn s3_client_trusting(
    endpoint: &str,
    access_key: &str,
    secret_key: &str,
    session_token: Option<&str>,
    ca: Option<&std::path::Path>,
) -> aws_sdk_s3::Client {
    let mut config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            access_key,
            secret_key,
            session_token.map(str::to_owned),
            None,
            "e2e",
        ));
    if let Some(pem) = ca.and_then(|ca| std::fs::read(ca).ok()) {
        use aws_smithy_http_client::tls;
        let trust = tls::TrustStore::empty()
            .with_native_roots(false)
            .with_pem_certificate(pem);
        if let Ok(context) = tls::TlsContext::builder().with_trust_store(trust).build() {
            config = config.http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(
                        tls::rustls_provider::CryptoMode::AwsLc,
                    ))
                    .tls_context(context)
                    .build_https(),
            );
        }
    }
    aws_sdk_s3::Client::from_conf(config.build())
}

/// The S3 error code of putting `key` into the bucket, or `None` when it succeeded.
pub async fn put_object(s3: &aws_sdk_s3::Client, key: &str) -> Option<String> {
    match s3
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(
            b"keybroker e2e",
        ))
        .send()
        .await
    {
        Ok(_) => None,
        Err(e) => Some(
            e.into_service_error()
                .meta()
                .code()
                .unwrap_or("Unknown")
                .to_owned(),
        ),
    }
}

/// The controller for namespace `ns` (and KeyProviders labelled `e2e-scope=<ns>`), as the
/// leader of its own Lease; stopped when dropped.
#[derive(Debug)]
pub struct Controller {
    task: tokio::task::JoinHandle<()>,
}

impl Controller {
    pub fn start(client: &Client, ns: &str) -> Self {
        let scope = keybroker_operator::controller::Scope {
            namespace: Some(ns.to_owned()),
            provider_labels: Some(format!("e2e-scope={ns}")),
            counts_namespace: Some(COUNTS_NAMESPACE.into()),
        };
        let lease = keybroker_operator::leader::LeaseConfig {
            name: "keybroker-controller".into(),
            namespace: ns.to_owned(),
            identity: "e2e".into(),
            duration: std::time::Duration::from_secs(4),
            grace: std::time::Duration::from_secs(1),
        };
        let client = client.clone();
        let task = tokio::spawn(async move {
            let metrics = std::sync::Arc::new(keybroker_operator::metrics::Metrics::default());
            if let Err(e) = keybroker_operator::controller::run_elected(
                client,
                scope,
                lease,
                metrics,
                keybroker_operator::shutdown::Shutdown::never(),
            )
            .await
            {
                tracing::error!(error = %e, "controller stopped");
            }
        });
        Self { task }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the controller recorded a grant for ApiKey `name` other than `previous`, and
/// returns it.
pub async fn recorded_grant(
    client: &Client,
    ns: &str,
    name: &str,
    previous: Option<&str>,
) -> anyhow::Result<String> {
    let api = Api::<keybroker_operator::crd::ApiKey>::namespaced(client.clone(), ns);
    crate::eventually(
        &format!("a new grant recorded for ApiKey {name}"),
        std::time::Duration::from_secs(30),
        || async {
            let key = api.get(name).await.ok()?;
            key.status?.grant.filter(|g| Some(g.as_str()) != previous)
        },
    )
    .await
}
