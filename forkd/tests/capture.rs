//! Capture of real programs, checked against the live process.
//!
//! Run as root. Each test starts a real target (C or Python), captures it
//! with `forkd snapshot`, and checks the image against what the target's
//! memory, maps and registers hold, then that the target runs on correctly.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;
use kernel_helpers::ptrace::Tracee;
use remotefork::capture::{capture, CaptureError, CaptureOptions, CapturePoint};
use remotefork::image::{PageState, Registers, SeedImage, VmaKind};
use remotefork::procfs;
use serde_json::Value;

const PAGE: usize = 4096;

/// Every page of every mapping in the image equals the live process's
/// memory: stored pages byte for byte, zero pages all zeros, from-file pages
/// equal to the file. The rseq area is excluded: the kernel rewrites its
/// cpu fields whenever the process is scheduled. Returns pages compared.
fn assert_image_matches_live(dir: &Path, pid: i32) -> u64 {
    let img = SeedImage::open(dir).unwrap();
    let d = img.descriptor();
    let mem = File::open(format!("/proc/{pid}/mem")).unwrap();
    let rseq = d.rseq.map(|r| (r.ptr, r.ptr + r.len as u64));
    let mut compared = 0u64;
    for v in &d.vmas {
        if v.kind.is_kernel_provided() {
            continue;
        }
        for run in &v.runs {
            let len = run.count as usize * PAGE;
            let addr = v.start + run.first * PAGE as u64;
            let mut live = vec![0u8; len];
            mem.read_exact_at(&mut live, addr)
                .unwrap_or_else(|e| panic!("reading live {addr:#x} ({}): {e}", v.path));
            let mut want = vec![0u8; len];
            match run.state {
                PageState::Stored { offset } => img.read_at(offset, &mut want).unwrap(),
                PageState::Zero => {}
                PageState::FromFile => {
                    let f = &d.files[v.file.unwrap() as usize];
                    let file = File::open(&f.path).unwrap();
                    let off = v.file_offset + run.first * PAGE as u64;
                    // Past the end of the file a mapping reads zeros.
                    let mut got = 0;
                    while got < len {
                        match file.read_at(&mut want[got..], off + got as u64).unwrap() {
                            0 => break,
                            n => got += n,
                        }
                    }
                }
            }
            if let Some((a, b)) = rseq {
                for x in a.max(addr)..b.min(addr + len as u64) {
                    let i = (x - addr) as usize;
                    live[i] = 0;
                    want[i] = 0;
                }
            }
            if live != want {
                let i = live.iter().zip(&want).position(|(x, y)| x != y).unwrap();
                panic!(
                    "{:?} page at {:#x} ({} {:?}) differs from the live process at byte {i}: live {:#x}, image {:#x}",
                    run.state,
                    addr + (i / PAGE * PAGE) as u64,
                    v.path,
                    v.kind,
                    live[i],
                    want[i]
                );
            }
            compared += run.count;
        }
    }
    compared
}

/// The image's mappings are exactly /proc/PID/maps (less [vsyscall]).
fn assert_vmas_match_maps(inspect: &Value, pid: i32) {
    let live: Vec<_> = procfs::maps(pid)
        .unwrap()
        .into_iter()
        .filter(|m| m.path != "[vsyscall]")
        .collect();
    let vmas = inspect["vmas"].as_array().unwrap();
    assert_eq!(
        vmas.len(),
        live.len(),
        "mapping count differs from /proc/{pid}/maps"
    );
    for (v, m) in vmas.iter().zip(&live) {
        assert_eq!(v["start"].as_u64().unwrap(), m.start);
        assert_eq!(v["end"].as_u64().unwrap(), m.end);
        assert_eq!(v["prot"].as_str().unwrap(), m.perms(), "{}", m.path);
        assert_eq!(v["path"].as_str().unwrap(), m.path);
    }
}

/// The image's registers equal what PTRACE_GETREGS reports now. The target
/// is blocked in the same read(2) as at capture, so they must be identical.
fn assert_registers_match(dir: &Path, pid: i32) {
    let img = SeedImage::open(dir).unwrap();
    let mut t = Tracee::seize(pid).unwrap();
    t.interrupt().unwrap();
    let now = Registers::from(&t.regs().unwrap());
    t.detach().unwrap();
    assert_eq!(img.descriptor().registers, now);
}

fn snapshot_json(pid: i32, out: &Path) -> Value {
    let (code, stdout, stderr) = run_forkd(&[
        "snapshot",
        "--pid",
        &pid.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "snapshot failed: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// `forkd snapshot --pid PID --out OUT`: (exit code, stdout, stderr).
fn snapshot(pid: i32, out: &Path) -> (i32, String, String) {
    run_forkd(&[
        "snapshot",
        "--pid",
        &pid.to_string(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn inspect_json(out: &Path) -> Value {
    let (code, stdout, stderr) = run_forkd(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "inspect failed: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn hex_field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap();
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn c_program_capture_matches_the_live_process() {
    if !require_root("c_program_capture_matches_the_live_process") {
        return;
    }
    if !has_avx2() {
        println!("SKIPPED: c_program_capture_matches_the_live_process: CPU has no AVX2");
        return;
    }
    let prog = c_program("capture_target");
    let (target, ready) = Target::start(Command::new(&prog));
    let pid = target.pid();
    let checksum = ready.split_whitespace().nth(1).unwrap().to_string();
    wait_blocked_in_read(pid);
    let out = scratch("c-capture").join("seed");

    let summary = snapshot_json(pid, &out);
    assert!(
        summary["pages_stored"].as_u64().unwrap() > 2000,
        "{summary}"
    );
    assert!(summary["pause_ms"].as_f64().is_some());
    // The clone was killed and reaped inside the target: no child is left.
    assert_eq!(children(pid), Vec::<i32>::new());

    let j = inspect_json(&out);
    assert_eq!(j["format_version"], 6);
    assert_eq!(j["page_digests"]["chunk_bytes"], 65536);
    assert_eq!(j["threads"], 1);
    assert_eq!(j["vdso_hash"].as_str().unwrap().len(), 64);
    assert_eq!(j["pages_stored"], summary["pages_stored"]);
    assert_eq!(
        j["image_bytes"].as_u64().unwrap(),
        j["pages_stored"].as_u64().unwrap() * 4096
    );
    assert_eq!(
        std::fs::metadata(out.join("pages.img")).unwrap().len(),
        j["image_bytes"].as_u64().unwrap()
    );
    assert_eq!(
        j["interrupted_syscall"], 0,
        "the target is blocked in read(2)"
    );
    assert_vmas_match_maps(&j, pid);

    let compared = assert_image_matches_live(&out, pid);
    assert!(compared > 16384, "compared only {compared} pages");
    assert_registers_match(&out, pid);

    let img = SeedImage::open(&out).unwrap();
    let d = img.descriptor();
    // TLS: fs_base is the thread pointer, just above the printed TLS variable.
    let tls = hex_field(&ready, "tls=");
    assert!(
        d.registers.fs_base > tls && d.registers.fs_base - tls < 4096,
        "fs_base {:#x} tls {tls:#x}",
        d.registers.fs_base
    );
    // AVX: ymm15 = pattern. XSAVE keeps xmm15 at 160 + 15*16 and the upper
    // half of ymm15 in the YMM_Hi128 component at 576 + 15*16.
    let x = &d.xstate;
    assert!(x.len() >= 832, "xstate is {} bytes", x.len());
    assert_eq!(&x[400..408], &0x1111222233334444u64.to_le_bytes());
    assert_eq!(&x[408..416], &0x5555666677778888u64.to_le_bytes());
    assert_eq!(&x[816..824], &0x99990000aaaabbbbu64.to_le_bytes());
    assert_eq!(&x[824..832], &0xccccddddeeeeffffu64.to_le_bytes());
    // The SIGUSR1 handler, its SA_RESTART flag and its mask (SIGUSR2).
    let usr1 = d
        .sigactions
        .iter()
        .find(|s| s.signo == libc::SIGUSR1 as u32)
        .unwrap();
    assert_eq!(usr1.handler, hex_field(&ready, "handler="));
    assert_ne!(usr1.flags & libc::SA_RESTART as u64, 0);
    assert_eq!(
        usr1.mask & (1 << (libc::SIGUSR2 - 1)),
        1 << (libc::SIGUSR2 - 1)
    );
    assert_eq!(d.sigactions.len(), 64);
    // Mappings: the 64 MiB buffer is there, mostly not stored.
    let big = hex_field(&ready, "big=");
    let bv = d
        .vmas
        .iter()
        .find(|v| v.start <= big && big < v.end)
        .unwrap();
    assert_eq!(bv.kind, VmaKind::Anon);
    assert!(bv.end - bv.start >= 64 << 20);
    // Process state.
    assert!(d.rseq.is_some(), "glibc registers rseq");
    assert_ne!(d.robust_list.0, 0, "glibc registers a robust list");
    assert_ne!(d.clear_child_tid, 0, "glibc sets clear_child_tid");
    assert!(d.mm.brk >= d.mm.start_brk && d.mm.start_brk > 0);
    assert_eq!(d.exe, prog.to_str().unwrap());
    assert_eq!(d.rlimits.len(), 16);
    assert!(d
        .fds
        .iter()
        .any(|f| f.fd == 0 && f.kind == procfs::FdKind::Pipe));
    assert!(d.auxv.len() > 10);

    // The parent runs on, unharmed: same checksum, AVX intact, read restarted.
    let (rest, status) = target.finish("go\n");
    assert!(status.success(), "target failed after capture: {rest}");
    assert!(rest.contains("got go"), "{rest}");
    assert!(rest.contains("ymm15 intact"), "{rest}");
    assert!(
        rest.contains(&format!("checksum {checksum} signal 0")),
        "{rest}"
    );
}

#[test]
fn python_capture_matches_the_live_process() {
    if !require_root("python_capture_matches_the_live_process") {
        return;
    }
    let script = r#"
import sys, json
try:
    import boto3
    client = boto3.client('s3', region_name='us-east-1')
    region = client.meta.region_name
except ImportError:
    region = 'no-boto3'
state = {'squares': [i * i for i in range(10000)], 'region': region}
print('ready', region, flush=True)
line = sys.stdin.readline()
print(json.dumps({'got': line.strip(), 'sum': sum(state['squares']), 'region': state['region']}), flush=True)
"#;
    let mut cmd = Command::new(python());
    cmd.args(["-c", script]);
    let (target, ready) = Target::start(cmd);
    let pid = target.pid();
    wait_blocked_in_read(pid);
    let out = scratch("py-capture").join("seed");
    let summary = snapshot_json(pid, &out);
    assert_eq!(children(pid), Vec::<i32>::new());
    let j = inspect_json(&out);
    assert_vmas_match_maps(&j, pid);
    assert!(summary["vmas"].as_u64().unwrap() > 50, "{summary}");
    let compared = assert_image_matches_live(&out, pid);
    assert!(compared > 1000);
    assert_registers_match(&out, pid);
    let d = SeedImage::open(&out).unwrap();
    assert!(d
        .descriptor()
        .files
        .iter()
        .any(|f| f.path.contains("libpython") || f.path.contains("python3")));

    let (rest, status) = target.finish("hello\n");
    assert!(status.success());
    let v: Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(v["got"], "hello");
    assert_eq!(v["sum"], (0..10000u64).map(|i| i * i).sum::<u64>());
    assert_eq!(
        v["region"].as_str().unwrap(),
        ready.split_whitespace().nth(1).unwrap()
    );
}

/// A two-thread process: both threads are recorded, the second one with
/// its own state (its name, its syscall, glibc's tid word), and the
/// process runs on as if nothing happened, each thread with its own CPU
/// affinity back.
#[test]
fn a_threaded_process_is_captured_with_each_threads_own_state() {
    if !require_root("a_threaded_process_is_captured_with_each_threads_own_state") {
        return;
    }
    let (target, _) = Target::start(Command::new(c_program("threaded_target")));
    let pid = target.pid();
    wait_blocked_in_read(pid);
    let sleeper = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse::<i32>().ok())
        .find(|&t| t != pid)
        .expect("a second thread");
    // The freeze runs each thread on one CPU; each has its own set back.
    let affinity = |tid: i32| {
        // SAFETY: all zeroes is the empty cpu_set_t.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most the set's size to it.
        let r = unsafe {
            libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `c` is below CPU_SETSIZE.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect::<Vec<_>>()
    };
    let before = (affinity(pid), affinity(sleeper));
    let out = scratch("threaded").join("seed");
    let (code, _, stderr) = snapshot(pid, &out);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!((affinity(pid), affinity(sleeper)), before);
    if before.0.len() < 2 {
        println!("one CPU: a pinned set could not differ from its own");
    }
    let j = inspect_json(&out);
    assert_eq!(j["threads"], 2, "{j}");
    assert_eq!(j["main_tid_word"], true, "{j}");
    let t = &j["other_threads"][0];
    assert_eq!(t["tid"], sleeper, "{t}");
    assert_eq!(t["comm"], "threaded_target", "{t}");
    // Parked in pause() (syscall 34), which restarts in a child.
    assert_eq!(t["interrupted_syscall"], libc::SYS_pause, "{t}");
    assert_eq!(t["tid_word"], true, "{t}");
    assert_ne!(
        t["fs_base"], j["registers"]["fs_base"],
        "each thread its own TLS"
    );
    let (rest, status) = target.finish("x\n");
    assert!(status.success());
    assert_eq!(rest, "alive 2\n");
}

/// Threads are created and exit all the time (`thread_churn.c`): each of
/// ten captures freezes some worker being created or exiting, and every
/// child, eager and lazy, churns on (a worker lost or half-kept would hang
/// its joiner).
#[test]
fn a_process_whose_threads_come_and_go_is_captured_and_its_children_churn_on() {
    if !require_root("a_process_whose_threads_come_and_go_is_captured_and_its_children_churn_on") {
        return;
    }
    let (target, _) = Target::start(Command::new(c_program("thread_churn")));
    let dir = scratch("churn");
    for i in 0..10 {
        let out = dir.join(format!("seed{i}"));
        let (code, _, stderr) = snapshot(target.pid(), &out);
        assert_eq!(code, 0, "capture {i}: {stderr}");
        let d = SeedImage::open(&out).unwrap().descriptor().clone();
        assert!(d.threads >= 2, "capture {i}: {} threads", d.threads);
        let mode: &[&str] = if i % 2 == 0 { &["--eager"] } else { &[] };
        let r = restore_and_talk(&out, mode, "go\n", |_| {});
        assert_eq!(
            (r.code, r.stdout.as_str()),
            (Some(0), "ok 1\n"),
            "capture {i} ({} threads) restored {mode:?}: {}",
            d.threads,
            r.stderr
        );
    }
    let (rest, status) = target.finish("go\n");
    assert!(status.success());
    assert_eq!(rest, "ok 1\n");
}

/// A process whose main thread has exited (`pthread_exit`) while another
/// runs on is refused, saying so, and runs on untouched.
#[test]
fn a_process_without_its_main_thread_is_refused_by_name_and_runs_on() {
    if !require_root("a_process_without_its_main_thread_is_refused_by_name_and_runs_on") {
        return;
    }
    let (target, _) = Target::start(Command::new(c_program("leaderless")));
    let out = scratch("no-main-thread").join("seed");
    let (code, _, stderr) = snapshot(target.pid(), &out);
    assert_eq!(code, 1);
    assert!(stderr.contains("its main thread has exited"), "{stderr}");
    assert!(!out.join("descriptor.bin").exists());
    let (rest, status) = target.finish("x\n");
    assert!(status.success());
    assert_eq!(rest, "alive 2\n");
}

/// A thread another tracer holds (a debugger) cannot be frozen: the
/// capture names that thread and its tracer, and the process runs on.
#[test]
fn a_thread_held_by_another_tracer_is_refused_by_name_and_the_process_runs_on() {
    if !require_root("a_thread_held_by_another_tracer_is_refused_by_name_and_the_process_runs_on") {
        return;
    }
    let (target, _) = Target::start(Command::new(c_program("threaded_target")));
    let pid = target.pid();
    let sleeper = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse::<i32>().ok())
        .find(|&t| t != pid)
        .expect("a second thread");
    // This test process becomes the thread's tracer, as a debugger would.
    let mut debugger = Tracee::seize(sleeper).unwrap();
    let out = scratch("traced-thread").join("seed");
    let (code, _, stderr) = snapshot(pid, &out);
    // Let the thread go first (only a stopped thread can be detached),
    // so that a failed check below does not leave it held.
    debugger.interrupt().unwrap();
    drop(debugger);
    assert_eq!(code, 1);
    let me = std::process::id();
    assert!(
        stderr.contains(&format!("thread {sleeper} (threaded_target)"))
            && stderr.contains(&format!("traced by process {me}")),
        "{stderr}"
    );
    assert!(!out.join("descriptor.bin").exists());
    let (rest, status) = target.finish("x\n");
    assert!(status.success());
    assert_eq!(rest, "alive 2\n");
}

#[test]
fn refuses_a_missing_pid() {
    if !require_root("refuses_a_missing_pid") {
        return;
    }
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    let out = scratch("nopid").join("seed");
    let (code, _, stderr) = snapshot(pid as i32, &out);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("process {pid} does not exist")),
        "{stderr}"
    );
}

#[test]
fn refuses_a_zombie() {
    if !require_root("refuses_a_zombie") {
        return;
    }
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    while state(pid) != Some('Z') {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = scratch("zombie").join("seed");
    let (code, _, stderr) = snapshot(pid, &out);
    assert_eq!(code, 1);
    assert!(stderr.contains("is a zombie"), "{stderr}");
    // Still our zombie to reap: capture did not disturb it.
    assert_eq!(state(pid), Some('Z'));
    c.wait().unwrap();
}

#[test]
fn refuses_without_ptrace_rights() {
    if !require_root("refuses_without_ptrace_rights") {
        return;
    }
    let (target2, _) = {
        let mut cmd = Command::new(python());
        cmd.args([
            "-c",
            "import sys; print('ready', flush=True); sys.stdin.readline(); print('ok')",
        ]);
        Target::start(cmd)
    };
    let out = scratch("noperm");
    // SAFETY: chmod of our own scratch dir so 'nobody' may write there.
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    use std::os::unix::process::CommandExt;
    let o = forkd()
        .args([
            "snapshot",
            "--pid",
            &target2.pid().to_string(),
            "--out",
            out.join("seed").to_str().unwrap(),
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not permitted to capture process"),
        "{stderr}"
    );
    let (rest, status) = target2.finish("x\n");
    assert!(status.success());
    assert_eq!(rest, "ok\n");
}

#[test]
fn a_target_killed_while_stopped_gives_a_clear_error_and_nothing_is_written() {
    if !require_root("a_target_killed_while_stopped_gives_a_clear_error_and_nothing_is_written") {
        return;
    }
    let target = idle_python();
    let pid = target.pid();
    let out = scratch("killed").join("seed");
    let opts = CaptureOptions {
        durable: false,
        hook: Some(Box::new(move |p| {
            if p == CapturePoint::ParentStopped {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        })),
        ..Default::default()
    };
    let err = capture(pid, &out, &opts).unwrap_err();
    assert!(matches!(err, CaptureError::Exited { .. }), "{err}");
    assert!(err.to_string().contains("exited during capture"), "{err}");
    assert!(!out.join("descriptor.bin").exists());
    // The dead target is not held by the tracer. Here the test is both the
    // target's parent and (through the library) its tracer, so the tracer's
    // wait may already have reaped it; either way no zombie is left.
    let mut target = target;
    if let Ok(st) = target.child.wait() {
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL)
        );
    }
    assert_eq!(state(pid), None);
}

#[test]
fn a_target_killed_after_the_clone_leaves_no_stray_process() {
    if !require_root("a_target_killed_after_the_clone_leaves_no_stray_process") {
        return;
    }
    let target = idle_python();
    let pid = target.pid();
    let out = scratch("killed2").join("seed");
    let clone = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = clone.clone();
    let opts = CaptureOptions {
        durable: false,
        hook: Some(Box::new(move |p| {
            if p == CapturePoint::CloneStopped {
                *seen.lock().unwrap() = children(pid);
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        })),
        ..Default::default()
    };
    // The clone holds a consistent copy, so capture may complete; either way
    // the result is clean.
    match capture(pid, &out, &opts) {
        Ok(d) => assert!(d.pages_stored > 0),
        Err(e) => assert!(e.to_string().contains(&pid.to_string()), "{e}"),
    }
    let clones = clone.lock().unwrap().clone();
    assert_eq!(clones.len(), 1, "exactly one clone existed: {clones:?}");
    // The clone is dead: gone, or a zombie waiting for its new parent.
    for c in clones {
        assert!(
            matches!(state(c), None | Some('Z')),
            "clone {c} is still alive"
        );
    }
}

#[test]
fn inspect_refuses_corrupt_images_clearly() {
    if !require_root("inspect_refuses_corrupt_images_clearly") {
        return;
    }
    let dir = scratch("corrupt");
    let good = dir.join("good");
    let desc = {
        let target = idle_python();
        capture(target.pid(), &good, &CaptureOptions::default()).unwrap()
    };
    let bytes = std::fs::read(good.join("descriptor.bin")).unwrap();
    let pages = std::fs::read(good.join("pages.img")).unwrap();
    let case = |name: &str, d: &[u8], p: &[u8], expect: &str| {
        let c = dir.join(name);
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("descriptor.bin"), d).unwrap();
        std::fs::write(c.join("pages.img"), p).unwrap();
        let (code, stdout, stderr) = run_forkd(&["inspect", c.to_str().unwrap()]);
        assert_eq!(
            code, 1,
            "{name}: exit {code}, stdout {stdout}, stderr {stderr}"
        );
        assert!(stderr.contains(expect), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    };
    case(
        "truncated",
        &bytes[..bytes.len() / 2],
        &pages,
        "descriptor is truncated",
    );
    case(
        "truncated-header",
        &bytes[..20],
        &pages,
        "descriptor is truncated",
    );
    let mut m = bytes.clone();
    m[..8].copy_from_slice(b"NOTASEED");
    case("magic", &m, &pages, "not a remotefork seed descriptor");
    let mut v = bytes.clone();
    v[8..12].copy_from_slice(&7u32.to_le_bytes());
    case("version", &v, &pages, "unknown seed format version 7");
    let mut c = bytes.clone();
    let n = c.len();
    c[n - 10] ^= 0xff;
    case("checksum", &c, &pages, "checksum mismatch");
    case(
        "short-pages",
        &bytes,
        &pages[..pages.len() - 4096],
        "page store is",
    );
    // A descriptor whose offsets point outside the page store.
    let mut bad = desc.clone();
    let run = bad
        .vmas
        .iter_mut()
        .flat_map(|v| v.runs.iter_mut())
        .find(|r| matches!(r.state, PageState::Stored { .. }))
        .unwrap();
    run.state = PageState::Stored {
        offset: bad.image_bytes,
    };
    case(
        "offsets",
        &remotefork::image::encode(&bad).unwrap(),
        &pages,
        "outside the",
    );
    case(
        "garbage",
        &[0x5a; 5000],
        &pages,
        "not a remotefork seed descriptor",
    );
    // The good one still reads.
    let (code, _, stderr) = run_forkd(&["inspect", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run_forkd(&["inspect", dir.join("missing").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("descriptor.bin"), "{stderr}");
}
