//! Proofs that the gateway tests' upstreams are the real servers and behave as those tests will
//! rely on: go-httpbin echoes what it is sent and streams server-sent events as they happen;
//! Gitea enforces its access tokens' scopes and forgets a deleted token at once.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use http_body_util::{BodyExt, Empty};
use hyper::Method;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::distr::{Alphanumeric, SampleString};

use keybroker_e2e::gitea::{ADMIN, Auth, Gitea};
use keybroker_e2e::httpbin::Httpbin;

#[tokio::test]
async fn httpbin_echoes_headers_and_streams_events_as_they_happen() -> anyhow::Result<()> {
    let started = Instant::now();
    let httpbin = Httpbin::start().await?;
    eprintln!("go-httpbin ready in {:?}", started.elapsed());
    let outcome = httpbin_checks(&httpbin).await;
    if outcome.is_err() {
        eprintln!("--- go-httpbin log ---\n{}", httpbin.log_tail(20));
    }
    outcome
}

async fn httpbin_checks(httpbin: &Httpbin) -> anyhow::Result<()> {
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    let secret = format!(
        "Bearer kb-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    );
    let req = http::Request::get(format!("{}/headers", httpbin.url()))
        .header("authorization", &secret)
        .header("x-keybroker-probe", "seen")
        .body(Empty::new())?;
    let response = http.request(req).await.context("GET /headers")?;
    ensure!(
        response.status() == 200,
        "GET /headers: {}",
        response.status()
    );
    let body = response.into_body().collect().await?.to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body)?;
    ensure!(
        echoed["headers"]["Authorization"][0] == secret.as_str(),
        "Authorization not echoed: {echoed}"
    );
    ensure!(
        echoed["headers"]["X-Keybroker-Probe"][0] == "seen",
        "X-Keybroker-Probe not echoed: {echoed}"
    );

    // Three events over one second: the first is written at once, the last after 1 s.
    let sent = Instant::now();
    let response = http
        .get(format!("{}/sse?count=3&duration=1s", httpbin.url()).parse()?)
        .await
        .context("GET /sse")?;
    ensure!(response.status() == 200, "GET /sse: {}", response.status());
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(
        content_type.starts_with("text/event-stream"),
        "content-type {content_type}"
    );
    let mut body = response.into_body();
    let mut text = String::new();
    let mut first_event = None;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
            if first_event.is_none() && text.contains("\n\n") {
                first_event = Some(sent.elapsed());
            }
        }
    }
    let ended = sent.elapsed();
    let first = first_event.context("the stream held no complete event")?;
    let events = text.matches("event: ping\n").count();
    ensure!(events == 3, "{events} events in {text:?}");
    eprintln!("/sse: first event after {first:?}, stream ended after {ended:?}");
    ensure!(
        ended.saturating_sub(first) >= Duration::from_millis(500),
        "the first event came {first:?} after the request, the end {ended:?}: not incremental"
    );
    Ok(())
}

#[tokio::test]
async fn gitea_enforces_token_scopes_and_forgets_deleted_tokens() -> anyhow::Result<()> {
    let started = Instant::now();
    let gitea = Gitea::start().await?;
    eprintln!("Gitea ready in {:?}", started.elapsed());
    let outcome = gitea_checks(&gitea).await;
    if outcome.is_err() {
        eprintln!("--- Gitea log ---\n{}", gitea.log_tail(30));
    }
    outcome
}

async fn gitea_checks(gitea: &Gitea) -> anyhow::Result<()> {
    const CONTENT: &[u8] = b"hello from gitea\n";
    let raw = format!("/api/v1/repos/{ADMIN}/docs/raw/dir/hello.txt");
    gitea
        .create_repo_with_file(ADMIN, "docs", "dir/hello.txt", CONTENT)
        .await?;
    gitea.create_org("team").await?;
    gitea
        .create_repo_with_file("team", "infra", "README.md", b"# infra\n")
        .await?;

    let anonymous = gitea.send(Method::GET, &raw, Auth::None, None).await?;
    ensure!(
        anonymous.status == 404,
        "a private file read anonymously: {}",
        anonymous.status
    );

    let (ro_id, ro) = gitea
        .create_token("read-only", &["read:repository"])
        .await?;
    for auth in [Auth::Token(&ro), Auth::Bearer(&ro)] {
        let read = gitea.send(Method::GET, &raw, auth, None).await?;
        ensure!(read.status == 200, "read with {auth:?}: {}", read.status);
        ensure!(read.body == CONTENT, "read {:?}", read.body);
    }
    let org_file = gitea
        .send(
            Method::GET,
            "/api/v1/repos/team/infra/contents/README.md",
            Auth::Token(&ro),
            None,
        )
        .await?;
    ensure!(org_file.status == 200, "org file: {}", org_file.status);

    let write = |name: &str| {
        (
            format!("/api/v1/repos/{ADMIN}/docs/contents/{name}"),
            serde_json::json!({"content": "d3JpdHRlbgo=", "message": "write"}),
        )
    };
    let (path, body) = write("by-read-only.txt");
    let denied = gitea
        .send(Method::POST, &path, Auth::Token(&ro), Some(&body))
        .await?;
    ensure!(
        denied.status == 403,
        "a write with a read-only token: {} {}",
        denied.status,
        String::from_utf8_lossy(&denied.body)
    );

    let (rw_id, rw) = gitea
        .create_token("read-write", &["write:repository"])
        .await?;
    let (path, body) = write("by-read-write.txt");
    let allowed = gitea
        .send(Method::POST, &path, Auth::Token(&rw), Some(&body))
        .await?;
    ensure!(
        allowed.status == 201,
        "a write with a write token: {}",
        allowed.status
    );

    let mut wrong = ro.clone();
    let last = if wrong.pop() == Some('0') { '1' } else { '0' };
    wrong.push(last);
    let unknown = gitea
        .send(Method::GET, &raw, Auth::Token(&wrong), None)
        .await?;
    ensure!(unknown.status == 401, "a wrong token: {}", unknown.status);

    let listed = gitea.list_tokens().await?;
    let mine = listed
        .iter()
        .find(|t| t.id == ro_id)
        .with_context(|| format!("token {ro_id} not listed: {listed:?}"))?;
    ensure!(
        mine.name == "read-only" && mine.scopes == ["read:repository"],
        "{mine:?}"
    );
    ensure!(ro.ends_with(&mine.token_last_eight), "{mine:?}");
    ensure!(listed.iter().any(|t| t.id == rw_id), "{listed:?}");

    gitea.delete_token(ro_id).await?;
    let deleted = Instant::now();
    let after = gitea
        .send(Method::GET, &raw, Auth::Token(&ro), None)
        .await?;
    ensure!(
        after.status == 401,
        "a deleted token right after its deletion: {}",
        after.status
    );
    eprintln!(
        "deleted token refused {:?} after the DELETE",
        deleted.elapsed()
    );
    let listed = gitea.list_tokens().await?;
    ensure!(
        !listed.iter().any(|t| t.id == ro_id) && listed.iter().any(|t| t.id == rw_id),
        "{listed:?}"
    );
    let still = gitea
        .send(Method::GET, &raw, Auth::Token(&rw), None)
        .await?;
    ensure!(still.status == 200, "the other token: {}", still.status);
    Ok(())
}
