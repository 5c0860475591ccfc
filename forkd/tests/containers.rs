//! Container seeds (issue 17): a Python function (boto3) in a runc
//! container whose rootfs is not the host's becomes a seed, and every
//! child is a lean container of its own: its own pid 1, mounts, hostname,
//! network, a writable layer that vanishes with it, and a cgroup with
//! memory and pids limits.
//!
//! The bundle is built by `forkd/scripts/oci-bundle.sh` (Debian's CPython
//! 3.11, boto3 from PyPI, an /etc/os-release and a module only it has);
//! the function is `tests/programs/container/fn.py`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use common::*;
use remotefork::container::{ChildCgroup, ChildSpec, Limits, Network};
use remotefork::{ExitReason, Seed, SpawnOptions};
use serde_json::Value;

/// The test bundle, built once per run; None (after SKIPPED) without runc.
fn bundle(test: &str) -> Option<PathBuf> {
    if !require_root(test) {
        return None;
    }
    if Command::new("runc").arg("--version").output().is_err() {
        println!("SKIPPED: {test}: runc is not installed (forkd/scripts/deps.sh installs it)");
        return None;
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    Some(
        BUILT
            .get_or_init(|| {
                let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oci-bundle");
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/oci-bundle.sh");
                let st = Command::new("bash")
                    .arg(&script)
                    .arg(&out)
                    .env("PYTHON", python())
                    .status()
                    .unwrap();
                assert!(st.success(), "oci-bundle.sh failed");
                out
            })
            .clone(),
    )
}

/// `forkctl seed create --oci-bundle BUNDLE --ready-line ready` through
/// `ctl`, which must succeed: the new seed's id.
fn oci_seed(ctl: impl Fn(&[&str]) -> (i32, String, String), bundle: &Path) -> String {
    let (code, out, err) = ctl(&[
        "--json",
        "seed",
        "create",
        "--oci-bundle",
        bundle.to_str().unwrap(),
        "--ready-line",
        "ready",
    ]);
    assert_eq!(code, 0, "seed create --oci-bundle failed: {err}");
    serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A container runc runs from the bundle, waiting for input once warm.
struct Container {
    id: String,
    runc: std::process::Child,
    pid: i32,
}

impl Container {
    fn run(bundle: &Path, name: &str) -> Container {
        let id = format!("rf-test-{name}-{}", std::process::id());
        let _ = Command::new("runc").args(["delete", "-f", &id]).output();
        let mut runc = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(runc.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the container did not start");
        let st = Command::new("runc").args(["state", &id]).output().unwrap();
        let v: Value = serde_json::from_slice(&st.stdout).unwrap();
        let pid = v["pid"].as_i64().unwrap() as i32;
        wait_blocked_in_read(pid);
        Container { id, runc, pid }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["kill", &self.id, "KILL"])
            .output();
        let _ = self.runc.kill();
        let _ = self.runc.wait();
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.id])
            .output();
    }
}

/// A seed of the bundle's function, captured from outside (`forkd
/// snapshot`) in a scratch directory: (its directory, the scratch dir).
fn snapshot_seed(bundle: &Path, name: &str) -> PathBuf {
    let c = Container::run(bundle, name);
    let dir = scratch(name).join("seed");
    let (code, _, err) = run_forkd(&[
        "snapshot",
        "--pid",
        &c.pid.to_string(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "snapshot of the container failed: {err}");
    dir
}

/// One child, talked to a line at a time.
struct Talk {
    child: remotefork::Child,
    to: std::fs::File,
    from: BufReader<std::fs::File>,
}

impl Talk {
    fn spawn(seed: &Seed, spec: ChildSpec) -> Talk {
        Talk::spawn_mode(seed, spec, false)
    }

    /// Restored from scratch, or forked from the seed's template.
    fn spawn_mode(seed: &Seed, spec: ChildSpec, template: bool) -> Talk {
        let opts = SpawnOptions::default()
            .lazy(true)
            .template(template)
            .container(spec);
        let mut child = seed
            .spawn(
                remotefork::Stdio::Piped,
                remotefork::Stdio::Piped,
                remotefork::Stdio::Inherit,
                &opts,
            )
            .unwrap();
        let to = child.take_stdin().unwrap();
        let from = BufReader::new(child.take_stdout().unwrap());
        Talk { child, to, from }
    }

    /// Send one command; its answer, or None if the child ended.
    fn ask(&mut self, cmd: &str) -> Option<Value> {
        writeln!(self.to, "{cmd}").ok()?;
        let mut line = String::new();
        match self.from.read_line(&mut line) {
            Ok(n) if n > 0 => Some(serde_json::from_str(&line).unwrap()),
            _ => None,
        }
    }
}

fn host_pid_of(t: &Talk) -> i32 {
    t.child.pid()
}

#[test]
fn children_of_a_container_seed_see_its_rootfs_and_only_themselves() {
    let Some(b) = bundle("children_of_a_container_seed_see_its_rootfs_and_only_themselves") else {
        return;
    };
    let host_release = std::fs::read_to_string("/etc/os-release").unwrap();
    assert!(!host_release.contains("remotefork test rootfs"));
    let dir = snapshot_seed(&b, "ctr-rootfs");
    // What the seed recorded of its container, as `forkd inspect` shows it.
    let (code, text, err) = run_forkd(&["inspect", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("container: rootfs sha256:") && text.contains("hostname \"rf-container\""),
        "{text}"
    );
    let (_, json, _) = run_forkd(&["inspect", "--json", dir.to_str().unwrap()]);
    let j: Value = serde_json::from_str(&json).unwrap();
    let c = &j["container"];
    assert_eq!(j["format_version"], 6);
    assert!(c["rootfs_files"].as_u64().unwrap() > 1000, "{c}");
    for ns in ["pid", "mnt", "uts", "ipc", "net"] {
        assert!(
            c["namespaces"].as_array().unwrap().iter().any(|n| n == ns),
            "{ns}: {c}"
        );
    }
    // runc's masked paths are kept: /proc/keys is /dev/null in children.
    assert!(
        c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["Bind"]["at"] == "/proc/keys" && m["Bind"]["from"] == "/dev/null"),
        "{c}"
    );
    let seed = Seed::open(&dir).unwrap();
    for template in [false, true] {
        isolated_children(&b, &dir, &seed, template);
    }
}

/// Two children (restored from scratch, or forked from the template) and
/// what each can see and touch.
fn isolated_children(b: &Path, dir: &Path, seed: &Seed, template: bool) {
    let mode = if template { "template" } else { "scratch" };
    let mut a = Talk::spawn_mode(seed, ChildSpec::default(), template);
    let mut b2 = Talk::spawn_mode(seed, ChildSpec::default(), template);
    let info = a.ask("info").unwrap();
    // The container's files, not the host's.
    assert_eq!(info["os"], "remotefork test rootfs 1", "{mode}: {info}");
    assert_eq!(info["marker"], "only in the container rootfs");
    assert_eq!(info["region"], "eu-west-1");
    // Its own pid namespace, as the parent's: it is pid 1 and alone.
    assert_eq!(info["pid"], 1);
    assert_eq!(info["procs"], serde_json::json!([1]), "{mode}: {info}");
    assert_eq!(info["hostname"], "rf-container");
    assert_eq!(info["net"], serde_json::json!(["lo"]));
    assert_eq!(a.ask("tcp").unwrap()["ok"], true);
    // It cannot reach its sibling, the test (forkd's place) or pid 1 of
    // the node: none of them exists in its pid namespace.
    for pid in [host_pid_of(&b2), std::process::id() as i32] {
        let r = a.ask(&format!("kill {pid} 15")).unwrap();
        assert_eq!(r["ok"], false, "kill {pid}: {r}");
        assert_eq!(r["error"], "No such process", "{mode}: kill {pid}: {r}");
    }
    assert!(b2.ask("info").is_some(), "the sibling was hurt");
    // Its writes land in its own layer: the sibling, the seed's rootfs and
    // the bundle never see them.
    assert_eq!(a.ask("write /etc/motd from a").unwrap()["ok"], true);
    assert_eq!(a.ask("read /etc/motd").unwrap()["text"], "from a");
    assert_eq!(b2.ask("read /etc/motd").unwrap()["ok"], false);
    assert!(!b.join("rootfs/etc/motd").exists());
    let store = std::fs::read_dir(dir.join("rootfs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(!store.join("etc/motd").exists());
    // A new child starts from the seed's rootfs again.
    drop(a);
    let mut c = Talk::spawn_mode(seed, ChildSpec::default(), template);
    assert_eq!(c.ask("read /etc/motd").unwrap()["ok"], false);
    // "none": a network namespace of its own with nothing up.
    let mut d = Talk::spawn_mode(
        seed,
        ChildSpec {
            network: Network::None,
            ..Default::default()
        },
        template,
    );
    let r = d.ask("tcp").unwrap();
    assert_eq!(r["ok"], false, "{mode}: loopback is down: {r}");
}

#[test]
fn a_child_past_its_memory_limit_is_oom_killed_and_its_sibling_goes_on() {
    let Some(b) = bundle("a_child_past_its_memory_limit_is_oom_killed_and_its_sibling_goes_on")
    else {
        return;
    };
    let dir = snapshot_seed(&b, "ctr-oom");
    let seed = Seed::open(&dir).unwrap();
    let spec = ChildSpec {
        limits: Limits {
            memory_bytes: Some(128 << 20),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut a = Talk::spawn(&seed, spec);
    let mut b2 = Talk::spawn(&seed, spec);
    let cg = a.child.cgroup().expect("a container child has a cgroup");
    assert_eq!(cg.limits.memory_bytes, Some(128 << 20));
    assert!(cg.usage().memory_bytes > 0);
    assert_eq!(a.ask("alloc 16").unwrap()["ok"], true);
    // Past the limit: no answer, killed by the OOM killer, and told so.
    assert_eq!(a.ask("alloc 400"), None);
    let ended = a.child.wait().unwrap();
    assert_eq!(ended, ExitReason::OutOfMemory { limit: 128 << 20 });
    assert!(
        ended.to_string().contains("memory limit of 128 MiB"),
        "{ended}"
    );
    // The sibling, in a cgroup of its own, goes on.
    assert_eq!(b2.ask("alloc 32").unwrap()["ok"], true);
    assert_eq!(b2.ask("info").unwrap()["pid"], 1);
}

#[test]
fn a_fork_bomb_stops_at_the_pids_limit() {
    let Some(b) = bundle("a_fork_bomb_stops_at_the_pids_limit") else {
        return;
    };
    let dir = snapshot_seed(&b, "ctr-pids");
    let seed = Seed::open(&dir).unwrap();
    let mut a = Talk::spawn(
        &seed,
        ChildSpec {
            limits: Limits {
                pids: Some(16),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let r = a.ask("forkbomb 200").unwrap();
    let made = r["made"].as_u64().unwrap();
    assert!(made < 16, "{r}");
    assert_eq!(r["error"], "Resource temporarily unavailable", "{r}");
    let usage = a.child.cgroup().unwrap().usage();
    assert!(usage.pids <= 16, "{usage:?}");
    // The function still answers; its forks are its own (it sees them).
    let info = a.ask("info").unwrap();
    assert_eq!(info["procs"].as_array().unwrap().len() as u64, made + 1);
    let paths = a.child.cgroup().unwrap().paths();
    // When it goes, its pid namespace and cgroup go with it.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    drop(a);
    for p in paths {
        assert!(!p.exists(), "{} is left", p.display());
    }
}

#[test]
fn cgroups_left_by_a_killed_forkd_are_swept_and_others_kept() {
    if !require_root("cgroups_left_by_a_killed_forkd_are_swept") {
        return;
    }
    if !Path::new("/sys/fs/cgroup/memory").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        println!("SKIPPED: cgroups_left_by_a_killed_forkd_are_swept: no memory cgroup controller");
        return;
    }
    // A pid no process has any more (reaped), as a forkd killed with
    // SIGKILL leaves: its child cgroups stay behind, empty.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let limits = Limits {
        memory_bytes: Some(64 << 20),
        ..Default::default()
    };
    let left = ChildCgroup::create(&format!("{dead}-1"), limits).unwrap();
    let left_paths = left.paths();
    std::mem::forget(left);
    // One of a forkd still running (this process): kept.
    let live = ChildCgroup::create(&format!("{}-999999", std::process::id()), limits).unwrap();
    let removed = remotefork::container::cgroup::sweep_stale();
    assert!(removed >= left_paths.len(), "{removed}");
    for p in &left_paths {
        assert!(!p.exists(), "{} was not swept", p.display());
    }
    for p in live.paths() {
        assert!(p.exists(), "{} of a running forkd was swept", p.display());
    }
}

#[test]
fn the_daemon_makes_a_seed_from_an_oci_bundle_and_50_containerized_children_answer() {
    let Some(b) =
        bundle("the_daemon_makes_a_seed_from_an_oci_bundle_and_50_containerized_children_answer")
    else {
        return;
    };
    let dir = scratch("ctr-daemon");
    let d = Daemon::start(&dir, false);
    let id = oci_seed(|a| d.ctl(a), &b);
    // The runtime's container is gone: the seed holds the process. (Other
    // tests' containers may be running: only this daemon's are looked for,
    // by their staged bundle under its state directory.)
    let list = Command::new("runc").arg("list").output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.contains(dir.to_str().unwrap()), "{list}");
    let input = dir.join("input");
    std::fs::write(&input, "info\n").unwrap();
    assert_50_container_children(|a| d.ctl(a), "the node", &id, input.to_str().unwrap());
    // While a child runs, `ps` shows its container: cgroups, limits, usage.
    std::fs::write(&input, "sleep 30\n").unwrap();
    let spawn = {
        let (addr, input, id) = (d.addr(), input.clone(), id.clone());
        std::thread::spawn(move || {
            run_forkctl(
                &addr,
                None,
                &[
                    "--json",
                    "spawn",
                    &id,
                    "--memory-limit",
                    "200M",
                    "--pids-limit",
                    "32",
                    "--stdin",
                    input.to_str().unwrap(),
                ],
            )
        })
    };
    let shown = (0..600).find_map(|_| {
        let (_, out, _) = d.ctl(&["--json", "ps"]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let running = v.as_array()?.iter().find(|i| {
            i["state"] == "running" && i["container"]["memory_limit_bytes"] == 200 << 20
        })?;
        Some(running.clone())
    });
    let shown = shown.expect("ps never showed the running container child");
    let c = &shown["container"];
    assert_eq!(c["pids_limit"], 32, "{shown}");
    assert_eq!(c["network"], "loopback");
    assert!(c["memory_bytes"].as_u64().unwrap() > 0, "{shown}");
    assert!(c["pids"].as_u64().unwrap() >= 1, "{shown}");
    assert!(
        c["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("/remotefork/")),
        "{shown}"
    );
    let (table_code, table, _) = d.ctl(&["ps"]);
    assert_eq!(table_code, 0);
    assert!(
        table.contains("CONTAINER (MEMORY, PIDS, CPU)") && table.contains("/200.0 MiB"),
        "{table}"
    );
    let _ = d.ctl(&["kill", shown["id"].as_str().unwrap()]);
    let _ = spawn.join();
    // Limits through the API: past 96 MiB, the Exited event says why.
    std::fs::write(&input, "alloc 400\n").unwrap();
    let (_, out, _) = d.ctl(&[
        "--json",
        "spawn",
        &id,
        "--memory-limit",
        "96M",
        "--stdin",
        input.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let k = &v["children"][0];
    assert_eq!(k["signal"], 9, "{k}");
    assert!(
        k["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("memory limit of 96 MiB"),
        "{k}"
    );
}

/// 50 children of the seed `r` through `ctl` (a node's forkctl), each
/// given "info": every one answers from the container's rootfs, alone in
/// its pid namespace.
fn assert_50_container_children(
    ctl: impl Fn(&[&str]) -> (i32, String, String),
    node: &str,
    r: &str,
    input: &str,
) {
    let (code, out, err) = ctl(&["--json", "spawn", r, "--count", "50", "--stdin", input]);
    assert_eq!(code, 0, "{node}: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let kids = v["children"].as_array().unwrap();
    assert_eq!(kids.len(), 50);
    for k in kids {
        let lines = stdout_lines(k);
        assert_eq!(lines.len(), 1, "node {node}: {k}");
        assert_eq!(lines[0]["os"], "remotefork test rootfs 1", "{k}");
        assert_eq!(lines[0]["marker"], "only in the container rootfs");
        assert_eq!(lines[0]["procs"], serde_json::json!([1]), "{k}");
        assert_eq!(lines[0]["region"], "eu-west-1");
    }
}

#[test]
fn a_second_node_gets_the_rootfs_once_and_its_children_page_over_tcp() {
    let Some(b) = bundle("a_second_node_gets_the_rootfs_once_and_its_children_page_over_tcp")
    else {
        return;
    };
    let Some(n) = Nodes::up_n("ctr-nodes", 2) else {
        return;
    };
    let id = oci_seed(|a| n.ctl(1, a), &b);
    let r = n.seed_ref(1, &id);
    let input = n.input("info", "info\n");
    assert_50_container_children(|a| n.ctl(1, a), "node 1", &id, &input);
    // Node 2 has no copy of the rootfs: it gets it from node 1, checked
    // against the digest, and keeps it.
    let store2 = n.dir.join("n2/rootfs");
    assert!(!store2.exists() || std::fs::read_dir(&store2).unwrap().next().is_none());
    assert_50_container_children(|a| n.ctl(2, a), "node 2", &r, &input);
    let kept: Vec<_> = std::fs::read_dir(&store2)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].starts_with("sha256-"), "{kept:?}");
    assert_eq!(
        std::fs::read_to_string(store2.join(&kept[0]).join("etc/os-release"))
            .unwrap()
            .lines()
            .next(),
        Some("PRETTY_NAME=\"remotefork test rootfs 1\"")
    );
    let fetched = forkd::client::scrape_metric(&n.get("NODE2_METRICS"), "forkd_page_bytes_total");
    assert!(fetched > 0, "node 2 fetched no page bytes");
}

#[test]
fn the_gateway_serves_1000_invocations_over_2_nodes_each_in_its_own_container() {
    let Some(b) =
        bundle("the_gateway_serves_1000_invocations_over_2_nodes_each_in_its_own_container")
    else {
        return;
    };
    let Some(n) = Nodes::up_n("ctr-gw", 2) else {
        return;
    };
    let burst = burst_size();
    let mut args = n.gateway_node_args(2);
    args.extend(["--keep-alive-ms".into(), "0".into()]);
    args.extend(n.gateway_worker_args(120_000));
    let gw = Gateway::start(&args);
    let a = gw.addr.clone();
    rt().block_on(async {
        let spec = serde_json::json!({
            "name": "ctr",
            "oci_bundle": b,
            "ready_line": "ready",
        });
        let (st, v) = http(&a, "POST", "/functions", &spec.to_string()).await;
        assert_eq!(st, 201, "{v}");
        // Registered means ready on both nodes: the other node has the
        // rootfs and each its template, before the first invocation.
        let prepared = v["prepared"].as_array().expect("prepared per node");
        assert_eq!(prepared.len(), 2, "{v}");
        assert!(
            prepared.iter().all(|p| p["state"] == "ready"
                && p["ms"].as_f64().is_some()
                && p["error"].is_null()),
            "{v}"
        );
        println!(
            "registered: seed made in {:.0} ms; prepared on the nodes: {prepared:?}",
            v["register_ms"].as_f64().unwrap_or(0.0)
        );
        let t = std::time::Instant::now();
        let calls: Vec<_> = (0..burst)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move {
                    (
                        i,
                        http(&a, "POST", "/invoke/ctr", &format!("{{\"n\": {i}}}")).await,
                    )
                })
            })
            .collect();
        for c in calls {
            let (i, (st, v)) = c.await.unwrap();
            assert_eq!(st, 200, "invocation {i}: {v}");
            assert_eq!(v["square"].as_u64(), Some(i * i), "invocation {i}: {v}");
            assert_eq!(v["os"], "remotefork test rootfs 1", "invocation {i}: {v}");
            // Its own container: pid 1, alone.
            assert_eq!(v["procs"], serde_json::json!([1]), "invocation {i}: {v}");
        }
        println!(
            "gateway, containers: {burst} invocations answered in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let (_, v) = http(&a, "GET", "/functions", "").await;
        assert_eq!(v["functions"][0]["spawned"].as_u64(), Some(burst), "{v}");
        let nodes = v["nodes"].as_array().unwrap();
        assert!(
            nodes.iter().all(|x| x["spawned"].as_u64().unwrap() > 0),
            "both nodes used: {v}"
        );
    });
}

#[test]
fn a_running_container_is_captured_by_its_id_and_keeps_running() {
    let Some(b) = bundle("a_running_container_is_captured_by_its_id_and_keeps_running") else {
        return;
    };
    let dir = scratch("ctr-by-id");
    let d = Daemon::start(&dir, false);
    let mut c = Container::run(&b, "by-id");
    let (code, out, err) = d.ctl(&["--json", "seed", "create", "--container", &c.id]);
    assert_eq!(code, 0, "seed create --container failed: {err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let input = dir.join("input");
    std::fs::write(&input, "{\"n\": 12}\n").unwrap();
    let (code, out, err) = d.ctl(&["--json", "spawn", &id, "--stdin", input.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let lines = stdout_lines(&v["children"][0]);
    assert_eq!(lines[0]["square"], 144, "{v}");
    assert_eq!(lines[0]["os"], "remotefork test rootfs 1");
    // The container itself goes on: it still answers.
    let stdin = c.runc.stdin.as_mut().unwrap();
    writeln!(stdin, "{{\"n\": 3}}").unwrap();
    let mut line = String::new();
    BufReader::new(c.runc.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["square"], 9);
    // An unknown id is a clear error.
    let (code, _, err) = d.ctl(&["seed", "create", "--container", "no-such-container"]);
    assert_ne!(code, 0);
    assert!(err.contains("no container \"no-such-container\""), "{err}");
}
