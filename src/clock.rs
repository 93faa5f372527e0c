//! Where the hub's time comes from. Messages are stamped and aged by wall-clock time (it is shown
//! to clients and survives restarts), but tests of expiry must not wait for it: with
//! [`Clock::Tokio`] the wall clock moves with tokio's, so a test with paused time
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) ages messages at once.

use std::time::SystemTime;

/// The hub's source of wall-clock time.
#[derive(Clone, Copy, Debug, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// The system time when the clock was made, advanced by tokio's clock since then.
    Tokio {
        /// Wall-clock time at `start`.
        anchor: SystemTime,
        /// tokio's time when the clock was made.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's time (paused in tests), starting from now.
    pub fn tokio() -> Clock {
        Clock::Tokio {
            anchor: SystemTime::now(),
            start: tokio::time::Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { anchor, start } => *anchor + start.elapsed(),
        }
    }
}
