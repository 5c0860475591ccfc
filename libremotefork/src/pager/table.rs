//! A child's page-state table, keyed by the child's current addresses, and
//! how the userfaultfd events change it. Pure: unit-tested without a process.

use std::collections::BTreeMap;

use crate::PAGE_SIZE;

/// Where a stored page lives: in the seed's page store, and in the
/// node-local cache (whose layout follows the child's address space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    /// Offset in the page store.
    pub image: u64,
    /// Offset in the node-local cache.
    pub cache: u64,
}

/// How the pages of a region are put into the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// `UFFDIO_COPY` from the cache: the child gets its own copy.
    Copy,
    /// The region maps the cache memfd privately; `UFFDIO_CONTINUE` maps the
    /// cache's page, shared by every child until one writes it.
    Continue,
}

/// The state of one lazily served page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Not yet in the child; its content is stored.
    Stored(PageRef),
    /// Not yet in the child; it reads as zeros.
    Zero,
    /// Installed in the child (from this origin).
    Done(Origin),
}

/// Where a page that was installed came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The page store.
    Stored(PageRef),
    /// Zeros.
    Zero,
}

/// Pages of `[start, start + 4096 * slots.len())`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    slots: Vec<Slot>,
    fill: Fill,
}

/// All lazily served pages of one child.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageTable {
    regions: BTreeMap<u64, Region>,
}

impl PageTable {
    /// Add a region of pages starting at `start` (page aligned).
    pub fn insert(&mut self, start: u64, slots: Vec<Slot>, fill: Fill) {
        if !slots.is_empty() {
            self.regions.insert(start, Region { slots, fill });
        }
    }

    /// How the page at `addr` is filled.
    pub fn fill(&self, addr: u64) -> Option<Fill> {
        let page = addr & !(PAGE_SIZE - 1);
        let (start, r) = self.regions.range(..=page).next_back()?;
        (page < start + r.slots.len() as u64 * PAGE_SIZE).then_some(r.fill)
    }

    /// Its regions: (start, length in bytes, filled from the cache).
    pub fn regions(&self) -> Vec<(u64, u64, bool)> {
        self.regions
            .iter()
            .map(|(s, r)| {
                (
                    *s,
                    r.slots.len() as u64 * PAGE_SIZE,
                    r.fill == Fill::Continue,
                )
            })
            .collect()
    }

    /// The first address of the first region, if there is one.
    pub fn first_addr(&self) -> Option<u64> {
        self.regions.keys().next().copied()
    }

    /// Number of tracked pages.
    pub fn pages(&self) -> usize {
        self.regions.values().map(|r| r.slots.len()).sum()
    }

    /// The slot of the page containing `addr`.
    pub fn get(&self, addr: u64) -> Option<Slot> {
        let page = addr & !(PAGE_SIZE - 1);
        let (start, r) = self.regions.range(..=page).next_back()?;
        r.slots.get(((page - start) / PAGE_SIZE) as usize).copied()
    }

    /// Set the slot of the page at `addr` (if tracked).
    pub fn set(&mut self, addr: u64, slot: Slot) {
        let page = addr & !(PAGE_SIZE - 1);
        if let Some((start, r)) = self.regions.range_mut(..=page).next_back() {
            let i = ((page - start) / PAGE_SIZE) as usize;
            if let Some(s) = r.slots.get_mut(i) {
                *s = slot;
            }
        }
    }

    /// Up to `max` consecutive pages from `addr` (inclusive) that are
    /// `Stored`, in the same region: (address, page) pairs.
    pub fn stored_run(&self, addr: u64, max: usize) -> Vec<(u64, PageRef)> {
        let page = addr & !(PAGE_SIZE - 1);
        let mut out = Vec::new();
        if let Some((start, r)) = self.regions.range(..=page).next_back() {
            let first = ((page - start) / PAGE_SIZE) as usize;
            for (k, s) in r.slots.iter().enumerate().skip(first).take(max) {
                match s {
                    Slot::Stored(off) => out.push((start + k as u64 * PAGE_SIZE, *off)),
                    _ => break,
                }
            }
        }
        out
    }

    /// Cut regions so that `at` is a region boundary (if inside one).
    fn split_at(&mut self, at: u64) {
        let Some((&start, _)) = self.regions.range(..at).next_back() else {
            return;
        };
        let len = self.regions[&start].slots.len() as u64;
        if at < start + len * PAGE_SIZE {
            let Some(r) = self.regions.get_mut(&start) else {
                return;
            };
            let tail = r.slots.split_off(((at - start) / PAGE_SIZE) as usize);
            let fill = r.fill;
            self.regions.insert(at, Region { slots: tail, fill });
        }
    }

    /// Remove and return the pages of `[start, end)` as (address, slots) regions.
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, Region)> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.regions.range(start..end).map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.regions.remove(&k).map(|r| (k, r)))
            .collect()
    }

    /// `munmap`: forget `[start, end)`.
    pub fn unmap(&mut self, start: u64, end: u64) {
        self.take(start, end);
    }

    /// `madvise(MADV_DONTNEED)`: pages of `[start, end)` read as zeros from
    /// now on, never as the parent's data again.
    pub fn remove(&mut self, start: u64, end: u64) {
        for (at, r) in self.take(start, end) {
            self.insert(at, vec![Slot::Zero; r.slots.len()], r.fill);
        }
    }

    /// `mremap`: pages of `[from, from+len)` now live at `to`. Whatever was
    /// tracked at the destination is replaced (the kernel unmapped it).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.take(from, from + len);
        self.take(to, to + len);
        for (at, r) in moved {
            self.insert(to + (at - from), r.slots, r.fill);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn st(image: u64) -> Slot {
        Slot::Stored(r(image))
    }

    fn r(image: u64) -> PageRef {
        PageRef {
            image,
            cache: image + 100 * P,
        }
    }

    fn table() -> PageTable {
        let mut t = PageTable::default();
        t.insert(
            0x10000,
            vec![st(0), st(P), Slot::Zero, st(2 * P)],
            Fill::Continue,
        );
        t
    }

    #[test]
    fn lookups_and_runs() {
        let t = table();
        assert_eq!(t.get(0x10000 + 5), Some(st(0)));
        assert_eq!(t.get(0x10000 + 2 * P), Some(Slot::Zero));
        assert_eq!(t.get(0x10000 + 4 * P), None);
        assert_eq!(t.get(0xf000), None);
        assert_eq!(
            t.stored_run(0x10000, 16),
            vec![(0x10000, r(0)), (0x10000 + P, r(P))]
        );
        assert_eq!(t.stored_run(0x10000, 1), vec![(0x10000, r(0))]);
        assert_eq!(t.stored_run(0x10000 + 2 * P, 16), vec![]);
    }

    #[test]
    fn dontneed_turns_pages_into_zeros() {
        let mut t = table();
        t.set(0x10000, Slot::Done(Origin::Stored(r(0))));
        t.remove(0x10000, 0x10000 + 2 * P);
        assert_eq!(t.get(0x10000), Some(Slot::Zero));
        assert_eq!(t.get(0x10000 + P), Some(Slot::Zero));
        assert_eq!(t.get(0x10000 + 3 * P), Some(st(2 * P)));
        assert_eq!(t.pages(), 4);
    }

    #[test]
    fn munmap_forgets_and_mremap_moves() {
        let mut t = table();
        t.unmap(0x10000 + P, 0x10000 + 2 * P);
        assert_eq!(t.get(0x10000 + P), None);
        assert_eq!(t.pages(), 3);
        assert_eq!(t.fill(0x10000), Some(Fill::Continue));
        assert_eq!(t.fill(0x10000 + P), None);
        let mut t = table();
        t.remap(0x10000 + P, 0x900000, 3 * P);
        assert_eq!(t.get(0x10000 + P), None);
        assert_eq!(t.get(0x900000), Some(st(P)));
        assert_eq!(t.get(0x900000 + 2 * P), Some(st(2 * P)));
        assert_eq!(t.get(0x10000), Some(st(0)));
        // Moving onto tracked pages replaces them.
        t.remap(0x900000, 0x10000, P);
        assert_eq!(t.get(0x10000), Some(st(P)));
    }
}

#[cfg(test)]
mod journal_tests {
    use super::*;
    use crate::pager::Journal;

    fn stored(n: u64) -> Vec<Slot> {
        (0..n)
            .map(|i| {
                Slot::Stored(PageRef {
                    image: i * PAGE_SIZE,
                    cache: i * PAGE_SIZE,
                })
            })
            .collect()
    }

    #[test]
    fn a_replayed_journal_rebuilds_the_same_table() {
        let p = std::env::temp_dir().join(format!("rf-journal-{}", std::process::id()));
        let mut live = PageTable::default();
        live.insert(0x10000, stored(16), Fill::Continue);
        live.insert(0x100000, stored(8), Fill::Copy);
        let base = live.clone();
        let mut j = Journal::create(p.clone()).unwrap();
        // What the pager does with the events, written down as it goes.
        live.remove(0x12000, 0x14000);
        j.record(b'R', 0x12000, 0x14000, 0);
        live.remap(0x100000, 0x200000, 8 * PAGE_SIZE);
        j.record(b'M', 0x100000, 0x200000, 8 * PAGE_SIZE);
        live.unmap(0x1e000, 0x20000);
        j.record(b'U', 0x1e000, 0x20000, 0);
        // A forked child's journal starts as a copy.
        let forked = j.fork(p.with_extension("g1")).unwrap();
        let mut again = base.clone();
        assert_eq!(Journal::replay(&p, &mut again).unwrap(), 3);
        assert_eq!(again, live);
        assert_eq!(
            again.get(0x12000),
            Some(Slot::Zero),
            "removed pages read as zeros"
        );
        assert_eq!(again.get(0x1e000), None, "unmapped pages are forgotten");
        let mut g = base;
        Journal::replay(forked.path(), &mut g).unwrap();
        assert_eq!(g, live);
        drop((j, forked));
        assert!(!p.exists(), "a journal is removed with its child");
    }
}
