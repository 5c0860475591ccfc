//! Page classification: which pages of a mapping go into the page store,
//! which read as zeros, and which come from the mapping's file. Pure
//! functions over pagemap entries, so the policy is unit-tested.

use kernel_helpers::pagemap::{PM_FILE_OR_SHARED, PM_PRESENT, PM_SWAPPED};

use crate::image::{PageRun, PageState, VmaKind};

/// What capture does with one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageClass {
    /// Read it and put it in the page store.
    Store,
    /// It reads as zeros: nothing to store.
    Zero,
    /// It comes from the mapping's file.
    FromFile,
}

/// Classify one page of a mapping of `kind` from its pagemap entry.
///
/// `store_all` is set for private mappings whose file cannot be found again
/// (deleted files): then every page is stored, as nothing else could supply it.
pub fn classify_page(kind: VmaKind, entry: u64, store_all: bool) -> PageClass {
    let present = entry & PM_PRESENT != 0;
    let swapped = entry & PM_SWAPPED != 0;
    let file_page = entry & PM_FILE_OR_SHARED != 0;
    if store_all {
        return PageClass::Store;
    }
    match kind {
        VmaKind::Anon | VmaKind::Heap | VmaKind::Stack | VmaKind::Shmem => {
            if present || swapped {
                PageClass::Store
            } else {
                PageClass::Zero
            }
        }
        // A swapped page of a private file mapping is an anonymous copy; a
        // present page without the file bit is a copied-on-write page.
        VmaKind::FilePrivate => {
            if swapped || (present && !file_page) {
                PageClass::Store
            } else {
                PageClass::FromFile
            }
        }
        VmaKind::FileShared => PageClass::FromFile,
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock => PageClass::Zero,
    }
}

/// Turn per-page classes into runs, assigning page-store offsets from
/// `next_offset` on. `zero_after_read(i)` says whether the `i`-th stored
/// page of this mapping turned out to be all zeros; such pages become
/// [`PageState::Zero`] and take no space.
pub fn build_runs(
    classes: &[PageClass],
    zero_after_read: impl Fn(usize) -> bool,
    next_offset: &mut u64,
) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    let mut store_idx = 0usize;
    for (i, c) in classes.iter().enumerate() {
        let state = match c {
            PageClass::Store => {
                let zero = zero_after_read(store_idx);
                store_idx += 1;
                if zero {
                    PageState::Zero
                } else {
                    let s = PageState::Stored {
                        offset: *next_offset,
                    };
                    *next_offset += crate::PAGE_SIZE;
                    s
                }
            }
            PageClass::Zero => PageState::Zero,
            PageClass::FromFile => PageState::FromFile,
        };
        if let Some(last) = runs.last_mut() {
            let extends = match (last.state, state) {
                (PageState::Stored { offset: a }, PageState::Stored { offset: b }) => {
                    a + last.count * crate::PAGE_SIZE == b
                }
                (x, y) => x == y,
            };
            if extends {
                last.count += 1;
                continue;
            }
        }
        runs.push(PageRun {
            first: i as u64,
            count: 1,
            state,
        });
    }
    runs
}

/// Is this page all zeros?
pub fn is_zero_page(page: &[u8]) -> bool {
    // Compare in 8-byte words; the compiler vectorises this loop.
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PM_PRESENT;
    const S: u64 = PM_SWAPPED;
    const F: u64 = PM_FILE_OR_SHARED;

    #[test]
    fn anonymous_pages() {
        assert_eq!(classify_page(VmaKind::Anon, P, false), PageClass::Store);
        assert_eq!(classify_page(VmaKind::Heap, S, false), PageClass::Store);
        assert_eq!(classify_page(VmaKind::Stack, 0, false), PageClass::Zero);
        assert_eq!(
            classify_page(VmaKind::Shmem, P | F, false),
            PageClass::Store
        );
    }

    #[test]
    fn file_pages() {
        assert_eq!(
            classify_page(VmaKind::FilePrivate, P | F, false),
            PageClass::FromFile
        );
        assert_eq!(
            classify_page(VmaKind::FilePrivate, P, false),
            PageClass::Store
        );
        assert_eq!(
            classify_page(VmaKind::FilePrivate, S, false),
            PageClass::Store
        );
        assert_eq!(
            classify_page(VmaKind::FilePrivate, 0, false),
            PageClass::FromFile
        );
        assert_eq!(
            classify_page(VmaKind::FileShared, P, false),
            PageClass::FromFile
        );
        assert_eq!(classify_page(VmaKind::Anon, 0, true), PageClass::Store);
    }

    #[test]
    fn runs_merge_and_compact_zero_pages() {
        use PageClass::*;
        let classes = [Store, Store, Store, Zero, FromFile, FromFile, Store];
        let mut off = 8192;
        // The second stored page is all zeros.
        let runs = build_runs(&classes, |i| i == 1, &mut off);
        assert_eq!(
            runs,
            vec![
                PageRun {
                    first: 0,
                    count: 1,
                    state: PageState::Stored { offset: 8192 }
                },
                PageRun {
                    first: 1,
                    count: 1,
                    state: PageState::Zero
                },
                PageRun {
                    first: 2,
                    count: 1,
                    state: PageState::Stored { offset: 12288 }
                },
                PageRun {
                    first: 3,
                    count: 1,
                    state: PageState::Zero
                },
                PageRun {
                    first: 4,
                    count: 2,
                    state: PageState::FromFile
                },
                PageRun {
                    first: 6,
                    count: 1,
                    state: PageState::Stored { offset: 16384 }
                },
            ]
        );
        assert_eq!(off, 20480);
        let runs = build_runs(&[Store, Store], |_| false, &mut off);
        assert_eq!(
            runs,
            vec![PageRun {
                first: 0,
                count: 2,
                state: PageState::Stored { offset: 20480 }
            }]
        );
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
    }
}
