//! The publish lane's request parser (`POST /topics/{topic}` read without hyper) on arbitrary
//! bytes, as they would sit at the front of a connection's read buffer.
//!
//! Invariants, besides "never panics":
//! - a request is taken only when it starts with `POST /topics/`, its topic has no `/`, `?`,
//!   `%` or `#`, and its head has exactly one `content-length` line, digits only, whose value is
//!   the body's length, no `transfer-encoding`, `expect` or `upgrade` line, and a `connection`
//!   line only if it says `keep-alive` (read by a naive line splitter, not by httparse);
//! - topic and content type lie in the head, the body right after it, within the bytes and the
//!   payload limit;
//! - what follows the request does not change it (pipelining): the request alone parses to the
//!   same parts, and the request cut short by a byte is not taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use topichub::fuzzing::parse_publish;

/// Small, so that inputs reach it.
const MAX_PAYLOAD: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((topic, content_type, body)) = parse_publish(data, MAX_PAYLOAD) else {
        return;
    };
    let head = &data[..body.0];
    assert!(data.starts_with(b"POST /topics/"));
    assert!(body.1 <= data.len() && body.1 - body.0 <= MAX_PAYLOAD);
    assert!(topic.0 == b"POST /topics/".len() && topic.1 <= body.0);
    assert!(
        !data[topic.0..topic.1]
            .iter()
            .any(|b| matches!(b, b'/' | b'?' | b'%' | b'#'))
    );
    if let Some((start, end)) = content_type {
        assert!(topic.1 < start && start <= end && end <= body.0);
    }

    let lines = head_lines(head);
    let named = |name: &str| {
        lines
            .iter()
            .filter_map(|line| {
                let colon = line.iter().position(|&b| b == b':')?;
                let (field, value) = (&line[..colon], &line[colon + 1..]);
                field
                    .eq_ignore_ascii_case(name.as_bytes())
                    .then(|| value.trim_ascii())
            })
            .collect::<Vec<_>>()
    };
    let lengths = named("content-length");
    assert_eq!(
        lengths.len(),
        1,
        "one content-length: {:?}",
        String::from_utf8_lossy(head)
    );
    assert!(lengths[0].iter().all(u8::is_ascii_digit));
    assert_eq!(
        std::str::from_utf8(lengths[0])
            .unwrap()
            .parse::<usize>()
            .ok(),
        Some(body.1 - body.0)
    );
    for refused in ["transfer-encoding", "expect", "upgrade"] {
        assert!(named(refused).is_empty(), "{refused} taken");
    }
    for connection in named("connection") {
        assert!(connection.eq_ignore_ascii_case(b"keep-alive"));
    }

    let alone = &data[..body.1];
    assert_eq!(
        parse_publish(alone, MAX_PAYLOAD),
        Some((topic, content_type, body)),
        "the request alone"
    );
    assert_eq!(
        parse_publish(&alone[..alone.len() - 1], MAX_PAYLOAD),
        None,
        "cut short"
    );
});

/// The head's header lines: split at LF (CRLF or bare LF, as httparse accepts), without the
/// request line and the empty line that ends the head.
fn head_lines(head: &[u8]) -> Vec<&[u8]> {
    head.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip(1)
        .filter(|line| !line.is_empty())
        .collect()
}
