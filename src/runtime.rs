//! The Tokio runtime the service runs on: the multi-threaded scheduler, one worker per CPU the
//! process may use, or `--worker-threads` of them.
//!
//! Not the single-threaded scheduler on one CPU (which linkerd2-proxy picks there). It used to
//! serve ~1.4x the cached reads per CPU here, because it ran a connection's task after the
//! requests that became ready, so that the connection wrote their answers together, where the
//! multi-threaded scheduler ran it after each one (its LIFO slot) and wrote one answer per
//! system call. The connection now does that itself on either scheduler
//! ([`crate::transport::http2`]), and both measure the same (1.18-1.23x a bare tonic server's
//! rate on one thread, 1.19-1.24x on the default; `docs/benchmark.md`). What the single thread
//! kept was its cost: 10,000 callers of a herd woken at once had every answer built before any
//! was written, and a herd of fast readers peaked at +106 MiB (+28 MiB on the default, against
//! the 64 MiB bound a rollout's herd is held to). One scheduler, then.

use std::io;
use std::num::NonZeroUsize;

use tokio::runtime::{Builder, Runtime};

/// The most worker threads accepted: more than any machine the service runs on has CPUs, so a
/// larger number is a typo rather than a choice.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The worker threads to run: `requested`, else the CPUs this process may use (its CPU
/// affinity and cgroup quota, as [`std::thread::available_parallelism`] reads them), else one.
pub fn workers(requested: Option<usize>) -> usize {
    requested
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
}

/// The worker threads of the runtime this is called on (`None` outside a runtime), as it was
/// built rather than as the flags say it should be.
pub fn current() -> Option<usize> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    Some(handle.metrics().num_workers())
}

/// Builds the runtime for the `requested` worker threads (see [`workers`]), with I/O and
/// timers.
pub fn build(requested: Option<usize>) -> io::Result<Runtime> {
    Builder::new_multi_thread()
        .worker_threads(workers(requested))
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_as_asked_else_the_cpus() {
        assert_eq!(workers(Some(3)), 3);
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(workers(None), cpus, "unset: the CPUs this process may use");
    }

    #[test]
    fn current_reads_the_runtime_as_built() {
        assert_eq!(current(), None);
        for workers in [1, 2] {
            let runtime = build(Some(workers)).unwrap();
            assert_eq!(runtime.block_on(async { current() }), Some(workers));
            assert_eq!(
                runtime.handle().runtime_flavor(),
                tokio::runtime::RuntimeFlavor::MultiThread,
                "one worker is still the multi-threaded scheduler"
            );
        }
    }

    #[test]
    fn runtimes_run_tasks_spawned_from_a_blocking_thread_while_driven() {
        // Telemetry's shutdown runs on a blocking thread and needs the runtime driven: what
        // `main` relies on, with one worker too.
        for workers in [1, 2] {
            let runtime = build(Some(workers)).unwrap();
            let answered = runtime.block_on(async {
                tokio::task::spawn_blocking(|| {
                    let handle = tokio::runtime::Handle::current();
                    let (tx, rx) = std::sync::mpsc::channel();
                    handle.spawn(async move { tx.send(7).unwrap() });
                    rx.recv_timeout(std::time::Duration::from_secs(10))
                })
                .await
                .unwrap()
            });
            assert_eq!(answered, Ok(7), "{workers} worker(s)");
        }
    }
}
