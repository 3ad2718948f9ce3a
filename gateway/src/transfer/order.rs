//! The order of a post-copy bulk push: address order, continuing from the last faulted
//! address. A fault says where the destination's process runs now, so the pages after it
//! are the likeliest to be touched next (QEMU's post-copy does the same); the push jumps
//! there, goes on in address order, and wraps around to what it skipped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::criu::image::{PageRun, PAGE_SIZE};

/// Where the last fault the source served was: `(process id in the images, address)`.
/// Written by the priority connection, read by the bulk push between pieces.
#[derive(Debug, Clone, Default)]
pub struct LastFault(Arc<Mutex<Option<(u32, u64)>>>);

impl LastFault {
    pub fn set(&self, pid: u32, vaddr: u64) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((pid, vaddr));
    }

    fn take(&self) -> Option<(u32, u64)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The runs still to push, handed out in pieces of at most `max_pages`: in address order
/// from a cursor that a new fault moves, wrapping around once the end is reached.
pub struct PushOrder {
    rest: BTreeMap<(u32, u64), u64>,
    cursor: (u32, u64),
    faults: LastFault,
    max_pages: u64,
}

impl PushOrder {
    pub fn new(runs: Vec<PageRun>, faults: LastFault, max_pages: u64) -> Self {
        let rest = runs
            .into_iter()
            .filter(|r| r.nr_pages > 0)
            .map(|r| ((r.pid, r.vaddr), r.nr_pages))
            .collect();
        Self {
            rest,
            cursor: (0, 0),
            faults,
            max_pages: max_pages.max(1),
        }
    }

    /// The run holding `at`, or the first one after it; else the first of all.
    fn next_key(&self, at: (u32, u64)) -> Option<(u32, u64)> {
        if let Some((&(pid, vaddr), &pages)) = self.rest.range(..=at).next_back() {
            if pid == at.0 && vaddr + pages * PAGE_SIZE > at.1 {
                return Some((pid, vaddr));
            }
        }
        self.rest
            .range(at..)
            .next()
            .or_else(|| self.rest.iter().next())
            .map(|(k, _)| *k)
    }
}

impl Iterator for PushOrder {
    type Item = PageRun;

    fn next(&mut self) -> Option<PageRun> {
        if let Some(fault) = self.faults.take() {
            self.cursor = fault;
        }
        let (pid, vaddr) = self.next_key(self.cursor)?;
        let pages = self.rest.remove(&(pid, vaddr))?;
        // Start at the cursor when it falls inside this run: what lies before it stays.
        let start = if pid == self.cursor.0 && self.cursor.1 > vaddr {
            let head = (self.cursor.1 - vaddr) / PAGE_SIZE;
            if head > 0 {
                self.rest.insert((pid, vaddr), head);
            }
            vaddr + head * PAGE_SIZE
        } else {
            vaddr
        };
        let left = pages - (start - vaddr) / PAGE_SIZE;
        let take = left.min(self.max_pages);
        if take < left {
            self.rest
                .insert((pid, start + take * PAGE_SIZE), left - take);
        }
        self.cursor = (pid, start + take * PAGE_SIZE);
        Some(PageRun {
            pid,
            vaddr: start,
            nr_pages: take,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn run(pid: u32, page: u64, pages: u64) -> PageRun {
        PageRun {
            pid,
            vaddr: page * P,
            nr_pages: pages,
        }
    }

    fn pages_of(runs: &[PageRun]) -> Vec<(u32, u64)> {
        runs.iter()
            .flat_map(|r| (0..r.nr_pages).map(move |i| (r.pid, r.vaddr / P + i)))
            .collect()
    }

    #[test]
    fn without_faults_the_push_is_in_address_order_in_pieces() {
        let order = PushOrder::new(
            vec![run(2, 0, 3), run(1, 50, 5), run(1, 10, 2)],
            LastFault::default(),
            2,
        );
        let got: Vec<PageRun> = order.collect();
        assert_eq!(
            got,
            vec![
                run(1, 10, 2),
                run(1, 50, 2),
                run(1, 52, 2),
                run(1, 54, 1),
                run(2, 0, 2),
                run(2, 2, 1)
            ]
        );
    }

    #[test]
    fn a_fault_moves_the_push_there_and_it_wraps_around_to_every_page_once() {
        let faults = LastFault::default();
        let runs = vec![run(1, 0, 10), run(1, 100, 10), run(2, 0, 4)];
        let mut order = PushOrder::new(runs.clone(), faults.clone(), 4);
        let mut got = vec![order.next().unwrap()];
        assert_eq!(got[0], run(1, 0, 4));
        // A fault inside the second run: the push goes on from the faulted page.
        faults.set(1, 105 * P);
        got.push(order.next().unwrap());
        assert_eq!(got[1], run(1, 105, 4));
        got.push(order.next().unwrap());
        assert_eq!(got[2], run(1, 109, 1));
        // Then the next process, then around to what was skipped, in order.
        got.extend(order);
        assert_eq!(got[3], run(2, 0, 4));
        assert_eq!(got[4], run(1, 4, 4));
        let mut all = pages_of(&got);
        all.sort_unstable();
        let mut want = pages_of(&runs);
        want.sort_unstable();
        assert_eq!(all, want, "every page exactly once");
    }

    #[test]
    fn a_fault_between_runs_or_past_the_end_goes_to_the_next_run_or_the_first() {
        let faults = LastFault::default();
        let mut order = PushOrder::new(vec![run(1, 0, 1), run(1, 20, 1)], faults.clone(), 8);
        faults.set(1, 5 * P);
        assert_eq!(order.next(), Some(run(1, 20, 1)));
        faults.set(9, 0);
        assert_eq!(order.next(), Some(run(1, 0, 1)));
        assert_eq!(order.next(), None);
    }
}
