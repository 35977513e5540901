//! `kubectl keybroker status`: one row per ApiKey with its provider, Ready and reason, whether
//! it is revoked, the pods that use it, the earliest credential expiry among them and today's
//! usage against its budget.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde::Serialize;

use crate::broker::authz::{self, APIKEYS_ANNOTATION, INJECT_LABEL};
use crate::crd::ApiKey;
use crate::status::ready_condition;

/// One ApiKey.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub namespace: String,
    pub name: String,
    pub provider: String,
    /// `True`, `False` or `Unknown` (not reconciled yet).
    pub ready: String,
    pub reason: String,
    pub message: String,
    pub revoked: bool,
    /// The running pods that name the ApiKey.
    pub pods: Vec<String>,
    /// The earliest expiry (RFC 3339) of the credentials those pods hold, as their sidecars
    /// report it; `None` when none holds any (or none answered).
    pub earliest_expiry: Option<String>,
    /// Today's usage, e.g. `42/1000 calls, 3 issuances`.
    pub usage: String,
    pub grant: String,
    pub ttl: String,
}

/// Whether `pod` names ApiKey `name` of its namespace and is not being deleted.
pub fn uses(pod: &Pod, name: &str) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.labels().get(INJECT_LABEL).map(String::as_str) == Some("true")
        && pod
            .annotations()
            .get(APIKEYS_ANNOTATION)
            .is_some_and(|list| authz::listed_api_keys(list).any(|k| k == name))
}

/// The rows for `keys`, given the pods of their namespaces and what each pod's sidecar reported
/// (`expiries`: by namespace, pod and ApiKey, Unix seconds).
pub fn rows(
    keys: &[ApiKey],
    pods: &[Pod],
    expiries: &BTreeMap<(String, String, String), f64>,
) -> Vec<Row> {
    keys.iter()
        .map(|key| {
            let ns = key.namespace().unwrap_or_default();
            let name = key.name_any();
            let users: Vec<String> = pods
                .iter()
                .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && uses(p, &name))
                .map(ResourceExt::name_any)
                .collect();
            let earliest = users
                .iter()
                .filter_map(|p| expiries.get(&(ns.clone(), p.clone(), name.clone())))
                .copied()
                .reduce(f64::min)
                .and_then(|secs| {
                    k8s_openapi::jiff::Timestamp::from_second(secs as i64)
                        .ok()
                        .map(|t| t.to_string())
                });
            let status = key.status.as_ref();
            let ready = ready_condition(status);
            Row {
                namespace: ns,
                name,
                provider: key.spec.provider_ref.name.clone(),
                ready: ready.map_or("Unknown".into(), |c| c.status.clone()),
                reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
                message: ready.map(|c| c.message.clone()).unwrap_or_default(),
                revoked: key.spec.revoked,
                pods: users,
                earliest_expiry: earliest,
                usage: usage(key),
                grant: status.and_then(|s| s.grant.clone()).unwrap_or_default(),
                ttl: status
                    .and_then(|s| s.effective_ttl.clone())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// Today's usage against the budget, as far as the ApiKey's kind counts it.
fn usage(key: &ApiKey) -> String {
    let usage = key.status.as_ref().and_then(|s| s.usage.as_ref());
    let per_day = key.spec.budget.as_ref().and_then(|b| b.requests_per_day);
    let mut parts = Vec::new();
    match (usage.and_then(|u| u.calls), per_day) {
        (calls, Some(limit)) => parts.push(format!("{}/{limit} calls", calls.unwrap_or(0))),
        (Some(calls), None) => parts.push(format!("{calls} calls")),
        (None, None) => {}
    }
    if let Some(issuances) = usage.and_then(|u| u.issuances) {
        parts.push(format!("{issuances} issuances"));
    }
    parts.join(", ")
}

/// The rows as kubectl prints a table: NAMESPACE only with `all_namespaces`, GRANT, TTL and
/// MESSAGE only `wide`.
pub fn table(rows: &[Row], all_namespaces: bool, wide: bool) -> String {
    let mut header = vec![];
    if all_namespaces {
        header.push("NAMESPACE");
    }
    header.extend([
        "NAME", "PROVIDER", "READY", "REASON", "REVOKED", "PODS", "EXPIRES", "USAGE",
    ]);
    if wide {
        header.extend(["TTL", "GRANT", "MESSAGE"]);
    }
    let mut lines = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    for row in rows {
        let mut line = vec![];
        if all_namespaces {
            line.push(row.namespace.clone());
        }
        line.extend([
            row.name.clone(),
            row.provider.clone(),
            row.ready.clone(),
            row.reason.clone(),
            row.revoked.to_string(),
            row.pods.len().to_string(),
            row.earliest_expiry.clone().unwrap_or_else(|| "-".into()),
            if row.usage.is_empty() {
                "-".into()
            } else {
                row.usage.clone()
            },
        ]);
        if wide {
            line.extend([row.ttl.clone(), row.grant.clone(), row.message.clone()]);
        }
        lines.push(line);
    }
    columns(&lines)
}

/// Left-aligned columns three spaces apart, as kubectl prints them.
pub fn columns(lines: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..lines.first().map_or(0, Vec::len))
        .map(|i| {
            lines
                .iter()
                .map(|l| l.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}
