//! `make demo`, run as a test so it cannot rot, and the proof that the chart works as installed:
//! `helm install` on a real node, both operator replicas Ready and running as the chart's
//! ServiceAccount, the examples' pods injected and Running, the Job Completed, and every
//! scenario passing. `kubectl auth can-i --list` for that identity must equal the README's list.

use std::time::Duration;

use anyhow::{Context, ensure};
use keybroker_e2e::demo::{self, Narrator};

/// The block after the README's "can-i" marker.
fn readme_can_i() -> anyhow::Result<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let start = readme
        .find("<!-- can-i -->")
        .context("README has no <!-- can-i --> marker")?;
    let block = &readme[start..];
    let body = block
        .split("```")
        .nth(1)
        .context("no code block after the can-i marker")?;
    Ok(body.trim_start_matches("text").trim().to_owned())
}

/// The rows of a `kubectl auth can-i --list` table, each with its verbs sorted, sorted: kubectl
/// merges rules of several Roles in the order the apiserver returns them, which varies.
fn table(text: &str) -> Vec<String> {
    let mut rows: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| match line.rsplit_once('[') {
            Some((head, verbs)) => {
                let mut verbs: Vec<&str> =
                    verbs.trim_end().trim_end_matches(']').split(' ').collect();
                verbs.sort_unstable();
                format!("{}[{}]", head.trim_end(), verbs.join(" "))
            }
            None => line.trim_end().to_owned(),
        })
        .collect();
    rows.sort();
    rows
}

#[tokio::test]
async fn make_demo_passes_with_the_chart_identity() -> anyhow::Result<()> {
    let report = demo::run(&Narrator::default()).await?;
    eprintln!("{report:#?}");

    let expected = readme_can_i()?;
    ensure!(
        table(&report.can_i) == table(&expected),
        "kubectl auth can-i --list as {} differs from the README:\n{}",
        demo::IDENTITY,
        report.can_i
    );
    ensure!(
        report.operators_ready == 2 && report.lease_holder.starts_with("keybroker-"),
        "operator replicas: {report:?}"
    );
    ensure!(
        report.pods >= 4 && report.injected == report.pods && report.running >= 3,
        "{report:?}"
    );
    ensure!(
        report.job_completed && report.job_output.contains("1234.50"),
        "the analytics Job: {report:?}"
    );
    ensure!(
        report.greedy_reason == "ScopeExceedsGuardrails",
        "{report:?}"
    );
    ensure!(
        report.inside.starts_with("upload:"),
        "the app's upload inside the scope: {report:?}"
    );
    ensure!(
        report.outside.contains("AccessDenied"),
        "the app's write outside the scope: {report:?}"
    );
    ensure!(
        report.copy_before == "ok",
        "the copy before the revocation: {report:?}"
    );
    ensure!(
        report.copy_after == "InvalidAccessKeyId" || report.copy_after == "AccessDenied",
        "the copy after the revocation: {report:?}"
    );
    // The app's next call: no credentials from the sidecar any more, or, for a call already
    // holding them, refused by MinIO.
    ensure!(
        [
            "no credentials for this ApiKey",
            "InvalidAccessKeyId",
            "AccessDenied"
        ]
        .iter()
        .any(|refused| report.after_revocation.contains(refused)),
        "the app's first line after the revocation: {report:?}"
    );
    ensure!(
        report.files_gone < Duration::from_secs(1),
        "files gone only {:?} after the revocation",
        report.files_gone
    );
    ensure!(
        report.forbidden.is_empty(),
        "RBAC refused the operator: {:?}",
        report.forbidden
    );
    Ok(())
}
