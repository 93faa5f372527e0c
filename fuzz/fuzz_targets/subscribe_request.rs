//! The SSE lane's request parser (a `GET /subscribe` head peeked off a new connection) on
//! arbitrary bytes.
//!
//! Invariants, besides "never panics":
//! - a head is taken only when it is a `GET` of `/subscribe` (with or without a query) over
//!   HTTP/1.1, without a body (`content-length` other than `0`, `transfer-encoding`), `expect`
//!   or `upgrade`, and every header line of the head reaches the request;
//! - its length lies within the bytes, and what follows the head does not change it: the head
//!   alone parses to the same request, and the head cut short by a byte is not taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use topichub::fuzzing::parse_subscribe;

fuzz_target!(|data: &[u8]| {
    let Some((length, request)) = parse_subscribe(data) else {
        return;
    };
    assert!(length <= data.len());
    assert_eq!(request.method(), "GET");
    assert_eq!(format!("{:?}", request.version()), "HTTP/1.1");
    assert_eq!(request.uri().path(), "/subscribe");
    let headers = request.headers();
    assert!(!headers.contains_key("transfer-encoding"));
    assert!(!headers.contains_key("upgrade"));
    assert!(!headers.contains_key("expect"));
    assert!(headers.get_all("content-length").iter().all(|v| v == "0"));

    let (again, same) = parse_subscribe(&data[..length]).expect("the head alone");
    assert_eq!(again, length);
    assert_eq!(same.uri(), request.uri());
    assert_eq!(same.headers(), request.headers());
    assert!(parse_subscribe(&data[..length - 1]).is_none(), "cut short");
    assert_eq!(
        headers.len(),
        header_lines(&data[..length]),
        "every header kept"
    );
});

/// The number of header lines in a head (CRLF or bare LF line ends, as httparse accepts): the
/// lines after the request line, which empty lines may precede (RFC 9112, section 2.2).
fn header_lines(head: &[u8]) -> usize {
    head.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip_while(|line| line.is_empty())
        .skip(1)
        .filter(|line| !line.is_empty())
        .count()
}
