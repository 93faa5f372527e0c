//! Topic names and subscription patterns.
//!
//! A topic is dot-separated tokens (`orders.eu.created`), each 1+ characters of `[A-Za-z0-9_:-]`,
//! at most [`MAX_TOPIC_LEN`] bytes in all. A pattern is a topic whose tokens may also be `*`
//! (exactly one token) or, as the last token only, `>` (one or more tokens).

use std::fmt;
use std::ops::Bound;
use std::sync::Arc;

use crate::error::Error;

/// Longest topic or pattern accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 255;

/// A validated, concrete topic name (no wildcards). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validates `name` as a publish topic.
    pub fn parse(name: &str) -> Result<Topic, Error> {
        check_syntax(name, false)?;
        Ok(Topic(Arc::from(name)))
    }

    /// The topic name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A validated subscription pattern: a concrete topic or one with `*` / `>` wildcards.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Arc<str>,
    wildcard: bool,
}

impl Pattern {
    /// Validates `text` as a subscription pattern.
    pub fn parse(text: &str) -> Result<Pattern, Error> {
        let wildcard = check_syntax(text, true)?;
        Ok(Pattern {
            text: Arc::from(text),
            wildcard,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The concrete topic this pattern names, when it has no wildcards.
    pub fn as_topic(&self) -> Option<Topic> {
        (!self.wildcard).then(|| Topic(self.text.clone()))
    }

    /// The range of names, in byte order, that holds every topic this pattern matches: the
    /// pattern itself for a topic; the names that start with its tokens before the first
    /// wildcard (`orders.eu.` for `orders.eu.*.created`, up to `orders.eu/`, `/` being the byte
    /// after `.`); every name when the first token is a wildcard. A listing walks only this
    /// range of its ordered names.
    pub fn name_range(&self) -> (Bound<String>, Bound<String>) {
        if !self.wildcard {
            return (
                Bound::Included(self.text.to_string()),
                Bound::Included(self.text.to_string()),
            );
        }
        let literal = self
            .text
            .split('.')
            .take_while(|token| *token != "*" && *token != ">")
            .map(str::len)
            .map(|len| len + 1)
            .sum::<usize>();
        if literal == 0 {
            return (Bound::Unbounded, Bound::Unbounded);
        }
        // `literal` covers the leading literal tokens and the dot after each.
        let prefix = &self.text[..literal];
        let stem = &prefix[..literal - 1];
        (
            Bound::Included(prefix.to_owned()),
            Bound::Excluded(format!("{stem}/")),
        )
    }

    /// Whether `topic` matches this pattern.
    pub fn matches(&self, topic: &str) -> bool {
        if !self.wildcard {
            return *self.text == *topic;
        }
        let mut names = topic.split('.');
        for token in self.text.split('.') {
            match token {
                ">" => return names.next().is_some(),
                "*" => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if names.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        names.next().is_none()
    }
}

impl Pattern {
    /// Whether every topic `other` matches is also matched by `self` (pattern containment), as
    /// used for permissions: a grant `orders.>` covers a subscription to `orders.eu.*`.
    pub fn covers(&self, other: &Pattern) -> bool {
        fn go(grant: &[&str], wanted: &[&str]) -> bool {
            match (grant.first(), wanted.first()) {
                (None, None) => true,
                // `>` matches one or more tokens: it covers anything that needs at least one.
                (Some(&">"), Some(_)) => true,
                // `*` covers exactly one token, literal or `*`, but not `>` (one or more).
                (Some(&"*"), Some(&w)) if w != ">" => go(&grant[1..], &wanted[1..]),
                (Some(&g), Some(&w)) if g != "*" && g != ">" && g == w => {
                    go(&grant[1..], &wanted[1..])
                }
                _ => false,
            }
        }
        let grant: Vec<&str> = self.text.split('.').collect();
        let wanted: Vec<&str> = other.text.split('.').collect();
        go(&grant, &wanted)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

/// Checks topic/pattern syntax; returns whether a wildcard token occurs.
fn check_syntax(text: &str, allow_wildcards: bool) -> Result<bool, Error> {
    let invalid = |reason: String| Error::InvalidTopic {
        topic: shorten(text),
        reason,
    };
    if text.is_empty() {
        return Err(invalid("a topic must not be empty".into()));
    }
    if text.len() > MAX_TOPIC_LEN {
        return Err(invalid(format!(
            "a topic is at most {MAX_TOPIC_LEN} bytes, this one has {}",
            text.len()
        )));
    }
    let mut wildcard = false;
    let count = text.split('.').count();
    for (i, token) in text.split('.').enumerate() {
        match token {
            "" => {
                return Err(invalid(
                    "empty token: tokens are separated by single dots, with none at either end"
                        .into(),
                ));
            }
            "*" | ">" if !allow_wildcards => {
                return Err(Error::WildcardInPublish {
                    topic: shorten(text),
                });
            }
            "*" => wildcard = true,
            ">" if i + 1 == count => wildcard = true,
            ">" => return Err(invalid("`>` may only be the last token".into())),
            _ => {
                if let Some(c) = token.chars().find(|c| !is_token_char(*c)) {
                    return Err(invalid(format!(
                        "character {c:?} is not allowed; tokens use letters, digits, `_`, `-` and `:`{}",
                        if c == '*' || c == '>' {
                            " (wildcards must be whole tokens)"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }
    }
    Ok(wildcard)
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':')
}

/// Error messages quote at most this much of a bad topic, so a 1 MiB "topic" cannot bloat them.
fn shorten(text: &str) -> String {
    const SHOWN: usize = 64;
    if text.len() <= SHOWN {
        return text.to_owned();
    }
    let mut end = SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The naive matcher `matches` is held to, shared with the integration tests and the fuzz target.
#[cfg(test)]
#[path = "../tests/support/reference.rs"]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Every topic a pattern matches lies in its name range (and the range excludes names
        /// that do not share its literal prefix, so it is narrow).
        #[test]
        fn a_patterns_name_range_holds_every_topic_it_matches(
            pattern in "(a|b|\\*)(\\.(a|ab|b|\\*)){0,3}(\\.>)?",
            topic in "(a|b|ab|a-)(\\.(a|b|ab|a-|b:)){0,4}",
        ) {
            let pattern = Pattern::parse(&pattern).unwrap();
            let range = pattern.name_range();
            let within = std::ops::RangeBounds::<String>::contains(&range, &topic);
            if pattern.matches(&topic) {
                proptest::prop_assert!(within, "{pattern} matches {topic} outside {range:?}");
            }
        }
    }

    #[test]
    fn name_ranges_start_at_the_literal_prefix() {
        let range = |p: &str| Pattern::parse(p).unwrap().name_range();
        assert_eq!(
            range("orders.eu.*.created"),
            (
                Bound::Included("orders.eu.".into()),
                Bound::Excluded("orders.eu/".into())
            )
        );
        assert_eq!(
            range("orders.eu"),
            (
                Bound::Included("orders.eu".into()),
                Bound::Included("orders.eu".into())
            )
        );
        assert_eq!(range("*.created"), (Bound::Unbounded, Bound::Unbounded));
        assert_eq!(range(">"), (Bound::Unbounded, Bound::Unbounded));
    }

    #[test]
    fn topics_accept_the_documented_alphabet() {
        for ok in ["a", "orders.eu.created", "A-b_c:d.9", &"x".repeat(255)] {
            assert!(Topic::parse(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn topics_reject_bad_syntax_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("a..b", "empty token"),
            (".a", "empty token"),
            ("a.", "empty token"),
            ("a b", "not allowed"),
            ("a/b", "not allowed"),
            ("é", "not allowed"),
            ("a*", "wildcards must be whole tokens"),
        ] {
            let err = Topic::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let long = "x".repeat(256);
        assert!(
            Topic::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("at most 255")
        );
        assert!(matches!(
            Topic::parse("a.*"),
            Err(Error::WildcardInPublish { .. })
        ));
        assert!(matches!(
            Topic::parse("a.>"),
            Err(Error::WildcardInPublish { .. })
        ));
    }

    #[test]
    fn patterns_validate_wildcard_placement() {
        assert!(Pattern::parse("a.*.c").is_ok());
        assert!(Pattern::parse(">").is_ok());
        assert!(Pattern::parse("a.>").is_ok());
        assert!(
            Pattern::parse("a.>.c")
                .unwrap_err()
                .to_string()
                .contains("last token")
        );
        assert!(Pattern::parse("a.b*").is_err());
    }

    #[test]
    fn matching_follows_nats_semantics() {
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("a.*", "a.b.c", false),
            ("a.*", "a", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c.d", true),
            ("a.>", "a", false),
            (">", "anything.at.all", true),
            ("*.*", "x.y", true),
            ("*.>", "x", false),
        ];
        for (pattern, topic, expected) in cases {
            assert_eq!(
                Pattern::parse(pattern).unwrap().matches(topic),
                expected,
                "{pattern} ~ {topic}"
            );
        }
    }

    #[test]
    fn covers_is_pattern_containment() {
        let cases = [
            ("orders.>", "orders.eu.*", true),
            ("orders.>", "orders.>", true),
            ("orders.>", "orders", false),
            (">", "anything.>", true),
            ("orders.*", "orders.eu", true),
            ("orders.*", "orders.*", true),
            ("orders.*", "orders.>", false),
            ("orders.*", "orders.eu.x", false),
            ("orders.eu", "orders.*", false),
            ("orders.eu", "orders.eu", true),
            ("*.created", "orders.created", true),
            ("a.*.c", "a.>", false),
        ];
        for (grant, wanted, expected) in cases {
            let (g, w) = (
                Pattern::parse(grant).unwrap(),
                Pattern::parse(wanted).unwrap(),
            );
            assert_eq!(g.covers(&w), expected, "{grant} covers {wanted}");
        }
    }

    /// Containment agrees with matching: if `g` covers `w`, every topic `w` matches, `g` matches.
    #[test]
    fn covers_never_grants_more_than_matching_allows() {
        let mut rng = fastrand::Rng::with_seed(0xc0fe);
        let tokens = ["a", "b"];
        let random_pattern = |rng: &mut fastrand::Rng| {
            let len = rng.usize(1..4);
            (0..len)
                .map(|i| match rng.u8(..6) {
                    0 => "*",
                    1 if i + 1 == len => ">",
                    _ => tokens[rng.usize(..2)],
                })
                .collect::<Vec<_>>()
                .join(".")
        };
        let topics: Vec<String> = (1..5)
            .flat_map(|len| {
                (0..(1 << len)).map(move |bits: u32| {
                    (0..len)
                        .map(|i| tokens[(bits >> i) as usize & 1])
                        .collect::<Vec<_>>()
                        .join(".")
                })
            })
            .collect();
        for _ in 0..5_000 {
            let g = Pattern::parse(&random_pattern(&mut rng)).unwrap();
            let w = Pattern::parse(&random_pattern(&mut rng)).unwrap();
            if g.covers(&w) {
                for t in topics.iter().filter(|t| w.matches(t)) {
                    assert!(g.matches(t), "{g} covers {w} but does not match {t}");
                }
            }
        }
    }

    #[test]
    fn matcher_agrees_with_reference_on_random_inputs() {
        let mut rng = fastrand::Rng::with_seed(0x70b1c);
        let tokens = ["a", "b", "c"];
        for _ in 0..50_000 {
            let topic: Vec<&str> = (0..rng.usize(1..5))
                .map(|_| tokens[rng.usize(..3)])
                .collect();
            let len = rng.usize(1..5);
            let pattern: Vec<&str> = (0..len)
                .map(|i| match rng.u8(..10) {
                    0..=1 => "*",
                    2 if i + 1 == len => ">",
                    _ => tokens[rng.usize(..3)],
                })
                .collect();
            let p = Pattern::parse(&pattern.join(".")).unwrap();
            assert_eq!(
                p.matches(&topic.join(".")),
                super::reference::tokens_match(&pattern, &topic),
                "{} ~ {}",
                pattern.join("."),
                topic.join(".")
            );
        }
    }
}
