//! The threads that carry the ingress's client connections: one single-threaded runtime
//! per core, as an event-driven proxy has one worker process per core. A client
//! connection, its backend connection and every wake-up between them stay on one thread;
//! no task moves between threads, and no thread wakes another to share its work.
//! Connections are handed out in turn as they are accepted.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

pub(super) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Ends the worker threads (and drops what still runs on them).
    stop: CancellationToken,
}

impl Workers {
    /// Starts one worker thread per core; they run until `stop` or until this is dropped.
    /// With none (a runtime or thread that cannot start), connections run where accepted.
    pub(super) fn start() -> Self {
        let cancel = CancellationToken::new();
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut handles = Vec::with_capacity(cores);
        for i in 0..cores {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start an ingress worker runtime; connections run on the gateway's runtime");
                    break;
                }
            };
            let handle = runtime.handle().clone();
            let stop = cancel.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-ingress-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()));
            match spawned {
                Ok(_) => handles.push(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start an ingress worker thread; connections run on the gateway's runtime");
                    break;
                }
            }
        }
        Self {
            handles,
            next: AtomicUsize::new(0),
            stop: cancel,
        }
    }

    /// Ends the worker threads; connections still on them close.
    pub(super) fn stop(&self) {
        self.stop.cancel();
    }

    /// The worker for the next connection, in turn (None: the caller's runtime).
    pub(super) fn next(&self) -> Option<&Handle> {
        if self.handles.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles.get(i)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
