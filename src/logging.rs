//! What the process logs: the default filter, and no bearer tokens.
//!
//! h2 logs a WARN line for each odd frame a peer sends (an unsolicited PING ACK, say), so a
//! peer could fill the disk with them; unless `RUST_LOG` names h2, its events below ERROR are
//! filtered out (the connection itself is closed by [`crate::net::keepalive`]).
//!
//! A token may arrive in the `authorization` header, the `access_token` cookie or the
//! `access_token` query parameter (see [`crate::auth`]), and request URIs and headers are what
//! debug and trace logs print: our request spans, and hyper's and h2's own events. Two defences:
//! the request span records the URI through [`uri`], and every line the process logs goes
//! through [`Redacting`], which blanks anything token-shaped whoever wrote it: the value of an
//! `authorization` header (`authorization: ...`, `"authorization": "..."`), the value of an
//! `access_token=` pair, the credentials after `Bearer `, and any JWT (three base64url parts, the
//! first starting `eyJ`, the encoding of `{"`).

use std::borrow::Cow;
use std::io;

use tracing_subscriber::fmt::MakeWriter;

/// What a token is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Filter directives used when `RUST_LOG` is not set. The disk log's store (fjall, lsm-tree)
/// logs each tree it recovers at INFO, at every start; its warnings and errors still show.
pub const DEFAULT_FILTER: &str = "info,fjall=warn,lsm_tree=warn";

/// Installs the process's log subscriber: `RUST_LOG` (else [`DEFAULT_FILTER`]) plus `h2=error`
/// unless `RUST_LOG` says otherwise about h2, formatted to stderr through [`Redacting`].
pub fn init() {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_owned());
    let directives = if directives.contains("h2") {
        directives
    } else {
        format!("{directives},h2=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|error| {
        eprintln!("topichub: ignoring RUST_LOG={directives:?}: {error}");
        tracing_subscriber::EnvFilter::new(format!("{DEFAULT_FILTER},h2=error"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Redacting(std::io::stderr))
        .init();
}

/// `uri` with the value of an `access_token` query parameter replaced by [`REDACTED`].
pub fn uri(uri: &http::Uri) -> String {
    text(&uri.to_string()).into_owned()
}

/// `line` with every token-shaped part replaced by [`REDACTED`].
pub fn text(line: &str) -> Cow<'_, str> {
    let bytes = line.as_bytes();
    let mut out: Option<String> = None;
    // Up to where `line` has been copied to `out`.
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let value = if starts_with_ignore_case(&bytes[at..], b"authorization") {
            header_value(bytes, at + "authorization".len())
        } else if starts_with_ignore_case(&bytes[at..], b"access_token=") {
            let start = at + "access_token=".len();
            Some((start, start + token_len(&bytes[start..])))
        } else if starts_with_ignore_case(&bytes[at..], b"bearer ")
            && (at == 0 || !bytes[at - 1].is_ascii_alphanumeric())
        {
            let start = at + "bearer ".len();
            Some((start, start + token_len(&bytes[start..])))
        } else if bytes[at..].starts_with(b"eyJ") && (at == 0 || !is_token_byte(bytes[at - 1])) {
            let end = at + token_len(&bytes[at..]);
            let dots = bytes[at..end].iter().filter(|&&b| b == b'.').count();
            (dots == 2).then_some((at, end))
        } else {
            None
        };
        let Some((start, end)) = value else {
            at += 1;
            continue;
        };
        if end == start {
            at = start;
            continue;
        }
        let out = out.get_or_insert_with(|| String::with_capacity(line.len()));
        out.push_str(&line[copied..start]);
        out.push_str(REDACTED);
        copied = end;
        at = end;
    }
    match out {
        None => Cow::Borrowed(line),
        Some(mut out) => {
            out.push_str(&line[copied..]);
            Cow::Owned(out)
        }
    }
}

/// Where the value after a header name at `at` is: past an optional closing quote, `:` or `=`,
/// spaces and an optional opening quote, up to the end of the line, a quote, a backtick, `,` or
/// `}`.
fn header_value(bytes: &[u8], mut at: usize) -> Option<(usize, usize)> {
    let skip = |at: &mut usize, what: &[u8]| {
        while bytes.get(*at).is_some_and(|b| what.contains(b)) {
            *at += 1;
        }
    };
    skip(&mut at, b"\"");
    if !matches!(bytes.get(at), Some(b':' | b'=')) {
        return None;
    }
    at += 1;
    skip(&mut at, b" \t\"");
    let len = bytes[at..]
        .iter()
        .take_while(|b| !matches!(b, b'"' | b'`' | b'\n' | b'\r' | b',' | b'}'))
        .count();
    Some((at, at + len))
}

/// Bytes a token (or a percent-encoded one) may be made of: base64url, `.`, and the `%`, `+`,
/// `/` and `=` of other encodings.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'%' | b'+' | b'/' | b'=' | b'~')
}

fn token_len(bytes: &[u8]) -> usize {
    bytes.iter().take_while(|&&b| is_token_byte(b)).count()
}

fn starts_with_ignore_case(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// A [`MakeWriter`] whose writers pass each formatted event through [`text`]. The formatter
/// writes an event in one `write` call, so a token is never split between two.
pub struct Redacting<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

/// The writer of [`Redacting`].
pub struct RedactingWriter<W>(W);

impl<W: io::Write> io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        self.0.write_all(text(&line).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";

    #[test]
    fn tokens_are_blanked_wherever_they_appear() {
        for (line, expected) in [
            (
                format!("uri=/subscribe?topic=a&access_token={JWT}&x=1"),
                "uri=/subscribe?topic=a&access_token=[redacted]&x=1",
            ),
            (
                format!(r#"headers={{"authorization": "Bearer {JWT}", "x": "1"}}"#),
                r#"headers={"authorization": "[redacted]", "x": "1"}"#,
            ),
            (
                "Authorization: Basic dXNlcjpwYXNz".to_owned(),
                "Authorization: [redacted]",
            ),
            (
                "forwarded bearer opaque-secret".to_owned(),
                "forwarded bearer [redacted]",
            ),
            (
                "no authorization needed".to_owned(),
                "no authorization needed",
            ),
            (
                format!("cookie: theme=dark; access_token={JWT}"),
                "cookie: theme=dark; access_token=[redacted]",
            ),
            (format!("token {JWT} seen"), "token [redacted] seen"),
            (
                "nothing here: eyJ alone, access_token= empty".to_owned(),
                "nothing here: eyJ alone, access_token= empty",
            ),
        ] {
            assert_eq!(text(&line), expected);
        }
        let uri: http::Uri = format!("/subscribe?access_token={JWT}").parse().unwrap();
        assert_eq!(super::uri(&uri), "/subscribe?access_token=[redacted]");
    }
}
