//! Request bodies through the gateway at their edges: one that grows past the provider's
//! `maxRequestBytes` with no length declared (chunked) is refused 413 like a declared one, and
//! during a rotation a call with a body that the current key fails is sent again with the
//! previous key (go-httpbin's `/basic-auth` checks the key itself); and a session works only
//! from its pod's address.

use anyhow::{Context, ensure};
use base64::Engine;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams};

use keybroker_e2e::httpbin::{Httpbin, KEY_SECRET};
use keybroker_e2e::{eventually, in_namespace, shared_with_crds};
use keybroker_operator::crd::HeaderPresentation;

use super::rig::*;

const KEY: &str = "basic";

fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// A POST to the sidecar whose body arrives in `chunks` frames of `chunk` bytes, with no
/// Content-Length (chunked): status and body.
async fn post_chunked(
    port: u16,
    path: &str,
    chunks: usize,
    chunk: usize,
) -> anyhow::Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let frames = futures::stream::iter(
        (0..chunks)
            .map(move |_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; chunk])))),
    );
    let request = hyper::Request::post(path)
        .header("host", format!("127.0.0.1:{port}"))
        .body(StreamBody::new(frames))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_growing_body_past_the_limit_is_413_and_a_rotation_retries_calls_with_a_body()
-> anyhow::Result<()> {
    let cluster = shared_with_crds().await?;
    in_namespace(cluster, "gw-bodies", |client, ns| async move {
        let httpbin = Httpbin::start().await?;
        let provider_name = format!("httpbin-basic-{ns}");
        let mut provider = provider(&provider_name, &ns, httpbin.url());
        if let Some(gateway) = provider.spec.gateway.as_mut() {
            gateway.presentation.header = Some(HeaderPresentation {
                name: "Authorization".into(),
                prefix: Some("Basic ".into()),
            });
        }
        provider
            .spec
            .guardrails
            .allowed_resources
            .push("/basic-auth/*".into());
        let mut apikey = apikey(KEY, &provider_name, None);
        apikey.spec.scope.actions.push("POST".into());
        apikey.spec.scope.resources.push("/basic-auth/*".into());
        // The current key is the next one, which go-httpbin's /basic-auth/app/old refuses.
        let rig = rig(
            &client,
            &ns,
            (KEY_SECRET, &basic("app", "new")),
            provider,
            vec![apikey],
        )
        .await?;
        let port = rig.local_port;

        // A chunked body that grows past the provider's 64 KiB: refused 413 with the reason,
        // not a broken connection or a 502; the next call goes through.
        let (status, body) =
            post_chunked(port, &format!("/{KEY}/anything/{ns}/upload"), 20, 8 * 1024).await?;
        ensure!(
            status == 413 && reason(&body) == "RequestTooLarge",
            "{status}: {body}"
        );
        ensure!(body.contains("maxRequestBytes"), "{body}");
        let (status, body) =
            post_chunked(port, &format!("/{KEY}/anything/{ns}/upload"), 4, 8 * 1024).await?;
        ensure!(
            status == 200,
            "a chunked body within the limit: {status} {body}"
        );

        // A call with a body, the current key refused by the upstream and no previous key yet.
        let payload = vec![b'p'; 4096];
        let (status, _, body) = call(
            port,
            "POST",
            &format!("/{KEY}/basic-auth/app/old"),
            &[],
            &payload,
        )
        .await?;
        ensure!(status == 401, "the current key alone: {status} {body}");

        // A rotation keeps the previous key: the same call is sent again with it and passes.
        Api::<Secret>::namespaced(client.clone(), &ns)
            .patch(
                KEY_SECRET,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "stringData": { "previousKey": basic("app", "old") }
                })),
            )
            .await?;
        let body = eventually(
            "a call with a body retried with the previous key",
            std::time::Duration::from_secs(30),
            || async {
                let (status, _, body) = call(
                    port,
                    "POST",
                    &format!("/{KEY}/basic-auth/app/old"),
                    &[],
                    &payload,
                )
                .await
                .ok()?;
                (status == 200).then_some(body)
            },
        )
        .await?;
        ensure!(
            body.contains("\"authenticated\": true") || body.contains("\"authenticated\":true"),
            "{body}"
        );

        // The session works only from the pod's own address: with the stored pod given another
        // one (as a copy of the session used from elsewhere would look), the sidecar's calls
        // are refused; given the sidecar's (loopback here), they pass again.
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        for (address, want) in [("10.99.0.1", 403), ("127.0.0.1", 200)] {
            pods.patch_status(
                "app",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "status": { "podIP": address, "podIPs": [{ "ip": address }] }
                })),
            )
            .await?;
            let (status, body) = eventually(
                &format!("calls with the pod at {address} to be {want}"),
                std::time::Duration::from_secs(30),
                || async {
                    let (status, _, body) =
                        call(port, "GET", &format!("/{KEY}/basic-auth/app/old"), &[], b"")
                            .await
                            .ok()?;
                    (status == want).then_some((status, body))
                },
            )
            .await?;
            if want == 403 {
                ensure!(reason(&body) == "SessionNotThisPod", "{status}: {body}");
            }
        }
        drop(rig);
        Ok(())
    })
    .await
    .context("the body edges")
}
