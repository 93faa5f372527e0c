//! A connection's byte stream, below every door: wrappers the listener puts around accepted
//! sockets, and the write rule the direct SSE writer shares with them.
//!
//! - [`keepalive`]: refuses clients that send HTTP/2 pings (or unsolicited acks) too often.
//! - [`write_timeout`]: closes connections whose peer stops reading while data is pending.

pub mod keepalive;
pub mod write_timeout;

/// The HTTP/2 connection preface (RFC 9113, section 3.4): an h2c client with prior knowledge
/// opens with it; an HTTP/1.1 request line never does.
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
