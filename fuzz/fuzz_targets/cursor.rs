//! `str::parse::<Cursor>` on arbitrary text (non-UTF-8 input is decoded lossily; cursors arrive
//! as text: the SSE `Last-Event-ID` header, query parameters, protobuf strings).
//!
//! Invariants, besides "never panics":
//! - an accepted cursor's epoch is 1-32 ASCII letters or digits, and `Display` gives back
//!   exactly the input (one spelling per cursor: no sign, no leading zeros in the seq);
//! - error messages stay bounded (the input is quoted up to 80 characters, `{:?}`-escaped).
#![no_main]

use libfuzzer_sys::fuzz_target;
use topichub::cursor::Cursor;

/// 80 quoted characters of at most 10 bytes each once escaped (`\u{10ffff}`), plus a sentence.
const MAX_ERROR_LEN: usize = 1000;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match text.parse::<Cursor>() {
        Ok(cursor) => {
            assert!(
                (1..=32).contains(&cursor.epoch.len())
                    && cursor.epoch.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{text:?} accepted with epoch {:?}",
                cursor.epoch
            );
            let shown = cursor.to_string();
            assert_eq!(shown, *text, "{text:?} parsed as {cursor:?}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.len() < MAX_ERROR_LEN,
                "error message of {} bytes: {message}",
                message.len()
            );
        }
    }
});
