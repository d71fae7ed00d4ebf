//! The Tokio runtime the service runs on: by default the multi-threaded scheduler, one worker
//! per CPU the process may use; with `--worker-threads 1`, the single-threaded scheduler.
//!
//! On one CPU the choice is not only about threads. The multi-threaded scheduler runs a task
//! woken by the running one next (its LIFO slot): each finished request wakes its
//! connection's task, which then runs at once and writes that one answer. A connection with
//! eight answers ready writes eight times, and each write is a system call that wakes the
//! reader. The single-threaded scheduler runs woken tasks in order, so the connection's task
//! runs after the other ready requests and writes their answers together. Measured under h2load
//! on one core (`docs/benchmark.md`, "The scheduler"): 0.58 writes per answer instead of 1,
//! and cached reads at 1.16-1.24x a bare tonic server's rate (on tonic's usual runtime), where
//! the default reads 0.82-0.84x.
//!
//! It is not the default, even on one CPU (where linkerd2-proxy picks it), because of a herd:
//! 10,000 callers waiting on one ECR read all wake at once, and on one thread in order every
//! one of their answers is built before any connection writes one. A herd of fast readers then
//! held up to +106 MiB at its peak, against +28 MiB on the default and the 64 MiB bound that a
//! rollout's herd is held to (`a_herd_of_ten_thousand_on_one_cold_tag_is_one_ecr_call`).

use std::io;
use std::num::NonZeroUsize;

use tokio::runtime::{Builder, Runtime};

/// The most worker threads accepted: more than any machine the service runs on has CPUs, so a
/// larger number is a typo rather than a choice.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The scheduler a runtime was built with, for the start-up line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// One thread runs every task, in the order they were woken.
    CurrentThread,
    /// Work-stealing workers, one per CPU.
    MultiThread,
}

impl Scheduler {
    /// The name in the start-up line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::CurrentThread => "current-thread",
            Scheduler::MultiThread => "multi-thread",
        }
    }
}

/// The worker threads to run: `requested`, else the CPUs this process may use (its CPU
/// affinity and cgroup quota, as [`std::thread::available_parallelism`] reads them), else one.
pub fn workers(requested: Option<usize>) -> usize {
    requested
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
}

/// The scheduler for the `requested` worker threads: the single-threaded one only when one is
/// asked for (not when one CPU is all there is: see the module).
pub fn scheduler(requested: Option<usize>) -> Scheduler {
    if requested == Some(1) {
        Scheduler::CurrentThread
    } else {
        Scheduler::MultiThread
    }
}

/// The runtime this is called on: its worker threads and its scheduler, as it was built
/// (`None` outside a runtime).
pub fn current() -> Option<(usize, Scheduler)> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let scheduler = match handle.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => Scheduler::CurrentThread,
        _ => Scheduler::MultiThread,
    };
    Some((handle.metrics().num_workers(), scheduler))
}

/// Builds the runtime for the `requested` worker threads (see [`workers`] and
/// [`scheduler`]), with I/O and timers.
pub fn build(requested: Option<usize>) -> io::Result<Runtime> {
    let workers = workers(requested);
    match scheduler(requested) {
        Scheduler::CurrentThread => Builder::new_current_thread().enable_all().build(),
        Scheduler::MultiThread => Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_worker_asked_for_runs_the_single_threaded_scheduler() {
        assert_eq!(scheduler(Some(1)), Scheduler::CurrentThread);
        assert_eq!(scheduler(Some(2)), Scheduler::MultiThread);
        assert_eq!(scheduler(None), Scheduler::MultiThread, "whatever the CPUs");
        assert_eq!(workers(Some(3)), 3);
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(workers(None), cpus, "unset: the CPUs this process may use");
    }

    #[test]
    fn current_reads_the_runtime_as_built() {
        assert_eq!(current(), None);
        for (workers, scheduler) in [(1, Scheduler::CurrentThread), (2, Scheduler::MultiThread)] {
            let runtime = build(Some(workers)).unwrap();
            assert_eq!(
                runtime.block_on(async { current() }),
                Some((workers, scheduler))
            );
        }
    }

    #[test]
    fn both_schedulers_run_tasks_spawned_from_a_blocking_thread_while_driven() {
        // Telemetry's shutdown runs on a blocking thread and needs the runtime driven: what
        // `main` relies on for both schedulers.
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
