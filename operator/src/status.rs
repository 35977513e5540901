//! Pure status logic: what an ApiKey's status should be, and the `Ready` condition's
//! transition rules (lastTransitionTime moves only when the status flips).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::{Selector, SelectorExt};

use crate::crd::{ApiKey, ApiKeyStatus, KeyProvider};
use crate::policy::{self, Compiled};

pub const READY: &str = "Ready";

/// The controller's judgement of an ApiKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready(Compiled),
    NotReady {
        reason: &'static str,
        message: String,
    },
}

impl Verdict {
    fn not_ready(reason: &'static str, message: String) -> Self {
        Verdict::NotReady { reason, message }
    }
}

/// Judges `key` against its provider (if it exists) and its namespace's labels.
pub fn evaluate(
    key: &ApiKey,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    provider: Option<&KeyProvider>,
) -> Verdict {
    let provider_name = &key.spec.provider_ref.name;
    if key.spec.revoked {
        return Verdict::not_ready(
            "Revoked",
            "spec.revoked is true: no credentials are issued; set it to false to issue again"
                .into(),
        );
    }
    let Some(provider) = provider else {
        return Verdict::not_ready(
            "ProviderNotFound",
            format!(
                "KeyProvider {provider_name:?} does not exist; `kubectl get keyproviders` lists those you can use"
            ),
        );
    };
    let selector = match Selector::try_from(provider.spec.namespace_selector.clone()) {
        Ok(selector) => selector,
        Err(e) => {
            return Verdict::not_ready(
                "ProviderInvalid",
                format!(
                    "KeyProvider {provider_name:?} has an invalid namespaceSelector ({e}); ask its owner to fix it"
                ),
            );
        }
    };
    if !selector.matches(namespace_labels) {
        return Verdict::not_ready(
            "NamespaceNotAllowed",
            format!(
                "KeyProvider {provider_name:?} does not serve namespace {namespace:?} (its namespaceSelector does not match the namespace's labels); use another provider or ask the platform team to select this namespace"
            ),
        );
    }
    match crate::providers::compile(&key.spec, provider, namespace) {
        Ok(compiled) => Verdict::Ready(compiled),
        Err(refusal) => Verdict::not_ready(refusal.reason(), refusal.to_string()),
    }
}

/// The status to write for `verdict`, keeping `current`'s lastTransitionTime when the Ready
/// status did not flip, so that an unchanged verdict yields an identical status (and no write).
/// `usage` is `current`'s: the reconciler never writes it (see `controller::usage`).
pub fn desired_status(
    current: Option<&ApiKeyStatus>,
    verdict: &Verdict,
    grant: Option<String>,
    generation: Option<i64>,
    now: Time,
) -> ApiKeyStatus {
    let (status, reason, message) = match verdict {
        Verdict::Ready(c) => (
            "True",
            "Compiled",
            format!(
                "credentials can be issued: session policy {}…, TTL {}",
                &c.scope_hash[..12],
                policy::format_ttl(c.ttl)
            ),
        ),
        Verdict::NotReady { reason, message } => ("False", *reason, message.clone()),
    };
    let ready = ready_transition(
        current.map(|s| s.conditions.as_slice()).unwrap_or_default(),
        status,
        reason,
        message,
        generation,
        now,
    );
    let compiled = match verdict {
        Verdict::Ready(c) => Some(c),
        Verdict::NotReady { .. } => None,
    };
    ApiKeyStatus {
        conditions: vec![ready],
        observed_generation: generation,
        session_policy: compiled.map(|c| c.session_policy.clone()),
        scope_hash: compiled.map(|c| c.scope_hash.clone()),
        effective_ttl: compiled.map(|c| policy::format_ttl(c.ttl)),
        grant,
        // Written by the usage loop under a field manager of its own; kept so that it does not
        // count as a change here.
        usage: current.and_then(|s| s.usage.clone()),
    }
}

/// The new Ready condition; lastTransitionTime is `now` only when the status flips (or there
/// was none), so re-judging an unchanged object yields an identical condition.
pub fn ready_transition(
    previous: &[Condition],
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    let last_transition_time = match previous.iter().find(|c| c.type_ == READY) {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The Ready condition of a status, if any.
pub fn ready_condition(status: Option<&ApiKeyStatus>) -> Option<&Condition> {
    status.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(yaml: &str) -> KeyProvider {
        yaml_serde::from_str(yaml).unwrap()
    }

    fn apikey(yaml: &str) -> ApiKey {
        yaml_serde::from_str(yaml).unwrap()
    }

    const PROVIDER: &str = r#"
apiVersion: keybroker.dev/v1alpha1
kind: KeyProvider
metadata: {name: s3}
spec:
  aws: {roleArn: "arn:aws:iam::000000000000:role/uploads", region: us-east-1}
  namespaceSelector: {matchLabels: {keybroker.dev/tenant: "true"}}
  guardrails:
    allowedActions: ["s3:GetObject", "s3:PutObject"]
    allowedResources: ["arn:aws:s3:::corp-data/{namespace}/*"]
    maxTTL: 1h
"#;

    const KEY: &str = r#"
apiVersion: keybroker.dev/v1alpha1
kind: ApiKey
metadata: {name: uploader, namespace: team-a, generation: 3}
spec:
  providerRef: {name: s3}
  serviceAccountNames: [uploader]
  scope: {actions: ["s3:PutObject"], resources: ["arn:aws:s3:::corp-data/team-a/invoices/*"]}
  ttl: 15m
"#;

    fn tenant() -> BTreeMap<String, String> {
        [("keybroker.dev/tenant".to_owned(), "true".to_owned())].into()
    }

    fn reason(v: &Verdict) -> &'static str {
        match v {
            Verdict::Ready(_) => "Ready",
            Verdict::NotReady { reason, .. } => reason,
        }
    }

    #[test]
    fn a_key_within_guardrails_in_a_selected_namespace_is_ready() {
        let v = evaluate(&apikey(KEY), "team-a", &tenant(), Some(&provider(PROVIDER)));
        let Verdict::Ready(c) = v else {
            panic!("{v:?}")
        };
        assert!(c.session_policy.contains("corp-data/team-a/invoices/*"));
    }

    #[test]
    fn each_problem_has_its_own_reason() {
        let p = provider(PROVIDER);
        let key = apikey(KEY);
        assert_eq!(
            reason(&evaluate(&key, "team-a", &tenant(), None)),
            "ProviderNotFound"
        );
        assert_eq!(
            reason(&evaluate(&key, "team-a", &BTreeMap::new(), Some(&p))),
            "NamespaceNotAllowed"
        );
        let mut revoked = key.clone();
        revoked.spec.revoked = true;
        assert_eq!(
            reason(&evaluate(&revoked, "team-a", &tenant(), Some(&p))),
            "Revoked"
        );
        let mut wide = key.clone();
        wide.spec.scope.actions = vec!["s3:*".into()];
        let v = evaluate(&wide, "team-a", &tenant(), Some(&p));
        let Verdict::NotReady {
            reason: why,
            message,
        } = v
        else {
            panic!()
        };
        assert_eq!(why, "ScopeExceedsGuardrails");
        assert!(message.contains("\"s3:*\""), "{message}");
        let mut long = key;
        long.spec.ttl = Some("2h".into());
        assert_eq!(
            reason(&evaluate(&long, "team-a", &tenant(), Some(&p))),
            "TTLExceedsGuardrails"
        );
    }

    #[test]
    fn unchanged_verdicts_give_identical_statuses_and_flips_move_the_transition_time() {
        let key = apikey(KEY);
        let p = provider(PROVIDER);
        let at = |s| Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap());
        let t0 = at(1_700_000_000);
        let t1 = at(1_700_000_600);
        let v = evaluate(&key, "team-a", &tenant(), Some(&p));
        let first = desired_status(None, &v, Some("g1".into()), Some(3), t0);
        assert_eq!(first.observed_generation, Some(3));
        assert_eq!(first.effective_ttl.as_deref(), Some("15m"));
        // Same verdict later: byte-identical status, so the controller writes nothing.
        assert_eq!(
            desired_status(Some(&first), &v, Some("g1".into()), Some(3), t1.clone()),
            first
        );
        // Flip to not ready: new transition time, compiled fields cleared.
        let refused = evaluate(&key, "team-a", &BTreeMap::new(), Some(&p));
        let second = desired_status(Some(&first), &refused, None, Some(3), t1.clone());
        let ready = ready_condition(Some(&second)).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time.clone()),
            ("False", t1)
        );
        assert_eq!(second.session_policy, None);
        assert_eq!(first.grant.as_deref(), Some("g1"));
        assert_eq!(
            second.grant, None,
            "a key that is not Ready records no grant"
        );
        // A different refusal while still False keeps the time of the flip.
        let later = at(1_700_001_000);
        let third = desired_status(
            Some(&second),
            &evaluate(&key, "team-a", &tenant(), None),
            None,
            Some(3),
            later,
        );
        assert_eq!(
            ready_condition(Some(&third)).unwrap().last_transition_time,
            ready.last_transition_time
        );
        assert_eq!(
            ready_condition(Some(&third)).unwrap().reason,
            "ProviderNotFound"
        );
    }
}
