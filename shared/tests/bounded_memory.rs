//! A job's memory is of the order of its own size, however its parts multiply: the request
//! builder never materialises what Opsgenie's limits would cut. Measured with a counting
//! allocator, so this file is a test binary of its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use opsgenie_shared::{AlertJob, build_request};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated above the starting point while `f` runs.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.load(Ordering::SeqCst);
    PEAK.store(start, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - start)
}

fn wide_job(url_chars: usize, rules: usize) -> Vec<u8> {
    let rules: Vec<serde_json::Value> = (0..rules)
        .map(|i| serde_json::json!({"id": i, "label": "r"}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "version": 1, "kind": "issue_alert", "notification_uuid": "wide-1", "team_id": "backend",
        "organization": {"id": 1, "slug": "acme", "url": format!("https://acme.example/{}", "a".repeat(url_chars))},
        "project": {"id": 7, "slug": "api", "name": "API"},
        "group": {"id": 1, "title": "Boom"},
        "event": {"title": "Boom"},
        "rules": rules,
    }))
    .unwrap()
}

#[test]
fn a_long_base_times_many_rules_costs_the_jobs_size_not_their_product() {
    // The two jobs an attacker sent: 126 KB (a 100 KB URL, 1,000 rules: 100 MB joined whole)
    // and 969 KB (500 KB, 20,000 rules: 10 GB joined whole).
    for (url_chars, rules) in [(100_000, 1_000), (500_000, 20_000)] {
        let body = wide_job(url_chars, rules);
        let (request, peak) = peak_of(|| {
            let job = AlertJob::parse(&body).expect("a valid job");
            build_request(&job)
        });
        assert!(
            request.body.len() < 64 * 1024,
            "request of {} bytes",
            request.body.len()
        );
        assert!(
            peak < 8 * body.len(),
            "{} rules behind a {url_chars}-char base ({} bytes of job) took {peak} bytes at peak",
            rules,
            body.len()
        );
    }
}
