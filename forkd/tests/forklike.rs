//! Children behave like `fork()` children of the seed's parent: pages they
//! only read stay shared, files and shared memory are shared as fork shares
//! them, state that must differ (entropy) differs, grandchildren are served
//! or killed with a reason, and children outlive forkd restarts.
//! Root-only: real ptrace, userfaultfd and daemons.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A seed of `tests/programs/heap.c` with a `mb` MiB heap, through `d`.
fn heap_seed(d: &Daemon, mb: u32) -> String {
    let prog = c_program("heap");
    let (code, out, err) = d.ctl(&[
        "--json",
        "seed",
        "create",
        "--ready-line",
        "ready",
        "--",
        prog.to_str().unwrap(),
        &mb.to_string(),
    ]);
    assert_eq!(code, 0, "seed create failed: {err}");
    serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Proportional set size of `pid` in bytes (0 if it is gone).
fn pss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Wait until `f` holds: up to 2 minutes, for a loaded machine.
fn wait_for<F: FnMut() -> bool>(what: &str, mut f: F) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many heap children wait on `release` (each marks `release.PID`).
fn marks(release: &Path) -> usize {
    let name = release.file_name().unwrap().to_string_lossy().into_owned() + ".";
    std::fs::read_dir(release.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&name))
        .count()
}

/// Spawn `count` children of `seed` that sum their heap and then wait for
/// `release` to exist; returns the running forkctl.
fn spawn_and_hold(
    d: &Daemon,
    seed: &str,
    count: u32,
    extra: &[&str],
    release: &Path,
) -> std::process::Child {
    let input = d.dir.join(format!("input-{count}-{}", extra.join("_")));
    std::fs::write(&input, format!("sum\nawait {}\n", release.display())).unwrap();
    let mut cmd = forkctl();
    cmd.arg("--addr")
        .arg(d.addr())
        .args([
            "--json",
            "spawn",
            seed,
            "--count",
            &count.to_string(),
            "--stdin",
        ])
        .arg(&input)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

#[test]
fn template_children_share_the_pages_they_only_read() {
    if !require_root("template_children_share_the_pages_they_only_read") {
        return;
    }
    const MB: u64 = 128;
    let dir = scratch("share-read");
    let d = Daemon::start(&dir, false);
    let seed = heap_seed(&d, MB as u32);
    let forkd_pid = d.child.id() as i32;
    let mut totals = Vec::new();
    for (mode, extra) in [
        ("template", vec!["--prefetch", "window"]),
        ("template-recorded", vec!["--prefetch", "recorded"]),
        ("no-template", vec!["--no-template"]),
    ] {
        let release = dir.join(format!("release-{mode}"));
        let p = spawn_and_hold(&d, &seed, 3, &extra, &release);
        // The three children have read their whole heap once they wait.
        wait_for("three children waiting", || marks(&release) >= 3);
        let all: u64 = children(forkd_pid).iter().map(|c| pss(*c)).sum();
        std::fs::write(&release, "").unwrap();
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let kids = v["children"].as_array().unwrap();
        assert_eq!(kids.len(), 3);
        let sums: Vec<&str> = kids
            .iter()
            .map(|k| {
                k["stdout"]
                    .as_str()
                    .unwrap()
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
            })
            .collect();
        assert!(
            sums.iter().all(|s| *s == sums[0] && !s.is_empty()),
            "{sums:?}"
        );
        println!(
            "{mode}: children and templates hold {} MiB of PSS ({MB} MiB heap, 3 children)",
            all >> 20
        );
        totals.push((mode, all));
    }
    // Children that only read share the cache's one copy, whatever the mode.
    for (mode, all) in &totals {
        assert!(
            *all < (MB * 3 / 2) << 20,
            "{mode}: {} MiB for three readers of a {MB} MiB heap",
            all >> 20
        );
    }
    drop(d);
}

#[test]
fn python_runtime_children_draw_their_own_random_numbers() {
    if !require_root("python_runtime_children_draw_their_own_random_numbers") {
        return;
    }
    let dir = scratch("runtime-random");
    let d = Daemon::start(&dir, false);
    let handler = dir.join("draw.py");
    std::fs::write(
        &handler,
        "import os, random\nimport remotefork\nrandom.seed(7)\nhooked = []\n\
         remotefork.on_restore(lambda: hooked.append(os.getpid()))\n\
         def handler(event):\n    return {'random': random.random(), 'hooked': hooked, 'pid': os.getpid()}\n",
    )
    .unwrap();
    let py = python().to_string();
    let pypath = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let (code, out, err) = d.ctl(&[
        "--json",
        "seed",
        "create",
        "--ready-line",
        "ready",
        "--",
        "/usr/bin/env",
        &format!("PYTHONPATH={}", pypath.display()),
        &py,
        "-m",
        "remotefork.runtime",
        handler.to_str().unwrap(),
        "--ready-line",
        "ready",
    ]);
    assert_eq!(code, 0, "{err}");
    let seed = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let input = dir.join("event");
    std::fs::write(&input, "{}\n").unwrap();
    let (code, out, err) = d.ctl(&[
        "--json",
        "spawn",
        &seed,
        "--count",
        "5",
        "--stdin",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut draws = std::collections::HashSet::new();
    for k in v["children"].as_array().unwrap() {
        let a: Value = serde_json::from_str(k["stdout"].as_str().unwrap().trim()).unwrap();
        assert_eq!(a["ok"], true, "{a}");
        let r = &a["result"];
        assert_eq!(r["pid"], k["pid"]);
        assert_eq!(
            r["hooked"],
            serde_json::json!([k["pid"]]),
            "on_restore ran once, in the child"
        );
        draws.insert(r["random"].to_string());
    }
    assert_eq!(
        draws.len(),
        5,
        "five children, five different draws: {draws:?}"
    );
}

/// Build `libfixture.so` answering `value` at `lib` (written to a new file,
/// then renamed over `lib`), and return its bytes.
fn fixture_lib(lib: &Path, value: i32) -> Vec<u8> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
    let tmp = lib.with_extension("new");
    let st = std::process::Command::new("cc")
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
    let bytes = std::fs::read(&tmp).unwrap();
    std::fs::rename(&tmp, lib).unwrap();
    bytes
}

#[test]
fn seed_files_are_copies_of_their_own() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !require_root("seed_files_are_copies_of_their_own") {
        return;
    }
    let dir = scratch("seed-files");
    let lib = dir.join("libfixture.so");
    let v41 = fixture_lib(&lib, 41);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
    let user = dir.join("lib_user");
    let st = std::process::Command::new("cc")
        .arg("-o")
        .arg(&user)
        .arg(src.join("lib_user.c"))
        .arg(format!("-L{}", dir.display()))
        .arg("-lfixture")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let d = Daemon::start(&dir, false);
    let (target, ready) = Target::start(std::process::Command::new(&user));
    assert_eq!(ready.trim(), "ready 41");
    let seed = seed_from_target(|a| d.ctl(a), target);
    let files = dir.join("state/seeds").join(&seed).join("files");
    let lib_md = std::fs::metadata(&lib).unwrap();
    let mut kept_lib = None;
    for e in std::fs::read_dir(&files).unwrap().flatten() {
        let md = e.metadata().unwrap();
        assert_eq!(
            md.permissions().mode() & 0o777,
            0o444,
            "{:?} is read-only",
            e.path()
        );
        assert_eq!(md.uid(), 0, "{:?} is forkd's", e.path());
        if md.len() == lib_md.len() && std::fs::read(e.path()).unwrap() == v41 {
            kept_lib = Some(e.path());
        }
    }
    let kept_lib = kept_lib.expect("the seed keeps a copy of libfixture.so");
    let kept_md = std::fs::metadata(&kept_lib).unwrap();
    assert!(
        (kept_md.dev(), kept_md.ino()) != (lib_md.dev(), lib_md.ino()),
        "the kept copy is its own file, not a link to the live one"
    );
    // Every system file the seed maps (libc among them) has another inode.
    for e in std::fs::read_dir(&files).unwrap().flatten() {
        let ino = e.metadata().unwrap().ino();
        for sys in [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ] {
            if let Ok(m) = std::fs::metadata(sys) {
                assert_ne!(m.ino(), ino, "{:?} is a hard link to {sys}", e.path());
            }
        }
    }

    // A chmod of the whole state directory leaves the live files alone.
    let mode_before = lib_md.permissions().mode();
    let st = std::process::Command::new("chmod")
        .args(["-R", "o+w"])
        .arg(dir.join("state"))
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::metadata(&lib).unwrap().permissions().mode(),
        mode_before
    );

    // The live library rewritten in place: the seed's copy is untouched,
    // and children still run the seed's build (41), from that copy.
    let v99 = {
        let other = dir.join("other.so");
        fixture_lib(&other, 99)
    };
    std::fs::write(&lib, &v99).unwrap();
    assert_eq!(
        std::fs::read(&kept_lib).unwrap(),
        v41,
        "the kept copy changed with the live file"
    );
    let input = dir.join("go");
    std::fs::write(&input, "go\n").unwrap();
    let (code, out, err) = d.ctl(&[
        "--json",
        "spawn",
        &seed,
        "--count",
        "2",
        "--stdin",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for k in v["children"].as_array().unwrap() {
        assert_eq!(k["stdout"], "fixture 41\n", "{k}");
    }

    // And the seed's copy rewritten: the live file is untouched.
    std::fs::write(&kept_lib, b"scribbled over").unwrap();
    assert_eq!(
        std::fs::read(&lib).unwrap(),
        v99,
        "the live file changed with the seed's copy"
    );
}
