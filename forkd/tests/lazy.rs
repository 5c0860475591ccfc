//! Lazy restore: the pager's memory semantics, fault handling, scale and the
//! child's death when its memory cannot be served. Run as root.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Capture the semantics program in `mode`, restore it lazily with
/// `prefetch`, and return (its result line, the report).
fn semantics(mode: &str, prefetch: &str, share: bool) -> (String, Value) {
    let mut cmd = Command::new(c_program("semantics"));
    cmd.arg(mode);
    let (dir, _) = seed_of(cmd, &format!("sem-{mode}-{prefetch}-{share}"));
    let mut args = vec!["--lazy", "--prefetch", prefetch, "--json"];
    if !share {
        args.push("--no-share");
    }
    let r = restore_and_talk(&dir, &args, "go\n", |_| {});
    assert_eq!(r.code, Some(0), "{mode}/{prefetch}: stderr {}", r.stderr);
    // One child's report, as forkctl's (docs/cli-schema.json).
    let report: Value = serde_json::from_str(r.stderr.lines().last().unwrap()).unwrap();
    (r.stdout.trim().to_string(), report["children"][0].clone())
}

fn check(mode: &str, min_events: u64) {
    // Shared cache (UFFDIO_CONTINUE) with and without prefetch, and private
    // copies (UFFDIO_COPY).
    for (prefetch, share) in [("off", true), ("window", true), ("off", false)] {
        let (line, report) = semantics(mode, prefetch, share);
        assert!(
            line.starts_with(&format!("{mode} ok")),
            "{mode}/{prefetch}: {line}"
        );
        assert!(report["faults"].as_u64().unwrap() > 0, "{report}");
        assert!(
            report["local"]["events"].as_u64().unwrap() >= min_events,
            "{mode}/{prefetch}: {report}"
        );
        assert_eq!(report["reason"], Value::Null);
    }
    // Children forked from a node template: each has its own userfaultfd
    // and a copy of the template's page table.
    let mut cmd = Command::new(c_program("semantics"));
    cmd.arg(mode);
    let (dir, _) = seed_of(cmd, &format!("sem-{mode}-template"));
    let r = restore_and_talk(
        &dir,
        &["--lazy", "--prefetch", "window", "--count", "2", "--json"],
        "go\n",
        |_| {},
    );
    assert_eq!(r.code, Some(0), "{mode}/template: stderr {}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let kids = v["children"].as_array().unwrap();
    assert_eq!(kids.len(), 2, "{v}");
    for k in kids {
        let out = k["stdout"].as_str().unwrap();
        assert!(
            out.starts_with(&format!("{mode} ok")),
            "{mode}/template: {k}"
        );
        assert!(k["faults"].as_u64().unwrap() > 0, "{k}");
        assert!(
            k["local"]["events"].as_u64().unwrap() >= min_events,
            "{mode}/template: {k}"
        );
        assert_eq!(k["reason"], Value::Null);
    }
}

#[test]
fn absent_pages_read_as_zeros() {
    if require_root("absent_pages_read_as_zeros") {
        check("absent", 0);
    }
}

#[test]
fn dontneed_gives_zeros_never_parent_data() {
    if require_root("dontneed_gives_zeros_never_parent_data") {
        check("dontneed", 1);
    }
}

#[test]
fn mremap_moves_a_64_mib_buffer_with_its_pages() {
    if require_root("mremap_moves_a_64_mib_buffer_with_its_pages") {
        check("mremap", 1);
    }
}

#[test]
fn munmap_forgets_the_range() {
    if require_root("munmap_forgets_the_range") {
        check("munmap", 1);
    }
}

#[test]
fn a_mapping_grown_in_place_reads_zeros_past_its_old_end() {
    if require_root("a_mapping_grown_in_place_reads_zeros_past_its_old_end") {
        check("grow", 0);
    }
}

#[test]
fn a_mapping_cut_by_mprotect_is_served_run_by_run_never_left_waiting() {
    // A run of pages filled at once must lie in one mapping: cut by
    // mprotect (which sends the pager no event), a run crossing a cut was
    // refused with ENOENT, and the faulting thread waited forever.
    if require_root("a_mapping_cut_by_mprotect_is_served_run_by_run_never_left_waiting") {
        check("mprotect", 0);
    }
}

#[test]
fn a_forked_grandchild_sees_the_parents_memory() {
    if require_root("a_forked_grandchild_sees_the_parents_memory") {
        check("fork", 1);
    }
}

#[test]
fn two_threads_faulting_the_same_pages() {
    if require_root("two_threads_faulting_the_same_pages") {
        check("threads", 0);
    }
}

#[test]
fn recorded_working_set_cuts_faults() {
    if !require_root("recorded_working_set_cuts_faults") {
        return;
    }
    let mut cmd = Command::new(python());
    cmd.args(["-c", "import sys, json\nd = {i: str(i) * 20 for i in range(100000)}\nprint('ready', flush=True)\nsys.stdin.readline()\nprint(json.dumps({'n': len(d), 'x': d[99999]}))"]);
    let (dir, _) = seed_of(cmd, "ws");
    let run = |prefetch: &str| {
        let r = restore_and_talk(&dir, &["--prefetch", prefetch, "--json"], "go\n", |_| {});
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        let out: Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(out["n"], 100000);
        assert_eq!(out["x"], "99999".repeat(20));
        let report = serde_json::from_str::<Value>(r.stderr.lines().last().unwrap()).unwrap();
        report["children"][0].clone()
    };
    let off = run("off");
    // The first recorded run records (it runs like window), the next uses it.
    let _ = run("recorded");
    assert!(dir.join("workingset.bin").exists());
    let rec = run("recorded");
    let (f_off, f_rec) = (
        off["faults"].as_u64().unwrap(),
        rec["faults"].as_u64().unwrap(),
    );
    assert!(rec["local"]["prefetched"].as_u64().unwrap() > 0, "{rec}");
    assert!(
        f_rec * 10 <= f_off,
        "recorded {f_rec} faults vs {f_off} with prefetch off: not 90% fewer"
    );
}

#[test]
fn a_hundred_lazy_children_from_one_seed() {
    if !require_root("a_hundred_lazy_children_from_one_seed") {
        return;
    }
    let script = r#"
import sys, os, json
try:
    import boto3
    client = boto3.client('s3', region_name='us-east-1')
    region = client.meta.region_name
except ImportError:
    region = 'no-boto3'
print('ready', flush=True)
line = sys.stdin.readline()
print(json.dumps({'got': line.strip(), 'pid': os.getpid(), 'region': region}), flush=True)
"#;
    let mut cmd = Command::new(python());
    cmd.args(["-c", script]);
    let (dir, _) = seed_of(cmd, "hundred");
    let p = forkd()
        .arg("restore")
        .arg(&dir)
        .args(["--count", "100", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.as_ref().unwrap().write_all(b"req\n").unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kids = v["children"].as_array().unwrap();
    assert_eq!(kids.len(), 100);
    let mut fetched = 0;
    let mut from_cache = 0;
    for k in kids {
        let a: Value = serde_json::from_str(k["stdout"].as_str().unwrap().trim()).unwrap();
        assert_eq!(a["got"], "req");
        assert_eq!(a["pid"], k["pid"]);
        fetched += k["local"]["pages_fetched"].as_u64().unwrap();
        from_cache += k["local"]["pages_from_cache"].as_u64().unwrap();
    }
    // The node-local cache: later children are served without fetching again.
    assert!(
        from_cache > 10 * fetched,
        "fetched {fetched}, from cache {from_cache}"
    );
}

/// The slow program touches 4000 pages over about 4 s.
fn slow_seed(name: &str) -> std::path::PathBuf {
    let mut cmd = Command::new(c_program("semantics"));
    cmd.arg("slow");
    seed_of(cmd, name).0
}

#[test]
fn killing_the_pager_kills_the_child_no_wrong_output() {
    if !require_root("killing_the_pager_kills_the_child_no_wrong_output") {
        return;
    }
    let dir = slow_seed("kill-pager");
    let mut p = forkd()
        .arg("restore")
        .arg(&dir)
        .args(["--prefetch", "off"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = first_child(p.id() as i32);
    assert!(child > 0 && blocked_in_read(child));
    p.stdin.take().unwrap().write_all(b"go\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The pager (forkd) dies mid-paging.
    p.kill().unwrap();
    let out = p.wait_with_output().unwrap();
    let t = Instant::now();
    while matches!(state(child), Some(c) if c != 'Z') {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "child {child} still running without its pager"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("slow"),
        "the child must not finish on wrong memory"
    );
}

#[test]
fn killing_the_pager_kills_children_forked_from_a_template() {
    if !require_root("killing_the_pager_kills_children_forked_from_a_template") {
        return;
    }
    let dir = slow_seed("kill-pager-template");
    let mut p = forkd()
        .arg("restore")
        .arg(&dir)
        .args(["--prefetch", "off", "--count", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(b"go\n").unwrap();
    // The template, its three children and a spare forked ahead, all
    // children of forkd.
    let t = Instant::now();
    let mut kids = Vec::new();
    while kids.len() < 5 && t.elapsed() < Duration::from_secs(10) {
        kids = children(p.id() as i32);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(kids.len() >= 4, "template and 3 children: {kids:?}");
    std::thread::sleep(Duration::from_millis(300));
    p.kill().unwrap();
    let out = p.wait_with_output().unwrap();
    let t = Instant::now();
    for k in kids {
        while matches!(state(k), Some(c) if c != 'Z') {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "process {k} still running without its pager"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("slow"),
        "no child may finish on wrong memory"
    );
}

#[test]
fn a_failing_page_source_kills_the_child_with_a_reason() {
    if !require_root("a_failing_page_source_kills_the_child_with_a_reason") {
        return;
    }
    let dir = slow_seed("bad-source");
    let pages = dir.join("pages.img");
    let r = restore_and_talk(&dir, &["--prefetch", "off", "--json"], "go\n", |_| {
        // The image loses its pages while the child runs.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&pages)
            .unwrap()
            .set_len(0)
            .unwrap();
    });
    assert_eq!(
        r.code,
        Some(128 + libc::SIGKILL),
        "stdout {} stderr {}",
        r.stdout,
        r.stderr
    );
    assert!(!r.stdout.contains("slow"), "{}", r.stdout);
    assert!(r.stderr.contains("was killed: reading"), "{}", r.stderr);
    let report: Value = serde_json::from_str(r.stderr.lines().last().unwrap()).unwrap();
    assert!(
        report["children"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("local:"),
        "{report}"
    );
}

/// glibc keeps the main thread's descriptor (and its rseq area) next to its
/// TLS; when that page is served lazily, the kernel's own write to the rseq
/// area during restore must not replace it with zeros. fork() in the child
/// reads the descriptor's thread lists: it crashed when that page was lost.
#[test]
fn python_forks_in_a_lazy_child_with_its_thread_descriptor_intact() {
    if !require_root("python_forks_in_a_lazy_child_with_its_thread_descriptor_intact") {
        return;
    }
    let script = "import os, sys\nprint('ready', flush=True)\nsys.stdin.readline()\npid = os.fork()\nif pid == 0:\n    print('grandchild ok', flush=True)\n    os._exit(0)\n_, st = os.waitpid(pid, 0)\nprint('status', st, flush=True)\n";
    let mut cmd = Command::new(python());
    // A long library path moves ld.so's early allocations, the TLS block
    // among them, out of ld.so's own pages into anonymous memory.
    // (The library path cargo gives tests does it; this is the same shape.)
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let long = [
        deps.display().to_string(),
        deps.parent().unwrap().display().to_string(),
        format!("{sysroot}/lib/rustlib/x86_64-unknown-linux-gnu/lib"),
        format!("{sysroot}/lib"),
    ];
    cmd.args(["-c", script])
        .env("LD_LIBRARY_PATH", long.join(":"));
    let (dir, _) = seed_of(cmd, "py-fork-tls");
    for args in [
        &["--lazy"][..],
        &["--lazy", "--no-share"][..],
        &["--eager"][..],
    ] {
        let r = restore_and_talk(&dir, args, "go\n", |_| {});
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
        assert_eq!(r.stdout, "grandchild ok\nstatus 0\n", "{args:?}");
    }
}
