//! `kubectl keybroker` against the real pods: status, check, renew (with the app's reload
//! notification), revoke, restore and audit, each by its output and exit code.

use super::*;

/// Runs `dist/kubectl-keybroker` (`make release-static`) as the cluster's admin: exit code,
/// stdout, stderr.
fn kubectl_keybroker(
    cluster: &Cluster,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<(i32, String, String)> {
    use std::io::Write;
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/kubectl-keybroker");
    ensure!(
        bin.is_file(),
        "{} is missing: run 'make release-static'",
        bin.display()
    );
    let mut child = std::process::Command::new(&bin)
        .args(args)
        .arg(format!("--kubeconfig={}", cluster.kubeconfig.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.unwrap_or_default().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("$ kubectl keybroker {}\n{stdout}{stderr}", args.join(" "));
    Ok((out.status.code().unwrap_or(-1), stdout, stderr))
}

#[tokio::test]
async fn kubectl_keybroker_shows_checks_revokes_restores_and_audits_real_pods() -> anyhow::Result<()>
{
    let cluster = cluster().await?;
    in_namespace(cluster, "cli", |client, ns| async move {
        // The app asks to be told of new credentials.
        let reload = (
            keybroker_contract::reload::ANNOTATION,
            "http://127.0.0.1:8099/-/reload",
        );
        let pod = uploading_pod(cluster, &client, &ns, &[reload]).await?;
        let pod_name = pod.metadata.name.clone().context("name")?;
        let kb = |args: &[&str]| kubectl_keybroker(cluster, args, None);

        // status: the ApiKey, its pod, and the expiry its sidecar holds.
        let (code, out, _) = kb(&["status", "-n", &ns, "-o", "json"])?;
        ensure!(code == 0, "status exited {code}");
        let rows: serde_json::Value = serde_json::from_str(&out)?;
        let row = &rows[0];
        ensure!(
            row["name"] == "uploader" && row["ready"] == "True",
            "status: {row}"
        );
        ensure!(
            row["pods"] == json!([pod_name]),
            "status names not the running pod: {row}"
        );
        let expiry = row["earliestExpiry"]
            .as_str()
            .context("no expiry reported from the sidecar")?;
        let expiry: k8s_openapi::jiff::Timestamp = expiry.parse()?;
        ensure!(
            expiry > k8s_openapi::jiff::Timestamp::now(),
            "the expiry {expiry} is past"
        );
        let (code, table, _) = kb(&["status", "-A"])?;
        ensure!(
            code == 0
                && table.starts_with("NAMESPACE")
                && table
                    .lines()
                    .any(|l| l.starts_with(&ns) && l.contains("uploader") && l.contains("True")),
            "status -A: {table}"
        );

        // check: the running pod gets its credentials; a manifest with another service account
        // is refused with the reason the webhook gives when the pod is created.
        let (code, out, _) = kb(&["check", "pod", &pod_name, "-n", &ns])?;
        ensure!(
            code == 0 && out.contains("ApiKey uploader: Issued"),
            "check pod: {code} {out}"
        );
        let mut stranger = pod.clone();
        stranger.metadata = kube::api::ObjectMeta {
            name: Some("stranger".into()),
            namespace: Some(ns.clone()),
            labels: pod.metadata.labels.clone(),
            annotations: Some([("keybroker.dev/apikeys".to_owned(), "uploader".to_owned())].into()),
            ..Default::default()
        };
        let spec = stranger.spec.as_mut().context("spec")?;
        spec.service_account_name = Some("default".into());
        spec.service_account = None;
        spec.init_containers = None;
        spec.volumes = Some(vec![]);
        spec.node_name = None;
        for c in &mut spec.containers {
            c.volume_mounts = None;
            c.env = None;
        }
        stranger.status = None;
        let manifest = std::env::temp_dir().join(format!("{ns}-stranger.yaml"));
        std::fs::write(&manifest, yaml_serde::to_string(&stranger)?)?;
        let (code, out, _) = kb(&["check", "-f", &manifest.display().to_string(), "-o", "json"])?;
        let report: serde_json::Value = serde_json::from_str(&out)?;
        ensure!(
            code == 1 && report["injection"]["outcome"] == "ServiceAccountNotAllowed",
            "check -f: {code} {report}"
        );
        let predicted = report["injection"]["message"]
            .as_str()
            .context("message")?
            .to_owned();
        let created = Api::<Pod>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &stranger)
            .await;
        let refused = match created {
            Err(kube::Error::Api(status)) => status.message,
            other => anyhow::bail!("the stranger pod was not refused: {other:?}"),
        };
        ensure!(
            refused.contains(&predicted),
            "the webhook said {refused:?}, check said {predicted:?}"
        );

        // renew: the pod fetches new credentials now, told through the broker's channel.
        let (code, out, _) = kb(&["renew", "uploader", "-n", &ns])?;
        ensure!(
            code == 0 && out.contains("new credentials in 1/1 pods after"),
            "renew: {code} {out}"
        );
        let (_, status, _) = kb(&["status", "-n", &ns, "-o", "json"])?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        let renewed: k8s_openapi::jiff::Timestamp = status[0]["earliestExpiry"]
            .as_str()
            .context("no expiry after renew")?
            .parse()?;
        ensure!(
            renewed > expiry,
            "the expiry did not move forward: {expiry} then {renewed}"
        );
        eprintln!(
            "measured: kubectl keybroker renew: {}",
            out.lines().last().unwrap_or_default()
        );
        // The app was told, by a POST to its reload URL.
        let reloaded = app_line(&client, &pod, "reload uploader").await?;
        eprintln!("measured: the app's reload notification {reloaded}");

        // revoke: asks first (no answer, nothing changes), then with --yes waits for the
        // provider and the pod's files.
        let (code, out, _) =
            kubectl_keybroker(cluster, &["revoke", "uploader", "-n", &ns], Some("n\n"))?;
        ensure!(
            code == 1 && out.contains("nothing changed"),
            "revoke without yes: {code} {out}"
        );
        let (code, out, _) = kb(&["revoke", "uploader", "-n", &ns, "--yes"])?;
        ensure!(
            code == 0
                && out.contains("provider was told")
                && out.contains("credentials gone from 1/1 pods"),
            "revoke: {code} {out}"
        );
        ensure!(
            app_line(&client, &pod, "loop files False").await.is_ok(),
            "the app still sees its files"
        );
        let (code, out, _) = kb(&["check", "pod", &pod_name, "-n", &ns])?;
        ensure!(
            code == 1 && out.contains("ApiKeyRevoked"),
            "check after revoke: {code} {out}"
        );
        let (code, out, _) = kb(&[
            "restore",
            "uploader",
            "-n",
            &ns,
            "--yes",
            "--timeout",
            "90s",
        ])?;
        ensure!(
            code == 0 && out.contains("credentials back in 1/1 pods"),
            "restore: {code} {out}"
        );

        // audit: the pod's issuances and the revocation, from the operator pods' logs.
        let (code, out, _) = kb(&[
            "audit", "uploader", "-n", &ns, "--since", "10m", "-o", "json",
        ])?;
        ensure!(code == 0, "audit exited {code}");
        let records: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        let of_ns = |outcome: &str| {
            records
                .iter()
                .filter(|r| r["namespace"] == ns.as_str() && r["outcome"] == outcome)
                .count()
        };
        ensure!(
            of_ns("issued") >= 2,
            "fewer than two issuances audited (before and after the revocation): {out}"
        );
        ensure!(
            records.iter().all(|r| r["api_key"] == "uploader"),
            "audit shows other ApiKeys"
        );
        let (code, table, _) = kb(&["audit", "uploader", "-n", &ns, "--since", "10m"])?;
        ensure!(
            code == 0 && table.starts_with("TIME") && table.contains(&pod_name),
            "audit table: {table}"
        );
        Ok(())
    })
    .await
}
