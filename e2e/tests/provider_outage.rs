//! The provider goes down under the broker: MinIO itself is stopped (this test binary has its
//! own control plane and MinIO, so no other test loses its provider), exchanges are refused as
//! retryable, and succeed again once the same MinIO is started back.

use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;

use keybroker_contract::wire::{AUDIENCE, Refusal};
use keybroker_e2e::server_thread::ServerThread;
use keybroker_e2e::{
    Cluster, Lifetime, Options, eventually, fixtures, https, install_crds, pki, run_dir,
};
use keybroker_operator::tls::ReloadingCert;

#[tokio::test]
async fn a_stopped_provider_is_retryable_and_the_broker_recovers_when_it_returns()
-> anyhow::Result<()> {
    let dir = run_dir()?;
    let mut cluster = Cluster::start(Options {
        dir: dir.clone(),
        lifetime: Lifetime::TiedToProcess,
        with_minio: true,
    })
    .await?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    let ns = "outage";
    let namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?;
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&Default::default(), &namespace)
        .await?;
    fixtures::uploader(&cluster, &client, ns).await?;

    let ca = pki::Ca::create(&dir, "broker-test-ca")?;
    let serving = ca.issue_server(&dir, "broker", &["127.0.0.1"])?;
    let tls = Arc::new(ReloadingCert::new(&serving.cert, &serving.key)?.server_config());
    let broker = ServerThread::broker(&cluster.kubeconfig, "127.0.0.1:0".parse()?, tls).await?;
    let https = https::Client::new(broker.addr, &ca.cert)?;
    let token = fixtures::token(&client, ns, "uploader", AUDIENCE, Some("app")).await?;
    let body = serde_json::to_vec(&serde_json::json!({"apiKey": "uploader"}))?;
    let exchange = || https.send("POST", "/v1/exchange", Some(&token), body.clone());

    let up = exchange().await?;
    ensure!(up.status == 200, "{up:?}");

    cluster.stop_minio();
    let down = exchange().await?;
    let refusal: Refusal = down.json()?;
    ensure!(
        down.status == 503 && refusal.reason == "ProviderUnavailable" && refusal.retryable,
        "{down:?}"
    );
    // The refusal says what is wrong without leaking anything of the broker's own keys.
    ensure!(
        refusal.message.contains("unavailable"),
        "{}",
        refusal.message
    );

    cluster.restart_minio().await?;
    // A sidecar retries a retryable refusal; once MinIO is back, it succeeds.
    eventually(
        "an exchange to succeed again",
        Duration::from_secs(30),
        || async {
            let reply = exchange().await.ok()?;
            (reply.status == 200).then_some(())
        },
    )
    .await?;
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
