//! The policy compiler and what it is made of: wildcard patterns and their subset relation,
//! ApiKey scopes against KeyProvider guardrails, TTLs. Inputs are kept within what the CRDs'
//! schemas let the apiserver store, since nothing else reaches the compiler.

use std::time::Duration;

use keybroker_operator::crd::{ApiKeySpec, Guardrails};
use keybroker_operator::pattern::Pattern;
use keybroker_operator::policy::{self, MAX_POLICY_BYTES, MIN_TTL, STS_MAX_TTL};
use serde::Deserialize;

use crate::Target;

pub const PATTERN: Target = Target {
    name: "pattern",
    about: "wildcard patterns: subset relation sound against matching",
    run: pattern,
    seeds: pattern_seeds,
    dictionary: &[
        "*",
        "?",
        "**",
        "*?",
        "?*",
        "arn:aws:s3:::",
        "/",
        "\n",
        "s3:Get",
    ],
    // Two patterns of up to 512 characters (the CRD's limit on a resource) and a separator.
    max_len: 2 * 512 * 4 + 2,
};

pub const POLICY: Target = Target {
    name: "policy",
    about: "ApiKey spec x guardrails x namespace -> session policy and TTL",
    run: compile,
    seeds: policy_seeds,
    dictionary: &[
        "\"scope\":",
        "\"actions\":",
        "\"resources\":",
        "\"allowedActions\":",
        "\"allowedResources\":",
        "\"ttl\":",
        "\"defaultTTL\":",
        "\"maxTTL\":",
        "{namespace}",
        "arn:aws:s3:::corp-data/",
        "s3:*",
        "s3:GetObject",
        "\"12h\"",
        "\"15m\"",
        "\"1h30m\"",
    ],
    max_len: 64 * 1024,
};

pub const TTL: Target = Target {
    name: "ttl",
    about: "TTL text -> duration, formatted back; guardrail defaults and caps",
    run: ttl,
    seeds: ttl_seeds,
    dictionary: &["h", "m", "s", "15m", "12h", "18446744073709551615s", "0"],
    max_len: 64,
};

/// `a`, `b` (patterns) split at the first newline; case folding from `a`'s first byte.
fn pattern(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let (a, b) = text.split_once('\n').unwrap_or((&text, ""));
    let a: String = a.chars().take(512).collect();
    let b: String = b.chars().take(512).collect();
    let ci = a.len() % 2 == 1;
    let (pa, pb) = (Pattern::new(&a, ci), Pattern::new(&b, ci));
    assert!(pa.contains(&pa), "pattern {a:?} does not contain itself");
    assert!(
        Pattern::new("*", ci).contains(&pb),
        "`*` does not contain {b:?}"
    );
    // Soundness: a string `b` matches that `a` does not means `a` does not contain `b`.
    for filler in ["", "q", "zq/"] {
        let witness: String = b
            .chars()
            .flat_map(|c| match c {
                '*' => filler.chars().collect::<Vec<_>>(),
                '?' => vec!['q'],
                c => vec![c],
            })
            .collect();
        if pb.matches(&witness, ci) && !pa.matches(&witness, ci) {
            assert!(
                !pa.contains(&pb),
                "{a:?} claims to contain {b:?}, but {witness:?} matches only the latter"
            );
        }
    }
    if !a.contains(['*', '?']) {
        assert!(
            pa.matches(&a, ci),
            "the literal {a:?} does not match itself"
        );
    }
}

fn pattern_seeds() -> Vec<Vec<u8>> {
    [
        "arn:aws:s3:::corp-data/*\narn:aws:s3:::corp-data/team-a/*",
        "s3:Get*\ns3:GetObject",
        "s3:GetObject\ns3:Get*",
        "a*b?c\na?*bc",
        "*?*?\n??",
        "",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// One compile: what an ApiKey asks, what its provider allows, the ApiKey's namespace.
#[derive(Deserialize)]
struct Case {
    spec: ApiKeySpec,
    guardrails: Guardrails,
    namespace: String,
}

fn compile(input: &[u8]) {
    let Ok(case) = serde_json::from_slice::<Case>(input) else {
        return;
    };
    if !storable(&case) {
        return;
    }
    match policy::compile(&case.spec, &case.guardrails, &case.namespace) {
        Ok(compiled) => {
            assert!(
                compiled.session_policy.len() <= MAX_POLICY_BYTES,
                "a session policy of {} bytes",
                compiled.session_policy.len()
            );
            let value: serde_json::Value = match serde_json::from_str(&compiled.session_policy) {
                Ok(value) => value,
                Err(e) => panic!("the session policy is not JSON: {e}"),
            };
            assert_eq!(value["Statement"][0]["Effect"], "Allow");
            assert!(
                compiled.scope_hash.len() == 64
                    && compiled.scope_hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "scope hash {:?}",
                compiled.scope_hash
            );
            assert!(
                (MIN_TTL..=STS_MAX_TTL).contains(&compiled.ttl),
                "TTL {:?} outside STS's range",
                compiled.ttl
            );
            // Every action granted lies within an allowed one.
            for action in &case.spec.scope.actions {
                let requested = Pattern::new(action, true);
                assert!(
                    case.guardrails
                        .allowed_actions
                        .iter()
                        .any(|a| Pattern::new(a, true).contains(&requested)),
                    "action {action:?} granted outside the guardrails"
                );
            }
        }
        Err(refusal) => {
            assert!(!refusal.reason().is_empty() && !refusal.to_string().is_empty());
        }
    }
}

/// The CRDs' schema limits (operator/src/crd.rs), which the apiserver enforces before anything
/// reaches the compiler.
fn storable(case: &Case) -> bool {
    let list = |items: &[String], max_len: usize| {
        (1..=64).contains(&items.len())
            && items
                .iter()
                .all(|i| (1..=max_len).contains(&i.chars().count()))
    };
    let ttl = |t: &Option<String>| t.as_ref().is_none_or(|t| (2..=16).contains(&t.len()));
    let action_shape = |a: &String| {
        a.split_once(':').is_some_and(|(service, name)| {
            !service.is_empty()
                && !name.is_empty()
                && service
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"*?-".contains(&b))
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"*?".contains(&b))
        })
    };
    let g = &case.guardrails;
    let s = &case.spec;
    list(&s.scope.actions, 128)
        && s.scope.actions.iter().all(action_shape)
        && list(&s.scope.resources, 512)
        && list(&g.allowed_actions, 128)
        && list(&g.allowed_resources, 512)
        && ttl(&s.ttl)
        && ttl(&g.default_ttl)
        && ttl(&g.max_ttl)
        && (1..=63).contains(&case.namespace.len())
        && case
            .namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn policy_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"namespace":"team-a","spec":{"providerRef":{"name":"aws"},"serviceAccountNames":["uploader"],"scope":{"actions":["s3:PutObject","s3:GetObject"],"resources":["arn:aws:s3:::corp-data/{namespace}/invoices/*"]},"ttl":"30m"},"guardrails":{"allowedActions":["s3:Get*","s3:Put*"],"allowedResources":["arn:aws:s3:::corp-data/{namespace}/*"],"defaultTTL":"1h","maxTTL":"2h"}}"#,
        r#"{"namespace":"team-b","spec":{"providerRef":{"name":"aws"},"serviceAccountNames":["a"],"scope":{"actions":["s3:*"],"resources":["arn:aws:s3:::other/*"]}},"guardrails":{"allowedActions":["s3:GetObject"],"allowedResources":["arn:aws:s3:::corp-data/*"]}}"#,
        r#"{"namespace":"ns","spec":{"providerRef":{"name":"p"},"serviceAccountNames":["a"],"scope":{"actions":["s3:GetObject"],"resources":["{other}"]},"ttl":"13h"},"guardrails":{"allowedActions":["*"],"allowedResources":["*"],"maxTTL":"99h"}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// The TTL text, then (after a newline) optional `defaultTTL` and `maxTTL` guardrail texts.
fn ttl(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let mut parts = text.split('\n');
    let requested = parts.next().unwrap_or_default();
    if let Ok(d) = policy::parse_ttl("ttl", requested) {
        let formatted = policy::format_ttl(d);
        assert_eq!(
            policy::parse_ttl("ttl", &formatted).ok(),
            Some(d),
            "{requested:?} parsed as {d:?}, formatted as {formatted:?}, which does not parse back"
        );
    }
    let guardrails = Guardrails {
        allowed_actions: vec!["*".into()],
        allowed_resources: vec!["*".into()],
        default_ttl: parts.next().map(str::to_owned),
        max_ttl: parts.next().map(str::to_owned),
        max_issuances_per_minute: None,
        max_request_bytes: None,
        max_requests_per_minute: None,
        max_requests_per_day: None,
    };
    let requested = Some(requested).filter(|r| !r.is_empty());
    if let Ok(ttl) = policy::effective_ttl(requested, &guardrails) {
        assert!(
            (MIN_TTL..=STS_MAX_TTL).contains(&ttl),
            "effective TTL {ttl:?} outside [15m, 12h]"
        );
        if let Some(max) = guardrails.max_ttl.as_deref() {
            let max = policy::parse_ttl("maxTTL", max).unwrap_or(Duration::MAX);
            assert!(ttl <= max, "effective TTL {ttl:?} above maxTTL {max:?}");
        }
    }
}

fn ttl_seeds() -> Vec<Vec<u8>> {
    [
        "1h30m",
        "15m\n1h\n2h",
        "900s",
        "12h\n\n13h",
        "1m1h",
        "99999999999999999999h",
        "h",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
