//! `__org.qga-bridge_online-when-present`: wait for a range of memory blocks to appear
//! and online each the moment it does.
//!
//! A host that has just plugged a DIMM otherwise polls `guest-get-memory-blocks` until the
//! DIMM's blocks show up, then sends `guest-set-memory-blocks`: several round trips and a
//! polling delay. Here the agent subscribes to the kernel's uevents first, then looks at
//! the tree once (a block added before the subscription is found there), then onlines
//! blocks as their `add` events come. Blocks outside the range are never touched.

use std::time::{Duration, Instant};

use qga_wire::schema::{GuestMemoryBlockResponse, GuestMemoryBlockResponseType};

use crate::{
    sysfs::{MemoryTree, OnlineType, StateWriter},
    uevent::{BlockEvents, News},
};

/// Most blocks one call may wait for (8 TiB of 128 MiB blocks).
pub const MAX_COUNT: u64 = 65_536;

/// Longest wait one call may ask for, milliseconds: the agent serves one request at a
/// time, so this bounds how long it answers nothing else.
pub const MAX_TIMEOUT_MS: u64 = 300_000;

/// What to wait for and how to online it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhenPresent {
    /// The first block's index.
    pub first: u64,
    /// How many blocks, at least one and at most [`MAX_COUNT`]; `first + count` does not
    /// overflow.
    pub count: u64,
    /// The word written to bring a block online.
    pub online_type: OnlineType,
    /// How long to wait for blocks to appear.
    pub timeout: Duration,
}

impl WhenPresent {
    fn indices(&self) -> std::ops::Range<u64> {
        self.first..self.first + self.count
    }
}

/// Onlines every block of `req`'s range as it appears, until all have a result or the
/// time is up; one result per block in index order. A block that never appeared is
/// `not-found` with errno 2 (ENOENT), as `guest-set-memory-blocks` answers for it; one
/// already online is a success; one the kernel refused keeps its errno.
///
/// `events` must have been subscribed before this is called, so that nothing added
/// between the subscription and the first look is missed.
pub fn online_when_present(
    tree: &MemoryTree,
    req: &WhenPresent,
    writer: &dyn StateWriter,
    events: &mut dyn BlockEvents,
) -> Vec<GuestMemoryBlockResponse> {
    let until = Instant::now() + req.timeout;
    let slots = usize::try_from(req.count).unwrap_or(usize::MAX);
    let mut results: Vec<Option<GuestMemoryBlockResponse>> = vec![None; slots];
    let mut left = slots;
    let mut look: Vec<u64> = req.indices().collect();
    loop {
        let tries: Vec<(u64, bool)> = look
            .iter()
            .filter(|&&i| req.indices().contains(&i))
            .filter(|&&i| results[slot(req, i)].is_none())
            .map(|&i| (i, true))
            .collect();
        if !tries.is_empty() {
            for mut r in tree.set_blocks(&tries, req.online_type, writer) {
                if raced(tree, &r) {
                    r.response = GuestMemoryBlockResponseType::Success;
                    r.error_code = None;
                }
                let s = &mut results[slot(req, r.phys_index)];
                if r.response != GuestMemoryBlockResponseType::NotFound && s.is_none() {
                    *s = Some(r);
                    left -= 1;
                }
            }
        }
        if left == 0 {
            break;
        }
        look = match events.wait(until) {
            News::Added(blocks) => blocks,
            News::Rescan => req.indices().collect(),
            News::TimedOut => break,
        };
    }
    results
        .into_iter()
        .zip(req.indices())
        .map(|(r, i)| {
            r.unwrap_or(GuestMemoryBlockResponse {
                phys_index: i,
                response: GuestMemoryBlockResponseType::NotFound,
                error_code: Some(i64::from(rustix::io::Errno::NOENT.raw_os_error())),
            })
        })
        .collect()
}

/// Whether a failed online lost a race with the kernel onlining the block itself
/// (`auto_online_blocks`): it read offline, the kernel onlined it, and the write of an
/// online word to an online block fails with EINVAL. The block is online: that is
/// success.
fn raced(tree: &MemoryTree, r: &GuestMemoryBlockResponse) -> bool {
    r.response == GuestMemoryBlockResponseType::OperationFailed
        && r.error_code == Some(i64::from(rustix::io::Errno::INVAL.raw_os_error()))
        && tree.is_online(r.phys_index) == Some(true)
}

/// Where block `i` (in the range) keeps its result.
fn slot(req: &WhenPresent, i: u64) -> usize {
    usize::try_from(i - req.first).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use qga_testkit::FakeSysfs;

    use super::*;
    use crate::sysfs::KernelWriter;

    /// Events played from a script: each wait runs the next step (which may change the
    /// tree) and returns its news; when the script is done, the time is up.
    struct Script<'a> {
        steps: VecDeque<Box<dyn FnMut() -> News + 'a>>,
        waits: usize,
    }

    impl<'a> Script<'a> {
        fn new(steps: Vec<Box<dyn FnMut() -> News + 'a>>) -> Self {
            Self {
                steps: steps.into(),
                waits: 0,
            }
        }
    }

    impl BlockEvents for Script<'_> {
        fn wait(&mut self, _until: Instant) -> News {
            self.waits += 1;
            match self.steps.pop_front() {
                Some(mut step) => step(),
                None => News::TimedOut,
            }
        }
    }

    fn req(first: u64, count: u64) -> WhenPresent {
        WhenPresent {
            first,
            count,
            online_type: OnlineType::OnlineMovable,
            timeout: Duration::from_secs(5),
        }
    }

    fn summary(results: &[GuestMemoryBlockResponse]) -> Vec<(u64, &'static str)> {
        results
            .iter()
            .map(|r| {
                let word = match r.response {
                    GuestMemoryBlockResponseType::Success => "success",
                    GuestMemoryBlockResponseType::NotFound => "not-found",
                    GuestMemoryBlockResponseType::OperationFailed => "failed",
                    GuestMemoryBlockResponseType::OperationNotSupported => "unsupported",
                };
                (r.phys_index, word)
            })
            .collect()
    }

    #[test]
    fn blocks_present_before_the_call_need_no_event() {
        let tree = FakeSysfs::with_blocks(4, "online");
        tree.block(32, Some("offline"), Some("1"))
            .block(33, Some("online"), Some("1"));
        let mut events = Script::new(Vec::new());
        let mem = MemoryTree::new(tree.root());
        let results = online_when_present(&mem, &req(32, 2), &KernelWriter, &mut events);
        assert_eq!(summary(&results), [(32, "success"), (33, "success")]);
        assert_eq!(tree.state(32), "online_movable");
        assert_eq!(tree.state(33), "online", "an online block is left as it is");
        assert_eq!(events.waits, 0, "nothing to wait for");
    }

    #[test]
    fn blocks_appearing_late_and_out_of_order_are_onlined_as_announced() {
        let tree = FakeSysfs::with_blocks(2, "online");
        let mem = MemoryTree::new(tree.root());
        let t = &tree;
        let mut events = Script::new(vec![
            // Another device's news, then the range's blocks in reverse order, one
            // announced twice, and one outside the range that must not be touched.
            Box::new(|| News::Added(Vec::new())),
            Box::new(|| {
                t.block(35, Some("offline"), Some("1"))
                    .block(99, Some("offline"), Some("1"));
                News::Added(vec![35, 99])
            }),
            Box::new(|| {
                t.block(34, Some("offline"), Some("1"))
                    .block(33, Some("offline"), Some("1"))
                    .block(32, Some("offline"), Some("1"));
                News::Added(vec![34, 33, 35])
            }),
            Box::new(|| News::Added(vec![32])),
        ]);
        let results = online_when_present(&mem, &req(32, 4), &KernelWriter, &mut events);
        assert_eq!(
            summary(&results),
            [
                (32, "success"),
                (33, "success"),
                (34, "success"),
                (35, "success")
            ]
        );
        for i in 32..36 {
            assert_eq!(tree.state(i), "online_movable", "block {i}");
        }
        assert_eq!(tree.state(99), "offline", "outside the range");
        assert_eq!(events.waits, 4);
    }

    #[test]
    fn lost_events_make_it_look_again() {
        let tree = FakeSysfs::with_blocks(1, "online");
        let mem = MemoryTree::new(tree.root());
        let t = &tree;
        let mut events = Script::new(vec![Box::new(|| {
            // Added while the socket's buffer was full: no event names it.
            t.block(8, Some("offline"), Some("1"));
            News::Rescan
        })]);
        let results = online_when_present(&mem, &req(8, 1), &KernelWriter, &mut events);
        assert_eq!(summary(&results), [(8, "success")]);
        assert_eq!(tree.state(8), "online_movable");
    }

    #[test]
    fn blocks_that_never_appear_are_not_found_at_the_timeout() {
        let tree = FakeSysfs::with_blocks(1, "online");
        tree.block(16, Some("offline"), Some("1"));
        let mem = MemoryTree::new(tree.root());
        let mut events = Script::new(vec![Box::new(|| News::Added(vec![18]))]);
        let results = online_when_present(&mem, &req(16, 3), &KernelWriter, &mut events);
        assert_eq!(
            summary(&results),
            [(16, "success"), (17, "not-found"), (18, "not-found")]
        );
        assert!(results[1..].iter().all(|r| r.error_code == Some(2)));
        assert_eq!(events.waits, 2, "waited until the script's time was up");
    }

    #[test]
    fn a_block_the_kernel_refuses_is_final_with_its_errno() {
        #[derive(Debug)]
        struct Refuse;
        impl StateWriter for Refuse {
            fn write_state(
                &self,
                _block: std::os::fd::BorrowedFd<'_>,
                index: u64,
                _value: &str,
            ) -> Result<(), rustix::io::Errno> {
                if index == 5 {
                    Err(rustix::io::Errno::INVAL)
                } else {
                    Ok(())
                }
            }
        }
        let tree = FakeSysfs::with_blocks(1, "online");
        tree.block(4, Some("offline"), Some("1"))
            .block(5, Some("offline"), Some("1"));
        let mem = MemoryTree::new(tree.root());
        let mut events = Script::new(Vec::new());
        let results = online_when_present(&mem, &req(4, 2), &Refuse, &mut events);
        assert_eq!(summary(&results), [(4, "success"), (5, "failed")]);
        assert_eq!(results[1].error_code, Some(22));
        assert_eq!(
            events.waits, 0,
            "a refusal is an answer, not a reason to wait"
        );
    }

    #[test]
    fn losing_a_race_with_the_kernels_own_onlining_is_success() {
        /// The kernel onlines the block itself between the agent's read and its write,
        /// which then fails with EINVAL (an online word to an online block).
        #[derive(Debug)]
        struct KernelFirst;
        impl StateWriter for KernelFirst {
            fn write_state(
                &self,
                block: std::os::fd::BorrowedFd<'_>,
                _index: u64,
                _value: &str,
            ) -> Result<(), rustix::io::Errno> {
                KernelWriter.write_state(block, 0, "online_movable")?;
                Err(rustix::io::Errno::INVAL)
            }
        }
        let tree = FakeSysfs::with_blocks(1, "online");
        tree.block(6, Some("offline"), Some("1"));
        let mem = MemoryTree::new(tree.root());
        let mut events = Script::new(Vec::new());
        let results = online_when_present(&mem, &req(6, 1), &KernelFirst, &mut events);
        assert_eq!(summary(&results), [(6, "success")]);
        assert_eq!(results[0].error_code, None);
    }
}
