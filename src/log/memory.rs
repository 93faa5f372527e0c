//! The in-memory log: each topic's retained messages, oldest first, with the watermarks resume
//! needs. It is the whole history with no data dir, and the index and cache in front of the disk
//! store with one (reads and resumes never touch the disk).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::message::Message;

/// Per-topic retention limits.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Messages kept per topic.
    pub messages: usize,
    /// Bytes (payload + headers + topic) kept per topic.
    pub bytes: usize,
    /// Age after which a message is evicted.
    pub age: Duration,
}

/// A retained message, with what eviction and replay look at kept beside it: by the time a
/// message is evicted it is long out of the cache, and reading its fields there cost a miss or
/// two on every publish.
struct Retained {
    seq: u64,
    published_at: SystemTime,
    size: usize,
    message: Arc<Message>,
}

/// One topic's history.
#[derive(Default)]
pub struct TopicLog {
    retained: VecDeque<Retained>,
    retained_bytes: usize,
    /// Highest seq evicted from this topic (0 = none).
    evicted_through: u64,
    /// Seq of the newest message appended (0 = none).
    last_seq: u64,
}

impl TopicLog {
    /// A topic whose messages up to `evicted_through` are gone (as recovered from disk).
    pub fn with_watermark(evicted_through: u64) -> TopicLog {
        TopicLog {
            evicted_through,
            last_seq: evicted_through,
            ..TopicLog::default()
        }
    }

    /// A new topic that may have had messages up to `evicted_through` before (a topic of that
    /// name may have been forgotten): a resume from before it is told of the gap.
    pub fn inheriting(evicted_through: u64) -> TopicLog {
        TopicLog {
            evicted_through,
            ..TopicLog::default()
        }
    }

    /// Appends `message` (its seq above every retained one) and evicts what the limits no
    /// longer allow, reporting each evicted seq to `evicted`. Returns the bytes evicted.
    pub fn append(
        &mut self,
        message: Arc<Message>,
        limits: &Retention,
        now: SystemTime,
        evicted: &mut impl FnMut(u64),
    ) -> (usize, usize) {
        let size = message.retained_size();
        // A topic's first message gets room for itself alone, not the four a `VecDeque` grows
        // to: most topics of a broker with many hold one or a few (128 bytes a topic less).
        if self.retained.capacity() == 0 {
            self.retained.reserve_exact(1);
        }
        self.retained_bytes += size;
        self.last_seq = message.seq;
        self.retained.push_back(Retained {
            seq: message.seq,
            published_at: message.published_at,
            size,
            message,
        });
        (size, self.evict(limits, now, evicted))
    }

    /// Evicts from the front while a limit is exceeded; returns the bytes evicted.
    pub fn evict(
        &mut self,
        limits: &Retention,
        now: SystemTime,
        evicted: &mut impl FnMut(u64),
    ) -> usize {
        let mut freed = 0;
        while let Some(oldest) = self.retained.front() {
            let expired = now
                .duration_since(oldest.published_at)
                .is_ok_and(|age| age > limits.age);
            if self.retained.len() <= limits.messages
                && self.retained_bytes <= limits.bytes
                && !expired
            {
                break;
            }
            freed += self.pop_oldest(evicted);
        }
        freed
    }

    /// Evicts the oldest message (the hub-wide byte cap chooses which topic); returns its size.
    pub fn pop_oldest(&mut self, evicted: &mut impl FnMut(u64)) -> usize {
        let Some(oldest) = self.retained.pop_front() else {
            return 0;
        };
        self.retained_bytes -= oldest.size;
        self.evicted_through = oldest.seq;
        evicted(oldest.seq);
        oldest.size
    }

    /// Seq of the oldest retained message.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.retained.front().map(|r| r.seq)
    }

    /// When the oldest retained message was published.
    pub fn oldest_published_at(&self) -> Option<SystemTime> {
        self.retained.front().map(|r| r.published_at)
    }

    /// Highest seq evicted from this topic (0 = none).
    pub fn evicted_through(&self) -> u64 {
        self.evicted_through
    }

    /// Seq of the newest message appended (0 = none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Messages retained.
    pub fn len(&self) -> usize {
        self.retained.len()
    }

    /// Whether nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.retained.is_empty()
    }

    /// Bytes retained.
    pub fn bytes(&self) -> usize {
        self.retained_bytes
    }

    /// Retained messages with seq > `after`, oldest first.
    pub fn read_after(&self, after: u64) -> impl Iterator<Item = &Arc<Message>> {
        let start = self.retained.partition_point(|r| r.seq <= after);
        self.retained.range(start..).map(|r| &r.message)
    }
}
