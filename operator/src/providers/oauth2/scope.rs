//! The oauth2 compiler: (ApiKey spec, guardrails, namespace) → the exact audiences and scopes
//! every token of the ApiKey is narrowed to. Pure, like the other kinds' compilers. A token
//! names concrete scopes and audiences, so the ApiKey's must be exact (no wildcards); the
//! guardrails' may be patterns, with `{namespace}` expanded.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crd::{ApiKeySpec, Guardrails};
use crate::pattern::Pattern;
use crate::policy::{Compiled, Refusal, ScopeKind, Violation, effective_ttl, expand, hex};

/// What every token of an ApiKey carries: the compiled session policy (its JSON is the
/// ApiKey's `status.sessionPolicy` and the grant's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Narrowed {
    pub audiences: Vec<String>,
    pub scopes: Vec<String>,
}

impl Narrowed {
    /// The narrowed rights recorded in a grant's session policy.
    pub fn from_policy(policy: &str) -> Option<Self> {
        serde_json::from_str(policy).ok()
    }
}

/// A scope or audience as a token carries it: printable, no space (scopes are
/// space-separated in OAuth2), no wildcard.
fn exact(field: &'static str, value: &str) -> Result<(), Refusal> {
    if value.contains(['*', '?']) {
        return Err(Refusal::InvalidPattern {
            field,
            pattern: value.to_owned(),
            problem: "has a wildcard: an oauth2 token names exact scopes and audiences, so list each one",
        });
    }
    if value.is_empty()
        || !value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(Refusal::InvalidPattern {
            field,
            pattern: value.to_owned(),
            problem: "is not a scope or audience: use printable characters without spaces, quotes or backslashes",
        });
    }
    Ok(())
}

/// Compiles an oauth2 ApiKey.
pub fn compile(
    spec: &ApiKeySpec,
    guardrails: &Guardrails,
    namespace: &str,
) -> Result<(Compiled, Narrowed), Refusal> {
    let ttl = effective_ttl(spec.ttl.as_deref(), guardrails)?;
    let patterns = |field: &'static str, list: &[String]| {
        list.iter()
            .map(|p| expand(field, p, namespace).map(|p| Pattern::new(&p, false)))
            .collect::<Result<Vec<_>, _>>()
    };
    let allowed_scopes = patterns("allowedActions", &guardrails.allowed_actions)?;
    let allowed_audiences = patterns("allowedResources", &guardrails.allowed_resources)?;

    let mut violations = Vec::new();
    let mut within = |kind, field, requested: &[String], allowed: &[Pattern]| {
        let mut names = Vec::new();
        for value in requested {
            let value = expand(field, value, namespace)?;
            exact(field, &value)?;
            if !allowed.iter().any(|a| a.matches(&value, false)) {
                violations.push(Violation {
                    kind,
                    requested: value.clone(),
                    allowed: allowed.iter().map(|p| p.as_str().to_owned()).collect(),
                });
            }
            names.push(value);
        }
        names.sort();
        names.dedup();
        Ok::<_, Refusal>(names)
    };
    let scopes = within(
        ScopeKind::Scope,
        "scope.actions",
        &spec.scope.actions,
        &allowed_scopes,
    )?;
    let audiences = within(
        ScopeKind::Audience,
        "scope.resources",
        &spec.scope.resources,
        &allowed_audiences,
    )?;
    if !violations.is_empty() {
        return Err(Refusal::ScopeExceedsGuardrails(violations));
    }
    let narrowed = Narrowed { audiences, scopes };
    let session_policy = serde_json::to_string(&narrowed).unwrap_or_default();
    let scope_hash = hex(&Sha256::digest(session_policy.as_bytes()));
    Ok((
        Compiled {
            session_policy,
            scope_hash,
            ttl,
        },
        narrowed,
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn guardrails() -> Guardrails {
        yaml_serde::from_str(
            r#"
allowedActions: ["reports:read", "reports:write", "{namespace}:*"]
allowedResources: ["reports-api", "{namespace}-api"]
maxTTL: 30m
"#,
        )
        .unwrap()
    }

    fn spec(yaml: &str) -> ApiKeySpec {
        yaml_serde::from_str(yaml).unwrap()
    }

    const READER: &str = r#"
providerRef: {name: keycloak}
serviceAccountNames: [reporter]
scope:
  actions: ["reports:read", "{namespace}:export", "reports:read"]
  resources: ["reports-api", "{namespace}-api"]
"#;

    #[test]
    fn an_apikey_compiles_to_exact_sorted_audiences_and_scopes() {
        let (compiled, narrowed) = compile(&spec(READER), &guardrails(), "team-a").unwrap();
        assert_eq!(narrowed.scopes, ["reports:read", "team-a:export"]);
        assert_eq!(narrowed.audiences, ["reports-api", "team-a-api"]);
        assert_eq!(
            compiled.session_policy,
            r#"{"audiences":["reports-api","team-a-api"],"scopes":["reports:read","team-a:export"]}"#
        );
        assert_eq!(
            Narrowed::from_policy(&compiled.session_policy),
            Some(narrowed)
        );
        assert_eq!(compiled.ttl, Duration::from_secs(30 * 60));
        assert_eq!(compiled.scope_hash.len(), 64);
    }

    #[test]
    fn scopes_and_audiences_outside_the_guardrails_are_named() {
        let wider = spec(
            r#"
providerRef: {name: keycloak}
serviceAccountNames: [reporter]
scope:
  actions: ["billing:read", "reports:read"]
  resources: ["team-b-api"]
"#,
        );
        let refusal = compile(&wider, &guardrails(), "team-a").unwrap_err();
        assert_eq!(refusal.reason(), "ScopeExceedsGuardrails");
        let message = refusal.to_string();
        assert!(
            message.contains(r#"scope "billing:read" is not within the provider's allowedActions"#),
            "{message}"
        );
        assert!(
            message.contains(r#"audience "team-b-api" is not within the provider's allowedResources [reports-api, team-a-api]"#),
            "{message}"
        );
        assert!(!message.contains("reports:read\" is not"), "{message}");
    }

    #[test]
    fn wildcards_and_odd_characters_are_refused_with_what_to_change() {
        for (actions, resources, needle) in [
            (r#"["reports:*"]"#, r#"["reports-api"]"#, "list each one"),
            (r#"["reports:read"]"#, r#"["reports-*"]"#, "list each one"),
            (
                r#"["reports:read"]"#,
                r#"["reports api"]"#,
                "without spaces",
            ),
        ] {
            let yaml = format!(
                "providerRef: {{name: keycloak}}\nserviceAccountNames: [r]\nscope: {{actions: {actions}, resources: {resources}}}\n"
            );
            let refusal = compile(&spec(&yaml), &guardrails(), "team-a").unwrap_err();
            assert_eq!(refusal.reason(), "InvalidScope", "{yaml}");
            assert!(refusal.to_string().contains(needle), "{refusal}");
        }
    }

    #[test]
    fn a_ttl_above_the_guardrail_is_refused() {
        let long = spec(&format!("{READER}ttl: 1h\n"));
        let refusal = compile(&long, &guardrails(), "team-a").unwrap_err();
        assert_eq!(refusal.reason(), "TTLExceedsGuardrails");
    }
}
