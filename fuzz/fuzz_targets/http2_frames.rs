//! The HTTP/2 frame scanner behind the ping policy (`src/net/keepalive.rs`) on arbitrary client bytes,
//! fed in pieces of arbitrary sizes.
//!
//! The first input byte picks the piece size (1-32 bytes), the second whether the connection
//! preface is put in front of the rest (so that most inputs are scanned as frames); the rest is
//! what the client sends.
//!
//! Invariants, besides "never panics":
//! - the frame headers found do not depend on how the bytes are split: pieces and the whole
//!   give the same result;
//! - they agree with a naive reading: the preface, then 9-byte headers, each followed by as
//!   many payload bytes as its 24-bit length says; anything that does not start as the preface
//!   is passed through without a frame; the stream ends on a frame boundary exactly when the
//!   naive reading ends between frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use topichub::fuzzing::scan_http2_client_bytes;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let [split, preface, rest @ ..] = data else {
        return;
    };
    let stream = if preface & 1 == 1 {
        [PREFACE, rest].concat()
    } else {
        rest.to_vec()
    };
    let piece = 1 + usize::from(*split) % 32;
    let pieces = scan_http2_client_bytes(stream.chunks(piece));
    let whole = scan_http2_client_bytes([&stream[..]]);
    assert_eq!(pieces, whole, "split every {piece} bytes");
    assert_eq!(whole, naive(&stream));
});

/// (frames as (type, flags, stream id), passed through, ends on a frame boundary).
fn naive(stream: &[u8]) -> (Vec<(u8, u8, u32)>, bool, bool) {
    let known = stream.len().min(PREFACE.len());
    if stream[..known] != PREFACE[..known] {
        return (Vec::new(), true, false);
    }
    let mut frames = Vec::new();
    let mut at = PREFACE.len();
    while at + 9 <= stream.len() {
        let h = &stream[at..at + 9];
        let length = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        frames.push((h[3], h[4], id));
        at += 9 + length;
    }
    (frames, false, at == stream.len().max(PREFACE.len()))
}
