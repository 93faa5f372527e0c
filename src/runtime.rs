//! The async runtime the broker runs on.

/// Tokio's multi-threaded scheduler, one worker per CPU this process may run on; with a single
/// CPU (a one-core container, or `taskset -c 0`), tokio's single-threaded scheduler, which does
/// the same work without cross-thread queues and wake-ups. `TOKIO_WORKER_THREADS` overrides the
/// worker count as usual.
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}
