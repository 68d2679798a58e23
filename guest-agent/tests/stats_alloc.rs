//! `__org.qga-bridge_get-memory-stats` is polled every second for the life of a guest:
//! its allocations per call must be few, freed by the end of the call, and the same on
//! the thousandth call as on the first. Counted with a global allocator of this test
//! binary (its own process, so no other test's allocations mix in; counted per thread).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    path::Path,
};

use qga_agent::{Agent, CommandFilter, MemoryTree, OnlineType, ProcFs};
use qga_wire::Request;
use serde_json::json;

struct Counting;

thread_local! {
    /// (allocations, bytes live) on this thread.
    static COUNT: Cell<(u64, i64)> = const { Cell::new((0, 0)) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a
// `const`-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        COUNT.with(|c| {
            let (n, live) = c.get();
            c.set((n + 1, live + layout.size() as i64));
        });
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        COUNT.with(|c| {
            let (n, live) = c.get();
            c.set((n, live - layout.size() as i64));
        });
        // SAFETY: `ptr` came from `alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn counted<T>(f: impl FnOnce() -> T) -> (T, u64, i64) {
    let (n0, live0) = COUNT.with(Cell::get);
    let out = f();
    let (n1, live1) = COUNT.with(Cell::get);
    (out, n1 - n0, live1 - live0)
}

#[test]
fn no_allocation_growth_with_call_count() {
    // This machine's real /proc, PSI or not.
    let procfs = ProcFs::default();
    procfs.memory_stats().expect("warm up");
    let (stats, allocs, live) = counted(|| procfs.memory_stats().expect("stats"));
    let boot_id = usize::from(stats.boot_id.is_some());
    assert_eq!(
        allocs as usize, boot_id,
        "only the boot id's string is allocated"
    );
    drop(stats);
    assert!(live > 0 || boot_id == 0);

    // Through the agent's request handling, reusing the output buffer as the server does:
    // after warming up, a thousand calls leave nothing behind and allocate the same each.
    let agent = Agent::new(
        MemoryTree::new(Path::new("/nonexistent")),
        OnlineType::Online,
        CommandFilter::default(),
    );
    let mut out = Vec::new();
    let call = |out: &mut Vec<u8>| {
        let req = Request::from_value(json!({"execute": "__org.qga-bridge_get-memory-stats"}))
            .expect("request");
        out.clear();
        agent.handle(req, out);
    };
    call(&mut out);
    let ((), first, _) = counted(|| call(&mut out));
    let ((), total, live) = counted(|| {
        for _ in 0..1000 {
            call(&mut out);
        }
    });
    assert!(
        out.starts_with(b"{\"return\":"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(live, 0, "bytes still allocated after 1000 calls");
    assert!(
        total <= 1000 * first,
        "{total} allocations for 1000 calls, {first} for one"
    );
}
