//! `helm test` of the installed chart: a throwaway ApiKey and an opted-in pod that must write
//! inside its scope and be denied outside it.

use super::*;

#[tokio::test]
async fn helm_test_proves_the_install_with_a_throwaway_apikey() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let client = cluster.client().await?;
    let ns = install::HELM_TEST_NAMESPACE;
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": ns } }))?,
        )
        .await?;
    // The platform's side: a KeyProvider serving the namespace, and MinIO's CA in it.
    install::uploader_tenant(cluster, &client, ns).await?;
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(keybroker_e2e::tools::Tools::locate()?.helm)
        .args(["test", install::RELEASE, "--namespace", install::NAMESPACE])
        // Not --logs: helm looks for test pods in the release namespace only.
        .args(["--timeout", "3m"])
        .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true)
        .output()
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ helm test {}\n{text}", install::RELEASE);
    ensure!(out.status.success(), "helm test failed: {text}");
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .get("keybroker-test")
        .await?;
    let text = logs(&client, &pod, "check").await?;
    eprintln!("the test pod's log:\n{text}");
    for line in [
        "inside the ApiKey's scope: allowed",
        "outside the ApiKey's scope: denied",
    ] {
        ensure!(
            text.contains(line),
            "helm test did not say {line:?}: {text}"
        );
    }
    eprintln!("measured: helm test passed in {:?}", started.elapsed());
    // A success removes the throwaway ApiKey (the completed pod stays for its log).
    let keys = Api::<keybroker_operator::crd::ApiKey>::namespaced(client.clone(), ns);
    eventually(
        "the helm test ApiKey to be removed",
        Duration::from_secs(30),
        || async {
            keys.get_opt("keybroker-test")
                .await
                .ok()
                .and_then(|k| k.is_none().then_some(()))
        },
    )
    .await?;
    namespaces.delete(ns, &DeleteParams::default()).await?;
    Ok(())
}
