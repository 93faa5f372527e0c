//! `PublishBody::parse` (the whole `POST /publish` body rule set) on arbitrary bytes.
//!
//! Invariants, besides "never panics":
//! - on success the topic is a valid concrete topic and the payload is exactly what the body
//!   says: a JSON string's text, another JSON value's serialization (with a JSON content-type
//!   unless one was given), or the decoded `payload_base64`, or nothing;
//! - on failure the error is a 400 INVALID_ARGUMENT (a client mistake, never a server error).
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use topichub::http::json::PublishBody;
use topichub::topic::Topic;

fuzz_target!(|data: &[u8]| {
    match PublishBody::parse(data) {
        Ok((topic, payload, headers)) => {
            assert!(Topic::parse(topic.as_str()).is_ok(), "{topic:?}");
            // The body was a JSON object: check the payload against an independent reading.
            let body: Value = serde_json::from_slice(data).expect("accepted bodies are JSON");
            let Value::Object(fields) = &body else {
                panic!("accepted a body that is not an object: {body:?}");
            };
            let field = |name: &str| fields.get(name).filter(|value| !value.is_null());
            assert_eq!(field("topic").and_then(Value::as_str), Some(topic.as_str()));
            let expected = match (field("payload"), field("payload_base64")) {
                (None, None) => Vec::new(),
                (Some(Value::String(text)), None) => text.clone().into_bytes(),
                (Some(value), None) => {
                    assert!(headers.contains_key("content-type"), "{headers:?}");
                    serde_json::to_vec(value).unwrap()
                }
                (None, Some(Value::String(encoded))) => base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .expect("accepted base64 decodes"),
                (payload, base64) => panic!("accepted payload {payload:?} with base64 {base64:?}"),
            };
            assert_eq!(&payload[..], &expected[..]);
        }
        Err(error) => {
            let body = error.body();
            assert_eq!(
                body.error.code, "INVALID_ARGUMENT",
                "{}",
                body.error.message
            );
        }
    }
});
