//! `forkd serve` and `forkctl`, end to end: seeds from a pid and from a
//! command, 50 children, drop, restart, bad input, TCP with a token, and a
//! burst of concurrent clients. Run as root.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SERVER: &str = r#"
import sys, os, json
state = {'n': 0}
print('ready', flush=True)
for line in sys.stdin:
    state['n'] += 1
    print(json.dumps({'got': line.strip(), 'pid': os.getpid(), 'n': state['n']}), flush=True)
"#;

fn spawn_json(d: &Daemon, seed: &str, count: u32, input: &str) -> Value {
    let f = d.dir.join(format!("in-{seed}-{count}"));
    std::fs::write(&f, input).unwrap();
    let (code, out, err) = d.ctl(&[
        "--json",
        "spawn",
        seed,
        "--count",
        &count.to_string(),
        "--stdin",
        f.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "spawn failed: {err} {out}");
    serde_json::from_str(&out).unwrap()
}

fn check_children(v: &Value, count: usize, input_lines: usize) {
    let kids = v["children"].as_array().unwrap();
    assert_eq!(kids.len(), count, "{v}");
    assert_eq!(v["failed"], 0);
    for k in kids {
        assert_eq!(k["exit_code"], 0, "{k}");
        let lines = stdout_lines(k);
        assert_eq!(lines.len(), input_lines, "{k}");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["pid"], k["pid"]);
            assert_eq!(l["n"], i + 1, "each child counts only its own requests");
        }
    }
}

#[test]
fn seeds_spawn_fifty_drop_and_survive_a_restart() {
    if !require_root("seeds_spawn_fifty_drop_and_survive_a_restart") {
        return;
    }
    let dir = scratch("daemon-main");
    let d = Daemon::start(&dir, false);

    // A seed from a running process.
    let mut cmd = Command::new(python());
    cmd.args(["-c", SERVER]);
    let (target, _) = Target::start(cmd);
    wait_blocked_in_read(target.pid());
    let (code, out, err) = d.ctl(&[
        "--json",
        "seed",
        "create",
        "--pid",
        &target.pid().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let seed: Value = serde_json::from_str(&out).unwrap();
    let id = seed["id"].as_str().unwrap().to_string();
    assert_eq!(seed["key"].as_str().unwrap().len(), 32, "128-bit key");
    drop(target);

    let v = spawn_json(&d, &id, 50, "a\nb\n");
    check_children(&v, 50, 2);
    let (_, ps, _) = d.ctl(&["--json", "ps", "--seed", &id]);
    let ps: Value = serde_json::from_str(&ps).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 50);
    assert!(ps
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["state"] == "exited 0"));

    // A seed from a command and its readiness line.
    let cmd_id = python_seed(|a| d.ctl(a), SERVER);
    check_children(&spawn_json(&d, &cmd_id, 5, "x\n"), 5, 1);

    // Drop the first; spawning from it is refused.
    let (code, _, _) = d.ctl(&["seed", "drop", &id]);
    assert_eq!(code, 0);
    let (code, _, err) = d.ctl(&["spawn", &id]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown seed") && err.contains("NotFound"),
        "{err}"
    );

    // Restart: the command seed is still there and still works.
    d.stop();
    let d = Daemon::start(&dir, false);
    let (_, ls, _) = d.ctl(&["--json", "seed", "ls"]);
    let ls: Value = serde_json::from_str(&ls).unwrap();
    let ids: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![cmd_id.as_str()]);
    check_children(&spawn_json(&d, &cmd_id, 3, "y\nz\n"), 3, 2);
}

#[test]
fn bad_input_gets_clear_errors_and_forkd_keeps_serving() {
    if !require_root("bad_input_gets_clear_errors_and_forkd_keeps_serving") {
        return;
    }
    let dir = scratch("daemon-bad");
    let d = Daemon::start(&dir, true);
    let tcp = d.tcp.clone().unwrap();
    let token = dir.join("token");
    let wrong = dir.join("wrong-token");
    std::fs::write(&wrong, "nope").unwrap();

    let id = python_seed(|a| d.ctl(a), SERVER);

    // Keep a spawn running while the bad requests come in.
    let slow_in = dir.join("slow-in");
    std::fs::write(&slow_in, "q\n".repeat(200)).unwrap();
    let burst = Command::new(env!("CARGO_BIN_EXE_forkctl"))
        .args([
            "--addr",
            &d.addr(),
            "--json",
            "spawn",
            &id,
            "--count",
            "20",
            "--stdin",
            slow_in.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // TCP without a token, with a wrong one.
    let (code, _, err) = d.ctl_at(&tcp, None, &["node"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("bearer token is required") && err.contains("Unauthenticated"),
        "{err}"
    );
    let (code, _, err) = d.ctl_at(&tcp, Some(&wrong), &["node"]);
    assert_eq!(code, 1);
    assert!(err.contains("wrong token"), "{err}");
    // With the token: node info answers during the burst.
    let (code, out, err) = d.ctl_at(&tcp, Some(&token), &["--json", "node"]);
    assert_eq!(code, 0, "{err}");
    let node: Value = serde_json::from_str(&out).unwrap();
    // Its memory account covers at least forkd itself.
    assert!(node["pss_bytes"].as_u64().unwrap() > 1 << 20, "{node}");
    let rdma = node["transports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "rdma")
        .unwrap();
    assert_eq!(rdma["available"], false);
    assert_eq!(node["transport"]["selected"], "tcp", "{node}");
    assert!(!node["transport"]["reason"].as_str().unwrap().is_empty());
    assert!(
        rdma["reason"]
            .as_str()
            .unwrap()
            .contains("RDMA unavailable: "),
        "{rdma}"
    );
    // Over TCP, spawning needs the seed's key.
    let (code, _, err) = d.ctl_at(&tcp, Some(&token), &["spawn", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("wrong key for seed"), "{err}");
    let (code, r, _) = d.ctl(&["seed", "ref", &id]);
    assert_eq!(code, 0);
    let key = r.trim().rsplit_once('#').unwrap().1.to_string();
    let input = dir.join("one");
    std::fs::write(&input, "k\n").unwrap();
    let (code, out, err) = d.ctl_at(
        &tcp,
        Some(&token),
        &[
            "spawn",
            &format!("{id}#{key}"),
            "--stdin",
            input.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"got\": \"k\""), "{out}");
    // Unknown seed, bad prefetch mode, uncapturable process.
    let (code, _, err) = d.ctl(&["spawn", "0123456789abcdef"]);
    assert!(code == 1 && err.contains("unknown seed"), "{err}");
    let (code, _, err) = d.ctl(&["spawn", &id, "--prefetch", "sideways"]);
    assert!(
        code == 1 && err.contains("unknown prefetch mode") && err.contains("InvalidArgument"),
        "{err}"
    );
    let (mt, _) = Target::start(Command::new(c_program("leaderless")));
    let (code, _, err) = d.ctl(&["seed", "create", "--pid", &mt.pid().to_string()]);
    assert!(
        code == 1 && err.contains("main thread has exited") && err.contains("FailedPrecondition"),
        "{err}"
    );
    let (code, _, err) = d.ctl(&[
        "seed",
        "create",
        "--ready-line",
        "never",
        "--timeout-ms",
        "300",
        "--",
        "sleep",
        "5",
    ]);
    assert!(code == 1 && err.contains("did not print"), "{err}");
    let (code, _, err) = d.ctl(&["kill", "no-such-instance"]);
    assert!(code == 1 && err.contains("unknown instance"), "{err}");

    // The burst completed, every child accounted for.
    let out = burst.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_children(&v, 20, 200);
}

#[test]
fn twenty_concurrent_clients_lose_no_events() {
    if !require_root("twenty_concurrent_clients_lose_no_events") {
        return;
    }
    let dir = scratch("daemon-burst");
    let d = Daemon::start(&dir, false);
    let id = python_seed(|a| d.ctl(a), SERVER);
    let input = dir.join("in");
    std::fs::write(&input, "r\n").unwrap();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_forkctl"))
                .args([
                    "--addr",
                    &d.addr(),
                    "--json",
                    "spawn",
                    &id,
                    "--count",
                    "3",
                    "--stdin",
                    input.to_str().unwrap(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // forkd answers while the burst runs.
    let t = Instant::now();
    let (code, _, _) = d.ctl(&["node"]);
    assert_eq!(code, 0);
    assert!(t.elapsed() < Duration::from_secs(30));
    for c in clients {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success());
        check_children(&serde_json::from_slice(&o.stdout).unwrap(), 3, 1);
    }
    let (_, ps, _) = d.ctl(&["--json", "ps"]);
    let ps: Value = serde_json::from_str(&ps).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 60);
    assert!(
        ps.as_array()
            .unwrap()
            .iter()
            .all(|i| i["state"] == "exited 0"),
        "{ps}"
    );
}

#[test]
fn config_file_and_prometheus_metrics() {
    if !require_root("config_file_and_prometheus_metrics") {
        return;
    }
    let dir = scratch("daemon-config");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.join("forkd.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\nmetrics = \"127.0.0.1:{port}\"\nspawner_threads = 1\n",
            dir.join("sock").display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    let mut child = forkd()
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .spawn()
        .unwrap();
    let addr = format!("unix:{}", dir.join("sock").display());
    let ctl = |args: &[&str]| run_forkctl(&addr, None, args);
    let t = Instant::now();
    while ctl(&["node"]).0 != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "forkd did not come up from its config file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let id = python_seed(ctl, SERVER);
    let input = dir.join("in");
    std::fs::write(&input, "m\n").unwrap();
    let (code, _, err) = ctl(&[
        "spawn",
        &id,
        "--count",
        "2",
        "--stdin",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    let m = get("/metrics");
    assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
    assert!(m.contains("forkd_seeds 1"), "{m}");
    assert!(m.contains("forkd_spawns_total 2"), "{m}");
    assert!(
        m.contains(&format!("forkd_seed_faults_total{{seed=\"{id}\"}}")),
        "{m}"
    );
    assert!(m.contains("forkd_fault_latency_us_bucket"), "{m}");
    assert!(get("/other").starts_with("HTTP/1.1 404"));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn grpc_api_directly_with_watch_and_malformed_input() {
    if !require_root("grpc_api_directly_with_watch_and_malformed_input") {
        return;
    }
    use forkd::pb;
    let dir = scratch("daemon-grpc");
    let d = Daemon::start(&dir, false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = forkd::client::connect(&d.addr(), None).await.unwrap();
        let mut watcher = forkd::client::connect(&d.addr(), None).await.unwrap();
        let mut watch = watcher
            .watch(pb::WatchRequest {})
            .await
            .unwrap()
            .into_inner();

        // Garbage on the gRPC socket and on the cooperative socket.
        {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(dir.join("sock")).unwrap();
            let _ = s.write_all(b"\x00\x01garbage that is not HTTP/2\r\n\r\n");
            drop(s);
            let mut s = std::os::unix::net::UnixStream::connect(dir.join("sock.coop")).unwrap();
            s.write_all(b"{not json\n").unwrap();
            let mut answer = [0u8; 256];
            let n = s.read(&mut answer).unwrap();
            let a = String::from_utf8_lossy(&answer[..n]);
            assert!(a.contains("\"ok\":false") && a.contains("not JSON"), "{a}");
        }
        // Malformed requests get INVALID_ARGUMENT.
        let e = c
            .create_seed(pb::CreateSeedRequest {
                source: None,
                name: String::new(),
                owner: String::new(),
                drop_unsupported_fds: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = c
            .spawn(pb::SpawnRequest {
                seed: Some(pb::SeedRef {
                    id: String::new(),
                    key: String::new(),
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

        // A seed from a running process, through the API.
        let mut cmd = Command::new(python());
        cmd.args(["-c", SERVER]);
        let (target, _) = Target::start(cmd);
        wait_blocked_in_read(target.pid());
        let seed = c
            .create_seed(pb::CreateSeedRequest {
                source: Some(pb::create_seed_request::Source::Pid(target.pid() as u32)),
                name: "api".into(),
                owner: String::new(),
                drop_unsupported_fds: false,
            })
            .await
            .unwrap()
            .into_inner();
        drop(target);
        assert_eq!(seed.name, "api");
        let e = c
            .spawn(pb::SpawnRequest {
                seed: Some(pb::SeedRef {
                    id: seed.id.clone(),
                    key: String::new(),
                }),
                count: 200_000,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);

        let req = pb::SpawnRequest {
            seed: Some(pb::SeedRef {
                id: seed.id.clone(),
                key: String::new(),
            }),
            count: 4,
            stdin: b"w\n".to_vec(),
            ..Default::default()
        };
        let mut stream = c.spawn(req).await.unwrap().into_inner();
        let mut order: std::collections::HashMap<String, Vec<&'static str>> = Default::default();
        let mut exited = 0;
        while let Some(ev) = stream.message().await.unwrap() {
            let k = match ev.kind.unwrap() {
                pb::instance_event::Kind::Started(_) => "started",
                pb::instance_event::Kind::Running(_) => "running",
                pb::instance_event::Kind::Exited(x) => {
                    assert_eq!(x.exit_code, 0);
                    let a: Value = serde_json::from_slice(&x.stdout).unwrap();
                    assert_eq!(a["pid"], ev.pid);
                    exited += 1;
                    "exited"
                }
                pb::instance_event::Kind::Failed(f) => panic!("{}", f.reason),
                pb::instance_event::Kind::Output(o) => {
                    assert!(!o.data.is_empty() && o.since_spawn_ms > 0.0);
                    continue;
                }
            };
            order.entry(ev.instance_id).or_default().push(k);
            if exited == 4 {
                break;
            }
        }
        assert_eq!(order.len(), 4);
        assert!(
            order
                .values()
                .all(|v| v == &["started", "running", "exited"]),
            "{order:?}"
        );
        // The watcher saw the same twelve events.
        let mut seen = 0;
        while seen < 12 {
            let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(ev.seed_id, seed.id);
            seen += 1;
        }
        let info = c
            .node_info(pb::NodeInfoRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.seeds, 1);
        assert_eq!(info.vdso_hash.len(), 64);
    });
}

/// Processes forkd started that are stopped under ptrace (`t`): its seeds'
/// node templates and the children they forked ahead.
fn stopped_children(forkd_pid: i32) -> Vec<i32> {
    children(forkd_pid)
        .into_iter()
        .filter(|p| state(*p) == Some('t'))
        .collect()
}

#[test]
fn idle_templates_are_dropped_and_rebuilt_at_the_next_spawn() {
    if !require_root("idle_templates_are_dropped_and_rebuilt_at_the_next_spawn") {
        return;
    }
    let dir = scratch("daemon-idle-templates");
    let d = Daemon::start_with(&dir, false, &["--template-idle-s", "1"]);
    let forkd_pid = d.child.id() as i32;
    let (code, out, err) = d.ctl(&[
        "--json",
        "seed",
        "create",
        "--ready-line",
        "ready",
        "--",
        python(),
        "-c",
        SERVER,
    ]);
    assert_eq!(code, 0, "{err}");
    let seed: Value = serde_json::from_str(&out).unwrap();
    let id = seed["id"].as_str().unwrap().to_string();
    check_children(&spawn_json(&d, &id, 3, "a\n"), 3, 1);
    // The template (and a spare) wait for the next spawn...
    let held = stopped_children(forkd_pid);
    assert!(!held.is_empty(), "no template after a spawn");
    // ...until they have been idle for a second: then they are gone.
    let t = Instant::now();
    while !stopped_children(forkd_pid).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "templates {:?} still held after 10 s idle",
            stopped_children(forkd_pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in &held {
        assert!(
            matches!(state(*p), None | Some('Z')),
            "process {p} lives on"
        );
    }
    // The next spawn builds a new one, and its children are right.
    check_children(&spawn_json(&d, &id, 2, "b\nc\n"), 2, 2);
    assert!(!stopped_children(forkd_pid).is_empty());
}

#[test]
fn a_prepared_seed_has_its_template_before_the_first_spawn() {
    if !require_root("a_prepared_seed_has_its_template_before_the_first_spawn") {
        return;
    }
    let dir = scratch("daemon-prepare");
    let d = Daemon::start(&dir, false);
    let forkd_pid = d.child.id() as i32;
    let id = python_seed(|a| d.ctl(a), SERVER);
    assert!(
        stopped_children(forkd_pid).is_empty(),
        "a template before any use"
    );
    // Prepared: the template (and its spare) are there, no child is.
    let (code, out, err) = d.ctl(&["--json", "prepare", &id]);
    assert_eq!(code, 0, "{err}");
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["seed"], id.as_str(), "{p}");
    assert_eq!(p["template_built"], true, "{p}");
    let held = stopped_children(forkd_pid);
    assert!(held.len() >= 2, "template and spare: {held:?}");
    let (code, out, _) = d.ctl(&["--json", "ps"]);
    assert_eq!(code, 0);
    let ps: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ps.as_array().map_or(0, |a| a.len()), 0, "no instance: {ps}");
    // Again: nothing to build.
    let (code, out, err) = d.ctl(&["--json", "prepare", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["template_built"],
        false
    );
    // The children come from that template, and are right.
    check_children(&spawn_json(&d, &id, 3, "a\nb\n"), 3, 2);
    assert!(
        held.iter().any(|p| stopped_children(forkd_pid).contains(p)),
        "the template was kept"
    );
    // Without templates, nothing is built; an unknown seed is named.
    let (code, out, err) = d.ctl(&["--json", "prepare", &id, "--no-template"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["template_built"],
        false
    );
    let (code, _, err) = d.ctl(&["prepare", "0123456789abcdef"]);
    assert_ne!(code, 0);
    assert!(err.contains("0123456789abcdef"), "{err}");
}

/// forkd's end of each established TCP connection to `port`: its socket
/// descriptors, found through /proc/net/tcp inodes.
fn established_fds(forkd_pid: i32, port: u16) -> Vec<i32> {
    let inodes: Vec<String> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && f.get(3) == Some(&"01"))
                .then(|| f.get(9).map(|s| s.to_string()))?
        })
        .collect();
    std::fs::read_dir(format!("/proc/{forkd_pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let ino = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            inodes
                .iter()
                .any(|i| i == ino)
                .then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

/// A child's events on a TCP `Spawn` stream are small writes: with Nagle's
/// algorithm they waited for the client's delayed ACK (40 ms). forkd's
/// accepted gRPC connections must have TCP_NODELAY.
#[test]
fn tcp_grpc_connections_have_nodelay() {
    if !require_root("tcp_grpc_connections_have_nodelay") {
        return;
    }
    let dir = scratch("daemon-nodelay");
    let d = Daemon::start(&dir, true);
    let addr = d.tcp.clone().unwrap();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = forkd::client::connect(&addr, Some("s3cret-token"))
            .await
            .unwrap();
        c.node_info(forkd::pb::NodeInfoRequest::default())
            .await
            .unwrap();
        let fds = established_fds(d.child.id() as i32, port);
        assert!(!fds.is_empty(), "no established connection found in forkd");
        let pidfd = kernel_helpers::uffd::pidfd_open(d.child.id() as i32).unwrap();
        for fd in fds {
            use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
            // SAFETY: pidfd_getfd copies forkd's descriptor into ours.
            let mine = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
            assert!(
                mine >= 0,
                "pidfd_getfd: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh descriptor we own.
            let mine = unsafe { OwnedFd::from_raw_fd(mine as i32) };
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes an int into `v`, `len` says its size.
            let r = unsafe {
                libc::getsockopt(
                    mine.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            assert_eq!(v, 1, "forkd's fd {fd} for a TCP gRPC client has Nagle on");
        }
    });
}
