//! The broker's answers as the sidecar reads them: an `ExchangeResponse`, a `RevocationStatus`
//! or a `Refusal`, then the credentials check and the files and endpoint answer made of them.
//!
//! `sidecar/src/files.rs` and `schedule.rs` are pure and belong to the sidecar binary (which
//! has no library API for them), so they are compiled into this crate by path: the code fuzzed
//! is the code shipped, and the sidecar crate stays unchanged.

use std::time::Duration;

use jiff::Timestamp;
use keybroker_contract::wire::{ExchangeResponse, Refusal, RevocationStatus};

use crate::Target;

#[allow(dead_code)]
#[path = "../../../sidecar/src/files.rs"]
mod files;
#[allow(dead_code)]
#[path = "../../../sidecar/src/schedule.rs"]
mod schedule;

pub const TARGET: Target = Target {
    name: "sidecar-wire",
    about: "broker answers -> credentials check, files, refresh time (sidecar)",
    run,
    seeds,
    dictionary: &[
        "\"credentials\":",
        "\"accessKeyId\":",
        "\"secretAccessKey\":",
        "\"sessionToken\":",
        "\"expiration\":",
        "\"refreshAt\":",
        "\"reason\":",
        "\"message\":",
        "\"retryable\":",
        "\"revoked\":true",
        "\"apiKey\":",
        "\"2026-01-01T00:15:00Z\"",
        "\"9999-12-31T23:59:59.999999999Z\"",
        "\"-009999-01-01T00:00:00Z\"",
        "\"2026-01-01T00:00:00+14:00\"",
        "\\n[evil]\\n",
        "\\u0000",
    ],
    // The sidecar reads at most 64 KiB of an answer.
    max_len: 64 * 1024 + 1,
};

/// A fixed "now", so that every input gives the same result on every run.
const NOW: &str = "2026-01-01T00:00:00Z";

/// The first byte picks what the sidecar asked for (an exchange or a revocation poll) and the
/// answer's status; the rest is the body.
fn run(input: &[u8]) {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    match selector % 4 {
        0 => exchange_answer(body),
        1 => {
            if let Ok(status) = serde_json::from_slice::<RevocationStatus>(body) {
                let _ = std::hint::black_box(status.revoked);
            }
        }
        _ => {
            // A refusal, as any non-200 answer is read: its text reaches logs and metrics.
            if let Ok(refusal) = serde_json::from_slice::<Refusal>(body) {
                let _ = std::hint::black_box(refusal.reason.len() + refusal.message.len());
            }
        }
    }
}

fn exchange_answer(body: &[u8]) {
    let Ok(answer) = serde_json::from_slice::<ExchangeResponse>(body) else {
        return;
    };
    let Some(c) = &answer.credentials else {
        return;
    };
    let valid = match files::validate(c) {
        Ok(valid) => valid,
        Err(e) => {
            let shown = e.to_string();
            for secret in [&c.secret_access_key, &c.session_token] {
                assert!(
                    secret.len() < 8 || !shown.contains(secret.as_str()),
                    "a refused credential's error shows its secret"
                );
            }
            return;
        }
    };
    check_files(c, &valid);
    let now: Timestamp = NOW.parse().unwrap_or(Timestamp::UNIX_EPOCH);
    let until = |t: Timestamp| Duration::try_from(t.duration_since(now)).ok();
    let lifetime = until(valid.expiration).unwrap_or_default();
    let broker_says = answer.refresh_at.parse::<Timestamp>().ok().and_then(until);
    for unit in [0.0, 0.5, 0.999] {
        let next = schedule::refresh_in(lifetime, broker_says, 2.0 / 3.0, unit);
        assert!(
            next >= Duration::from_secs(1) && next <= lifetime.max(Duration::from_secs(1)),
            "refresh in {next:?} for a lifetime of {lifetime:?}"
        );
    }
}

/// Whatever passed the check makes files an SDK reads back as exactly those credentials: no
/// extra INI line or profile, JSON that parses, one expiration line.
fn check_files(c: &keybroker_contract::wire::Credentials, valid: &files::Valid) {
    let rendered = files::render(valid);
    let names: Vec<_> = rendered.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        [
            files::CREDENTIALS,
            files::CREDENTIALS_JSON,
            files::EXPIRATION
        ]
    );
    let ini = String::from_utf8_lossy(&rendered[0].1);
    let lines: Vec<&str> = ini.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "the credentials file has extra lines: {lines:?}"
    );
    assert_eq!(lines[1], "[default]");
    assert_eq!(lines[2], format!("aws_access_key_id = {}", c.access_key_id));
    assert_eq!(
        lines[3],
        format!("aws_secret_access_key = {}", c.secret_access_key),
        "the secret changed on its way into the file"
    );
    assert_eq!(
        lines[4],
        format!("aws_session_token = {}", c.session_token),
        "the session token changed on its way into the file"
    );
    for json in [&rendered[1].1, &files::container_credentials(valid)] {
        let value: serde_json::Value = match serde_json::from_slice(json) {
            Ok(value) => value,
            Err(e) => panic!("a credentials JSON document does not parse: {e}"),
        };
        assert_eq!(value["AccessKeyId"], c.access_key_id.as_str());
        assert_eq!(value["SecretAccessKey"], c.secret_access_key.as_str());
        let expiration = value["Expiration"].as_str().unwrap_or_default();
        assert!(
            expiration.parse::<Timestamp>().is_ok(),
            "Expiration {expiration:?} is not RFC 3339"
        );
    }
    let expiration = String::from_utf8_lossy(&rendered[2].1);
    assert!(
        expiration.ends_with("Z\n") && expiration.lines().count() == 1,
        "the expiration file is {expiration:?}"
    );
}

fn seeds() -> Vec<Vec<u8>> {
    let exchange = r#"{"credentials":{"accessKeyId":"ASIAEXAMPLE123","secretAccessKey":"se/cr+et=KEY","sessionToken":"tok.en+/=","expiration":"2026-01-01T00:15:00.5Z"},"refreshAt":"2026-01-01T00:10:00Z"}"#;
    let mut seeds = vec![
        [b"\x00", exchange.as_bytes()].concat(),
        br#"{"credentials":{"accessKeyId":"A","secretAccessKey":"s","sessionToken":"t","expiration":"2025-12-31T23:00:00Z"},"refreshAt":"later"}"#.to_vec(),
        br#"{"credentials":{"accessKeyId":"AKIA=x","secretAccessKey":"abc\n[evil]","sessionToken":"t o k","expiration":"tomorrow"},"refreshAt":""}"#.to_vec(),
        br#"{"apiKey":"uploader","revoked":true}"#.to_vec(),
        br#"{"reason":"ApiKeyRevoked","message":"revoked","retryable":false}"#.to_vec(),
        b"<html>502 Bad Gateway</html>".to_vec(),
    ];
    for (selector, seed) in seeds.iter_mut().enumerate().skip(1) {
        seed.insert(0, [0u8, 0, 1, 2, 3][selector % 5]);
    }
    seeds
}
