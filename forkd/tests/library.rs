//! The library's public API as a scheduler uses it: the crate example, the
//! C API from a C program, the example scheduler (local and by reference
//! over TCP from a forkd page server), and bad references.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Built next to the test binaries (`target/debug/examples/`).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        p.exists(),
        "{} not built (cargo test builds examples)",
        p.display()
    );
    p
}

fn libdir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let d = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(
        d.join("libremotefork.so").exists(),
        "libremotefork.so not built in {}",
        d.display()
    );
    d
}

/// forkd with a TCP page server, and a seed of a shell that answers the
/// square of a number: (daemon, seed reference over the page server).
fn page_served_seed(name: &str) -> (Daemon, String) {
    let dir = scratch(name);
    let page = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let d = Daemon::start_with(&dir, false, &["--page-listen", &page]);
    let id = command_seed(
        |x| d.ctl(x),
        &[],
        &["/bin/sh", "-c", "echo ready; read x; echo $((x * x))"],
    );
    let (code, r, err) = d.ctl(&["seed", "ref", "--pages", &id]);
    assert_eq!(code, 0, "{err}");
    let r = r.trim().to_string();
    assert!(r.starts_with(&format!("{page}/{id}#")), "{r}");
    (d, r)
}

/// A seed, captured through the library, of `/bin/sh -c SCRIPT` blocked in
/// its first read; the parent is gone after. Its directory.
fn shell_seed(script: &str, name: &str) -> PathBuf {
    let mut parent = Command::new("/bin/sh")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_blocked_in_read(parent.id() as i32);
    let dir = scratch(name).join("seed");
    remotefork::capture(parent.id() as i32, &dir, &Default::default()).unwrap();
    parent.kill().unwrap();
    parent.wait().unwrap();
    dir
}

#[test]
fn crate_example_works() {
    if !require_root("crate_example_works") {
        return;
    }
    // The crate page's example (libremotefork/src/lib.rs), as written there.
    use remotefork::{capture, CaptureOptions, Seed, SpawnOptions, Stdio};
    let mut parent = std::process::Command::new("/bin/sh")
        .args(["-c", "read x; echo hello $x"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_blocked_in_read(parent.id() as i32);
    let dir = scratch("crate-example").join("seed");
    capture(parent.id() as i32, &dir, &CaptureOptions::default()).unwrap();
    let seed = Seed::open(&dir).unwrap();
    let mut child = seed
        .spawn(
            Stdio::Piped,
            Stdio::Piped,
            Stdio::Null,
            &SpawnOptions::default(),
        )
        .unwrap();
    child.take_stdin().unwrap().write_all(b"world\n").unwrap();
    let mut out = String::new();
    child
        .take_stdout()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "hello world\n");
    assert!(child.wait().unwrap().success());
    parent.kill().unwrap();
    parent.wait().unwrap();
}

#[test]
fn a_childs_events_run_from_running_to_exited() {
    if !require_root("a_childs_events_run_from_running_to_exited") {
        return;
    }
    use remotefork::{ChildEvent, ExitReason, Seed, SpawnOptions, Stdio};
    let dir = shell_seed("read x; echo got $x; exit 3", "child-events");
    let seed = Seed::open(&dir).unwrap();
    for opts in [
        SpawnOptions::default(),
        SpawnOptions::default().lazy(false).template(false),
    ] {
        let mut child = seed
            .spawn(Stdio::Piped, Stdio::Piped, Stdio::Null, &opts)
            .unwrap();
        let mut stdin = child.take_stdin().unwrap();
        let mut stdout = child.take_stdout().unwrap();
        let pid = child.pid();
        let mut evs = child.events();
        assert!(matches!(evs.next(), Some(Ok(ChildEvent::Running { .. }))));
        stdin.write_all(b"x\n").unwrap();
        let mut seen = Vec::new();
        for e in evs {
            seen.push(e.unwrap());
        }
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        assert_eq!(out, "got x\n", "{opts:?}");
        assert!(
            seen.iter()
                .any(|e| matches!(e, ChildEvent::FirstOutput { .. })),
            "{opts:?}: {seen:?}"
        );
        assert_eq!(
            seen.last(),
            Some(&ChildEvent::Exited(ExitReason::Exited(3))),
            "{opts:?}: {seen:?}"
        );
        if opts.lazy {
            assert!(
                seen.iter()
                    .any(|e| matches!(e, ChildEvent::Faults { served, .. } if *served > 0)),
                "a lazy child with no fault events: {seen:?}"
            );
        }
        // Reaped: its pid is no longer ours to signal.
        assert!(child.kill().is_err(), "pid {pid}");
    }
}

#[test]
fn the_c_api_runs_from_a_c_program() {
    if !require_root("the_c_api_runs_from_a_c_program") {
        return;
    }
    let dir = scratch("c-api");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = libdir();
    let prog = dir.join("api_c");
    let st = Command::new("cc")
        .arg("-O1")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-o")
        .arg(&prog)
        .arg(root.join("forkd/tests/programs/api_c.c"))
        .arg(format!(
            "-I{}",
            root.join("libremotefork/include").display()
        ))
        .arg(format!("-L{}", lib.display()))
        .arg("-lremotefork")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .unwrap();
    assert!(st.success());
    // Captured by the C program itself, from a local directory.
    let o = Command::new(&prog).arg(&dir).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out.trim(), "ok 12 children");
    // By reference, from forkd's page server over TCP.
    let (d, r) = page_served_seed("c-api-remote");
    let o = Command::new(&prog).arg(&dir).arg(&r).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out.trim(), "ok 12 children");
    d.stop();
}

/// The answers the scheduler printed: job -> (node, answer).
fn answers(out: &str) -> std::collections::HashMap<u64, (String, u64)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("job ")?;
            let (job, rest) = rest.split_once(" on ")?;
            let (node, ans) = rest.split_once(": ")?;
            Some((job.parse().ok()?, (node.to_string(), ans.parse().ok()?)))
        })
        .collect()
}

#[test]
fn the_example_scheduler_places_restarts_and_sums_up() {
    if !require_root("the_example_scheduler_places_restarts_and_sums_up") {
        return;
    }
    let sched = example("scheduler");
    // A seed in a directory, captured through the library.
    let seed = shell_seed("read x; echo $((x * x))", "scheduler");
    let (d, r) = page_served_seed("scheduler-remote");
    for (how, arg) in [
        ("--seed", seed.to_str().unwrap()),
        ("--seed-ref", r.as_str()),
    ] {
        let o = Command::new(&sched)
            .args([how, arg, "--nodes", "a=2,b=3,c=1", "--children", "30"])
            .args(["--fail-every", "4", "--retries", "5"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{how}: {out}{err}");
        let a = answers(&out);
        assert_eq!(a.len(), 30, "{how}: {out}");
        for (job, (_, ans)) in &a {
            assert_eq!(*ans, job * job, "{how}: job {job}");
        }
        // Every fourth child on each node was killed, and restarted.
        assert!(err.contains("restarting it"), "{how}: {err}");
        assert!(out.contains("summary: 30 children over 3 nodes"), "{out}");
        assert!(out.contains(": 30 ok, 0 failed for good,"), "{out}");
        let placed: usize = out
            .lines()
            .filter(|l| l.starts_with("node "))
            .map(|l| {
                let p = l.split("placed ").nth(1).unwrap();
                p.split(',').next().unwrap().parse::<usize>().unwrap()
            })
            .sum();
        assert!(placed > 30, "restarts are placed too: {out}");
    }
    d.stop();
}

#[test]
fn bad_references_are_refused_by_name() {
    if !require_root("bad_references_are_refused_by_name") {
        return;
    }
    use remotefork::{RemoteOptions, Seed, SeedRef, Transport};
    let (d, r) = page_served_seed("bad-refs");
    let good: SeedRef = r.parse().unwrap();
    let wrong_key = SeedRef {
        key: "00".repeat(16),
        ..good.clone()
    };
    let e = Seed::open_remote(&wrong_key, &RemoteOptions::default()).unwrap_err();
    assert!(e.to_string().contains("wrong key"), "{e}");
    let unknown = SeedRef {
        id: "0123456789abcdef".into(),
        ..good.clone()
    };
    let e = Seed::open_remote(&unknown, &RemoteOptions::default()).unwrap_err();
    assert!(e.to_string().contains("no seed 0123456789abcdef"), "{e}");
    let e =
        Seed::open_remote(&good, &RemoteOptions::default().transport(Transport::Rdma)).unwrap_err();
    assert!(e.to_string().contains("RDMA"), "{e}");
    let tls = SeedRef {
        addr: format!("tls://{}", good.addr),
        ..good.clone()
    };
    let e = Seed::open_remote(&tls, &RemoteOptions::default()).unwrap_err();
    assert!(e.to_string().contains("tls_ca"), "{e}");
    // And the good one still works after all that.
    let seed = Seed::open_remote(&good, &RemoteOptions::default()).unwrap();
    let mut c = seed
        .spawn(
            remotefork::Stdio::Piped,
            remotefork::Stdio::Piped,
            remotefork::Stdio::Null,
            &remotefork::SpawnOptions::default(),
        )
        .unwrap();
    c.take_stdin().unwrap().write_all(b"12\n").unwrap();
    let mut out = String::new();
    c.take_stdout().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(out, "144\n");
    assert!(c.wait().unwrap().success());
    d.stop();
}
