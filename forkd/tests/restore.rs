//! Eager restore of real programs on this node, checked by their output.
//!
//! Run as root. Each test captures a real target, kills it, restores it with
//! `forkd restore`, and checks output that would differ if anything were
//! restored wrong.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use remotefork::image::{self, SeedImage};
use serde_json::Value;

#[test]
fn c_program_restores_with_its_state_registers_and_handler() {
    if !require_root("c_program_restores_with_its_state_registers_and_handler") {
        return;
    }
    if !has_avx2() {
        println!(
            "SKIPPED: c_program_restores_with_its_state_registers_and_handler: CPU has no AVX2"
        );
        return;
    }
    let (dir, ready) = seed_of(Command::new(c_program("capture_target")), "c-restore");
    let checksum = ready.split_whitespace().nth(1).unwrap().to_string();

    // Plain restore: exactly what the original would have printed.
    let r = restore_and_talk(&dir, &[], "go\n", |_| {});
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(
        r.stdout,
        format!("got go\nymm15 intact\nchecksum {checksum} signal 0\ncpu ok rseq registered calloc ok\n"),
        "stderr: {}",
        r.stderr
    );

    // The same, eagerly restored (every page written before it runs).
    let r = restore_and_talk(&dir, &["--eager"], "go\n", |_| {});
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "checksum {checksum} signal 0\ncpu ok rseq registered calloc ok"
        )),
        "{}",
        r.stdout
    );

    // A signal to the restored child runs the restored handler, and the
    // interrupted read restarts (SA_RESTART).
    let r = restore_and_talk(&dir, &[], "go\n", |child| {
        // SAFETY: plain kill(2).
        assert_eq!(unsafe { libc::kill(child, libc::SIGUSR1) }, 0);
    });
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(
        r.stdout
            .contains(&format!("checksum {checksum} signal {}", libc::SIGUSR1)),
        "{}",
        r.stdout
    );
    assert!(r.child > 0);
}

#[test]
fn rust_program_restores() {
    if !require_root("rust_program_restores") {
        return;
    }
    // cargo test builds the examples next to the test binaries' directory.
    let exe = std::env::current_exe().unwrap();
    let prog = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/rust_target");
    assert!(prog.exists(), "{} not built", prog.display());
    let (dir, ready) = seed_of(Command::new(&prog), "rust-restore");
    let checksum = ready.split_whitespace().nth(1).unwrap().to_string();
    let r = restore_and_talk(&dir, &[], "hello\n", |child| {
        // SAFETY: plain kill(2).
        assert_eq!(unsafe { libc::kill(child, libc::SIGUSR1) }, 0);
    });
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let want = format!(
        "got hello\nchecksum {checksum} signal {}\npid {}\n",
        libc::SIGUSR1,
        r.child
    );
    assert_eq!(r.stdout, want);
}

const PY_SERVER: &str = r#"
import sys, os, json
try:
    import boto3
    client = boto3.client('s3', region_name='us-east-1')
    region, endpoint = client.meta.region_name, client.meta.endpoint_url
except ImportError:
    region, endpoint = 'no-boto3', None
state = {'requests': 0, 'squares': [i * i for i in range(10000)]}
print('ready', os.getpid(), region, flush=True)
for line in sys.stdin:
    state['requests'] += 1
    print(json.dumps({'got': line.strip(), 'pid': os.getpid(), 'requests': state['requests'],
                      'sum': sum(state['squares']), 'region': region, 'endpoint': endpoint}), flush=True)
"#;

#[test]
fn python_with_boto3_restores_and_answers() {
    if !require_root("python_with_boto3_restores_and_answers") {
        return;
    }
    let mut cmd = Command::new(python());
    cmd.args(["-c", PY_SERVER]);
    let (dir, ready) = seed_of(cmd, "py-restore");
    let region = ready.split_whitespace().nth(2).unwrap().to_string();
    let r = restore_and_talk(&dir, &["--json"], "hello\n", |_| {});
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["got"], "hello");
    assert_eq!(
        v["pid"], r.child,
        "os.getpid() must return the child's own pid"
    );
    assert_eq!(v["requests"], 1);
    assert_eq!(v["sum"], (0..10000u64).map(|i| i * i).sum::<u64>());
    assert_eq!(v["region"].as_str().unwrap(), region);
    if region != "no-boto3" {
        assert_eq!(v["endpoint"], "https://s3.amazonaws.com");
    }
    // Eagerly restored, the same answer.
    let e = restore_and_talk(&dir, &["--eager"], "hello\n", |_| {});
    assert_eq!(e.code, Some(0), "stderr: {}", e.stderr);
    let ev: Value = serde_json::from_str(e.stdout.trim()).unwrap();
    assert_eq!(ev["sum"], v["sum"]);
    assert_eq!(ev["pid"], e.child);
    // The report (on stderr for a single child) says what happened.
    let report: Value = serde_json::from_str(r.stderr.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&report["count"], &report["failed"]),
        (&1.into(), &0.into())
    );
    let report = &report["children"][0];
    assert_eq!(report["pid"], r.child);
    assert_eq!(report["exit_code"], 0);
    // Lazy by default: most pages came through the pager, on demand.
    assert!(
        report["pages_installed"].as_u64().unwrap() > 1000,
        "{report}"
    );
    assert!(report["faults"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["reason"], Value::Null);
}

#[test]
fn twenty_children_from_one_image_are_correct_and_independent() {
    if !require_root("twenty_children_from_one_image_are_correct_and_independent") {
        return;
    }
    let mut cmd = Command::new(python());
    cmd.args(["-c", PY_SERVER]);
    let (dir, _) = seed_of(cmd, "py-count");
    let out = forkd()
        .arg("restore")
        .arg(&dir)
        .args(["--count", "20", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = out.stdin.as_ref().unwrap();
    stdin.write_all(b"a\nb\n").unwrap();
    let out = out.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kids = v["children"].as_array().unwrap();
    assert_eq!(kids.len(), 20);
    assert_eq!(v["failed"], 0);
    let mut pids = std::collections::HashSet::new();
    for k in kids {
        let lines = stdout_lines(k);
        assert_eq!(lines.len(), 2, "{k}");
        // Each child counts only its own requests: no child sees another's writes.
        assert_eq!(lines[0]["requests"], 1);
        assert_eq!(lines[1]["requests"], 2);
        assert_eq!(lines[1]["got"], "b");
        assert_eq!(lines[0]["pid"], k["pid"]);
        assert!(pids.insert(k["pid"].as_i64().unwrap()));
    }
    // Written to files instead, one per child, in order.
    let od = scratch("count-files");
    let mut p = forkd()
        .arg("restore")
        .arg(&dir)
        .args(["--count", "3", "--output-dir", od.to_str().unwrap()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(b"x\n").unwrap();
    assert!(p.wait().unwrap().success());
    for i in 0..3 {
        let s = std::fs::read_to_string(od.join(format!("child-{i}.out"))).unwrap();
        assert!(s.contains("\"got\": \"x\""), "{s}");
    }
}

#[test]
fn detach_prints_pids_and_returns() {
    if !require_root("detach_prints_pids_and_returns") {
        return;
    }
    let mut cmd = Command::new(python());
    cmd.args(["-c", PY_SERVER]);
    let (dir, _) = seed_of(cmd, "py-detach");
    let mut p = forkd()
        .arg("restore")
        .arg(&dir)
        .arg("--detach")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(p.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    // (Child::wait would close our end of the child's stdin: keep it.)
    let mut stdin = p.stdin.take().unwrap();
    assert!(
        p.wait().unwrap().success(),
        "forkd restore --detach returns at once"
    );
    // The child runs on its own, reading the stdin it was given.
    wait_blocked_in_read(pid);
    stdin.write_all(b"ping\n").unwrap();
    drop(stdin);
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let v: Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["pid"], pid);
    assert_eq!(v["got"], "ping");
}

#[test]
fn a_changed_or_missing_library_is_served_from_the_seed() {
    if !require_root("a_changed_or_missing_library_is_served_from_the_seed") {
        return;
    }
    let work = scratch("libfixture");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
    let lib = work.join("libfixture.so");
    let build_lib = |value: i32| {
        let tmp = work.join("libfixture.so.new");
        let st = Command::new("cc")
            .args([
                "-shared",
                "-fPIC",
                &format!("-DFIXTURE_VALUE={value}"),
                "-o",
            ])
            .arg(&tmp)
            .arg(src.join("libfixture.c"))
            .status()
            .unwrap();
        assert!(st.success());
        // Replace by rename, as installers and linkers do.
        std::fs::rename(&tmp, &lib).unwrap();
    };
    build_lib(41);
    let user = work.join("lib_user");
    let st = Command::new("cc")
        .arg("-o")
        .arg(&user)
        .arg(src.join("lib_user.c"))
        .arg(format!("-L{}", work.display()))
        .arg("-lfixture")
        .arg(format!("-Wl,-rpath,{}", work.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let (dir, ready) = seed_of(Command::new(&user), "libfixture-seed");
    assert_eq!(ready.trim(), "ready 41");

    // Changed: the node's library now answers 99; the child must still run
    // the seed's (41), and say so.
    build_lib(99);
    let r = restore_and_talk(&dir, &[], "go\n", |_| {});
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "fixture 41\n");
    assert!(
        r.stderr.contains(&format!(
            "{} is missing or differs on this node",
            lib.display()
        )),
        "{}",
        r.stderr
    );

    // Missing altogether.
    std::fs::remove_file(&lib).unwrap();
    let r = restore_and_talk(&dir, &[], "go\n", |_| {});
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "fixture 41\n");

    // And without the seed's copy: a clear error, nothing left running.
    std::fs::remove_dir_all(dir.join("files")).unwrap();
    let r = restore_and_talk(&dir, &[], "go\n", |_| {});
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .contains(&format!("{} is needed by mapping", lib.display())),
        "{}",
        r.stderr
    );
    assert_eq!(orphan_husks(), Vec::<i32>::new());
}

#[test]
fn a_seed_covering_the_husks_own_address_restores() {
    if !require_root("a_seed_covering_the_husks_own_address_restores") {
        return;
    }
    let (dir, _) = seed_of(Command::new(c_program("husk_range")), "husk-range");
    let r = restore_and_talk(&dir, &[], "go\n", |_| {});
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "husk range ok\n");
}

/// Rewrite an image's descriptor with `f` applied.
fn tamper(dir: &Path, name: &str, f: impl FnOnce(&mut image::Descriptor)) -> PathBuf {
    let img = SeedImage::open(dir).unwrap();
    let mut d = img.descriptor().clone();
    f(&mut d);
    let out = scratch(name).join("seed");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(dir.join("pages.img"), out.join("pages.img")).unwrap();
    std::fs::write(out.join("descriptor.bin"), image::encode(&d).unwrap()).unwrap();
    out
}

#[test]
fn a_different_vdso_is_refused_before_anything_starts() {
    if !require_root("a_different_vdso_is_refused_before_anything_starts") {
        return;
    }
    let mut cmd = Command::new(python());
    cmd.args([
        "-c",
        "import sys; print('ready', flush=True); sys.stdin.readline(); print('ran')",
    ]);
    let (dir, _) = seed_of(cmd, "vdso");
    let bad = tamper(&dir, "vdso-bad", |d| d.vdso_hash = "ab".repeat(32));
    let r = restore_and_talk(&bad, &[], "x\n", |_| {});
    assert_eq!(r.code, Some(1));
    assert_eq!(r.child, 0, "no child may be started");
    assert!(
        r.stderr.contains("vDSO differs from the seed's"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("ran"));

    // A mapping where no process can have one: refused, nothing left behind.
    let bad = tamper(&dir, "vdso-range", |d| {
        let v = d
            .vmas
            .iter_mut()
            .find(|v| v.kind == image::VmaKind::Anon)
            .unwrap();
        let pages = v.pages();
        v.start = 0x7fff_ffff_f000 - 0x1000;
        v.end = v.start + pages * 4096;
        d.vmas.sort_by_key(|v| v.start);
    });
    let r = restore_and_talk(&bad, &[], "x\n", |_| {});
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("outside the user address space") || r.stderr.contains("inconsistent"),
        "{}",
        r.stderr
    );
    assert_eq!(orphan_husks(), Vec::<i32>::new());
}

#[test]
fn restore_without_privileges_is_refused_clearly() {
    if !require_root("restore_without_privileges_is_refused_clearly") {
        return;
    }
    let mut cmd = Command::new(python());
    cmd.args([
        "-c",
        "import sys; print('ready', flush=True); sys.stdin.readline()",
    ]);
    let (dir, _) = seed_of(cmd, "noperm-restore");
    // Let 'nobody' read the image, so privileges are what stops it.
    let mut p = dir.clone();
    while p.pop() && p.starts_with(env!("CARGO_TARGET_TMPDIR")) {
        let _ = std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    }
    for f in ["descriptor.bin", "pages.img"] {
        std::fs::set_permissions(
            dir.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
    }
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    use std::os::unix::process::CommandExt;
    let o = forkd()
        .arg("restore")
        .arg(&dir)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not permitted to restore") || stderr.contains("Permission denied"),
        "{stderr}"
    );
    assert_eq!(orphan_husks(), Vec::<i32>::new());
}

/// Children forked from a template each get their own open file
/// description for the seed's regular files: one child's reads do not move
/// another's offset (a plain fork would share it).
#[test]
fn children_of_a_template_share_open_files_as_fork_children_do() {
    if !require_root("children_of_a_template_share_open_files_as_fork_children_do") {
        return;
    }
    let dir = scratch("file-offsets");
    let data = dir.join("lines.txt");
    let log = dir.join("log.txt");
    std::fs::write(&data, "l0\nl1\nl2\nl3\nl4\nl5\nl6\n").unwrap();
    let script = format!(
        r#"
import os, sys, json
fd = os.open({path:?}, os.O_RDONLY)
first = os.read(fd, 3)
log = open({log:?}, 'w')
print('ready', flush=True)
sys.stdin.readline()
log.write('line from %d\n' % os.getpid())
log.flush()
print(json.dumps({{'first': first.decode(), 'next': os.read(fd, 3).decode(), 'pid': os.getpid()}}), flush=True)
"#,
        path = data.to_str().unwrap(),
        log = log.to_str().unwrap(),
    );
    let mut cmd = Command::new(python());
    cmd.args(["-c", &script]);
    let (seed, _) = seed_of(cmd, "file-offsets-seed");
    for args in [
        &["--count", "5", "--json"][..],
        &["--count", "5", "--eager", "--json"][..],
    ] {
        std::fs::write(&log, "").unwrap();
        let out = forkd()
            .arg("restore")
            .arg(&seed)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        out.stdin.as_ref().unwrap().write_all(b"go\n").unwrap();
        let out = out.wait_with_output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let kids = v["children"].as_array().unwrap();
        assert_eq!(kids.len(), 5);
        let mut next: Vec<String> = Vec::new();
        for k in kids {
            let a: Value = serde_json::from_str(k["stdout"].as_str().unwrap().trim()).unwrap();
            assert_eq!(a["first"], "l0\n", "{args:?} {k}");
            assert_eq!(a["pid"], k["pid"]);
            next.push(a["next"].as_str().unwrap().to_string());
        }
        // One open file description for all five, as after fork(): each
        // read moved the offset the others read from.
        next.sort();
        assert_eq!(next, ["l1\n", "l2\n", "l3\n", "l4\n", "l5\n"], "{args:?}");
        // And five writes through the parent's "w" file keep five lines.
        let lines = std::fs::read_to_string(&log).unwrap();
        assert_eq!(lines.lines().count(), 5, "{args:?}: {lines:?}");
        for k in kids {
            assert!(
                lines.contains(&format!("line from {}\n", k["pid"])),
                "{lines:?}"
            );
        }
    }
}

#[test]
fn a_hundred_restorers_with_children_leave_no_thread_and_no_cpu_behind() {
    if !require_root("a_hundred_restorers_with_children_leave_no_thread_and_no_cpu_behind") {
        return;
    }
    use remotefork::{ExitReason, Seed, SpawnOptions, Stdio};
    let (dir, _) = seed_of(Command::new(c_program("confined")), "hundred-restorers");
    // The library's threads in this process: named pager-N or rf-..., or
    // unnamed and started from this test's thread (they have its name).
    // Not the other tests' threads, which come and go meanwhile.
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let comm = |tid: &str| {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let mine = comm(&me.to_string());
    let threads = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|tid| *tid != me.to_string())
            .filter(|tid| {
                let c = comm(tid);
                c.starts_with("pager-") || c.starts_with("rf-") || c == mine
            })
            .count()
    };
    let cpu_ticks = || -> u64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        let after = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = threads();
    for i in 0..100 {
        let seed = Seed::open(&dir).unwrap();
        // Lazy: the seed's own pager threads serve it. Every tenth from a
        // template (the template service thread, which also ends once no
        // seed has templates and no child forked from one is left). Its
        // stdin is /dev/null: it exits at once.
        let opts = SpawnOptions::default().template(i % 10 == 0);
        let mut child = seed
            .spawn(Stdio::Null, Stdio::Null, Stdio::Null, &opts)
            .unwrap();
        // Its pager threads exist while it does.
        assert!(threads() > before, "no pager thread for a lazy child");
        assert_eq!(child.wait().unwrap(), ExitReason::Exited(0), "child {i}");
        drop(seed);
    }
    // Every restorer's threads end once it is dropped and its child gone
    // (looked at for up to two minutes, for a loaded machine).
    let t = std::time::Instant::now();
    while threads() > before {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{} threads left of 100 restorers ({} before)",
            threads() - before,
            before
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And nothing spins: over 2 s this process uses well under a core.
    let c0 = cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks() - c0;
    assert!(
        used < 50,
        "{used} clock ticks of CPU in 2 s with nothing to do"
    );
}
