//! The hub's error type. Transports map it once each: to `tonic::Status` in `grpc` and to an HTTP
//! JSON error in `http`.

use std::fmt;

/// Everything the hub can refuse, with enough detail to tell the caller what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A topic or pattern is malformed.
    InvalidTopic { topic: String, reason: String },
    /// A publish named a wildcard pattern instead of a concrete topic.
    WildcardInPublish { topic: String },
    /// A payload is larger than the configured limit.
    PayloadTooLarge { size: usize, limit: usize },
    /// A request is missing something or combines options that do not go together.
    InvalidRequest(String),
    /// A cursor could not be parsed.
    InvalidCursor { cursor: String, reason: String },
    /// A cursor of this epoch points past the newest message.
    CursorAhead { cursor: String, head: u64 },
    /// No subscription has this id.
    UnknownSubscription(String),
    /// No topic of this name has retained messages or live subscribers.
    UnknownTopic(String),
    /// The topic the subscription named was deleted (`DELETE /topics/{topic}`, `DeleteTopic`).
    TopicDeleted(String),
    /// The subscriber's queue overflowed under the `disconnect` policy.
    SlowConsumer(Behind),
    /// The server is shutting down.
    ShuttingDown,
    /// No valid token (missing, malformed, expired, wrong signature).
    Unauthenticated(String),
    /// The token is valid but does not allow this topic or pattern.
    PermissionDenied(String),
    /// A server limit was reached; the message names it and the option that sets it.
    LimitExceeded(String),
    /// The log could not store a message (e.g. the disk is full); nothing was published.
    Unavailable(String),
    /// This deployment cannot do what was asked (the message says why and what to do instead).
    Unsupported(String),
    /// A publish reused an idempotency key that names another message (`what`: its topic, or
    /// another payload on it; `original`: its seq, or that it is still being published).
    KeyReused {
        key: String,
        what: String,
        original: String,
    },
}

/// How far behind a slow subscriber fell: the bound of its queue that it overflowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// Its queue held this many messages.
    Messages(usize),
    /// Its queued messages took this many bytes (payload, headers and topic).
    Bytes(usize),
}

/// The gRPC status code name each error maps to; HTTP codes follow grpc-gateway's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidArgument,
    ResourceExhausted,
    NotFound,
    Unavailable,
    Unauthenticated,
    PermissionDenied,
    AlreadyExists,
    Aborted,
    Unimplemented,
}

impl Kind {
    /// The canonical upper-case gRPC status code name, as every door names it on the wire.
    pub fn code_name(self) -> &'static str {
        match self {
            Kind::InvalidArgument => "INVALID_ARGUMENT",
            Kind::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Kind::NotFound => "NOT_FOUND",
            Kind::Unavailable => "UNAVAILABLE",
            Kind::Unauthenticated => "UNAUTHENTICATED",
            Kind::PermissionDenied => "PERMISSION_DENIED",
            Kind::AlreadyExists => "ALREADY_EXISTS",
            Kind::Aborted => "ABORTED",
            Kind::Unimplemented => "UNIMPLEMENTED",
        }
    }
}

impl Error {
    /// Which class of failure this is.
    pub fn kind(&self) -> Kind {
        match self {
            Error::InvalidTopic { .. }
            | Error::WildcardInPublish { .. }
            | Error::InvalidRequest(_)
            | Error::InvalidCursor { .. }
            | Error::CursorAhead { .. } => Kind::InvalidArgument,
            Error::PayloadTooLarge { .. } | Error::SlowConsumer(_) | Error::LimitExceeded(_) => {
                Kind::ResourceExhausted
            }
            Error::UnknownSubscription(_) | Error::UnknownTopic(_) => Kind::NotFound,
            Error::TopicDeleted(_) => Kind::Aborted,
            Error::ShuttingDown | Error::Unavailable(_) => Kind::Unavailable,
            Error::Unauthenticated(_) => Kind::Unauthenticated,
            Error::PermissionDenied(_) => Kind::PermissionDenied,
            Error::KeyReused { .. } => Kind::AlreadyExists,
            Error::Unsupported(_) => Kind::Unimplemented,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidTopic { topic, reason } => write!(f, "invalid topic {topic:?}: {reason}"),
            Error::WildcardInPublish { topic } => write!(
                f,
                "cannot publish to {topic:?}: wildcards (`*`, `>`) are for subscribing; publish to a concrete topic"
            ),
            Error::PayloadTooLarge { size, limit } => write!(
                f,
                "payload is {size} bytes, over the limit of {limit} bytes (server option --max-payload-bytes)"
            ),
            Error::InvalidRequest(message) => f.write_str(message),
            Error::InvalidCursor { cursor, reason } => {
                write!(f, "invalid cursor {cursor:?}: {reason}")
            }
            Error::CursorAhead { cursor, head } => write!(
                f,
                "cursor {cursor} is ahead of this hub, whose newest message is seq {head}; use a cursor this hub issued"
            ),
            Error::UnknownSubscription(id) => write!(f, "no subscription with id {id:?}"),
            Error::UnknownTopic(topic) => write!(
                f,
                "no topic {topic:?}: it has no retained messages and no live subscribers"
            ),
            Error::TopicDeleted(topic) => write!(
                f,
                "topic {topic:?} was deleted: its history is gone and this subscription has ended; subscribe again to follow new messages"
            ),
            Error::SlowConsumer(Behind::Messages(queue_size)) => write!(
                f,
                "subscriber fell more than {queue_size} messages behind and its lag policy is `disconnect`; read faster, raise queue_size, or use the `catch-up` policy"
            ),
            Error::SlowConsumer(Behind::Bytes(queue_bytes)) => write!(
                f,
                "subscriber fell more than {queue_bytes} bytes behind and its lag policy is `disconnect`; read faster, raise queue_bytes, or use the `catch-up` policy"
            ),
            Error::ShuttingDown => {
                f.write_str("topichub is shutting down; reconnect and resume from your last cursor")
            }
            Error::Unauthenticated(reason) => write!(f, "unauthenticated: {reason}"),
            Error::PermissionDenied(reason) => write!(f, "permission denied: {reason}"),
            Error::LimitExceeded(reason) => write!(f, "limit reached: {reason}"),
            Error::Unsupported(reason) => write!(f, "not supported: {reason}"),
            Error::Unavailable(reason) => write!(f, "unavailable: {reason}"),
            Error::KeyReused {
                key,
                what,
                original,
            } => write!(
                f,
                "idempotency key {key:?} was already used for {what} ({original}); a retry must repeat the same topic and payload, a new message needs a new key"
            ),
        }
    }
}

impl std::error::Error for Error {}
