//! Kubernetes Events for ApiKey transitions, published without a cache.
//!
//! kube's `Recorder` keeps every event it published for six minutes to aggregate repeats into a
//! series. keybroker emits at most one event per Ready transition, so there is nothing to
//! aggregate, and that cache cost ~30 MiB at 10,000 ApiKeys (`make bench`). This publisher
//! creates one `events.k8s.io/v1` Event per call and keeps nothing.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// events.k8s.io rejects notes longer than 1 kB.
const MAX_NOTE_BYTES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Publishes Events as `reporting_controller`/`instance`.
#[derive(Clone)]
pub struct Publisher {
    client: kube::Client,
    controller: String,
    instance: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("controller", &self.controller)
            .field("instance", &self.instance)
            .finish()
    }
}

impl Publisher {
    pub fn new(client: kube::Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
        }
    }

    /// Creates an Event about `regarding` in its namespace.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let event = build(
            regarding,
            type_,
            reason,
            action,
            note,
            &self.controller,
            &self.instance,
            Timestamp::now(),
        );
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        Api::<Event>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &event)
            .await
            .map(drop)
    }
}

#[allow(clippy::too_many_arguments)]
fn build(
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
    controller: &str,
    instance: &str,
    now: Timestamp,
) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or(controller),
                now.as_nanosecond()
            )),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(match type_ {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        reason: Some(reason.to_owned()),
        action: Some(action.to_owned()),
        note: Some(truncate(note, MAX_NOTE_BYTES)),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(controller.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        ..Event::default()
    }
}

/// `s` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_to_the_api_limit_on_a_char_boundary() {
        assert_eq!(truncate("short", 1024), "short");
        let long = "é".repeat(800); // 1,600 bytes
        let cut = truncate(&long, MAX_NOTE_BYTES);
        assert!(cut.len() <= MAX_NOTE_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn events_name_the_object_and_reporter() {
        let regarding = ObjectReference {
            kind: Some("ApiKey".into()),
            name: Some("uploader".into()),
            namespace: Some("team-a".into()),
            ..ObjectReference::default()
        };
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let ev = build(
            &regarding,
            EventType::Warning,
            "ScopeExceedsGuardrails",
            "Compile",
            "why",
            "keybroker-controller",
            "pod-1",
            now,
        );
        assert_eq!(ev.metadata.namespace.as_deref(), Some("team-a"));
        assert!(ev.metadata.name.unwrap().starts_with("uploader."));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.reporting_instance.as_deref(), Some("pod-1"));
    }
}
