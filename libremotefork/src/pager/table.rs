//! A child's page-state table, keyed by the child's current addresses, and
//! how the userfaultfd events change it. Pure: unit-tested without a process.

use std::collections::BTreeMap;

use crate::PAGE_SIZE;

/// The state of one lazily served page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Not yet in the child; its content is at this page-store offset.
    Stored(u64),
    /// Not yet in the child; it reads as zeros.
    Zero,
    /// Installed in the child (from this origin).
    Done(Origin),
}

/// Where a page that was installed came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The page store, at this offset.
    Stored(u64),
    /// Zeros.
    Zero,
}

/// Pages of `[start, start + 4096 * slots.len())`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    slots: Vec<Slot>,
}

/// All lazily served pages of one child.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageTable {
    regions: BTreeMap<u64, Region>,
}

impl PageTable {
    /// Add a region of pages starting at `start` (page aligned).
    pub fn insert(&mut self, start: u64, slots: Vec<Slot>) {
        if !slots.is_empty() {
            self.regions.insert(start, Region { slots });
        }
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
    /// `Stored`, in the same region: (address, offset) pairs.
    pub fn stored_run(&self, addr: u64, max: usize) -> Vec<(u64, u64)> {
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
            self.regions.insert(at, Region { slots: tail });
        }
    }

    /// Remove and return the pages of `[start, end)` as (address, slots) regions.
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, Vec<Slot>)> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.regions.range(start..end).map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.regions.remove(&k).map(|r| (k, r.slots)))
            .collect()
    }

    /// `munmap`: forget `[start, end)`.
    pub fn unmap(&mut self, start: u64, end: u64) {
        self.take(start, end);
    }

    /// `madvise(MADV_DONTNEED)`: pages of `[start, end)` read as zeros from
    /// now on, never as the parent's data again.
    pub fn remove(&mut self, start: u64, end: u64) {
        for (at, slots) in self.take(start, end) {
            self.insert(at, vec![Slot::Zero; slots.len()]);
        }
    }

    /// `mremap`: pages of `[from, from+len)` now live at `to`. Whatever was
    /// tracked at the destination is replaced (the kernel unmapped it).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.take(from, from + len);
        self.take(to, to + len);
        for (at, slots) in moved {
            self.insert(to + (at - from), slots);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn table() -> PageTable {
        let mut t = PageTable::default();
        t.insert(
            0x10000,
            vec![
                Slot::Stored(0),
                Slot::Stored(P),
                Slot::Zero,
                Slot::Stored(2 * P),
            ],
        );
        t
    }

    #[test]
    fn lookups_and_runs() {
        let t = table();
        assert_eq!(t.get(0x10000 + 5), Some(Slot::Stored(0)));
        assert_eq!(t.get(0x10000 + 2 * P), Some(Slot::Zero));
        assert_eq!(t.get(0x10000 + 4 * P), None);
        assert_eq!(t.get(0xf000), None);
        assert_eq!(
            t.stored_run(0x10000, 16),
            vec![(0x10000, 0), (0x10000 + P, P)]
        );
        assert_eq!(t.stored_run(0x10000, 1), vec![(0x10000, 0)]);
        assert_eq!(t.stored_run(0x10000 + 2 * P, 16), vec![]);
    }

    #[test]
    fn dontneed_turns_pages_into_zeros() {
        let mut t = table();
        t.set(0x10000, Slot::Done(Origin::Stored(0)));
        t.remove(0x10000, 0x10000 + 2 * P);
        assert_eq!(t.get(0x10000), Some(Slot::Zero));
        assert_eq!(t.get(0x10000 + P), Some(Slot::Zero));
        assert_eq!(t.get(0x10000 + 3 * P), Some(Slot::Stored(2 * P)));
        assert_eq!(t.pages(), 4);
    }

    #[test]
    fn munmap_forgets_and_mremap_moves() {
        let mut t = table();
        t.unmap(0x10000 + P, 0x10000 + 2 * P);
        assert_eq!(t.get(0x10000 + P), None);
        assert_eq!(t.pages(), 3);
        let mut t = table();
        t.remap(0x10000 + P, 0x900000, 3 * P);
        assert_eq!(t.get(0x10000 + P), None);
        assert_eq!(t.get(0x900000), Some(Slot::Stored(P)));
        assert_eq!(t.get(0x900000 + 2 * P), Some(Slot::Stored(2 * P)));
        assert_eq!(t.get(0x10000), Some(Slot::Stored(0)));
        // Moving onto tracked pages replaces them.
        t.remap(0x900000, 0x10000, P);
        assert_eq!(t.get(0x10000), Some(Slot::Stored(P)));
    }
}
