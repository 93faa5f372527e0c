//! Wildcard subscriptions indexed by their patterns' tokens (a subject trie, as NATS's sublist):
//! finding the subscriptions a new topic matches walks the topic's tokens, so its cost does not
//! grow with the wildcard subscriptions it does not match.

use std::collections::{HashMap, HashSet};

use crate::topic::Pattern;

/// Subscription ids by wildcard pattern.
#[derive(Default)]
pub struct PatternIndex {
    root: Node,
}

#[derive(Default)]
struct Node {
    /// Next token literal.
    literal: HashMap<Box<str>, Node>,
    /// Next token `*`.
    star: Option<Box<Node>>,
    /// Patterns ending with `>` here: they match one or more further tokens.
    rest: HashSet<u64>,
    /// Patterns ending here.
    here: HashSet<u64>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.rest.is_empty()
            && self.here.is_empty()
    }
}

impl PatternIndex {
    /// Indexes `pattern` for subscription `id`.
    pub fn insert(&mut self, pattern: &Pattern, id: u64) {
        let mut node = &mut self.root;
        for token in pattern.as_str().split('.') {
            node = match token {
                ">" => {
                    node.rest.insert(id);
                    return;
                }
                "*" => node.star.get_or_insert_with(Box::default),
                literal => node.literal.entry(literal.into()).or_default(),
            };
        }
        node.here.insert(id);
    }

    /// Removes `pattern` of subscription `id`, and the branches left empty.
    pub fn remove(&mut self, pattern: &Pattern, id: u64) {
        fn go<'a>(node: &mut Node, mut tokens: impl Iterator<Item = &'a str>, id: u64) {
            match tokens.next() {
                None => {
                    node.here.remove(&id);
                }
                Some(">") => {
                    node.rest.remove(&id);
                }
                Some("*") => {
                    if let Some(star) = &mut node.star {
                        go(star, tokens, id);
                        if star.is_empty() {
                            node.star = None;
                        }
                    }
                }
                Some(literal) => {
                    if let Some(child) = node.literal.get_mut(literal) {
                        go(child, tokens, id);
                        if child.is_empty() {
                            node.literal.remove(literal);
                        }
                    }
                }
            }
        }
        go(&mut self.root, pattern.as_str().split('.'), id);
    }

    /// Calls `found` with every subscription one of whose patterns matches `topic` (a
    /// subscription with several matching patterns, once per pattern).
    pub fn matches(&self, topic: &str, found: &mut impl FnMut(u64)) {
        fn go(node: &Node, tokens: &[&str], found: &mut impl FnMut(u64)) {
            let Some((first, rest)) = tokens.split_first() else {
                node.here.iter().copied().for_each(&mut *found);
                return;
            };
            node.rest.iter().copied().for_each(&mut *found);
            if let Some(child) = node.literal.get(*first) {
                go(child, rest, found);
            }
            if let Some(star) = &node.star {
                go(star, rest, found);
            }
        }
        let tokens: Vec<&str> = topic.split('.').collect();
        go(&self.root, &tokens, found);
    }

    /// Whether nothing is indexed.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.root.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matching(index: &PatternIndex, topic: &str) -> Vec<u64> {
        let mut ids = Vec::new();
        index.matches(topic, &mut |id| ids.push(id));
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("c".to_owned())
        ]
    }

    fn pattern() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![token(), Just("*".to_owned())], 0..4),
            any::<bool>(),
        )
            .prop_filter_map("a pattern has a token", |(mut tokens, rest)| {
                if rest {
                    tokens.push(">".to_owned());
                }
                (!tokens.is_empty()).then(|| tokens.join("."))
            })
    }

    proptest! {
        /// The index finds exactly the patterns `Pattern::matches` accepts, and removing every
        /// pattern leaves it empty.
        #[test]
        fn finds_what_pattern_matching_finds(
            patterns in prop::collection::vec(pattern(), 1..12),
            topics in prop::collection::vec(prop::collection::vec(token(), 1..5), 1..12),
        ) {
            let patterns: Vec<Pattern> =
                patterns.iter().map(|p| Pattern::parse(p).unwrap()).collect();
            let mut index = PatternIndex::default();
            for (id, pattern) in patterns.iter().enumerate() {
                index.insert(pattern, id as u64);
            }
            for topic in topics {
                let topic = topic.join(".");
                let expected: Vec<u64> = patterns
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.matches(&topic))
                    .map(|(id, _)| id as u64)
                    .collect();
                prop_assert_eq!(matching(&index, &topic), expected, "topic {}", topic);
            }
            for (id, pattern) in patterns.iter().enumerate() {
                index.remove(pattern, id as u64);
            }
            prop_assert!(index.is_empty());
        }
    }
}
