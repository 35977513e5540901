//! The policy compiler: (ApiKey spec, KeyProvider guardrails, namespace) → the AWS session
//! policy and TTL the broker uses for every issuance, or a refusal that names what to change.
//! Pure: no I/O, no clock.

use std::fmt;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::crd::{ApiKeySpec, Guardrails};
use crate::pattern::Pattern;

/// STS refuses sessions shorter than 15 minutes.
pub const MIN_TTL: Duration = Duration::from_secs(900);
/// AssumeRole's ceiling (a role's MaxSessionDuration can be at most 12 hours).
pub const STS_MAX_TTL: Duration = Duration::from_secs(12 * 3600);
/// Guardrail defaults when the provider leaves them out.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// STS's limit on the plaintext session policy.
pub const MAX_POLICY_BYTES: usize = 2048;
/// Placeholder in resource patterns replaced by the ApiKey's namespace.
pub const NAMESPACE_PLACEHOLDER: &str = "{namespace}";

/// A compiled ApiKey: what the broker sends to STS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// IAM policy JSON, compact (this is what STS receives).
    pub session_policy: String,
    /// Hex SHA-256 of `session_policy`, recorded in audit records.
    pub scope_hash: String,
    pub ttl: Duration,
}

/// Why an ApiKey cannot be compiled. Every variant says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{}", describe_violations(.0))]
    ScopeExceedsGuardrails(Vec<Violation>),
    #[error(
        "{field} {value:?} is not a valid duration: use a Go duration such as 15m, 1h or 1h30m"
    )]
    InvalidTtl { field: &'static str, value: String },
    #[error("ttl {} exceeds the provider's maxTTL {}; ask for at most {}", format_ttl(*requested), format_ttl(*max), format_ttl(*max))]
    TtlExceedsGuardrails { requested: Duration, max: Duration },
    #[error("ttl {} is below the STS minimum of 15m", format_ttl(*requested))]
    TtlBelowMinimum { requested: Duration },
    #[error("{field} pattern {pattern:?} {problem}")]
    InvalidPattern {
        field: &'static str,
        pattern: String,
        problem: &'static str,
    },
    #[error(
        "the compiled session policy is {bytes} bytes but STS accepts at most {MAX_POLICY_BYTES}; list fewer actions or resources, or use wider patterns within the guardrails"
    )]
    PolicyTooLarge { bytes: usize },
    #[error("{field} {requested} exceeds the provider's {guardrail} {max}; ask for at most {max}")]
    BudgetExceedsGuardrails {
        field: &'static str,
        guardrail: &'static str,
        requested: u64,
        max: u64,
    },
    #[error(
        "{field} is for {kinds} providers only, and KeyProvider {provider:?} is {kind}; {hint}"
    )]
    NotForKind {
        field: &'static str,
        kinds: &'static str,
        provider: String,
        kind: &'static str,
        hint: &'static str,
    },
}

impl Refusal {
    /// The condition reason: one word a user can search for.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::ScopeExceedsGuardrails(_) => "ScopeExceedsGuardrails",
            Refusal::InvalidTtl { .. } => "InvalidTTL",
            Refusal::TtlExceedsGuardrails { .. } | Refusal::TtlBelowMinimum { .. } => {
                "TTLExceedsGuardrails"
            }
            Refusal::InvalidPattern { .. } => "InvalidScope",
            Refusal::PolicyTooLarge { .. } => "PolicyTooLarge",
            Refusal::BudgetExceedsGuardrails { .. } => "BudgetExceedsGuardrails",
            Refusal::NotForKind { .. } => "InvalidScope",
        }
    }
}

/// One requested action or resource outside the guardrails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ScopeKind,
    pub requested: String,
    pub allowed: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    Action,
    Resource,
    /// An oauth2 scope (in `scope.actions`).
    Scope,
    /// An oauth2 audience (in `scope.resources`).
    Audience,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, guardrail) = match self.kind {
            ScopeKind::Action => ("action", "allowedActions"),
            ScopeKind::Resource => ("resource", "allowedResources"),
            ScopeKind::Scope => ("scope", "allowedActions"),
            ScopeKind::Audience => ("audience", "allowedResources"),
        };
        write!(
            f,
            "{what} {:?} is not within the provider's {guardrail} [{}]",
            self.requested,
            self.allowed.join(", ")
        )
    }
}

fn describe_violations(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Compiles `spec` for an ApiKey in `namespace` under the guardrails of the `aws` provider
/// `provider`: an IAM session policy.
pub fn compile(
    spec: &ApiKeySpec,
    guardrails: &Guardrails,
    namespace: &str,
) -> Result<Compiled, Refusal> {
    let ttl = effective_ttl(spec.ttl.as_deref(), guardrails)?;
    if let Some(action) = spec.scope.actions.iter().find(|a| !a.contains(':')) {
        return Err(Refusal::InvalidPattern {
            field: "scope.actions",
            pattern: action.clone(),
            problem: "is not an IAM action: use service:Action, e.g. s3:GetObject (HTTP methods are for gateway providers)",
        });
    }

    let allowed_actions: Vec<Pattern> = guardrails
        .allowed_actions
        .iter()
        .map(|a| Pattern::new(a, true))
        .collect();
    let allowed_resources = guardrails
        .allowed_resources
        .iter()
        .map(|r| expand("allowedResources", r, namespace).map(|r| Pattern::new(&r, false)))
        .collect::<Result<Vec<_>, _>>()?;

    let mut violations = Vec::new();
    let mut actions = Vec::with_capacity(spec.scope.actions.len());
    for action in &spec.scope.actions {
        let requested = Pattern::new(action, true);
        if !allowed_actions.iter().any(|a| a.contains(&requested)) {
            violations.push(Violation {
                kind: ScopeKind::Action,
                requested: action.clone(),
                allowed: guardrails.allowed_actions.clone(),
            });
        }
        actions.push(action.clone());
    }
    let mut resources = Vec::with_capacity(spec.scope.resources.len());
    for resource in &spec.scope.resources {
        let expanded = expand("scope.resources", resource, namespace)?;
        if !allowed_resources
            .iter()
            .any(|a| a.contains(&Pattern::new(&expanded, false)))
        {
            violations.push(Violation {
                kind: ScopeKind::Resource,
                requested: expanded.clone(),
                allowed: allowed_resources
                    .iter()
                    .map(|p| p.as_str().to_owned())
                    .collect(),
            });
        }
        resources.push(expanded);
    }
    if !violations.is_empty() {
        return Err(Refusal::ScopeExceedsGuardrails(violations));
    }
    actions.sort();
    actions.dedup();
    resources.sort();
    resources.dedup();

    let session_policy = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": actions,
            "Resource": resources,
        }]
    })
    .to_string();
    if session_policy.len() > MAX_POLICY_BYTES {
        return Err(Refusal::PolicyTooLarge {
            bytes: session_policy.len(),
        });
    }
    let scope_hash = hex(&Sha256::digest(session_policy.as_bytes()));
    Ok(Compiled {
        session_policy,
        scope_hash,
        ttl,
    })
}

/// The TTL issued: the ApiKey's, else the provider's default (capped at its max); always within
/// [15m, maxTTL].
pub fn effective_ttl(
    requested: Option<&str>,
    guardrails: &Guardrails,
) -> Result<Duration, Refusal> {
    let max = match guardrails.max_ttl.as_deref() {
        Some(v) => parse_ttl("guardrails.maxTTL", v)?,
        None => DEFAULT_TTL,
    }
    .min(STS_MAX_TTL);
    let ttl = match requested {
        Some(v) => {
            let ttl = parse_ttl("ttl", v)?;
            if ttl > max {
                return Err(Refusal::TtlExceedsGuardrails {
                    requested: ttl,
                    max,
                });
            }
            ttl
        }
        None => match guardrails.default_ttl.as_deref() {
            Some(v) => parse_ttl("guardrails.defaultTTL", v)?,
            None => DEFAULT_TTL,
        }
        .min(max),
    };
    if ttl < MIN_TTL {
        return Err(Refusal::TtlBelowMinimum { requested: ttl });
    }
    Ok(ttl)
}

/// Parses a Go-style duration made of hours, minutes and seconds (`1h30m`, `900s`).
pub fn parse_ttl(field: &'static str, value: &str) -> Result<Duration, Refusal> {
    let invalid = || Refusal::InvalidTtl {
        field,
        value: value.to_owned(),
    };
    if value.is_empty() || value.len() > 32 {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in value.chars() {
        if let Some(d) = c.to_digit(10) {
            number = Some(
                number
                    .unwrap_or(0)
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d)))
                    .ok_or_else(invalid)?,
            );
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(invalid()),
        };
        let n = number.take().ok_or_else(invalid)?;
        total = n
            .checked_mul(unit)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(invalid)?;
    }
    if number.is_some() {
        return Err(invalid());
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way users write TTLs: `1h30m`, `15m`, `45s`.
pub fn format_ttl(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// Replaces `{namespace}`; refuses any other `{…}` placeholder rather than sending it to STS.
pub(crate) fn expand(
    field: &'static str,
    pattern: &str,
    namespace: &str,
) -> Result<String, Refusal> {
    let expanded = pattern.replace(NAMESPACE_PLACEHOLDER, namespace);
    if expanded.contains('{') || expanded.contains('}') {
        return Err(Refusal::InvalidPattern {
            field,
            pattern: pattern.to_owned(),
            problem: "has a placeholder other than {namespace}",
        });
    }
    Ok(expanded)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ProviderRef, Scope};

    fn guardrails(yaml: &str) -> Guardrails {
        yaml_serde::from_str(yaml).unwrap()
    }

    fn apikey(yaml: &str) -> ApiKeySpec {
        yaml_serde::from_str(yaml).unwrap()
    }

    const TEAM_PREFIX: &str = r#"
allowedActions: ["s3:GetObject", "s3:PutObject"]
allowedResources: ["arn:aws:s3:::corp-data/{namespace}/*"]
defaultTTL: 30m
maxTTL: 1h
"#;

    #[test]
    fn compiles_a_scope_inside_the_guardrails() {
        let spec = apikey(
            r#"
providerRef: {name: s3}
serviceAccountNames: [uploader]
scope:
  actions: ["s3:PutObject"]
  resources: ["arn:aws:s3:::corp-data/{namespace}/invoices/2026/*"]
ttl: 15m
"#,
        );
        let compiled = compile(&spec, &guardrails(TEAM_PREFIX), "team-a").unwrap();
        assert_eq!(
            compiled.session_policy,
            r#"{"Statement":[{"Action":["s3:PutObject"],"Effect":"Allow","Resource":["arn:aws:s3:::corp-data/team-a/invoices/2026/*"]}],"Version":"2012-10-17"}"#
        );
        assert_eq!(compiled.ttl, Duration::from_secs(900));
        assert_eq!(compiled.scope_hash.len(), 64);
    }

    #[test]
    fn refuses_another_teams_prefix_naming_it() {
        let spec = apikey(
            r#"
providerRef: {name: s3}
serviceAccountNames: [uploader]
scope: {actions: ["s3:PutObject"], resources: ["arn:aws:s3:::corp-data/team-b/*"]}
"#,
        );
        let refusal = compile(&spec, &guardrails(TEAM_PREFIX), "team-a").unwrap_err();
        assert_eq!(refusal.reason(), "ScopeExceedsGuardrails");
        assert_eq!(
            refusal.to_string(),
            r#"resource "arn:aws:s3:::corp-data/team-b/*" is not within the provider's allowedResources [arn:aws:s3:::corp-data/team-a/*]"#
        );
    }

    #[test]
    fn refuses_wildcard_actions_and_lookalike_prefixes_listing_each() {
        let spec = apikey(
            r#"
providerRef: {name: s3}
serviceAccountNames: [uploader]
scope:
  actions: ["s3:*", "s3:GetObject", "s3:Get*"]
  resources: ["arn:aws:s3:::corp-data/team-a*", "arn:aws:s3:::*"]
"#,
        );
        let Refusal::ScopeExceedsGuardrails(v) =
            compile(&spec, &guardrails(TEAM_PREFIX), "team-a").unwrap_err()
        else {
            panic!("wrong refusal")
        };
        let requested: Vec<&str> = v.iter().map(|v| v.requested.as_str()).collect();
        assert_eq!(
            requested,
            [
                "s3:*",
                "s3:Get*",
                "arn:aws:s3:::corp-data/team-a*",
                "arn:aws:s3:::*"
            ]
        );
    }

    #[test]
    fn ttl_defaults_caps_and_bounds() {
        let g = guardrails(TEAM_PREFIX);
        assert_eq!(effective_ttl(None, &g), Ok(Duration::from_secs(1800)));
        assert_eq!(effective_ttl(Some("1h"), &g), Ok(Duration::from_secs(3600)));
        assert_eq!(
            effective_ttl(Some("2h"), &g),
            Err(Refusal::TtlExceedsGuardrails {
                requested: Duration::from_secs(7200),
                max: Duration::from_secs(3600)
            })
        );
        assert_eq!(
            effective_ttl(Some("2h"), &g).unwrap_err().to_string(),
            "ttl 2h exceeds the provider's maxTTL 1h; ask for at most 1h"
        );
        assert_eq!(
            effective_ttl(Some("10m"), &g).unwrap_err().reason(),
            "TTLExceedsGuardrails"
        );
        assert_eq!(
            effective_ttl(Some("1d"), &g).unwrap_err().reason(),
            "InvalidTTL"
        );
        // No guardrail TTLs: 1h default and max.
        let bare = guardrails("{allowedActions: [\"s3:*\"], allowedResources: [\"*\"]}");
        assert_eq!(effective_ttl(None, &bare), Ok(DEFAULT_TTL));
        // A default above the max is capped.
        let odd =
            guardrails("{allowedActions: [a], allowedResources: [b], defaultTTL: 2h, maxTTL: 30m}");
        assert_eq!(effective_ttl(None, &odd), Ok(Duration::from_secs(1800)));
    }

    #[test]
    fn parses_and_formats_durations() {
        for (text, secs) in [
            ("15m", 900),
            ("1h30m", 5400),
            ("900s", 900),
            ("12h", 43200),
            ("1h0m5s", 3605),
        ] {
            assert_eq!(
                parse_ttl("ttl", text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in [
            "",
            "15",
            "m",
            "1.5h",
            "-1h",
            "1hh",
            "99999999999999999999h",
            "1 h",
        ] {
            assert!(parse_ttl("ttl", bad).is_err(), "{bad}");
        }
        assert_eq!(format_ttl(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_ttl(Duration::from_secs(900)), "15m");
        assert_eq!(format_ttl(Duration::from_secs(0)), "0s");
    }

    #[test]
    fn refuses_policies_over_the_sts_limit() {
        let resources: Vec<String> = (0..40)
            .map(|i| format!("arn:aws:s3:::corp-data/team-a/folder-number-{i:03}/*"))
            .collect();
        let spec = ApiKeySpec {
            provider_ref: ProviderRef { name: "s3".into() },
            service_account_names: vec!["app".into()],
            scope: Scope {
                actions: vec!["s3:PutObject".into()],
                resources,
            },
            ttl: None,
            revoked: false,
            budget: None,
            anomalies: None,
        };
        let refusal = compile(&spec, &guardrails(TEAM_PREFIX), "team-a").unwrap_err();
        assert_eq!(refusal.reason(), "PolicyTooLarge");
        assert!(refusal.to_string().contains("at most 2048"));
    }

    #[test]
    fn refuses_unknown_placeholders() {
        let spec = apikey(
            r#"
providerRef: {name: s3}
serviceAccountNames: [uploader]
scope: {actions: ["s3:PutObject"], resources: ["arn:aws:s3:::corp-data/{team}/*"]}
"#,
        );
        let refusal = compile(&spec, &guardrails(TEAM_PREFIX), "team-a").unwrap_err();
        assert_eq!(refusal.reason(), "InvalidScope");
    }

    #[test]
    fn compiled_output_is_deterministic_whatever_the_order() {
        let a = apikey(
            "{providerRef: {name: p}, serviceAccountNames: [x], scope: {actions: [\"s3:PutObject\", \"s3:GetObject\"], resources: [\"arn:aws:s3:::corp-data/team-a/b\", \"arn:aws:s3:::corp-data/team-a/a\"]}}",
        );
        let b = apikey(
            "{providerRef: {name: p}, serviceAccountNames: [x], scope: {actions: [\"s3:GetObject\", \"s3:PutObject\", \"s3:GetObject\"], resources: [\"arn:aws:s3:::corp-data/team-a/a\", \"arn:aws:s3:::corp-data/team-a/b\"]}}",
        );
        let g = guardrails(TEAM_PREFIX);
        assert_eq!(compile(&a, &g, "team-a"), compile(&b, &g, "team-a"));
    }
}
