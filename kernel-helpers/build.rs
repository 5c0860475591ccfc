//! Assembles the husk (a static, libc-free binary at a fixed address) and the
//! injected syscall executor (raw position-independent code) with the
//! system's C compiler and binutils.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Where the husk's text is linked: above where PIE executables (0x55..,
/// 0x56..) and below where shared libraries and stacks (0x7f..) land.
const HUSK_BASE: &str = "0x5f0000000000";

fn run(cmd: &mut Command) {
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (install build-essential)"));
    assert!(st.success(), "{cmd:?} failed");
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    println!("cargo:rerun-if-changed=asm/husk.S");
    println!("cargo:rerun-if-changed=asm/executor.S");
    println!("cargo:rustc-env=RF_HUSK_BASE={HUSK_BASE}");

    run(Command::new(&cc)
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none"])
        .arg(format!("-Wl,-Ttext-segment={HUSK_BASE}"))
        .arg("-o")
        .arg(out.join("rf-husk"))
        .arg("asm/husk.S"));

    let obj = out.join("executor.o");
    run(Command::new(&cc)
        .args(["-c", "-o"])
        .arg(&obj)
        .arg("asm/executor.S"));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(out.join("executor.bin")));
}
