//! The chart's PrometheusRule and Grafana dashboard: every query parsed as PromQL, every metric
//! it names served by the running operators and sidecars.

use super::*;

/// The metric names `expr` selects.
fn selected_metrics(
    expr: &promql_parser::parser::Expr,
    names: &mut std::collections::BTreeSet<String>,
) {
    use promql_parser::parser::Expr;
    match expr {
        Expr::Aggregate(a) => {
            selected_metrics(&a.expr, names);
            if let Some(p) = &a.param {
                selected_metrics(p, names);
            }
        }
        Expr::Unary(u) => selected_metrics(&u.expr, names),
        Expr::Binary(b) => {
            selected_metrics(&b.lhs, names);
            selected_metrics(&b.rhs, names);
        }
        Expr::Paren(p) => selected_metrics(&p.expr, names),
        Expr::Subquery(s) => selected_metrics(&s.expr, names),
        Expr::VectorSelector(v) => names.extend(v.name.clone()),
        Expr::MatrixSelector(m) => names.extend(m.vs.name.clone()),
        Expr::Call(c) => c.args.args.iter().for_each(|a| selected_metrics(a, names)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The series names a Prometheus text exposition can hold, from its `# TYPE` lines (a family
/// with no sample yet still declares its type) and its samples.
fn served_series(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => names.extend([name.to_owned(), format!("{name}_total")]),
                "histogram" => {
                    names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")))
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            names.extend(line.split(['{', ' ']).next().map(str::to_owned));
        }
    }
    names
}

/// `/metrics` of `pod` on `port`, through the apiserver's pod proxy (as Prometheus would
/// reach it on the pod network).
async fn pod_metrics(
    client: &kube::Client,
    ns: &str,
    pod: &str,
    port: u16,
) -> anyhow::Result<String> {
    let request = http::Request::get(format!(
        "/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/metrics"
    ))
    .body(Vec::new())?;
    client
        .request_text(request)
        .await
        .with_context(|| format!("/metrics of pod {ns}/{pod}:{port}"))
}

#[tokio::test]
async fn the_charts_alerts_and_dashboard_query_series_the_operator_and_sidecars_serve()
-> anyhow::Result<()> {
    let cluster = cluster().await?;
    in_namespace(cluster, "monitoring", |client, ns| async move {
        // What the chart's rules and dashboard query, each expression parsed as PromQL.
        let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/keybroker");
        let out = std::process::Command::new(keybroker_e2e::tools::Tools::locate()?.helm)
            .arg("template")
            .arg("keybroker")
            .arg(&chart)
            .args([
                "--namespace",
                install::NAMESPACE,
                "--kube-version",
                "1.36.0",
            ])
            .args([
                "--set",
                "prometheusRule.enabled=true,grafanaDashboard.enabled=true,podMonitor.enabled=true",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout)?;
        let mut exprs: Vec<(String, String)> = Vec::new();
        for doc in rendered.split("\n---\n") {
            let Ok(doc) = yaml_serde::from_str::<serde_json::Value>(doc) else {
                continue;
            };
            match doc["kind"].as_str() {
                Some("PrometheusRule") => {
                    for group in doc["spec"]["groups"].as_array().into_iter().flatten() {
                        for rule in group["rules"].as_array().into_iter().flatten() {
                            let alert = rule["alert"].as_str().context("a rule without alert")?;
                            let expr = rule["expr"].as_str().context("a rule without expr")?;
                            exprs.push((format!("alert {alert}"), expr.to_owned()));
                        }
                    }
                }
                Some("ConfigMap") if doc["data"]["keybroker.json"].is_string() => {
                    let dashboard: serde_json::Value = serde_json::from_str(
                        doc["data"]["keybroker.json"].as_str().unwrap_or_default(),
                    )?;
                    for panel in dashboard["panels"].as_array().into_iter().flatten() {
                        for target in panel["targets"].as_array().into_iter().flatten() {
                            let expr = target["expr"].as_str().context("a target without expr")?;
                            exprs.push((format!("panel {:?}", panel["title"]), expr.to_owned()));
                        }
                    }
                }
                _ => {}
            }
        }
        let alerts: Vec<&str> = exprs
            .iter()
            .filter_map(|(w, _)| w.strip_prefix("alert "))
            .collect();
        for alert in [
            "KeybrokerCredentialsExpiring",
            "KeybrokerRefusalSpike",
            "KeybrokerAnomaly",
            "KeybrokerGatewayBudgetSpent",
            "KeybrokerWebhookErrors",
            "KeybrokerWebhookSlow",
            "KeybrokerNoLeader",
        ] {
            ensure!(
                alerts.contains(&alert),
                "the PrometheusRule has no {alert}: {alerts:?}"
            );
        }
        ensure!(
            exprs
                .iter()
                .filter(|(w, _)| w.starts_with("panel "))
                .count()
                >= 10,
            "the dashboard has few queries"
        );
        let mut referenced: Vec<(String, std::collections::BTreeSet<String>)> = Vec::new();
        for (what, expr) in &exprs {
            let parsed = promql_parser::parser::parse(expr)
                .map_err(|e| anyhow::anyhow!("{what}: {expr:?} is not PromQL: {e}"))?;
            let mut names = std::collections::BTreeSet::new();
            selected_metrics(&parsed, &mut names);
            ensure!(!names.is_empty(), "{what} selects no metric");
            referenced.push((what.clone(), names));
        }

        // What live operators and a live sidecar serve. A labelled family appears only once it
        // has a sample: the sidecar is scraped holding credentials, then after a revocation
        // (credentials removed, its next exchange refused), and both operator replicas.
        let pod = uploading_pod(cluster, &client, &ns, &[]).await?;
        let pod_name = pod.metadata.name.clone().context("name")?;
        let health = keybroker_contract::ports::HEALTH;
        let mut live = served_series(&pod_metrics(&client, &ns, &pod_name, health).await?);
        fixtures::revoke(&client, &ns, "uploader").await?;
        let after = eventually(
            "a refused refresh in the sidecar's metrics",
            Duration::from_secs(60),
            || async {
                let text = pod_metrics(&client, &ns, &pod_name, health).await.ok()?;
                text.contains("keybroker_sidecar_refresh_failures_total{")
                    .then_some(text)
            },
        )
        .await?;
        live.extend(served_series(&after));
        let operators = Api::<Pod>::namespaced(client.clone(), install::NAMESPACE)
            .list(&ListParams::default().labels("app.kubernetes.io/name=keybroker"))
            .await?;
        ensure!(
            operators.items.len() == 2,
            "{} operator pods",
            operators.items.len()
        );
        for operator in &operators.items {
            let name = operator.metadata.name.clone().context("name")?;
            live.extend(served_series(
                &pod_metrics(&client, install::NAMESPACE, &name, 8080).await?,
            ));
        }
        for name in [
            "keybroker_sidecar_credentials_expiry_timestamp_seconds",
            "keybroker_sidecar_credentials_removed_total",
            "keybroker_sidecar_refresh_failures_total",
            "keybroker_broker_exchanges_total",
            "keybroker_webhook_admissions_total",
            "keybroker_controller_leader",
        ] {
            ensure!(live.contains(name), "{name} is not served live: {live:?}");
        }
        // Families this test does not drive (gateway calls, reconcile errors): the operator's
        // own registry with one sample each.
        let registry = keybroker_operator::metrics::Metrics::default();
        registry.gateway_call(Some("OutsideScope"), 0, Duration::from_millis(1));
        registry.error("ApiKey", "Kubernetes");
        registry.anomaly(
            "RefusalSpike",
            keybroker_operator::crd::AnomalyAction::Alert,
        );
        let registered = served_series(&registry.encode()?);
        let mut only_registered = std::collections::BTreeSet::new();
        for (what, names) in &referenced {
            for name in names {
                if !live.contains(name) {
                    ensure!(
                        registered.contains(name),
                        "{what} queries {name}, which neither the operator nor the sidecar serves"
                    );
                    only_registered.insert(name.clone());
                }
            }
        }
        eprintln!(
            "measured: not sampled live, found in the operator's registry: {only_registered:?}"
        );
        eprintln!(
            "measured: {} chart queries checked against {} live series names",
            referenced.len(),
            live.len()
        );
        Ok(())
    })
    .await
}
