//! Cursors: a position in the hub's history, `EPOCH-SEQ` in text.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// "After the message with this seq, in this epoch." `seq == 0` is before the first message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The history id of the hub that issued the cursor.
    pub epoch: String,
    /// Sequence number of the message the cursor points at.
    pub seq: u64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

impl FromStr for Cursor {
    type Err = Error;

    fn from_str(text: &str) -> Result<Cursor, Error> {
        let bad = |why: &str| Error::InvalidCursor {
            cursor: text.chars().take(80).collect(),
            reason: why.to_owned(),
        };
        let (epoch, seq) = text
            .rsplit_once('-')
            .ok_or_else(|| bad("expected EPOCH-SEQ, e.g. the `id` of an SSE event"))?;
        if !is_epoch(epoch) {
            return Err(bad("the epoch part must be 1-32 letters or digits"));
        }
        // One spelling per cursor: digits only, no sign, no leading zeros (u64's parser would
        // accept `+7` and `007`).
        let canonical = !seq.is_empty()
            && seq.bytes().all(|b| b.is_ascii_digit())
            && (seq == "0" || !seq.starts_with('0'));
        let seq = canonical
            .then(|| seq.parse().ok())
            .flatten()
            .ok_or_else(|| {
                bad("the seq part must be a whole number without sign or leading zeros")
            })?;
        Ok(Cursor {
            epoch: epoch.to_owned(),
            seq,
        })
    }
}

/// Epochs are short alphanumeric ids, so `EPOCH-SEQ` splits unambiguously.
pub(crate) fn is_epoch(text: &str) -> bool {
    (1..=32).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let epoch: String = (0..rng.usize(1..=32)).map(|_| rng.alphanumeric()).collect();
            let cursor = Cursor {
                epoch,
                seq: rng.u64(..),
            };
            assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        }
    }

    #[test]
    fn malformed_cursors_say_what_is_wrong() {
        for (bad, why) in [
            ("", "EPOCH-SEQ"),
            ("abc", "EPOCH-SEQ"),
            ("-5", "epoch"),
            ("ab-", "whole number"),
            ("ab--5", "epoch"),
            ("ab-x", "whole number"),
            ("ab-18446744073709551616", "whole number"),
            ("ab-+7", "whole number"),
            ("ab-007", "leading zeros"),
        ] {
            let err = bad.parse::<Cursor>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
