//! The Helm chart without a cluster: `helm lint`, a `helm template` golden snapshot, the CRDs in
//! sync with `crds/`, and values.schema.json refusing bad values. Installing it into a real
//! apiserver and running the operator as its ServiceAccount is the `demo` test.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use keybroker_e2e::tools::Tools;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/keybroker")
}

/// Runs helm with `args`: success and stdout + stderr.
fn helm(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new(Tools::locate()?.helm).args(args).output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn template(extra: &[&str]) -> anyhow::Result<(bool, String)> {
    let chart = chart();
    let mut args = vec![
        "template",
        "keybroker",
        chart.to_str().context("path")?,
        "--namespace",
        "keybroker-system",
        "--kube-version",
        "1.36.0",
    ];
    args.extend_from_slice(extra);
    helm(&args)
}

/// Generated key material and its checksum differ on every render.
fn normalize(rendered: &str) -> String {
    rendered
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let generated = [
                "ca.crt: ",
                "tls.crt: ",
                "tls.key: ",
                "checksum/broker-tls: ",
            ]
            .iter()
            .find(|p| trimmed.starts_with(*p));
            match generated {
                Some(prefix) => {
                    format!("{}{prefix}<generated>", &line[..line.len() - trimmed.len()])
                }
                None => line.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn helm_lint_passes_strictly() -> anyhow::Result<()> {
    let chart = chart();
    let (ok, out) = helm(&["lint", "--strict", chart.to_str().context("path")?])?;
    ensure!(ok && out.contains("0 chart(s) failed"), "{out}");
    Ok(())
}

/// `KEYBROKER_BLESS=1` rewrites the snapshot after an intended change.
#[test]
fn helm_template_matches_the_golden_snapshot() -> anyhow::Result<()> {
    let golden = repo().join("e2e/tests/golden/chart-default.yaml");
    let (ok, out) = template(&[])?;
    ensure!(ok, "{out}");
    let rendered = normalize(&out);
    if std::env::var_os("KEYBROKER_BLESS").is_some() {
        std::fs::write(&golden, &rendered)?;
    }
    let expected = std::fs::read_to_string(&golden)
        .with_context(|| format!("{} (KEYBROKER_BLESS=1 writes it)", golden.display()))?;
    ensure!(
        rendered == expected,
        "helm template differs from {} (KEYBROKER_BLESS=1 rewrites it):\n{}",
        golden.display(),
        first_difference(&expected, &rendered)
    );
    Ok(())
}

fn first_difference(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<_>, Vec<_>) = (expected.lines().collect(), actual.lines().collect());
    let at = e
        .iter()
        .zip(&a)
        .position(|(x, y)| x != y)
        .unwrap_or(e.len().min(a.len()));
    format!(
        "line {}:\n- {}\n+ {}",
        at + 1,
        e.get(at).unwrap_or(&"<end>"),
        a.get(at).unwrap_or(&"<end>")
    )
}

#[test]
fn every_optional_part_renders() -> anyhow::Result<()> {
    let (ok, out) = template(&[
        "--set",
        "certManager.enabled=true,certManager.issuerRef.name=corp-ca,networkPolicy.enabled=true,serviceMonitor.enabled=true,podMonitor.enabled=true,prometheusRule.enabled=true,grafanaDashboard.enabled=true",
        "--set",
        "credentialsSecretNamespaces={platform-secrets}",
        "--set",
        "test.enabled=true,test.namespace=team-a,test.keyProvider=s3,test.image=app:1,test.s3.bucket=corp-data,test.s3.prefix=team-a/helm-test/",
    ])?;
    ensure!(ok, "{out}");
    for expected in [
        "kind: NetworkPolicy",
        "kind: ServiceMonitor",
        "kind: PodMonitor",
        "kind: PrometheusRule",
        "alert: KeybrokerNoLeader",
        "keybroker.json: |-",
        "helm.sh/hook: test",
        "resources: [\"arn:aws:s3:::corp-data/team-a/helm-test/*\"]",
        "kind: Certificate",
        "cert-manager.io/inject-ca-from: keybroker-system/keybroker-webhook",
        "--webhook-cert-file=/etc/keybroker/webhook-tls/tls.crt",
        "namespace: platform-secrets",
    ] {
        ensure!(out.contains(expected), "{expected:?} missing:\n{out}");
    }
    // cert-manager's injector owns the caBundle: the operator gets no right to patch it.
    ensure!(!out.contains("mutatingwebhookconfigurations"), "{out}");
    Ok(())
}

#[test]
fn without_the_gateway_nothing_of_it_is_rendered() -> anyhow::Result<()> {
    let (ok, out) = template(&["--set", "gateway.enabled=false,networkPolicy.enabled=true"])?;
    ensure!(ok, "{out}");
    for absent in [
        "keybroker-gateway",
        "--gateway-url",
        "port: gateway",
        "containerPort: 8444",
        "gateway-session",
        "broker,gateway",
    ] {
        ensure!(!out.contains(absent), "{absent:?} rendered:\n{out}");
    }
    ensure!(out.contains("--roles=controller,webhook,broker\n"), "{out}");
    Ok(())
}

#[test]
fn the_schema_refuses_bad_values() -> anyhow::Result<()> {
    for (set, expected) in [
        ("webhook.timeoutSeconds=30", "timeoutSeconds"),
        ("webhook.failurePolicy=Maybe", "failurePolicy"),
        ("replicaCount=0", "replicaCount"),
        ("imagee.tag=x", "imagee"),
        ("certManager.enabled=true", "name"),
        ("gateway.url=http://gw.example:8444", "url"),
        (
            "sidecar.tokenExpirationSeconds=60",
            "tokenExpirationSeconds",
        ),
        ("prometheusRule.refusalsPerSecond=0", "refusalsPerSecond"),
        ("test.enabled=true", "test.s3.bucket is required"),
    ] {
        let (ok, out) = template(&["--set", set])?;
        ensure!(!ok, "{set} was accepted");
        ensure!(out.contains(expected), "{set}: {expected:?} not in: {out}");
    }
    Ok(())
}

#[test]
fn the_chart_ships_the_committed_crds() -> anyhow::Result<()> {
    for file in std::fs::read_dir(repo().join("crds"))? {
        let file = file?;
        let ours = std::fs::read(file.path())?;
        let shipped = chart().join("crds").join(file.file_name());
        ensure!(
            std::fs::read(&shipped).ok() == Some(ours),
            "{} differs from crds/ (run make crds)",
            shipped.display()
        );
    }
    Ok(())
}
