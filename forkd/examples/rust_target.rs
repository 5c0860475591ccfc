//! A Rust test target for capture and restore (std, no threads): state in
//! globals, the heap, a 64 MiB mapping and thread-local storage, and a
//! SIGUSR1 handler. It prints a checksum of that state, blocks reading a
//! line from stdin, then prints what it read, the checksum again and the
//! last signal its handler saw.

use std::cell::Cell;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

const BIG: usize = 64 << 20;

static GLOBALS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static GOT_SIGNAL: AtomicI32 = AtomicI32::new(0);

thread_local! {
    static TLS: Cell<u64> = const { Cell::new(0x7151) };
}

extern "C" fn on_usr1(sig: libc::c_int) {
    GOT_SIGNAL.store(sig, Ordering::SeqCst);
}

fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

fn checksum(heap: &[u64], big: &[u8]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for g in &GLOBALS {
        h = fnv(&g.load(Ordering::Relaxed).to_le_bytes(), h);
    }
    for x in heap {
        h = fnv(&x.to_le_bytes(), h);
    }
    for off in (0..BIG).step_by(4096 * 7) {
        h = fnv(&big[off..off + 64], h);
    }
    TLS.with(|t| fnv(&t.get().to_le_bytes(), h))
}

fn main() {
    for (i, g) in GLOBALS.iter().enumerate() {
        g.store(
            (i as u64).wrapping_mul(0x9e3779b97f4a7c15) ^ 0x55,
            Ordering::Relaxed,
        );
    }
    let heap: Vec<u64> = (0..100_000u64)
        .map(|i| i.wrapping_mul(31) ^ 0xabcdef)
        .collect();
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            BIG,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the mapping is BIG bytes, readable and writable, and only used through this slice.
    let big: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(p.cast(), BIG) };
    for off in (0..BIG).step_by(4096 * 7) {
        big[off..off + 4096].fill((off >> 12) as u8);
    }
    TLS.with(|t| t.set(t.get() ^ heap.as_ptr() as u64));
    // SAFETY: installing a handler that only stores to an atomic; the
    // sigaction struct is fully initialised before use.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ready {:016x} heap={:p}",
        checksum(&heap, big),
        heap.as_ptr()
    )
    .unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    writeln!(out, "got {}", line.trim()).unwrap();
    writeln!(
        out,
        "checksum {:016x} signal {}",
        checksum(&heap, big),
        GOT_SIGNAL.load(Ordering::SeqCst)
    )
    .unwrap();
    // SAFETY: getpid has no preconditions.
    writeln!(out, "pid {}", unsafe { libc::getpid() }).unwrap();
}
