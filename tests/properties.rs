//! Property tests (proptest) for the pure parts of the broker: the wildcard matcher against a
//! naive reference, the cursor codec, and topic validation. Case counts are modest so the file
//! runs in well under a second in debug; the fuzz targets in `fuzz/` explore the same code with
//! arbitrary bytes.

mod support;

use proptest::prelude::*;
use proptest::sample::select;

use support::reference;
use topichub::cursor::Cursor;
use topichub::topic::{MAX_TOPIC_LEN, Pattern, Topic};

/// Topics of 1-5 tokens over a three-letter alphabet, so matches are frequent.
fn small_topic() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(select(&["a", "b", "c"][..]), 1..=5)
}

/// Patterns over the same alphabet: `*` anywhere, `>` only as the last token.
fn small_pattern() -> impl Strategy<Value = Vec<&'static str>> {
    (
        prop::collection::vec(select(&["a", "b", "c", "*"][..]), 0..=4),
        select(&["a", "b", "c", "*", ">"][..]),
    )
        .prop_map(|(mut tokens, last)| {
            tokens.push(last);
            tokens
        })
}

/// One token of the topic alphabet.
fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_:-]{1,12}"
}

/// A valid topic: tokens joined by dots, at most `MAX_TOPIC_LEN` bytes.
fn valid_topic() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 1..=24)
        .prop_map(|tokens| tokens.join("."))
        .prop_filter("longer than MAX_TOPIC_LEN", |t| t.len() <= MAX_TOPIC_LEN)
}

/// A character no topic may contain: not a letter, digit, `_`, `-`, `:` or the `.` separator.
/// Half the time one of the likely mistakes, otherwise any character at all.
fn invalid_char() -> impl Strategy<Value = char> {
    prop_oneof![
        select(
            &[
                '*',
                '>',
                ' ',
                '/',
                '\0',
                '\n',
                '#',
                '+',
                'é',
                '\u{7f}',
                '\u{1F600}'
            ][..]
        ),
        any::<char>(),
    ]
    .prop_filter("a valid character", |c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn matcher_agrees_with_reference(pattern in small_pattern(), topic in small_topic()) {
        let text = pattern.join(".");
        let parsed = Pattern::parse(&text).expect("generated patterns are valid");
        prop_assert_eq!(
            parsed.matches(&topic.join(".")),
            reference::tokens_match(&pattern, &topic),
            "{} ~ {}", text, topic.join(".")
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_pattern_matches_its_instances(pattern in small_pattern(), fill in small_topic()) {
        // Replace `*` by one token and `>` by one or more: the result must match.
        let mut topic = Vec::new();
        for (i, token) in pattern.iter().enumerate() {
            match *token {
                "*" => topic.push(fill[i % fill.len()]),
                ">" => topic.extend(&fill),
                literal => topic.push(literal),
            }
        }
        let parsed = Pattern::parse(&pattern.join(".")).unwrap();
        prop_assert!(parsed.matches(&topic.join(".")), "{} ~ {}", pattern.join("."), topic.join("."));
    }

    #[test]
    fn cursors_round_trip(epoch in "[A-Za-z0-9]{1,32}", seq in any::<u64>()) {
        let text = format!("{epoch}-{seq}");
        let cursor: Cursor = text.parse().expect("a well-formed cursor parses");
        prop_assert_eq!(&cursor, &Cursor { epoch, seq });
        prop_assert_eq!(cursor.to_string(), text);
    }

    #[test]
    fn cursors_reject_non_alphanumeric_epochs(
        before in "[A-Za-z0-9]{0,15}",
        bad in invalid_char(),
        after in "[A-Za-z0-9]{0,15}",
        seq in any::<u64>(),
    ) {
        let text = format!("{before}{bad}{after}-{seq}");
        prop_assert!(text.parse::<Cursor>().is_err(), "{:?} was accepted", text);
        // `-` is the separator, so an epoch containing one is just as bad.
        let dashed = format!("{before}-{after}-{seq}");
        prop_assert!(dashed.parse::<Cursor>().is_err(), "{:?} was accepted", dashed);
    }

    #[test]
    fn cursors_reject_epochs_of_the_wrong_length(epoch in "[A-Za-z0-9]{33,40}", seq in any::<u64>()) {
        let long = format!("{epoch}-{seq}");
        prop_assert!(long.parse::<Cursor>().is_err(), "{:?} was accepted", long);
        let empty = format!("-{seq}");
        prop_assert!(empty.parse::<Cursor>().is_err(), "{:?} was accepted", empty);
    }

    #[test]
    fn valid_topics_parse(topic in valid_topic()) {
        let parsed = Topic::parse(&topic);
        prop_assert!(parsed.is_ok(), "{:?}: {}", topic, parsed.unwrap_err());
        let pattern = Pattern::parse(&topic).expect("a topic is a pattern");
        prop_assert!(pattern.matches(&topic));
        prop_assert_eq!(pattern.as_topic().map(|t| t.to_string()), Some(topic));
    }

    #[test]
    fn an_invalid_character_anywhere_is_rejected(
        topic in valid_topic(),
        at in any::<prop::sample::Index>(),
        bad in invalid_char(),
    ) {
        let at = at.index(topic.len() + 1);
        let mut broken = topic.clone();
        broken.insert(at, bad);
        prop_assert!(Topic::parse(&broken).is_err(), "{:?} was accepted", broken);
        prop_assert!(Pattern::parse(&broken).is_err(), "{:?} was accepted as a pattern", broken);
    }
}
