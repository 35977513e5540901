//! The gateway's policy compiler: (ApiKey spec, guardrails, namespace) → the methods and paths
//! the gateway forwards, the request-size limit and the budget. Pure, like the aws compiler,
//! and with the same sound subset check: an ApiKey's pattern must lie entirely within one of
//! the guardrails' (`/repos/*` is not within `/repos/team-a/*`).

use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::crd::{ApiKeySpec, Guardrails};
use crate::pattern::Pattern;
use crate::policy::{Compiled, Refusal, ScopeKind, Violation, effective_ttl, expand, hex};

/// Defaults when the provider's guardrails leave them out.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1 << 20;
pub const DEFAULT_MAX_REQUESTS_PER_MINUTE: u32 = 600;
pub const DEFAULT_MAX_REQUESTS_PER_DAY: u64 = 100_000;

/// The HTTP methods a gateway ApiKey may name (and patterns over them).
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// What the gateway enforces for one ApiKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayScope {
    methods: Vec<Pattern>,
    paths: Vec<Pattern>,
    pub max_request_bytes: u64,
    pub requests_per_minute: u32,
    pub requests_per_day: u64,
    pub session_ttl: Duration,
}

impl GatewayScope {
    /// Whether `method` on the normalized `path` is within the ApiKey's scope.
    pub fn allows(&self, method: &str, path: &str) -> bool {
        self.methods.iter().any(|m| m.matches(method, false))
            && self.paths.iter().any(|p| p.matches(path, false))
    }
}

/// Compiles a gateway ApiKey.
pub fn compile(
    spec: &ApiKeySpec,
    guardrails: &Guardrails,
    namespace: &str,
) -> Result<(Compiled, GatewayScope), Refusal> {
    let ttl = effective_ttl(spec.ttl.as_deref(), guardrails)?;
    for action in &spec.scope.actions {
        let known = METHODS
            .iter()
            .any(|m| Pattern::new(action, false).matches(m, false));
        if action.contains(':') || !known {
            return Err(Refusal::InvalidPattern {
                field: "scope.actions",
                pattern: action.clone(),
                problem: "is not an HTTP method: use GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS, or * for all (IAM actions are for aws providers)",
            });
        }
    }
    for resource in &spec.scope.resources {
        if !resource.starts_with('/') {
            return Err(Refusal::InvalidPattern {
                field: "scope.resources",
                pattern: resource.clone(),
                problem: "is not a URL path: start it with /, e.g. /api/v1/repos/{namespace}/*",
            });
        }
    }
    let allowed_methods: Vec<Pattern> = guardrails
        .allowed_actions
        .iter()
        .map(|a| Pattern::new(a, false))
        .collect();
    let allowed_paths = guardrails
        .allowed_resources
        .iter()
        .map(|r| expand("allowedResources", r, namespace).map(|r| Pattern::new(&r, false)))
        .collect::<Result<Vec<_>, _>>()?;

    let mut violations = Vec::new();
    let mut methods = Vec::new();
    for action in &spec.scope.actions {
        let requested = Pattern::new(action, false);
        if !allowed_methods.iter().any(|a| a.contains(&requested)) {
            violations.push(Violation {
                kind: ScopeKind::Action,
                requested: action.clone(),
                allowed: guardrails.allowed_actions.clone(),
            });
        }
        methods.push(action.clone());
    }
    let mut paths = Vec::new();
    for resource in &spec.scope.resources {
        let expanded = expand("scope.resources", resource, namespace)?;
        if !allowed_paths
            .iter()
            .any(|a| a.contains(&Pattern::new(&expanded, false)))
        {
            violations.push(Violation {
                kind: ScopeKind::Resource,
                requested: expanded.clone(),
                allowed: allowed_paths
                    .iter()
                    .map(|p| p.as_str().to_owned())
                    .collect(),
            });
        }
        paths.push(expanded);
    }
    if !violations.is_empty() {
        return Err(Refusal::ScopeExceedsGuardrails(violations));
    }
    methods.sort();
    methods.dedup();
    paths.sort();
    paths.dedup();

    let max_per_minute = guardrails
        .max_requests_per_minute
        .unwrap_or(DEFAULT_MAX_REQUESTS_PER_MINUTE);
    let max_per_day = guardrails
        .max_requests_per_day
        .unwrap_or(DEFAULT_MAX_REQUESTS_PER_DAY);
    let budget = spec.budget.as_ref();
    let per_minute = budget
        .and_then(|b| b.requests_per_minute)
        .unwrap_or(max_per_minute);
    let per_day = budget
        .and_then(|b| b.requests_per_day)
        .unwrap_or(max_per_day);
    if per_minute > max_per_minute {
        return Err(Refusal::BudgetExceedsGuardrails {
            field: "budget.requestsPerMinute",
            guardrail: "maxRequestsPerMinute",
            requested: u64::from(per_minute),
            max: u64::from(max_per_minute),
        });
    }
    if per_day > max_per_day {
        return Err(Refusal::BudgetExceedsGuardrails {
            field: "budget.requestsPerDay",
            guardrail: "maxRequestsPerDay",
            requested: per_day,
            max: max_per_day,
        });
    }
    let max_request_bytes = guardrails
        .max_request_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_BYTES);

    let policy = json!({
        "methods": methods,
        "paths": paths,
        "maxRequestBytes": max_request_bytes,
        "requestsPerMinute": per_minute,
        "requestsPerDay": per_day,
    })
    .to_string();
    let scope_hash = hex(&Sha256::digest(policy.as_bytes()));
    let scope = GatewayScope {
        methods: methods.iter().map(|m| Pattern::new(m, false)).collect(),
        paths: paths.iter().map(|p| Pattern::new(p, false)).collect(),
        max_request_bytes,
        requests_per_minute: per_minute,
        requests_per_day: per_day,
        session_ttl: ttl,
    };
    Ok((
        Compiled {
            session_policy: policy,
            scope_hash,
            ttl,
        },
        scope,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guardrails() -> Guardrails {
        yaml_serde::from_str(
            r#"
allowedActions: [GET, HEAD, POST]
allowedResources: ["/api/v1/repos/{namespace}/*"]
maxRequestsPerMinute: 100
maxRequestsPerDay: 1000
"#,
        )
        .unwrap()
    }

    fn spec(yaml: &str) -> ApiKeySpec {
        yaml_serde::from_str(yaml).unwrap()
    }

    const READER: &str = r#"
providerRef: {name: gitea}
serviceAccountNames: [reader]
scope: {actions: [GET], resources: ["/api/v1/repos/{namespace}/docs/*"]}
budget: {requestsPerMinute: 10}
"#;

    #[test]
    fn a_reader_gets_its_methods_paths_and_budget() {
        let (compiled, scope) = compile(&spec(READER), &guardrails(), "team-a").unwrap();
        assert!(scope.allows("GET", "/api/v1/repos/team-a/docs/raw/README.md"));
        assert!(!scope.allows("POST", "/api/v1/repos/team-a/docs/raw/README.md"));
        assert!(!scope.allows("GET", "/api/v1/repos/team-b/docs/raw/README.md"));
        assert!(!scope.allows("get", "/api/v1/repos/team-a/docs/x"));
        assert_eq!(scope.requests_per_minute, 10);
        assert_eq!(
            scope.requests_per_day, 1000,
            "the provider's cap by default"
        );
        assert_eq!(scope.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert!(
            compiled
                .session_policy
                .contains("/api/v1/repos/team-a/docs/*")
        );
    }

    #[test]
    fn refusals_say_what_to_change() {
        let wide = spec(
            r#"
providerRef: {name: gitea}
serviceAccountNames: [reader]
scope: {actions: [GET, DELETE], resources: ["/api/v1/repos/*"]}
"#,
        );
        let e = compile(&wide, &guardrails(), "team-a").unwrap_err();
        let text = e.to_string();
        assert_eq!(e.reason(), "ScopeExceedsGuardrails");
        assert!(
            text.contains("\"DELETE\"") && text.contains("/api/v1/repos/team-a/*"),
            "{text}"
        );

        let iam = spec(
            r#"
providerRef: {name: gitea}
serviceAccountNames: [reader]
scope: {actions: ["s3:GetObject"], resources: ["/x"]}
"#,
        );
        assert!(
            compile(&iam, &guardrails(), "team-a")
                .unwrap_err()
                .to_string()
                .contains("not an HTTP method")
        );

        let arn = spec(
            r#"
providerRef: {name: gitea}
serviceAccountNames: [reader]
scope: {actions: [GET], resources: ["arn:aws:s3:::x"]}
"#,
        );
        assert!(
            compile(&arn, &guardrails(), "team-a")
                .unwrap_err()
                .to_string()
                .contains("start it with /")
        );

        let greedy = spec(
            r#"
providerRef: {name: gitea}
serviceAccountNames: [reader]
scope: {actions: [GET], resources: ["/api/v1/repos/{namespace}/x"]}
budget: {requestsPerDay: 5000}
"#,
        );
        let e = compile(&greedy, &guardrails(), "team-a").unwrap_err();
        assert_eq!(e.reason(), "BudgetExceedsGuardrails");
        assert!(e.to_string().contains("at most 1000"), "{e}");
    }
}
