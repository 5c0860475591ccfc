//! Descriptors a child cannot have as its parent does: capture or spawn
//! fails naming the descriptor and its kind, or (only with `--drop-fds`)
//! the child has it closed and each spawn's notes say so. Never a silent
//! `/dev/null`. The objects that are recreated are the corpus cases
//! `event_loop`, `fd_objects` and `sockets` (tests/corpus.rs).
//!
//! Root-only.

mod common;

use std::process::Command;

use common::*;

/// `forkd snapshot` of `target` (blocked reading stdin) into `out`, with
/// `extra` arguments: (exit code, stderr).
fn snapshot(target: &Target, out: &std::path::Path, extra: &[&str]) -> (i32, String) {
    wait_blocked_in_read(target.pid());
    let pid = target.pid().to_string();
    let mut args = vec!["snapshot", "--pid", &pid, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, _, err) = run_forkd(&args);
    (code, err)
}

fn python_target(script: &str) -> (Target, String) {
    let mut c = Command::new(python());
    c.arg("-c").arg(script);
    Target::start(c)
}

/// An inotify instance watching /tmp, at the number the ready line names;
/// after its line, says whether that number is still open.
const INOTIFY: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
assert fd >= 0 and libc.inotify_add_watch(fd, b"/tmp", 0x100) >= 0
print("ready", fd, flush=True)
sys.stdin.readline()
try:
    os.fstat(fd)
    print("open")
except OSError as e:
    print("closed", e.errno)
"#;

#[test]
fn an_inotify_instance_is_refused_by_name_or_dropped_when_asked() {
    if !require_root("fds::an_inotify_instance_is_refused_by_name_or_dropped_when_asked") {
        return;
    }
    let dir = scratch("fds-inotify");
    let (t, ready) = python_target(INOTIFY);
    let fd: i32 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    // Refused, naming the descriptor, its kind, and the way out.
    let (code, err) = snapshot(&t, &dir.join("refused"), &[]);
    assert_ne!(code, 0, "capture of an inotify holder succeeded");
    assert!(
        err.contains(&format!("fd {fd} (inotify")) && err.contains("--drop-fds"),
        "{err}"
    );
    assert!(!dir.join("refused/descriptor.bin").exists());
    // Dropped when asked: the child has the number closed, and is told.
    let seed = dir.join("dropped");
    let (code, err) = snapshot(&t, &seed, &["--drop-fds"]);
    assert_eq!(code, 0, "{err}");
    let r = restore_and_talk(&seed, &["--eager"], "go\n", |_| {});
    assert_eq!(
        r.stdout,
        format!("closed {}\n", libc::EBADF),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains(&format!("fd {fd} was dropped at capture")),
        "{}",
        r.stderr
    );
    let (out, st) = t.finish("go\n");
    assert!(st.success());
    assert_eq!(out, "open\n", "the parent lost its inotify instance");
}

#[test]
fn a_pipe_shared_with_another_process_is_refused_naming_that_process() {
    if !require_root("fds::a_pipe_shared_with_another_process_is_refused_naming_that_process") {
        return;
    }
    let dir = scratch("fds-outside-pipe");
    // fd 3: the read end of a pipe whose write end a `sleep` holds (its
    // pid on the ready line, killed at the end).
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg("exec 3< <(exec sleep 1000 </dev/null 2>/dev/null); echo ready $!; read x; echo done");
    let (t, ready) = Target::start(c);
    let sleeper: i32 = ready.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (code, err) = snapshot(&t, &dir.join("seed"), &[]);
    assert_ne!(code, 0, "capture succeeded");
    assert!(
        err.contains("fd 3 (pipe read end") && err.contains("(sleep)"),
        "{err}"
    );
    let (out, _) = t.finish("go\n");
    // SAFETY: plain kill(2) of the sleep this test started.
    unsafe { libc::kill(sleeper, libc::SIGKILL) };
    assert_eq!(out, "done\n");
}

/// A TCP socket listening on 127.0.0.1 without SO_REUSEPORT.
const LISTENER: &str = r#"
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print("ready", s.fileno(), s.getsockname()[1], flush=True)
sys.stdin.readline()
print("listening", s.getsockname()[1])
"#;

#[test]
fn a_port_the_parent_holds_alone_fails_the_spawn_naming_it() {
    if !require_root("fds::a_port_the_parent_holds_alone_fails_the_spawn_naming_it") {
        return;
    }
    let dir = scratch("fds-listener");
    let (t, ready) = python_target(LISTENER);
    let words: Vec<&str> = ready.split_whitespace().collect();
    let (fd, port) = (words[1], words[2]);
    let seed = dir.join("seed");
    let (code, err) = snapshot(&t, &seed, &[]);
    assert_eq!(code, 0, "{err}");
    // While the parent listens, a child on its node cannot: the spawn
    // fails, naming the descriptor, the address and SO_REUSEPORT.
    let r = restore_and_talk(&seed, &["--eager"], "go\n", |_| {});
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!(
            "fd {fd}: binding the listening socket to 127.0.0.1:{port}"
        )) && r.stderr.contains("SO_REUSEPORT"),
        "{}",
        r.stderr
    );
    assert!(orphan_husks().is_empty(), "a husk was left behind");
    // Once the parent has let the port go, the child listens on it.
    let (out, _) = t.finish("go\n");
    assert_eq!(out, format!("listening {port}\n"));
    let r = restore_and_talk(&seed, &["--eager"], "go\n", |_| {});
    assert_eq!(r.stdout, format!("listening {port}\n"), "{}", r.stderr);
}
