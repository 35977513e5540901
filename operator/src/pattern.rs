//! IAM-style wildcard patterns (`*` any run of characters, including `/`; `?` one character) and
//! the subset relation between them: does every string one pattern matches also match another?

use std::fmt;

/// One element of a parsed pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyOne,
    AnyRun,
}

/// A parsed wildcard pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    tokens: Vec<Token>,
}

impl Pattern {
    /// Parses `text`; `case_insensitive` folds literals to lower case (IAM action names are
    /// case-insensitive, ARNs are not).
    pub fn new(text: &str, case_insensitive: bool) -> Self {
        let mut tokens = Vec::with_capacity(text.len());
        let mut run_ones = 0usize;
        let mut run_any = false;
        let flush = |tokens: &mut Vec<Token>, ones: &mut usize, any: &mut bool| {
            // Normal form of a wildcard run: its `?`s first, then at most one `*`. `*?` and `?*`
            // match the same strings, so this makes the subset check below see them as equal.
            tokens.extend(std::iter::repeat_n(Token::AnyOne, *ones));
            if *any {
                tokens.push(Token::AnyRun);
            }
            *ones = 0;
            *any = false;
        };
        for c in text.chars() {
            match c {
                '*' => run_any = true,
                '?' => run_ones += 1,
                c => {
                    flush(&mut tokens, &mut run_ones, &mut run_any);
                    let c = if case_insensitive {
                        c.to_ascii_lowercase()
                    } else {
                        c
                    };
                    tokens.push(Token::Literal(c));
                }
            }
        }
        flush(&mut tokens, &mut run_ones, &mut run_any);
        Self {
            text: text.to_owned(),
            tokens,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when every string `other` matches is also matched by `self`.
    ///
    /// Sound (never true when some string of `other` escapes `self`), which is what a guardrail
    /// needs; it can be conservative for exotic wildcard arrangements, which are then refused.
    pub fn contains(&self, other: &Pattern) -> bool {
        let (a, r) = (&self.tokens, &other.tokens);
        // covers[i][j]: a[i..] covers r[j..]. Filled backwards.
        let mut covers = vec![vec![false; r.len() + 1]; a.len() + 1];
        covers[a.len()][r.len()] = true;
        for i in (0..a.len()).rev() {
            for j in (0..=r.len()).rev() {
                covers[i][j] = match a[i] {
                    // `*` absorbs nothing, or absorbs r[j] (whatever it is) and stays.
                    Token::AnyRun => covers[i + 1][j] || (j < r.len() && covers[i][j + 1]),
                    Token::AnyOne => {
                        j < r.len()
                            && matches!(r[j], Token::Literal(_) | Token::AnyOne)
                            && covers[i + 1][j + 1]
                    }
                    Token::Literal(c) => {
                        j < r.len() && r[j] == Token::Literal(c) && covers[i + 1][j + 1]
                    }
                };
            }
        }
        covers[0][0]
    }

    /// True when `self` matches the concrete string `s` (wildcards in `s` are plain characters).
    pub fn matches(&self, s: &str, case_insensitive: bool) -> bool {
        let s: Vec<char> = s
            .chars()
            .map(|c| {
                if case_insensitive {
                    c.to_ascii_lowercase()
                } else {
                    c
                }
            })
            .collect();
        let p = &self.tokens;
        let mut m = vec![vec![false; s.len() + 1]; p.len() + 1];
        m[p.len()][s.len()] = true;
        for i in (0..p.len()).rev() {
            for j in (0..=s.len()).rev() {
                m[i][j] = match p[i] {
                    Token::AnyRun => m[i + 1][j] || (j < s.len() && m[i][j + 1]),
                    Token::AnyOne => j < s.len() && m[i + 1][j + 1],
                    Token::Literal(c) => j < s.len() && s[j] == c && m[i + 1][j + 1],
                };
            }
        }
        m[0][0]
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arn(s: &str) -> Pattern {
        Pattern::new(s, false)
    }

    #[test]
    fn prefix_lookalikes_and_wider_patterns_are_not_contained() {
        let team_a = arn("arn:aws:s3:::corp-data/team-a/*");
        assert!(team_a.contains(&arn("arn:aws:s3:::corp-data/team-a/*")));
        assert!(team_a.contains(&arn("arn:aws:s3:::corp-data/team-a/invoices/*")));
        assert!(team_a.contains(&arn("arn:aws:s3:::corp-data/team-a/x?.csv")));
        assert!(team_a.contains(&arn("arn:aws:s3:::corp-data/team-a/report.csv")));
        // Matches team-ab/... too.
        assert!(!team_a.contains(&arn("arn:aws:s3:::corp-data/team-a*")));
        assert!(!team_a.contains(&arn("arn:aws:s3:::*")));
        assert!(!team_a.contains(&arn("arn:aws:s3:::corp-data/team-?/*")));
        assert!(!team_a.contains(&arn("arn:aws:s3:::corp-data/team-a")));
        assert!(!team_a.contains(&arn("arn:aws:s3:::corp-data/team-b/*")));
    }

    #[test]
    fn actions_compare_case_insensitively_and_wildcards_do_not_widen() {
        let get = Pattern::new("s3:GetObject", true);
        assert!(get.contains(&Pattern::new("s3:getobject", true)));
        assert!(!get.contains(&Pattern::new("s3:Get*", true)));
        assert!(!get.contains(&Pattern::new("s3:*", true)));
        assert!(Pattern::new("s3:Get*", true).contains(&Pattern::new("s3:GetObjectTagging", true)));
        assert!(Pattern::new("*", true).contains(&Pattern::new("s3:*", true)));
    }

    #[test]
    fn equivalent_wildcard_runs_are_contained_both_ways() {
        assert!(arn("a/*?").contains(&arn("a/?*")));
        assert!(arn("a/?*").contains(&arn("a/*?")));
        assert!(arn("a/**").contains(&arn("a/*")));
        assert!(!arn("a/??*").contains(&arn("a/?*")));
    }

    #[test]
    fn matches_concrete_strings() {
        let p = arn("arn:aws:s3:::b/team-a/*");
        assert!(p.matches("arn:aws:s3:::b/team-a/x/y", false));
        assert!(!p.matches("arn:aws:s3:::b/team-ab/x", false));
        assert!(arn("a?c").matches("abc", false));
        assert!(!arn("a?c").matches("ac", false));
    }

    /// Patterns over a tiny alphabet, so that collisions (and therefore containment) are common.
    fn pattern_text() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof!["a", "b", "/", "\\*", "\\?"], 0..8)
            .prop_map(|parts| parts.concat())
    }

    /// A concrete string matched by `pattern`, choosing wildcard expansions from `choices`.
    fn instantiate(pattern: &str, choices: &[String]) -> String {
        let mut out = String::new();
        let mut next = choices.iter().cycle();
        for c in pattern.chars() {
            match c {
                '*' => out.push_str(next.next().map(String::as_str).unwrap_or("")),
                '?' => out.push(next.next().and_then(|s| s.chars().next()).unwrap_or('a')),
                c => out.push(c),
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Soundness: whatever `contains` accepts, no string of the requested pattern falls
        /// outside the allowed one.
        #[test]
        fn contained_patterns_match_only_allowed_strings(
            allowed in pattern_text(),
            requested in pattern_text(),
            choices in proptest::collection::vec("[ab/*?]{1,4}", 1..6),
        ) {
            let a = arn(&allowed);
            let r = arn(&requested);
            if a.contains(&r) {
                let s = instantiate(&requested, &choices);
                prop_assert!(r.matches(&s, false), "instantiation {s} does not match {requested}");
                prop_assert!(a.matches(&s, false), "{requested} accepted under {allowed} but {s} escapes");
                // Empty expansions too.
                let empty: Vec<String> = vec![String::new()];
                let s = instantiate(&requested.replace('?', "a"), &empty);
                prop_assert!(a.matches(&s, false), "{requested} accepted under {allowed} but {s} escapes");
            }
        }

        /// Matching agrees with containment of a literal pattern.
        #[test]
        fn literal_containment_is_matching(allowed in pattern_text(), s in "[ab/]{0,8}") {
            prop_assert_eq!(arn(&allowed).contains(&arn(&s)), arn(&allowed).matches(&s, false));
        }

        #[test]
        fn every_pattern_contains_itself(p in pattern_text()) {
            prop_assert!(arn(&p).contains(&arn(&p)));
        }
    }
}
