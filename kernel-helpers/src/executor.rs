//! The injected syscall executor: raw code that runs a table of syscalls
//! inside a stopped process in one go (see `asm/executor.S`), and the table
//! format it reads. What goes into the table is decided elsewhere
//! (`remotefork::restore::plan`); this module only knows the layout.

/// The executor's machine code (position independent).
pub const CODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/executor.bin"));

/// Bytes per table entry: nr, six arguments, flags, extra.
pub const ENTRY_SIZE: usize = 72;

/// Flag: replace argument `i` with the previous syscall's result.
pub const fn prev_to_arg(i: u32) -> u64 {
    1 << i
}
/// Flag: replace argument `i` with the saved result (see [`SAVE`]).
pub const fn saved_to_arg(i: u32) -> u64 {
    1 << (16 + i)
}
/// Flag: a failure of this syscall does not stop the executor.
pub const IGNORE_ERROR: u64 = 1 << 8;
/// Flag: remember this syscall's result as the saved result.
pub const SAVE: u64 = 1 << 9;
/// Flag: store the result (8 bytes) at the address in `extra`.
pub const STORE: u64 = 1 << 10;
/// Flag: the result must equal `extra`, else the executor stops as failed.
pub const EXPECT: u64 = 1 << 11;
/// Flag: argument 0 is the address of a 32-bit int (as `pipe2` and
/// `socketpair` write descriptor numbers), and the syscall gets that int,
/// sign-extended, instead.
pub const LOAD_ARG0: u64 = 1 << 12;

/// An entry with this number is not a syscall but a touch: it reads one
/// byte of each page of `args[1]` runs listed at `args[0]` (16 bytes each:
/// the first page's address and the page count, little-endian), in order,
/// stopping early once the 8-byte word at `args[2]` is nonzero. Its result
/// is the count of pages read. A page read this way has its page-table
/// entry marked accessed, which a `fork()` child's entries are not: the
/// first access to each then costs the child nothing extra.
pub const TOUCH: u64 = -2i64 as u64;

/// Bytes per run of a [`TOUCH`] list.
pub const RUN_SIZE: usize = 16;

/// One table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    /// Syscall number.
    pub nr: u64,
    /// Arguments.
    pub args: [u64; 6],
    /// Flags.
    pub flags: u64,
    /// Store address or expected value.
    pub extra: u64,
}

impl Entry {
    /// Little-endian encoding, as the executor reads it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nr.to_le_bytes());
        for a in self.args {
            out.extend_from_slice(&a.to_le_bytes());
        }
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.extra.to_le_bytes());
    }
}

/// How a run of the executor ended, read from the registers at its `int3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every entry ran.
    Done,
    /// Entry `index` failed with `result` (a negative errno, or the value
    /// that did not match an EXPECT).
    Failed {
        /// Index of the failing entry.
        index: u64,
        /// Its raw result.
        result: i64,
    },
}

/// Decode the outcome from the registers at the executor's final stop.
pub fn outcome(regs: &libc::user_regs_struct) -> Outcome {
    if regs.r13 == 0 {
        Outcome::Done
    } else {
        Outcome::Failed {
            index: regs.r15,
            result: regs.rax as i64,
        }
    }
}

/// Registers that start the executor at `code_addr` over `count` entries at `table_addr`.
pub fn start_regs(
    base: &libc::user_regs_struct,
    code_addr: u64,
    table_addr: u64,
    count: u64,
) -> libc::user_regs_struct {
    let mut r = *base;
    r.rip = code_addr;
    r.r12 = table_addr;
    r.r13 = count;
    r.r14 = 0;
    r.r15 = 0;
    r.rbp = 0;
    // Not in a syscall: nothing for the kernel to restart.
    r.orig_rax = u64::MAX;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_ends_in_int3_loops_and_entries_are_72_bytes() {
        assert!(CODE.len() > 100 && CODE.len() < 4096);
        assert!(
            CODE.windows(3).any(|w| w == [0xcc, 0xeb, 0xfd]),
            "int3; jmp back"
        );
        let mut v = Vec::new();
        Entry {
            nr: 9,
            args: [1, 2, 3, 4, 5, 6],
            flags: SAVE,
            extra: 7,
        }
        .encode(&mut v);
        assert_eq!(v.len(), ENTRY_SIZE);
        assert_eq!(&v[56..64], &SAVE.to_le_bytes());
    }
}
