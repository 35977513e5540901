//! Hostile load, as generators the attack tests and the benchmark share: AdmissionReviews
//! that are expensive to decide, bodies of nonsense, connections that never speak, and bearer
//! tokens that are junk or forged. Each generator is deterministic (index-based), so a failing
//! run can be replayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::json;

/// An AdmissionReview (admission.k8s.io/v1) of a Pod CREATE in `namespace`.
pub fn admission_review(uid: &str, namespace: &str, pod: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": pod,
        },
    }))
    .unwrap_or_default()
}

/// An opted-in pod naming `names` distinct ApiKeys that do not exist.
pub fn many_names_review(uid: &str, namespace: &str, names: usize) -> Vec<u8> {
    let list: Vec<String> = (0..names).map(|i| format!("missing-{i}")).collect();
    admission_review(
        uid,
        namespace,
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "hostile",
                "labels": {"keybroker.dev/inject": "true"},
                "annotations": {"keybroker.dev/apikeys": list.join(",")},
            },
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        }),
    )
}

/// About `bytes` of nonsense that starts like an AdmissionReview (so a parser gets far) and
/// never becomes one: a long run of nested, unterminated junk.
pub fn nonsense_body(seed: u64, bytes: usize) -> Vec<u8> {
    let mut out = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"junk-{seed}","object":{{"metadata":{{"annotations":{{"x":["#
    )
    .into_bytes();
    let mut n = seed;
    while out.len() < bytes {
        n = n
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        match n >> 61 {
            0 => out.extend_from_slice(b"{\"k\":[1,2,3,{\"a\":null}],\"v\":\"zzzz\"},"),
            1 => out.extend_from_slice(b"12345678901234567890e-5,"),
            2 => out.extend_from_slice(b"\"\\u00e9\\n\\t long string of text \","),
            _ => out.extend_from_slice(b"[true,false,null,[[],[{}]]],"),
        }
    }
    out
}

/// `n` TCP connections to `addr` that never send a byte. Dropping them closes them.
pub async fn idle_connections(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(tcp) => open.push(tcp),
            Err(_) => break,
        }
    }
    open
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Bearer token `i` of a junk series: every one distinct, in shapes that cycle through what a
/// scanner or a confused client sends (random text, JWT-looking text that is not base64, JWTs
/// for another audience, expired, unsigned or from another issuer).
pub fn junk_token(i: usize) -> String {
    let exp = now_unix() + 600;
    let header = b64(br#"{"alg":"RS256","kid":"x"}"#);
    let claims = |c: serde_json::Value| b64(c.to_string().as_bytes());
    match i % 6 {
        0 => format!("not-a-token-{i}"),
        1 => format!("eyJ!{i}.e30.sig"),
        2 => format!(
            "{header}.{}.c2ln",
            claims(json!({"aud": ["https://kubernetes.default.svc"], "exp": exp, "n": i}))
        ),
        3 => format!(
            "{header}.{}.c2ln",
            claims(json!({"aud": ["keybroker"], "exp": 1_000_000 + i}))
        ),
        4 => format!(
            "{}.{}.c2ln",
            b64(br#"{"alg":"none"}"#),
            claims(json!({"aud": ["keybroker"], "exp": exp, "n": i}))
        ),
        _ => format!(
            "{header}.{}.c2ln",
            claims(
                json!({"aud": ["keybroker"], "exp": exp, "iss": "https://elsewhere.example", "n": i})
            )
        ),
    }
}

/// A token that passes every structural check for `issuer` (audience keybroker, not expired)
/// but carries no valid signature: only the apiserver can refuse it.
pub fn forged_token(issuer: &str, n: usize) -> String {
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","kid":"forged"}"#),
        b64(json!({
            "aud": ["keybroker"],
            "exp": now_unix() + 600,
            "iss": issuer,
            "sub": format!("system:serviceaccount:attacker:sa-{n}"),
        })
        .to_string()
        .as_bytes()),
        b64(&[7u8; 256]),
    )
}

/// Counts of a flood's requests.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

/// Runs `workers` loops of `attack(worker, round)` until `stop` is set; each loop counts its
/// rounds in the tally (a round that returns false counts as failed: the attack tells).
pub fn flood<F, Fut>(
    workers: usize,
    stop: Arc<AtomicBool>,
    attack: F,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>)
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let tally = Arc::new(Tally::default());
    let tasks = (0..workers)
        .map(|worker| {
            let (stop, tally, attack) = (Arc::clone(&stop), Arc::clone(&tally), attack.clone());
            tokio::spawn(async move {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    if !attack(worker, round).await {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    round += 1;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    (tally, tasks)
}

/// This process's resident set size in bytes (Linux), for "RSS stays bounded" checks.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// p50 and p99 of `samples` (sorted in place).
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.50), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_make_what_they_say() {
        let review = many_names_review("u", "ns", 50_000);
        let parsed: serde_json::Value = serde_json::from_slice(&review).unwrap();
        let names = parsed["request"]["object"]["metadata"]["annotations"]["keybroker.dev/apikeys"]
            .as_str()
            .unwrap();
        assert_eq!(names.split(',').count(), 50_000);
        let junk = nonsense_body(1, 3 << 20);
        assert!(junk.len() >= 3 << 20);
        assert!(serde_json::from_slice::<serde_json::Value>(&junk).is_err());
        let tokens: std::collections::BTreeSet<String> = (0..600).map(junk_token).collect();
        assert_eq!(tokens.len(), 600, "junk tokens repeat");
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(
            percentiles(&mut samples),
            (Duration::from_millis(50), Duration::from_millis(99))
        );
    }
}
