//! `kubectl keybroker audit`: the broker's and controller's audit records (log target
//! `keybroker::audit`, JSON lines) from the operator's logs, filtered by ApiKey and time.

use serde::Serialize;
use serde_json::{Map, Value};

use super::status::columns;

/// The log target every audit record is written to.
pub const TARGET: &str = "keybroker::audit";

/// One audit record: its time and its fields (message, outcome, api_key, ...).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Record {
    pub timestamp: String,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Record {
    fn field(&self, name: &str) -> String {
        match self.fields.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        }
    }
}

/// The audit records among `log` lines (JSON, as `--log-format=json` writes them; other lines
/// are skipped) of `namespace` and naming `api_key` if given, at or after `since` (RFC 3339) if
/// given.
pub fn records(
    log: &str,
    namespace: Option<&str>,
    api_key: Option<&str>,
    since: Option<&str>,
) -> Vec<Record> {
    let since = since.and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok());
    log.lines()
        .filter(|line| line.contains(TARGET))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v.get("target").and_then(Value::as_str) == Some(TARGET))
        .filter_map(|v| {
            let timestamp = v.get("timestamp")?.as_str()?.to_owned();
            let fields = v.get("fields")?.as_object()?.clone();
            Some(Record { timestamp, fields })
        })
        .filter(|r| namespace.is_none_or(|ns| r.field("namespace") == ns))
        .filter(|r| api_key.is_none_or(|k| r.field("api_key") == k))
        .filter(|r| {
            since.is_none_or(|since| {
                r.timestamp
                    .parse::<k8s_openapi::jiff::Timestamp>()
                    .is_ok_and(|t| t >= since)
            })
        })
        .collect()
}

/// The records as a table, oldest first.
pub fn table(records: &[Record]) -> String {
    let mut lines = vec![
        [
            "TIME",
            "OUTCOME",
            "NAMESPACE",
            "APIKEY",
            "POD",
            "REASON",
            "EVENT",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in records {
        let reason = match r.field("reason") {
            reason if reason.is_empty() => r.field("result"),
            reason => reason,
        };
        lines.push(vec![
            r.timestamp.clone(),
            r.field("outcome"),
            r.field("namespace"),
            r.field("api_key"),
            r.field("pod"),
            reason,
            r.field("message"),
        ]);
    }
    columns(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"timestamp":"2026-12-03T10:00:00.000Z","level":"INFO","fields":{"message":"credentials issued","outcome":"issued","api_key":"uploader","namespace":"team-a","pod":"app-1"},"target":"keybroker::audit"}
{"timestamp":"2026-12-03T10:00:01.000Z","level":"INFO","fields":{"message":"KeyProvider verified"},"target":"keybroker_operator::controller"}
not json, a panic message or a kubelet line
{"timestamp":"2026-12-03T10:05:00.000Z","level":"INFO","fields":{"message":"exchange refused","outcome":"refused","reason":"ApiKeyRevoked","api_key":"uploader","namespace":"team-a","pod":"app-1"},"target":"keybroker::audit"}
{"timestamp":"2026-12-03T10:06:00.000Z","level":"INFO","fields":{"message":"credentials issued","outcome":"issued","api_key":"reports","namespace":"team-a","pod":"app-2"},"target":"keybroker::audit"}
"#;

    #[test]
    fn records_are_the_audit_lines_by_apikey_and_time() {
        let all = records(LOG, None, None, None);
        assert_eq!(all.len(), 3);
        assert_eq!(records(LOG, Some("team-b"), None, None).len(), 0);
        let uploader = records(LOG, Some("team-a"), Some("uploader"), None);
        assert_eq!(uploader.len(), 2);
        assert_eq!(uploader[1].field("reason"), "ApiKeyRevoked");
        let recent = records(LOG, None, Some("uploader"), Some("2026-12-03T10:01:00Z"));
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].field("outcome"), "refused");
        let table = table(&recent);
        assert!(table.starts_with("TIME"), "{table}");
        assert!(
            table.contains("refused") && table.contains("ApiKeyRevoked"),
            "{table}"
        );
        let json = serde_json::to_value(&recent[0]).unwrap();
        assert_eq!(json["api_key"], "uploader");
        assert_eq!(json["timestamp"], "2026-12-03T10:05:00.000Z");
    }
}
