//! A deliberately naive topic matcher: the reference the broker's `Pattern::matches` is held to,
//! by the tests (through `support`) and by the `topic_pattern` fuzz target, which includes this
//! file by its path.
#![allow(dead_code)]

/// Whether `pattern` matches `topic`, both dot-separated.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let topic: Vec<&str> = topic.split('.').collect();
    tokens_match(&pattern, &topic)
}

/// Whether the `pattern` tokens match the `topic` tokens: `*` takes exactly one token, `>` (last)
/// one or more, anything else itself.
pub fn tokens_match(pattern: &[&str], topic: &[&str]) -> bool {
    match (pattern.first(), topic.first()) {
        (Some(&">"), Some(_)) => true,
        (Some(&"*"), Some(_)) => tokens_match(&pattern[1..], &topic[1..]),
        (Some(p), Some(t)) => p == t && tokens_match(&pattern[1..], &topic[1..]),
        (None, None) => true,
        _ => false,
    }
}
