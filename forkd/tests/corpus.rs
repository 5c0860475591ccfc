//! The restore-case corpus (CRIU's zdtm as the model): each case is its own
//! small C program, `tests/cases/CASE.c` (what every case shares is in
//! `tests/cases/case.h`), that sets up one piece of process state or memory
//! behaviour, prints "ready", and on a line from stdin checks it and prints
//! "ok" or "FAIL: why". Every case runs in every mode, each cell its own
//! test (`corpus::CASE::MODE`):
//!
//! - `eager`: every page written before the child runs;
//! - `lazy_window`, `lazy_off`, `lazy_recorded`: served by the pager, with
//!   each prefetch (recorded: a first child records, a second uses it);
//! - `template`: two children forked from the node template;
//! - `remote_tcp`: a seed of one forkd, a child on another, paged over TCP;
//! - `seed_of_seed`: a restored child, captured while it waits, restored;
//! - `remote_rdma`: as `remote_tcp`, paged by RDMA READ between two
//!   Soft-RoCE nodes: every case in one test on one pair of nodes
//!   (`remote_rdma_every_case`; under the VM's emulated CPU a pair of
//!   daemons per case would not fit its time), each cell printed as a
//!   `CELL ok|FAIL corpus::CASE::remote_rdma` line that the VM harness
//!   (`soft-rdma-tests/run`, which sets `RF_RDMA_NODE{1,2}_{DEV,IP}`) counts
//!   as a test. Elsewhere it prints SKIPPED.
//!
//! Root-only: real ptrace, userfaultfd and daemons.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;

/// A seed of the program `tests/cases/CASE.c` (captured with `forkd snapshot`).
fn seed(case: &str, mode: &str) -> PathBuf {
    seed_of(Command::new(c_case(case)), &format!("corpus-{case}-{mode}")).0
}

/// Restore `dir` with `args`, send the check: its answer.
fn check(dir: &std::path::Path, args: &[&str]) -> Restored {
    restore_and_talk(dir, args, "check\n", |_| {})
}

fn assert_ok(case: &str, mode: &str, r: &Restored) {
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "ok\n"),
        "{case} in {mode}: {}{}",
        r.stdout,
        r.stderr
    );
}

fn run(case: &str, mode: &str) {
    if !require_root(&format!("corpus::{case}::{mode}")) {
        return;
    }
    match mode {
        "eager" => assert_ok(case, mode, &check(&seed(case, mode), &["--eager"])),
        "lazy_window" => assert_ok(case, mode, &check(&seed(case, mode), &[])),
        "lazy_off" => assert_ok(
            case,
            mode,
            &check(&seed(case, mode), &["--prefetch", "off"]),
        ),
        "lazy_recorded" => {
            let dir = seed(case, mode);
            for _ in 0..2 {
                assert_ok(case, mode, &check(&dir, &["--prefetch", "recorded"]));
            }
        }
        "template" => {
            let dir = seed(case, mode);
            let r = check(&dir, &["--count", "2", "--json"]);
            let report: Value = serde_json::from_str(r.stdout.trim())
                .or_else(|_| serde_json::from_str(r.stderr.trim()))
                .unwrap_or_else(|_| panic!("{case} in {mode}: {}{}", r.stdout, r.stderr));
            let kids = report["children"].as_array().unwrap();
            assert_eq!(kids.len(), 2, "{report}");
            for k in kids {
                assert_eq!(
                    (k["exit_code"].as_i64(), k["stdout"].as_str()),
                    (Some(0), Some("ok\n")),
                    "{case} in {mode}: {k}"
                );
            }
        }
        "remote_tcp" => {
            let free = || {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            };
            let base = scratch(&format!("corpus-{case}-remote"));
            let (da, db) = (base.join("a"), base.join("b"));
            std::fs::create_dir_all(&da).unwrap();
            std::fs::create_dir_all(&db).unwrap();
            let a = Daemon::start_with(&da, true, &["--page-listen", &free()]);
            let b = Daemon::start_with(&db, true, &["--transport", "tcp"]);
            let input = base.join("check");
            std::fs::write(&input, "check\n").unwrap();
            remote_cell(case, &a, &a.tcp.clone().unwrap(), &b, &input);
        }
        "seed_of_seed" => {
            let dir = seed(case, mode);
            let again = scratch(&format!("corpus-{case}-again")).join("seed");
            // The restored child, waiting for its check, becomes a seed.
            let r = restore_and_talk(&dir, &["--eager"], "check\n", |child| {
                let (code, _, err) = run_forkd(&[
                    "snapshot",
                    "--pid",
                    &child.to_string(),
                    "--out",
                    again.to_str().unwrap(),
                ]);
                assert_eq!(code, 0, "snapshot of a restored child: {err}");
            });
            assert_ok(case, "the first generation", &r);
            assert_ok(case, mode, &check(&again, &[]));
        }
        other => panic!("unknown mode {other}"),
    }
}

/// One module per case, named after its program `tests/cases/CASE.c`; one
/// test per mode.
/// A seed of `case` on node `a` (reached by other nodes at `a_addr`), a
/// child of it on node `b` given `input`: it must answer "ok". The seed id.
fn remote_cell(
    case: &str,
    a: &Daemon,
    a_addr: &str,
    b: &Daemon,
    input: &std::path::Path,
) -> String {
    let prog = c_case(case);
    let id = command_seed(|x| a.ctl(x), &[], &[prog.to_str().unwrap()]);
    let (code, r, err) = a.ctl(&["seed", "ref", &id, "--origin", a_addr]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = b.ctl(&[
        "--json",
        "spawn",
        r.trim(),
        "--stdin",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{case} remotely: {out} {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["children"][0]["stdout"], "ok\n", "{case} remotely: {v}");
    id
}

macro_rules! corpus {
    ($($case:ident),* $(,)?) => {
        /// Every case, in order.
        const CASES: &[&str] = &[$(stringify!($case)),*];
        $(
            #[allow(non_snake_case)]
            mod $case {
                #[test] fn eager() { super::run(stringify!($case), "eager") }
                #[test] fn lazy_window() { super::run(stringify!($case), "lazy_window") }
                #[test] fn lazy_off() { super::run(stringify!($case), "lazy_off") }
                #[test] fn lazy_recorded() { super::run(stringify!($case), "lazy_recorded") }
                #[test] fn template() { super::run(stringify!($case), "template") }
                #[test] fn remote_tcp() { super::run(stringify!($case), "remote_tcp") }
                #[test] fn seed_of_seed() { super::run(stringify!($case), "seed_of_seed") }
            }
        )*
    };
}

corpus!(
    sigmask,
    sigaction,
    sigign,
    sigaltstack,
    rlimit,
    cwd,
    umask,
    personality,
    environ,
    auxv,
    vdso,
    rseq,
    big,
    sparse,
    readonly,
    guard,
    shared_anon,
    growsdown,
    file_private,
    jit,
    fd_offset,
    fd_append,
    tls,
    heap,
    brk,
    mxcsr,
    comm,
    dontneed,
    mremap,
    dir_fd,
    fd_gaps,
    thp,
    file_shared_ro,
    anon_untouched,
    mixed_prot,
    rand_state,
    siginfo_onstack,
    realtime,
    robust_mutex,
    deep_stack,
    threads_state,
    event_loop,
    fd_objects,
    sockets,
);

#[test]
fn remote_rdma_every_case() {
    if !require_root("corpus::remote_rdma_every_case") {
        return;
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(dev1), Some(dev2), Some(ip1), Some(ip2)) = (
        var("RF_RDMA_NODE1_DEV"),
        var("RF_RDMA_NODE2_DEV"),
        var("RF_RDMA_NODE1_IP"),
        var("RF_RDMA_NODE2_IP"),
    ) else {
        println!(
            "SKIPPED: corpus::remote_rdma_every_case: no RDMA nodes here (RF_RDMA_NODE1_DEV unset); soft-rdma-tests/run runs the corpus over RDMA in its VM"
        );
        return;
    };
    let base = scratch("corpus-rdma");
    let token = base.join("token");
    std::fs::write(&token, "corpus-rdma-token\n").unwrap();
    let free = |ip: &str| {
        let l = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
        l.local_addr().unwrap().to_string()
    };
    let node = |name: &str, ip: &str, dev: &str| {
        let d = base.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (grpc, pages) = (free(ip), free(ip));
        let args = [
            "--listen",
            &grpc,
            "--page-listen",
            &pages,
            "--token-file",
            token.to_str().unwrap(),
            "--transport",
            "rdma",
            "--rdma-device",
            dev,
            "--page-deadline-ms",
            "60000",
        ];
        (Daemon::start_with(&d, false, &args), grpc)
    };
    let (a, a_addr) = node("a", &ip1, &dev1);
    let (b, _) = node("b", &ip2, &dev2);
    let (_, info, _) = b.ctl(&["--json", "node"]);
    assert!(info.contains(&dev2), "node b is not on {dev2}: {info}");
    let input = base.join("check");
    std::fs::write(&input, "check\n").unwrap();
    let mut failed = Vec::new();
    for case in CASES {
        // Each cell on its own: one failing case does not hide the others.
        let cell = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // --transport rdma on node b: paged by RDMA READ or refused.
            let id = remote_cell(case, &a, &a_addr, &b, &input);
            let _ = a.ctl(&["seed", "drop", &id]);
        }));
        match cell {
            Ok(()) => println!("CELL ok corpus::{case}::remote_rdma"),
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!(
                    "CELL FAIL corpus::{case}::remote_rdma: {}",
                    why.replace('\n', " ")
                );
                failed.push(*case);
            }
        }
    }
    a.stop();
    b.stop();
    assert!(
        failed.is_empty(),
        "over RDMA these cases failed: {failed:?}"
    );
}
