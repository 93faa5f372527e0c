//! `Topic::parse` and `Pattern::parse` on arbitrary text (bytes that are not UTF-8 are decoded
//! lossily: both take `&str`, and every transport hands them decoded text).
//!
//! Invariants, besides "never panics":
//! - a parsed topic is at most 255 bytes of valid tokens, is also a pattern, names itself as
//!   that pattern's topic, and the pattern matches it;
//! - a parsed pattern has no empty tokens, `>` only as its last token, wildcards only as whole
//!   tokens; it is a concrete topic exactly when it has no wildcard; it matches the topic built
//!   by filling its wildcards in;
//! - `Pattern::matches` agrees with a naive token-list matcher (the input is split at its first
//!   newline into pattern and candidate topic);
//! - error messages stay bounded however long or strange the input ([`MAX_ERROR_LEN`]).
#![no_main]

#[path = "../../tests/support/reference.rs"]
mod reference;

use libfuzzer_sys::fuzz_target;
use topichub::topic::{MAX_TOPIC_LEN, Pattern, Topic};

/// Longest error message accepted. A message quotes at most 64 bytes of the input, `{:?}`-escaped:
/// at worst 6 bytes per input byte (`\u{7f}`), so up to 384 bytes plus `…`, and a fixed sentence
/// of at most about 110 bytes. The worst case found (64+ bytes of U+007F) gives 484 bytes; an
/// earlier bound of 400 was exceeded within seconds (see fuzz/README.md, "Findings").
const MAX_ERROR_LEN: usize = 512;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check(&text);
    if let Some((pattern, topic)) = text.split_once('\n') {
        check(pattern);
        check(topic);
        if let Ok(p) = Pattern::parse(pattern) {
            let tokens: Vec<&str> = pattern.split('.').collect();
            let names: Vec<&str> = topic.split('.').collect();
            assert_eq!(
                p.matches(topic),
                reference::tokens_match(&tokens, &names),
                "{pattern:?} ~ {topic:?}"
            );
        }
    }
});

fn check(text: &str) {
    let topic = Topic::parse(text);
    let pattern = Pattern::parse(text);
    match &topic {
        Ok(t) => {
            assert_eq!(t.as_str(), text);
            assert!(text.len() <= MAX_TOPIC_LEN);
            assert!(text.split('.').all(is_name), "{text:?} accepted as a topic");
            let p = pattern.as_ref().expect("a topic is also a pattern");
            assert_eq!(p.as_topic().as_ref(), Some(t));
            assert!(p.matches(text), "{text:?} does not match itself");
        }
        Err(e) => bounded(&e.to_string(), text),
    }
    match &pattern {
        Ok(p) => {
            assert_eq!(p.as_str(), text);
            assert!(text.len() <= MAX_TOPIC_LEN);
            let tokens: Vec<&str> = text.split('.').collect();
            let last = tokens.len() - 1;
            for (i, token) in tokens.iter().enumerate() {
                assert!(
                    is_name(token) || *token == "*" || (*token == ">" && i == last),
                    "{text:?} accepted as a pattern (token {i}: {token:?})"
                );
            }
            let wildcard = tokens.iter().any(|t| *t == "*" || *t == ">");
            assert_eq!(p.as_topic().is_some(), !wildcard, "{text:?}");
            assert_eq!(topic.is_ok(), !wildcard, "{text:?}");
            // Fill the wildcards in: `*` with one token, `>` with two.
            let filled: Vec<&str> = tokens
                .iter()
                .map(|t| match *t {
                    "*" => "x",
                    ">" => "y.z",
                    t => t,
                })
                .collect();
            let filled = filled.join(".");
            assert!(p.matches(&filled), "{text:?} does not match {filled:?}");
        }
        Err(e) => {
            bounded(&e.to_string(), text);
            assert!(topic.is_err(), "{text:?} is a topic but not a pattern");
        }
    }
}

fn is_name(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':'))
}

fn bounded(message: &str, input: &str) {
    assert!(
        message.len() <= MAX_ERROR_LEN,
        "error message of {} bytes for an input of {} bytes: {message}",
        message.len(),
        input.len()
    );
}
