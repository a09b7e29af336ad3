//! Memory stays flat however many jobs go through: the two samples every job records into the
//! duration histograms do not pile up in a worker whose `/metrics` nobody scrapes. Measured
//! with a counting allocator, so this file is a test binary of its own (and the process's
//! only metrics recorder is the worker's).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grown = unsafe { System.realloc(ptr, layout, new_size) };
        if !grown.is_null() {
            LIVE.fetch_add(new_size, Ordering::SeqCst);
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        grown
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The jobs of one round, a million in all. Unfolded, a round's samples take over 3 MB.
const JOBS_PER_ROUND: usize = 100_000;
const ROUNDS: usize = 10;
/// What the histograms may still hold above the start once the upkeep has been through: the
/// samples recorded since, and what the allocator keeps of a freed block. A million jobs'
/// samples kept whole are some 30 MB.
const BOUND: usize = 1024 * 1024;

#[test]
fn a_million_jobs_samples_do_not_stay_in_memory_without_a_scrape() {
    let handle = opsgenie_worker::telemetry::init_metrics();
    assert!(handle.is_some(), "the recorder was not installed");
    // The handles every job's sample goes through (the macros at the call sites resolve to
    // these same histograms).
    let delivery = metrics::histogram!("opsgenie_delivery_duration_seconds");
    let request = metrics::histogram!("opsgenie_request_duration_seconds");
    delivery.record(0.02);
    request.record(0.02);
    let start = LIVE.load(Ordering::SeqCst);
    let mut slowest = Duration::ZERO;
    for round in 1..=ROUNDS {
        for i in 0..JOBS_PER_ROUND {
            let seconds = 0.02 + (i % 100) as f64 * 1e-4;
            request.record(seconds);
            delivery.record(seconds + 0.001);
        }
        // Nothing scrapes: only the worker's own upkeep can fold the samples away.
        let recorded = Instant::now();
        let deadline = recorded + Duration::from_secs(10);
        loop {
            let held = LIVE.load(Ordering::SeqCst).saturating_sub(start);
            if held <= BOUND {
                slowest = slowest.max(recorded.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after {} jobs the histograms still hold {held} bytes above the start (bound {BOUND})",
                round * JOBS_PER_ROUND
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    eprintln!(
        "{} jobs; the samples of {JOBS_PER_ROUND} were let go of within {} ms at most",
        ROUNDS * JOBS_PER_ROUND,
        slowest.as_millis()
    );
}
