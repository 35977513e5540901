//! The JSON patch writer: RFC 6902 `add` operations written straight into JSON text.

use serde_json::Value;

/// Writes RFC 6902 `add` operations straight into JSON text, without building a tree first.
#[derive(Default)]
pub(super) struct PatchWriter {
    out: Vec<u8>,
}

#[derive(serde::Serialize)]
struct AddOp<'a, T: serde::Serialize + ?Sized> {
    op: &'static str,
    path: &'a str,
    value: &'a T,
}

impl PatchWriter {
    pub(super) fn add<T: serde::Serialize + ?Sized>(&mut self, path: &str, value: &T) {
        self.out.push(if self.out.is_empty() { b'[' } else { b',' });
        // Writing these types (string keys only) into memory cannot fail.
        let _ = serde_json::to_writer(
            &mut self.out,
            &AddOp {
                op: "add",
                path,
                value,
            },
        );
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        if self.out.is_empty() {
            self.out.push(b'[');
        }
        self.out.push(b']');
        self.out
    }
}

/// Escapes one JSON-pointer token (RFC 6901).
pub(super) fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> Value {
    // Serializing k8s-openapi types into a Value cannot fail (string keys, no non-finite floats).
    serde_json::to_value(value).unwrap_or(Value::Null)
}
