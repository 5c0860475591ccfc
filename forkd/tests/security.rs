//! Tenants who do not trust each other (docs/SECURITY.md): each hostile
//! move is refused with a clear error, and forkd keeps serving the others.
//! Root-only: real daemons, real processes, real uids.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const UID_A: u32 = 2001;
const UID_B: u32 = 2002;

/// A daemon with tenants `a` (uid 2001, may create seeds from commands) and
/// `b` (uid 2002), and TCP with the node token.
struct Tenanted {
    d: Daemon,
    token_a: PathBuf,
    token_b: PathBuf,
}

impl Tenanted {
    fn start(name: &str, extra: &[&str]) -> Tenanted {
        let dir = scratch(name);
        // Children run as 2001/2002: they must reach the test's programs.
        let mut p = dir.clone();
        while let Some(parent) = p.parent() {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(&p) {
                let mode = m.permissions().mode();
                if mode & 0o001 == 0 {
                    let _ =
                        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o011));
                }
            }
            p = parent.to_path_buf();
        }
        let token_a = dir.join("token-a");
        let token_b = dir.join("token-b");
        std::fs::write(&token_a, "tenant-a-secret\n").unwrap();
        std::fs::write(&token_b, "tenant-b-secret\n").unwrap();
        let hash = |t: &str| {
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_forkd"))
                .arg("hash-token")
                .stdin(std::fs::File::open(t).unwrap())
                .output()
                .unwrap();
            assert!(o.status.success());
            String::from_utf8(o.stdout).unwrap().trim().to_string()
        };
        let tenants = dir.join("tenants.toml");
        std::fs::write(
            &tenants,
            format!(
                "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nuid = {UID_A}\ngid = {UID_A}\ncreate_from_command = true\n\n\
                 [[tenant]]\nname = \"b\"\ntoken_sha256 = \"{}\"\nuid = {UID_B}\ngid = {UID_B}\n",
                hash(token_a.to_str().unwrap()),
                hash(token_b.to_str().unwrap())
            ),
        )
        .unwrap();
        let mut flags = vec!["--tenants-file", tenants.to_str().unwrap()];
        flags.extend_from_slice(extra);
        let d = Daemon::start_with(&dir, true, &flags);
        Tenanted {
            d,
            token_a,
            token_b,
        }
    }

    fn as_a(&self, args: &[&str]) -> (i32, String, String) {
        run_forkctl(&self.d.addr(), Some(&self.token_a), args)
    }

    fn as_b(&self, args: &[&str]) -> (i32, String, String) {
        run_forkctl(&self.d.addr(), Some(&self.token_b), args)
    }

    fn tcp(&self) -> String {
        self.d.tcp.clone().unwrap()
    }

    /// A seed of `confined.c` (with its seccomp filter), captured by root.
    fn confined_seed(&self, owner: &str) -> String {
        let prog = c_program("confined");
        command_seed(
            |a| self.d.ctl(a),
            &["--owner", owner],
            &[prog.to_str().unwrap(), "filter"],
        )
    }
}

fn id_of(out: &str) -> String {
    serde_json::from_str::<Value>(out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Spawn one child through `ctl` with `input`; its report.
fn spawn_one(
    ctl: impl Fn(&[&str]) -> (i32, String, String),
    dir: &Path,
    seed: &str,
    input: &str,
) -> Value {
    spawn_with(ctl, dir, seed, input, &[])[0].clone()
}

/// Spawn through `ctl` with `input` and `extra` flags; must succeed: the
/// children's reports.
fn spawn_with(
    ctl: impl Fn(&[&str]) -> (i32, String, String),
    dir: &Path,
    seed: &str,
    input: &str,
    extra: &[&str],
) -> Vec<Value> {
    let f = dir.join(format!("input-{}", input.len()));
    std::fs::write(&f, input).unwrap();
    let mut args = vec!["--json", "spawn", seed, "--stdin", f.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, out, err) = ctl(&args);
    assert_eq!(code, 0, "{extra:?}: {out} {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["children"].as_array().unwrap().clone()
}

/// The JSON lines a child printed.
fn lines(child: &Value) -> Vec<Value> {
    child["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// forkctl run as `uid` (no token): what a local user gets.
fn forkctl_as(uid: u32, addr: &str, args: &[&str]) -> (i32, String, String) {
    let o = forkctl()
        .arg("--addr")
        .arg(addr)
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// One request on the cooperative socket from a process running as `uid`
/// (a fork of this test that changes its ids first); the answer line.
fn coop_as(uid: u32, sock: &Path, request: &str) -> String {
    use std::io::{BufRead, Read, Write};
    let (mut r, w) = std::io::pipe().unwrap();
    let path = sock.to_path_buf();
    let request = request.to_string();
    // SAFETY: the child only changes ids, uses a Unix socket and a pipe,
    // and _exits; it touches no lock another thread of the test may hold
    // (std's UnixStream and write are plain syscalls).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = (|| -> Option<()> {
            // SAFETY: plain id changes of this (child) process.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(uid, uid, uid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return None;
                }
            }
            let mut s = std::os::unix::net::UnixStream::connect(&path).ok()?;
            s.write_all(request.as_bytes()).ok()?;
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line).ok()?;
            let mut w = w;
            w.write_all(line.as_bytes()).ok()?;
            Some(())
        })();
        // SAFETY: the forked child ends here without running destructors.
        unsafe { libc::_exit(if code.is_some() { 0 } else { 1 }) };
    }
    drop(w);
    let mut out = String::new();
    let _ = r.read_to_string(&mut out);
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    out
}

/// forkd answers and can still start a child for tenant `a`.
fn still_serving(t: &Tenanted, seed_a: &str) {
    let c = spawn_one(|a| t.as_a(a), &t.d.dir, seed_a, "report\nexit\n");
    assert_eq!(c["exit_code"], 0, "{c}");
    assert_eq!(lines(&c)[0]["uid"], UID_A, "{c}");
}

#[test]
fn a_tenants_child_of_a_root_parent_runs_as_the_tenant_with_the_parents_filter() {
    if !require_root("a_tenants_child_of_a_root_parent_runs_as_the_tenant_with_the_parents_filter")
    {
        return;
    }
    let t = Tenanted::start("sec-identity", &[]);
    // A root parent, confined by its own filter, captured by the operator
    // for tenant a.
    let prog = c_program("confined");
    let parent = Target::start({
        let mut c = std::process::Command::new(&prog);
        c.arg("filter");
        c
    })
    .0;
    let (code, out, err) = t.d.ctl(&[
        "--json",
        "seed",
        "create",
        "--pid",
        &parent.pid().to_string(),
        "--owner",
        "a",
    ]);
    assert_eq!(code, 0, "{err}");
    let seed = id_of(&out);
    let (said, _) = parent.finish("report\nexit\n");
    let pr: Value = serde_json::from_str(said.lines().next().unwrap()).unwrap();
    assert_eq!(
        (pr["uid"].as_u64(), pr["nnp"].as_u64()),
        (Some(0), Some(0)),
        "{pr}"
    );
    assert_ne!(pr["capeff"], "0000000000000000", "{pr}");

    let c = spawn_one(|a| t.as_a(a), &t.d.dir, &seed, "report\nexit\n");
    assert_eq!(c["exit_code"], 0, "{c}");
    let r = &lines(&c)[0];
    // The tenant's ids, no capabilities, no_new_privs...
    assert_eq!(
        (r["uid"].as_u64(), r["euid"].as_u64(), r["gid"].as_u64()),
        (Some(2001), Some(2001), Some(2001)),
        "{r}"
    );
    assert_eq!(r["capeff"], "0000000000000000", "{r}");
    assert_eq!(r["capprm"], "0000000000000000", "{r}");
    assert_eq!(r["nnp"], 1, "{r}");
    // Dumpable as its parent was (a uid change would have cleared it).
    assert_eq!(r["dumpable"], pr["dumpable"], "{r}");
    // ...and the parent's seccomp filter: sysinfo(2) fails with EPERM.
    assert_eq!(
        (
            r["seccomp"].as_u64(),
            r["sysinfo"].as_i64(),
            r["errno"].as_i64()
        ),
        (Some(2), Some(-1), Some(libc::EPERM as i64)),
        "{r}"
    );
    // Its own session and process group.
    assert_eq!(r["sid"], r["pid"], "{r}");
    assert_eq!(r["pgid"], r["pid"], "{r}");
    let notes = c["notes"].to_string();
    assert!(
        notes.contains("no_new_privs"),
        "the difference is said: {c}"
    );

    // The same seed spawned by the operator still runs as its tenant.
    let c = spawn_one(|a| t.d.ctl(a), &t.d.dir, &seed, "report\nexit\n");
    assert_eq!(lines(&c)[0]["uid"], UID_A, "{c}");

    // An operator's seed of a root parent: root, with the parent's
    // capabilities, no_new_privs and filter (not forkd's freedom), whether
    // forked from a template or restored from scratch.
    let seed = command_seed(
        |a| t.d.ctl(a),
        &[],
        &[prog.to_str().unwrap(), "filter", "dropcaps", "nodump"],
    );
    let lacks_net_raw =
        |hex: &Value| u64::from_str_radix(hex.as_str().unwrap(), 16).unwrap() & (1 << 13) == 0;
    for extra in [&[][..], &["--count", "2"][..], &["--no-template"][..]] {
        for c in &spawn_with(|a| t.d.ctl(a), &t.d.dir, &seed, "report\nexit\n", extra) {
            let r = &lines(c)[0];
            assert_eq!(r["uid"], 0, "{r}");
            assert!(!lacks_net_raw(&pr["capeff"]), "{pr}");
            assert!(
                lacks_net_raw(&r["capeff"]) && lacks_net_raw(&r["capprm"]),
                "{extra:?}: {r}"
            );
            assert!(lacks_net_raw(&r["capbnd"]), "{extra:?}: {r}");
            assert_eq!(
                r["dumpable"], 0,
                "{extra:?}: the parent was not dumpable: {r}"
            );
            assert_eq!(r["nnp"], pr["nnp"], "{r}");
            assert_eq!(
                (r["sysinfo"].as_i64(), r["errno"].as_i64()),
                (Some(-1), Some(libc::EPERM as i64)),
                "{r}"
            );
            assert_eq!(r["sid"], r["pid"], "{extra:?}: {r}");
        }
    }
}

#[test]
fn tenant_b_cannot_see_spawn_watch_drop_or_kill_tenant_as_things() {
    if !require_root("tenant_b_cannot_see_spawn_watch_drop_or_kill_tenant_as_things") {
        return;
    }
    let t = Tenanted::start("sec-isolation", &[]);
    let seed = t.confined_seed("a");
    // An instance of a's.
    let c = spawn_one(|a| t.as_a(a), &t.d.dir, &seed, "report\nexit\n");
    let iid = c["instance"].as_str().unwrap().to_string();

    // Listing: b sees nothing of a's.
    let (code, out, _) = t.as_b(&["--json", "seed", "ls"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&seed), "b lists a's seed: {out}");
    let (code, out, _) = t.as_b(&["--json", "ps"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&seed), "b lists a's instances: {out}");
    // Every direct reach is as if it did not exist.
    for args in [
        vec!["seed", "get", seed.as_str()],
        vec!["seed", "drop", seed.as_str()],
        vec!["spawn", seed.as_str()],
    ] {
        let (code, _, err) = t.as_b(&args);
        assert_ne!(code, 0, "b could {args:?}");
        assert!(err.contains("unknown seed"), "{args:?}: {err}");
    }
    for args in [vec!["kill", iid.as_str()], vec!["instance", iid.as_str()]] {
        let (code, _, err) = t.as_b(&args);
        assert_ne!(code, 0, "b could {args:?}");
        assert!(err.contains("unknown instance"), "{args:?}: {err}");
    }
    let (code, out, err) = t.as_a(&["--json", "instance", &iid]);
    assert_eq!(code, 0, "a cannot see its own instance: {err}");
    assert!(out.contains(&iid));
    // b's watch sees none of a's events while a spawns.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(async {
        use tokio_stream::StreamExt;
        let mut c = forkd::client::connect(&t.d.addr(), Some("tenant-b-secret"))
            .await
            .unwrap();
        let mut w = c
            .watch(forkd::pb::WatchRequest {})
            .await
            .unwrap()
            .into_inner();
        let a = tokio::task::spawn_blocking({
            let seed = seed.clone();
            let addr = t.d.addr();
            let tok = t.token_a.clone();
            move || run_forkctl(&addr, Some(&tok), &["spawn", &seed])
        });
        let _ = a.await;
        let mut n = 0;
        while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(500), w.next()).await {
            if ev.is_ok() {
                n += 1;
            }
        }
        n
    });
    assert_eq!(seen, 0, "b watched a's events");
    // a's seed and instance are untouched; a still spawns.
    let (code, out, _) = t.as_a(&["--json", "seed", "ls"]);
    assert_eq!(code, 0);
    assert!(out.contains(&seed));
    still_serving(&t, &seed);
}

#[test]
fn wrong_missing_and_foreign_credentials_are_refused() {
    if !require_root("wrong_missing_and_foreign_credentials_are_refused") {
        return;
    }
    let t = Tenanted::start("sec-creds", &[]);
    let seed = t.confined_seed("a");
    let wrong = t.d.dir.join("wrong");
    std::fs::write(&wrong, "tenant-a-secreT\n").unwrap();
    let (code, _, err) = run_forkctl(&t.tcp(), Some(&wrong), &["seed", "ls"]);
    assert_ne!(code, 0);
    assert!(err.contains("wrong token"), "{err}");
    let (code, _, err) = run_forkctl(&t.tcp(), None, &["seed", "ls"]);
    assert_ne!(code, 0);
    assert!(err.contains("bearer token is required"), "{err}");
    // Over TCP with its token, a tenant is itself.
    let (code, out, err) = run_forkctl(&t.tcp(), Some(&t.token_a), &["--json", "seed", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&seed));
    // On the Unix socket: a local user who is no tenant is refused; a
    // tenant's uid is that tenant.
    let (code, _, err) = forkctl_as(1234, &t.d.addr(), &["seed", "ls"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("uid 1234 is neither root nor a configured tenant"),
        "{err}"
    );
    let (code, out, err) = forkctl_as(UID_A, &t.d.addr(), &["--json", "seed", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&seed));
    let (code, out, err) = forkctl_as(UID_B, &t.d.addr(), &["--json", "seed", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(&seed));
    // Only the operator names a seed's owner.
    let prog = c_program("confined");
    let (code, _, err) =
        create_seed_cmd(|a| t.as_b(a), &["--owner", "a"], &[prog.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("only the operator"), "{err}");
    still_serving(&t, &seed);
}

#[test]
fn commands_and_captures_only_as_the_caller_could_run_them() {
    if !require_root("commands_and_captures_only_as_the_caller_could_run_them") {
        return;
    }
    let t = Tenanted::start("sec-capture", &[]);
    let seed = t.confined_seed("a");
    let prog = c_program("confined");
    // The node token over TCP: no commands unless the operator enables them.
    let node_token = t.d.dir.join("token");
    let argv = [prog.to_str().unwrap()];
    let (code, _, err) =
        create_seed_cmd(|a| run_forkctl(&t.tcp(), Some(&node_token), a), &[], &argv);
    assert_ne!(code, 0);
    assert!(err.contains("over the network is off"), "{err}");
    // b may not run commands at all; a's run as a.
    let (code, _, err) = create_seed_cmd(|a| t.as_b(a), &[], &argv);
    assert_ne!(code, 0);
    assert!(err.contains("may not create seeds from a command"), "{err}");
    let own = command_seed(|a| t.as_a(a), &[], &argv);
    let c = spawn_one(|a| t.as_a(a), &t.d.dir, &own, "report\nexit\n");
    assert_eq!(lines(&c)[0]["uid"], UID_A, "{c}");

    // Capture by pid: only what the caller could ptrace.
    let root_proc = idle_python();
    let pid = root_proc.pid().to_string();
    let (code, _, err) = t.as_b(&["seed", "create", "--pid", &pid]);
    assert_ne!(code, 0);
    assert!(err.contains("may not capture"), "{err}");
    let (code, _, err) = forkctl_as(UID_B, &t.d.addr(), &["seed", "create", "--pid", &pid]);
    assert_ne!(code, 0);
    assert!(err.contains("uid 2002 may not capture"), "{err}");
    // Through the cooperative socket: the same rule, by SO_PEERCRED.
    let coop = t.d.dir.join("sock.coop");
    let answer = coop_as(
        UID_B,
        &coop,
        &format!("{{\"op\":\"create_seed\",\"pid\":{pid}}}\n"),
    );
    assert!(
        answer.contains("\"ok\":false") && answer.contains("may not capture"),
        "{answer}"
    );
    drop(root_proc);
    still_serving(&t, &seed);
}

#[test]
fn children_that_signal_their_group_or_play_session_games_reach_only_themselves() {
    if !require_root("children_that_signal_their_group_or_play_session_games_reach_only_themselves")
    {
        return;
    }
    let t = Tenanted::start("sec-games", &[]);
    let seed = t.confined_seed("a");
    let c = spawn_one(
        |a| t.as_a(a),
        &t.d.dir,
        &seed,
        "killgroup\njoinparent\noutlive\nreport\nexit\n",
    );
    let out = c["stdout"].as_str().unwrap().to_string();
    assert!(out.contains("killgroup 0"), "{out}");
    // Joining forkd's group from its own session: EPERM.
    assert!(
        out.contains(&format!("joinparent -1 {}", libc::EPERM)),
        "{out}"
    );
    let g: i32 = out
        .lines()
        .find_map(|l| l.strip_prefix("outlive "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // forkd did not get the SIGTERM: it serves on.
    std::thread::sleep(Duration::from_millis(300));
    assert!(t.d.ctl(&["node"]).0 == 0, "forkd stopped");
    still_serving(&t, &seed);
    // The grandchild that outlives its parent runs as the tenant, not root.
    let st = std::fs::read_to_string(format!("/proc/{g}/status")).unwrap_or_default();
    assert!(st.contains(&format!("Uid:\t{UID_A}")), "{st}");
    // SAFETY: plain kill(2) of the grandchild this test made.
    unsafe { libc::kill(g, libc::SIGKILL) };
}

#[test]
fn tenants_cannot_read_state_or_another_seeds_image() {
    if !require_root("tenants_cannot_read_state_or_another_seeds_image") {
        return;
    }
    let t = Tenanted::start("sec-state", &[]);
    let seed_a = t.confined_seed("a");
    let seed_b = t.confined_seed("b");
    let pages = t.d.dir.join(format!("state/seeds/{seed_b}/pages.img"));
    assert!(pages.exists());
    // A child of a's tries b's page store.
    let c = spawn_one(
        |a| t.as_a(a),
        &t.d.dir,
        &seed_a,
        &format!("read {}\nexit\n", pages.display()),
    );
    let out = c["stdout"].as_str().unwrap();
    assert!(out.contains(&format!("read -1 {}", libc::EACCES)), "{out}");
    // A local non-root user lists nothing of STATE.
    let o = std::process::Command::new("ls")
        .arg(t.d.dir.join("state/seeds"))
        .uid(UID_B)
        .gid(UID_B)
        .output()
        .unwrap();
    assert!(!o.status.success(), "uid {UID_B} listed STATE/seeds");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(t.d.dir.join("state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "STATE is {mode:o}");
    let mode = std::fs::metadata(&pages).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "pages.img is {mode:o}");
    still_serving(&t, &seed_a);
}

/// A gateway for `t`'s forkd with `extra` flags: the process, unstarted
/// (stdout and stderr piped).
fn gateway_cmd(t: &Tenanted, extra: &[&std::ffi::OsStr]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--node")
        .arg(t.d.addr())
        .args(extra)
        .env("FORKD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// [`gateway_cmd`] listening on 127.0.0.1: the process and its address.
fn gateway_up(t: &Tenanted, extra: &[&std::ffi::OsStr]) -> (std::process::Child, String) {
    let mut args: Vec<&std::ffi::OsStr> = vec!["--listen".as_ref(), "127.0.0.1:0".as_ref()];
    args.extend_from_slice(extra);
    let mut g = gateway_cmd(t, &args);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(g.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("gateway listening on ")
        .unwrap_or_else(|| panic!("gateway did not start: {line:?}"))
        .to_string();
    (g, addr)
}

/// One HTTP/1.1 request with an optional bearer token: (status, JSON body).
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn the_gateway_needs_a_credential_and_keeps_tenants_functions_apart() {
    if !require_root("the_gateway_needs_a_credential_and_keeps_tenants_functions_apart") {
        return;
    }
    let t = Tenanted::start("sec-gateway", &[]);
    let tenants = t.d.dir.join("tenants.toml");
    let admin = t.d.dir.join("admin-token");
    std::fs::write(&admin, "gateway-admin\n").unwrap();
    // Beyond loopback without a credential: refused at start.
    let o = gateway_cmd(&t, &["--listen".as_ref(), "0.0.0.0:0".as_ref()])
        .wait_with_output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("beyond loopback"), "{err}");

    let (mut g, addr) = gateway_up(
        &t,
        &[
            "--api-token-file".as_ref(),
            admin.as_os_str(),
            "--tenants-file".as_ref(),
            tenants.as_os_str(),
        ],
    );
    let prog = c_program("confined");
    let spec = serde_json::json!({
        "name": "f", "command": [prog, "filter"], "ready_line": "ready",
    })
    .to_string();
    // No credential, a wrong one: 401, and nothing registered.
    let (code, v) = http(&addr, "POST", "/functions", None, &spec);
    assert_eq!(code, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("bearer token"), "{v}");
    let (code, _) = http(&addr, "POST", "/functions", Some("nope"), &spec);
    assert_eq!(code, 401);
    let (code, v) = http(&addr, "GET", "/healthz", None, "");
    assert_eq!(code, 200, "{v}");
    // a registers f; it runs as a, confined as its parent.
    let (code, v) = http(&addr, "POST", "/functions", Some("tenant-a-secret"), &spec);
    assert_eq!(code, 201, "{v}");
    let (code, v) = http(&addr, "POST", "/invoke/f", Some("tenant-a-secret"), "{}");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["uid"], UID_A, "{v}");
    assert_eq!(v["errno"], libc::EPERM, "{v}");
    // b sees no f, cannot call or remove it; its own f is another function.
    let (code, v) = http(&addr, "GET", "/functions", Some("tenant-b-secret"), "");
    assert_eq!(code, 200);
    assert_eq!(v["functions"], serde_json::json!([]), "{v}");
    let (code, _) = http(&addr, "POST", "/invoke/f", Some("tenant-b-secret"), "{}");
    assert_eq!(code, 404);
    let (code, _) = http(&addr, "DELETE", "/functions/f", Some("tenant-b-secret"), "");
    assert_eq!(code, 404);
    let (code, _) = http(&addr, "GET", "/metrics", Some("tenant-b-secret"), "");
    assert_eq!(code, 403);
    // a's f still answers.
    let (code, v) = http(&addr, "POST", "/invoke/f", Some("tenant-a-secret"), "{}");
    assert_eq!(code, 200, "{v}");
    // SAFETY: plain kill(2) of our gateway.
    unsafe { libc::kill(g.id() as i32, libc::SIGTERM) };
    let _ = g.wait();
}

#[test]
fn a_tenant_cannot_send_forkds_peer_token_to_an_address_it_names() {
    if !require_root("a_tenant_cannot_send_forkds_peer_token_to_an_address_it_names") {
        return;
    }
    // A listener standing in for an attacker's "node": it must never be
    // called.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let trap_addr = trap.local_addr().unwrap().to_string();
    trap.set_nonblocking(true).unwrap();
    let t = Tenanted::start("sec-origin", &[]);
    let seed = t.confined_seed("a");
    let r = format!("{trap_addr}/0123456789abcdef#{}", "0".repeat(32));
    let (code, _, err) = t.as_a(&["spawn", &r]);
    assert_ne!(code, 0);
    assert!(err.contains("not one of this node's peers"), "{err}");
    assert!(
        trap.accept().is_err(),
        "forkd connected to the tenant's address"
    );
    // With --peer, even the operator reaches only the peers listed.
    drop(t);
    let t = Tenanted::start("sec-origin-peers", &["--peer", "127.0.0.1:9"]);
    let (code, _, err) = t.d.ctl(&["spawn", &r]);
    assert_ne!(code, 0);
    assert!(err.contains("not one of this node's peers"), "{err}");
    assert!(
        trap.accept().is_err(),
        "forkd connected to an unlisted address"
    );
    let _ = seed;
}

#[test]
fn a_symlink_swapped_for_a_seed_file_is_refused() {
    if !require_root("a_symlink_swapped_for_a_seed_file_is_refused") {
        return;
    }
    let t = Tenanted::start("sec-symlink", &[]);
    let seed_a = t.confined_seed("a");
    // A parent with a file open; once captured, the file is swapped for a
    // symlink to a secret.
    let data = t.d.dir.join("data.txt");
    std::fs::write(&data, "the seed's own data\n").unwrap();
    let secret = t.d.dir.join("secret");
    std::fs::write(&secret, "root's secret\n").unwrap();
    let parent = Target::start({
        let mut c = std::process::Command::new("bash");
        c.arg("-c").arg(format!(
            "exec 3<{}; echo ready; read x; cat <&3",
            data.display()
        ));
        c
    })
    .0;
    let (code, out, err) = t.d.ctl(&[
        "--json",
        "seed",
        "create",
        "--pid",
        &parent.pid().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let seed = id_of(&out);
    drop(parent);
    // Unswapped, the child reads the file through its fd 3.
    let c = spawn_one(|a| t.d.ctl(a), &t.d.dir, &seed, "go\n");
    assert_eq!(c["stdout"], "the seed's own data\n", "{c}");
    // Replaced (renamed over) by another file: the child is told.
    let other = t.d.dir.join("data.new");
    std::fs::write(&other, "another file\n").unwrap();
    std::fs::rename(&other, &data).unwrap();
    let c = spawn_with(|a| t.d.ctl(a), &t.d.dir, &seed, "go\n", &["--no-template"]);
    assert!(
        c[0]["notes"]
            .to_string()
            .contains("is not the file the parent had open"),
        "{}",
        c[0]
    );
    std::fs::remove_file(&data).unwrap();
    std::os::unix::fs::symlink(&secret, &data).unwrap();
    let f = t.d.dir.join("go");
    std::fs::write(&f, "go\n").unwrap();
    // Forked from the template built before the swap: the child shares the
    // template's open file, the seed's own (as a fork child would), never
    // what the symlink points to.
    let (code, out, err) =
        t.d.ctl(&["--json", "spawn", &seed, "--stdin", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(!out.contains("root's secret"), "{out}");
    // Restored from scratch: the file is opened again, and the symlink is
    // refused with the file named.
    let (code, out, err) = t.d.ctl(&[
        "--json",
        "spawn",
        &seed,
        "--stdin",
        f.to_str().unwrap(),
        "--no-template",
    ]);
    assert_ne!(code, 0, "a child started through the symlink: {out}");
    assert!(!out.contains("root's secret"), "{out}");
    let said = format!("{out} {err}");
    assert!(
        said.contains(data.to_str().unwrap()),
        "the file is not named: {said}"
    );
    still_serving(&t, &seed_a);
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in
/// `dir`: (ca, cert, key). A second, unrelated CA as `other-ca.pem`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, cert, key) = tls_pems();
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = other_params.self_signed(&other_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca).unwrap();
    std::fs::write(&paths.1, cert).unwrap();
    std::fs::write(&paths.2, key).unwrap();
    std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
    paths
}

#[test]
fn tcp_with_tls_serves_only_tls_clients_that_trust_its_ca() {
    if !require_root("tcp_with_tls_serves_only_tls_clients_that_trust_its_ca") {
        return;
    }
    let dir = scratch("sec-tls");
    let (ca, cert, key) = certificates(&dir);
    let page = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let d = Daemon::start_with(
        &dir,
        true,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--page-listen",
            &page,
        ],
    );
    let tcp = d.tcp.clone().unwrap();
    let token = dir.join("token");
    let tls_addr = format!("https://{tcp}");
    // A TLS client that trusts the CA, with the token: served.
    let run = |addr: &str, ca: Option<&Path>, args: &[&str]| {
        let mut c = forkctl();
        c.arg("--addr").arg(addr).arg("--token-file").arg(&token);
        if let Some(ca) = ca {
            c.arg("--tls-ca").arg(ca);
        }
        let o = c.args(args).output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&tls_addr, Some(&ca), &["--json", "node"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"version\""), "{out}");
    // A plaintext client gets nothing (the token never crosses in clear).
    let (code, _, err) = run(&tcp, None, &["node"]);
    assert_ne!(code, 0, "a plaintext client was served by a TLS listener");
    println!("plaintext: {err}");
    // A client that trusts another CA refuses the server.
    let (code, _, err) = run(&tls_addr, Some(&dir.join("other-ca.pem")), &["node"]);
    assert_ne!(code, 0, "a client trusting another CA connected");
    assert!(err.contains("not signed by the CA given"), "{err}");
    // https:// without a CA: told what is missing.
    let (code, _, err) = run(&tls_addr, None, &["node"]);
    assert_ne!(code, 0);
    assert!(err.contains("--tls-ca"), "{err}");
    // The Unix socket is unchanged.
    assert_eq!(d.ctl(&["node"]).0, 0);

    // Another node fetches a seed's descriptor from this one over TLS.
    let prog = c_program("confined");
    let id = command_seed(|a| d.ctl(a), &[], &[prog.to_str().unwrap()]);
    let (code, r, err) = d.ctl(&["seed", "ref", &id, "--origin", &tls_addr]);
    assert_eq!(code, 0, "{err}");
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("token"), "s3cret-token\n").unwrap();
    let b = Daemon::start_with(
        &other,
        false,
        &[
            "--tls-ca",
            ca.to_str().unwrap(),
            "--peer-token-file",
            token.to_str().unwrap(),
            "--transport",
            "tcp",
        ],
    );
    let c = spawn_one(|a| b.ctl(a), &other, r.trim(), "report\nexit\n");
    assert_eq!(c["exit_code"], 0, "{c}");
    assert_eq!(lines(&c)[0]["uid"], 0, "{c}");
    // ...and its pages over TLS: the page server answers no plaintext hello.
    {
        use std::io::{Read, Write};
        let (_, key) = r.trim().rsplit_once('#').unwrap();
        let k = remotefork::transport::wire::key_bytes(key).unwrap();
        let mut p = std::net::TcpStream::connect(&page).unwrap();
        p.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        p.write_all(&remotefork::transport::wire::hello(&id, &k).unwrap())
            .unwrap();
        let mut h = [0u8; 16];
        let got = p.read_exact(&mut h);
        assert!(
            got.is_err() || h[0] != remotefork::transport::wire::hello_status::OK,
            "a plaintext client was served pages"
        );
    }
    let (code, out, _) = d.ctl(&["--json", "node"]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("tls://{page}")), "{out}");
}

#[test]
fn the_gateway_serves_https_with_its_certificate() {
    if !require_root("the_gateway_serves_https_with_its_certificate") {
        return;
    }
    use std::io::{Read, Write};
    let t = Tenanted::start("sec-gateway-tls", &[]);
    let (ca, cert, key) = certificates(&t.d.dir);
    let admin = t.d.dir.join("admin-token");
    std::fs::write(&admin, "gateway-admin\n").unwrap();
    let (mut g, addr) = gateway_up(
        &t,
        &[
            "--api-token-file".as_ref(),
            admin.as_os_str(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ],
    );
    let https = |path: &str, token: Option<&str>| -> String {
        let cfg =
            remotefork::transport::tcp::tls_client_config(&std::fs::read(&ca).unwrap()).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).unwrap();
        let sock = std::net::TcpStream::connect(&addr).unwrap();
        let mut s = rustls::StreamOwned::new(conn, sock);
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: gw\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let r = https("/healthz", None);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = https("/functions", None);
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let r = https("/functions", Some("gateway-admin"));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Plain HTTP on the HTTPS port gets no answer.
    let mut p = std::net::TcpStream::connect(&addr).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    p.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = p.read_to_end(&mut out);
    assert!(
        !String::from_utf8_lossy(&out).contains("200 OK"),
        "plain HTTP was served"
    );
    // SAFETY: plain kill(2) of our gateway.
    unsafe { libc::kill(g.id() as i32, libc::SIGTERM) };
    let _ = g.wait();
}

#[test]
fn a_replayed_or_misaddressed_signed_credential_is_refused() {
    if !require_root("a_replayed_or_misaddressed_signed_credential_is_refused") {
        return;
    }
    let t = Tenanted::start("sec-replay", &[]);
    let seed = t.confined_seed("a");
    let tcp = t.tcp();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A client sending exactly this header on every request.
        let with = |cred: String| {
            let tcp = tcp.clone();
            async move {
                let ch = tonic::transport::Endpoint::try_from(format!("http://{tcp}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let v: tonic::metadata::MetadataValue<_> = cred.parse().unwrap();
                forkd::pb::forkd_client::ForkdClient::with_interceptor(
                    ch,
                    move |mut r: tonic::Request<()>| {
                        r.metadata_mut().insert("authorization", v.clone());
                        Ok(r)
                    },
                )
            }
        };
        // Tenant a's signed credential, seen on its way (a log, a proxy).
        let cred = forkd::daemon::auth::sign("tenant-a-secret", &tcp);
        let mut c = with(cred.clone()).await;
        let l = c
            .list_seeds(forkd::pb::ListSeedsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(l.seeds.iter().any(|s| s.id == seed), "a sees its seed");
        // Sent again: refused, and a learns nothing more.
        let e = c
            .list_seeds(forkd::pb::ListSeedsRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        assert!(e.message().contains("replayed"), "{e}");
        // One made for another node is refused here.
        let other = forkd::daemon::auth::sign("tenant-a-secret", "127.0.0.1:1");
        let e = with(other)
            .await
            .list_seeds(forkd::pb::ListSeedsRequest {})
            .await
            .unwrap_err();
        assert!(e.message().contains("addressed to"), "{e}");
    });
    // forkctl over TCP signs each request afresh: it works request after request.
    for _ in 0..2 {
        let (code, out, err) = run_forkctl(&tcp, Some(&t.token_a), &["--json", "seed", "ls"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&seed));
    }
    still_serving(&t, &seed);
}

#[test]
fn a_planted_husk_path_changes_nothing_and_nothing_is_written_under_tmp() {
    if !require_root("a_planted_husk_path_changes_nothing_and_nothing_is_written_under_tmp") {
        return;
    }
    // Where the husk used to be written: a directory and a symlink to a
    // program that is not the husk.
    let tmp = std::env::temp_dir();
    let planted = tmp.join(format!("remotefork-husk-{:016x}", std::process::id()));
    let _ = std::fs::remove_dir_all(&planted);
    std::fs::create_dir_all(&planted).unwrap();
    std::os::unix::fs::symlink("/bin/false", planted.join("rf-husk")).unwrap();
    let husks = || -> Vec<String> {
        std::fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("remotefork-husk-"))
            .collect()
    };
    let before = husks();
    let t = Tenanted::start("sec-husk", &[]);
    let seed = t.confined_seed("a");
    for extra in [&[][..], &["--no-template"][..]] {
        let c = spawn_with(|a| t.as_a(a), &t.d.dir, &seed, "report\nexit\n", extra);
        assert_eq!(lines(&c[0])[0]["uid"], UID_A, "{extra:?}: {}", c[0]);
    }
    assert_eq!(
        husks(),
        before,
        "something was written under {}",
        tmp.display()
    );
    assert_eq!(
        std::fs::read_link(planted.join("rf-husk")).unwrap(),
        Path::new("/bin/false"),
        "the planted symlink was touched"
    );
    std::fs::remove_dir_all(&planted).unwrap();
}

#[test]
fn spawns_beyond_the_queue_limit_are_refused_and_the_count_comes_back() {
    if !require_root("spawns_beyond_the_queue_limit_are_refused_and_the_count_comes_back") {
        return;
    }
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let t = Tenanted::start("sec-queue", &["--max-queued", "3", "--metrics", &metrics]);
    let seed = t.confined_seed("a");
    let f = t.d.dir.join("q-in");
    std::fs::write(&f, "exit\n").unwrap();
    let (code, _, err) = t.as_a(&[
        "spawn",
        &seed,
        "--count",
        "5",
        "--stdin",
        f.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "5 children passed a limit of 3");
    assert!(err.contains("limit of 3"), "{err}");
    let c = spawn_with(|a| t.as_a(a), &t.d.dir, &seed, "exit\n", &["--count", "3"]);
    assert_eq!(c.len(), 3);
    assert!(c.iter().all(|k| k["exit_code"] == 0), "{c:?}");
    // Once started, they are out of the queue: the limit is whole again.
    assert_eq!(
        forkd::client::scrape_metric(&metrics, "forkd_spawns_total"),
        3
    );
    assert_eq!(
        forkd::client::scrape_metric(&metrics, "forkd_children_queued"),
        0
    );
    let c = spawn_with(|a| t.as_a(a), &t.d.dir, &seed, "exit\n", &["--count", "3"]);
    assert_eq!(c.len(), 3);
}

#[test]
fn an_unused_remote_seed_is_evicted_then_fetched_again_with_its_key() {
    if !require_root("an_unused_remote_seed_is_evicted_then_fetched_again_with_its_key") {
        return;
    }
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let base = scratch("sec-evict");
    let (da, db) = (base.join("a"), base.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let (page, metrics) = (free(), free());
    let a = Daemon::start_with(&da, true, &["--page-listen", &page]);
    let b = Daemon::start_with(
        &db,
        true,
        &[
            "--transport",
            "tcp",
            "--template-idle-s",
            "1",
            "--metrics",
            &metrics,
        ],
    );
    let prog = c_program("confined");
    let id = command_seed(|x| a.ctl(x), &[], &[prog.to_str().unwrap()]);
    let (code, r, err) = a.ctl(&["seed", "ref", &id, "--origin", &a.tcp.clone().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let c = spawn_with(|x| b.ctl(x), &db, r.trim(), "report\nexit\n", &[]);
    assert_eq!(lines(&c[0])[0]["uid"], 0, "{c:?}");
    assert_eq!(
        forkd::client::scrape_metric(&metrics, "forkd_remote_seeds"),
        1
    );
    // Unused for the idle time, no child left: evicted (checked for up to
    // two minutes, for a loaded machine).
    let t = std::time::Instant::now();
    while forkd::client::scrape_metric(&metrics, "forkd_remote_seeds") != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the remote seed was never evicted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A wrong key does not bring it back; the right one does.
    let (o, key) = r.trim().rsplit_once('#').unwrap();
    let wrong = format!("{o}#{}", "0".repeat(key.len()));
    let (code, _, err) = b.ctl(&["spawn", &wrong]);
    assert_ne!(code, 0);
    assert!(err.contains("wrong key"), "{err}");
    let c = spawn_with(|x| b.ctl(x), &db, r.trim(), "report\nexit\n", &[]);
    assert_eq!(lines(&c[0])[0]["uid"], 0, "{c:?}");
}
