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
/// the bytes that could be the start of a key split across two chunks. Chunks without a key
/// pass without a copy: the search is SIMD (`memchr::memmem`), so redaction costs the gateway
/// about as much as a memcpy of the body.
#[derive(Clone)]
pub struct Redactor {
    finders: Vec<memchr::memmem::Finder<'static>>,
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
            finders: keys
                .iter()
                .filter(|k| !k.is_empty())
                .map(|k| memchr::memmem::Finder::new(k.as_bytes()).into_owned())
                .collect(),
            carry: Vec::new(),
            redacted: 0,
        }
    }

    /// The bytes of `chunk` (after what was held back) that can be released now.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.finders.is_empty() {
            return chunk;
        }
        if self.carry.is_empty() {
            return self.scan(&chunk, false, Some(&chunk));
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(&chunk);
        self.scan(&buf, false, None)
    }

    /// What is still held back, at the end of the body.
    pub fn finish(&mut self) -> Bytes {
        let buf = std::mem::take(&mut self.carry);
        self.scan(&buf, true, None)
    }

    /// Replaces the keys in `buf` and holds back a tail that may start one (unless `last`).
    /// `whole`: `buf` as `Bytes`, returned as is when there is nothing to change.
    fn scan(&mut self, buf: &[u8], last: bool, whole: Option<&Bytes>) -> Bytes {
        let find = |n: usize, from: usize| self.finders[n].find(&buf[from..]).map(|at| at + from);
        let mut next: Vec<Option<usize>> = (0..self.finders.len()).map(|n| find(n, 0)).collect();
        let mut out: Option<Vec<u8>> = None;
        let mut i = 0;
        // The leftmost occurrence first; at the same place, the first key (the current one).
        while let Some((at, n)) = next
            .iter()
            .enumerate()
            .filter_map(|(n, at)| at.map(|at| (at, n)))
            .min()
        {
            if !last && self.blocks(&buf[i..], at - i, n) {
                break;
            }
            let out = out.get_or_insert_with(|| Vec::with_capacity(buf.len()));
            out.extend_from_slice(&buf[i..at]);
            out.extend_from_slice(REDACTED);
            self.redacted += 1;
            i = at + self.finders[n].needle().len();
            for (k, slot) in next.iter_mut().enumerate() {
                if slot.is_some_and(|at| at < i) {
                    *slot = find(k, i);
                }
            }
        }
        let held = if last { 0 } else { self.held_back(&buf[i..]) };
        let end = buf.len() - held;
        self.carry = buf[end..].to_vec();
        match (out, whole) {
            (None, Some(whole)) => whole.slice(..end),
            (None, None) => Bytes::copy_from_slice(&buf[..end]),
            (Some(mut out), _) => {
                out.extend_from_slice(&buf[i..end]);
                Bytes::from(out)
            }
        }
    }

    /// Whether a key that takes precedence over the match of key `n` at `at` may still match
    /// once more of the body arrives: one starting before `at`, or at `at` and listed before
    /// `n`. Only keys that are parts of one another can do that.
    fn blocks(&self, rest: &[u8], at: usize, n: usize) -> bool {
        let longest = self.longest();
        let from = rest.len().saturating_sub(longest.saturating_sub(1));
        (from..=at.min(rest.len())).any(|p| {
            let tail = &rest[p..];
            self.finders.iter().enumerate().any(|(k, f)| {
                f.needle().len() > tail.len() && f.needle().starts_with(tail) && (p < at || k < n)
            })
        })
    }

    fn longest(&self) -> usize {
        self.finders
            .iter()
            .map(|f| f.needle().len())
            .max()
            .unwrap_or(0)
    }

    /// The length of the longest tail of `rest` that is the start of a key (not a whole one).
    fn held_back(&self, rest: &[u8]) -> usize {
        let longest = self.longest();
        (1..longest.min(rest.len() + 1))
            .rev()
            .find(|&k| {
                let tail = &rest[rest.len() - k..];
                self.finders
                    .iter()
                    .any(|f| f.needle().len() > k && f.needle().starts_with(tail))
            })
            .unwrap_or(0)
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
                    out.extend_from_slice(&r.push(Bytes::copy_from_slice(chunk)));
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
        let mut out = r.push(Bytes::from_static(b"abc s3cr3t")).to_vec();
        out.extend_from_slice(&r.finish());
        assert_eq!(out, b"abc s3cr3t");
    }

    /// The redactor against the plain definition (leftmost occurrence, the first key at a tie,
    /// on the whole body at once), for any body and any chunking.
    #[test]
    fn redaction_in_chunks_is_redaction_of_the_whole() {
        use proptest::prelude::*;
        fn whole(body: &[u8], keys: &[&[u8]]) -> Vec<u8> {
            let (mut out, mut i) = (Vec::new(), 0);
            'outer: while i < body.len() {
                for key in keys {
                    if body[i..].starts_with(key) {
                        out.extend_from_slice(REDACTED);
                        i += key.len();
                        continue 'outer;
                    }
                }
                out.push(body[i]);
                i += 1;
            }
            out
        }
        proptest!(|(body in proptest::collection::vec(prop_oneof![Just(b'k'), Just(b'e'), Just(b'y'), Just(b'-')], 0..200),
                    cuts in proptest::collection::vec(1usize..40, 1..20))| {
            let keys: [&str; 2] = ["key-ke", "ke"];
            let mut r = Redactor::new(&keys);
            let (mut out, mut at) = (Vec::new(), 0);
            for cut in cuts.iter().cycle() {
                if at >= body.len() {
                    break;
                }
                let end = (at + cut).min(body.len());
                out.extend_from_slice(&r.push(Bytes::copy_from_slice(&body[at..end])));
                at = end;
            }
            out.extend_from_slice(&r.finish());
            let bytes: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            prop_assert_eq!(out, whole(&body, &bytes));
        });
    }
}
