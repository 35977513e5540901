//! The pure parts of forwarding a call: which paths are acceptable, which headers cross the
//! gateway in each direction, and redacting the upstream's key from what comes back. No I/O,
//! so every rule is tested on its own and fuzzable.

use hyper::HeaderMap;
use hyper::body::Bytes;
use hyper::header::{self, HeaderName};

/// Longest path (with its query) the gateway forwards.
pub const MAX_PATH_BYTES: usize = 2048;
/// What replaces the key wherever the upstream echoes it.
pub const REDACTED: &[u8] = b"[redacted by keybroker]";

/// Why a path is refused before it reaches the scope check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    #[error("the path must start with / and be at most {MAX_PATH_BYTES} bytes")]
    Shape,
    #[error(
        "the path holds an empty segment (//), a . or .. segment, a backslash or a control character; send the canonical path"
    )]
    NotCanonical,
    #[error(
        "the path holds an encoded /, \\, . or NUL (%2F, %5C, %2E, %00); send the path unencoded"
    )]
    EncodedSeparator,
}

/// Checks that `path` (without the query) is canonical, so that what the scope check sees is
/// what the upstream resolves: no `//`, no `.`/`..` segments, no backslashes, no control
/// characters, and none of `/`, `\`, `.` or NUL percent-encoded (upstreams differ in whether
/// they decode those before routing; the gateway refuses rather than guesses).
pub fn check_path(path: &str) -> Result<(), PathRefusal> {
    if !path.starts_with('/') || path.len() > MAX_PATH_BYTES {
        return Err(PathRefusal::Shape);
    }
    if path
        .bytes()
        .any(|b| b == b'\\' || b.is_ascii_control() || b == b'#' || b >= 0x80)
    {
        return Err(PathRefusal::NotCanonical);
    }
    let lower = path.to_ascii_lowercase();
    if ["%2f", "%5c", "%2e", "%00", "%25"]
        .iter()
        .any(|e| lower.contains(e))
    {
        return Err(PathRefusal::EncodedSeparator);
    }
    // Every segment after the leading slash: non-empty (a trailing slash is allowed) and not
    // a dot segment.
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if (segment.is_empty() && !last) || *segment == "." || *segment == ".." {
            return Err(PathRefusal::NotCanonical);
        }
    }
    Ok(())
}

/// Headers that belong to one connection, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers named in `Connection`, plus the fixed hop-by-hop ones.
fn connection_scoped(headers: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = HOP_BY_HOP.iter().map(|h| (*h).to_owned()).collect();
    for value in headers.get_all(header::CONNECTION) {
        if let Ok(value) = value.to_str() {
            names.extend(value.split(',').map(|n| n.trim().to_ascii_lowercase()));
        }
    }
    names
}

/// The app's request headers the upstream may see: not hop-by-hop, not the app's own
/// credentials (`Authorization`, `Cookie`, the header the key goes in), not `Host` (the
/// upstream's is set) and not the session the sidecar added.
pub fn request_headers(from: &HeaderMap, key_header: Option<&HeaderName>) -> HeaderMap {
    let scoped = connection_scoped(from);
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        let dropped = scoped.iter().any(|s| s == name.as_str())
            || name == header::AUTHORIZATION
            || name == header::COOKIE
            || name == header::HOST
            || key_header.is_some_and(|k| k == name);
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The upstream's response headers the app may see: not hop-by-hop, and with every value that
/// holds one of `keys` replaced by [`REDACTED`].
pub fn response_headers(from: &HeaderMap, keys: &[&str]) -> HeaderMap {
    let scoped = connection_scoped(from);
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if scoped.iter().any(|s| s == name.as_str()) {
            continue;
        }
        let leaks = keys
            .iter()
            .any(|k| !k.is_empty() && contains(value.as_bytes(), k.as_bytes()));
        if leaks {
            out.append(
                name.clone(),
                header::HeaderValue::from_static("[redacted by keybroker]"),
            );
        } else {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.len() <= haystack.len() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The app's query with any parameter named `name` removed (the key's parameter is the
/// gateway's to set), then `name=key` appended.
pub fn query_with_key(query: Option<&str>, name: &str, key: &str) -> String {
    let mut out = String::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let param = pair.split_once('=').map_or(pair, |(k, _)| k);
        if param == name {
            continue;
        }
        out.push_str(pair);
        out.push('&');
    }
    out.extend(form_urlencoded::byte_serialize(name.as_bytes()));
    out.push('=');
    out.extend(form_urlencoded::byte_serialize(key.as_bytes()));
    out
}

/// Replaces every occurrence of the keys in a body that arrives in chunks, holding back only
/// the bytes that could be the start of a key split across two chunks.
#[derive(Clone)]
pub struct Redactor {
    needles: Vec<Vec<u8>>,
    carry: Vec<u8>,
    /// Occurrences replaced so far.
    pub redacted: u64,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("redacted", &self.redacted)
            .finish_non_exhaustive()
    }
}

impl Redactor {
    pub fn new(keys: &[&str]) -> Self {
        Self {
            needles: keys
                .iter()
                .filter(|k| !k.is_empty())
                .map(|k| k.as_bytes().to_vec())
                .collect(),
            carry: Vec::new(),
            redacted: 0,
        }
    }

    /// The bytes of `chunk` (after what was held back) that can be released now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.needles.is_empty() {
            return Bytes::copy_from_slice(chunk);
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        self.scan(buf, false)
    }

    /// What is still held back, at the end of the body.
    pub fn finish(&mut self) -> Bytes {
        let buf = std::mem::take(&mut self.carry);
        self.scan(buf, true)
    }

    fn scan(&mut self, buf: Vec<u8>, last: bool) -> Bytes {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'outer: while i < buf.len() {
            for needle in &self.needles {
                if buf[i..].starts_with(needle) {
                    out.extend_from_slice(REDACTED);
                    self.redacted += 1;
                    i += needle.len();
                    continue 'outer;
                }
            }
            if !last
                && self
                    .needles
                    .iter()
                    .any(|n| n.len() > buf.len() - i && n.starts_with(&buf[i..]))
            {
                break;
            }
            out.push(buf[i]);
            i += 1;
        }
        self.carry = buf[i..].to_vec();
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn only_canonical_paths_pass() {
        for good in [
            "/",
            "/api/v1/repos/team-a/docs/raw/README.md",
            "/a/b/",
            "/a%20b",
            "/v1/chat/completions",
            "/a/.well-known/x",
            "/a/..b/c",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", PathRefusal::Shape),
            ("a/b", PathRefusal::Shape),
            ("//a", PathRefusal::NotCanonical),
            ("/a//b", PathRefusal::NotCanonical),
            ("/a/../b", PathRefusal::NotCanonical),
            ("/a/./b", PathRefusal::NotCanonical),
            ("/..", PathRefusal::NotCanonical),
            ("/a/..", PathRefusal::NotCanonical),
            ("/a\\..\\b", PathRefusal::NotCanonical),
            ("/a\tb", PathRefusal::NotCanonical),
            ("/a/%2e%2e/b", PathRefusal::EncodedSeparator),
            ("/a%2Fb", PathRefusal::EncodedSeparator),
            ("/a%5cb", PathRefusal::EncodedSeparator),
            ("/a%00", PathRefusal::EncodedSeparator),
            ("/a%252e%252e", PathRefusal::EncodedSeparator),
        ] {
            assert_eq!(check_path(bad), Err(why), "{bad:?}");
        }
        assert_eq!(
            check_path(&format!("/{}", "a".repeat(MAX_PATH_BYTES))),
            Err(PathRefusal::Shape)
        );
    }

    #[test]
    fn the_apps_credentials_and_hop_by_hop_headers_stay_behind() {
        let mut from = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer app-own"),
            ("cookie", "session=1"),
            ("host", "127.0.0.1:9913"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-api-key", "forged"),
            ("accept", "application/json"),
            ("content-type", "text/plain"),
        ] {
            from.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let key_header = HeaderName::from_static("x-api-key");
        let out = request_headers(&from, Some(&key_header));
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept", "content-type"]);
    }

    #[test]
    fn an_echoed_key_is_redacted_in_headers() {
        let mut from = HeaderMap::new();
        from.append("x-echo", HeaderValue::from_static("token s3cr3t-key"));
        from.append("x-fine", HeaderValue::from_static("ok"));
        from.append("upgrade", HeaderValue::from_static("h2c"));
        let out = response_headers(&from, &["s3cr3t-key"]);
        assert_eq!(out["x-echo"], "[redacted by keybroker]");
        assert_eq!(out["x-fine"], "ok");
        assert!(!out.contains_key("upgrade"));
    }

    #[test]
    fn the_key_parameter_is_the_gateways() {
        assert_eq!(
            query_with_key(Some("a=1&key=forged&b=2"), "key", "k&v"),
            "a=1&b=2&key=k%26v"
        );
        assert_eq!(query_with_key(None, "key", "k"), "key=k");
    }

    #[test]
    fn a_key_split_across_chunks_is_redacted() {
        let key = "s3cr3t-key-0123";
        let body = format!("{{\"headers\":{{\"X-Api-Key\":\"{key}\"}},\"again\":\"{key}{key}\"}}");
        for split in 1..body.len() {
            for step in [1, 3, split] {
                let mut r = Redactor::new(&[key, "old-key"]);
                let mut out = Vec::new();
                for chunk in body.as_bytes().chunks(step) {
                    out.extend_from_slice(&r.push(chunk));
                }
                out.extend_from_slice(&r.finish());
                let text = String::from_utf8(out).unwrap();
                assert!(!text.contains(key), "{text}");
                assert_eq!(r.redacted, 3, "step {step}: {text}");
                assert_eq!(text.matches("[redacted by keybroker]").count(), 3);
            }
        }
        // A prefix of the key at the very end is released as is.
        let mut r = Redactor::new(&[key]);
        let mut out = r.push(b"abc s3cr3t").to_vec();
        out.extend_from_slice(&r.finish());
        assert_eq!(out, b"abc s3cr3t");
    }
}
