//! Remote fork across "nodes": network namespaces joined by veth pairs,
//! one forkd each (`forkd/scripts/nodes.sh`). Seeds on node A, children on
//! B and C paging over TCP; multi-hop; faults; hostile page-server clients.
//! Run as root.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn spawn_on(
    n: &Nodes,
    node: u32,
    seed_ref: &str,
    count: u32,
    input: &str,
    extra: &[&str],
) -> (i32, Value, String) {
    let mut args = vec!["--json", "spawn", seed_ref, "--count"];
    let c = count.to_string();
    args.push(&c);
    args.push("--stdin");
    args.push(input);
    args.extend_from_slice(extra);
    let (code, out, err) = n.ctl(node, &args);
    (code, serde_json::from_str(&out).unwrap_or(Value::Null), err)
}

#[test]
fn remote_fork_to_two_nodes_fifty_children_each() {
    if !require_root("remote_fork_to_two_nodes_fifty_children_each") {
        return;
    }
    let Some(n) = Nodes::up("nodes-fifty") else {
        return;
    };
    // The Python (boto3) function, seeded on node 1 from a command.
    let id = python_seed(|a| n.ctl(1, a), BOTO_SERVER);
    let r = n.seed_ref(1, &id);
    let input = n.input("py-in", "a\nb\n");
    for node in [2, 3] {
        let (code, v, err) = spawn_on(&n, node, &r, 50, &input, &[]);
        assert_eq!(code, 0, "node {node}: {err} {v}");
        assert_boto_children(&v, 50);
    }
    // The pages came over TCP: node 2 fetched bytes from node 1's page server.
    let fetched = forkd::client::scrape_metric(&n.get("NODE2_METRICS"), "forkd_page_bytes_total");
    assert!(fetched > 0, "node 2 fetched no page bytes");

    // The C checksum program, seeded on node 1 from its pid.
    if has_avx2() {
        let (cid, checksum) = checksum_seed(|a| n.ctl(1, a));
        let cr = n.seed_ref(1, &cid);
        let go = n.input("go", "go\n");
        for node in [2, 3] {
            let (code, v, err) = spawn_on(&n, node, &cr, 50, &go, &[]);
            assert_eq!(code, 0, "node {node}: {err}");
            assert_checksum_children(&v, &checksum);
        }
    } else {
        println!(
            "SKIPPED: the C part of remote_fork_to_two_nodes_fifty_children_each: CPU has no AVX2"
        );
    }
}

#[test]
fn multi_hop_a_child_on_b_becomes_a_seed_spawned_on_c() {
    if !require_root("multi_hop_a_child_on_b_becomes_a_seed_spawned_on_c") {
        return;
    }
    let Some(n) = Nodes::up("nodes-hop") else {
        return;
    };
    let prog = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/hop.py");
    let o = Command::new(python())
        .arg(&prog)
        .env(
            "PYTHONPATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../python"),
        )
        .env("FORKD_COOP_SOCKET", format!("{}.coop", n.get("NODE1_SOCK")))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let seed0 = out
        .lines()
        .find_map(|l| l.strip_prefix("hop0 seed="))
        .unwrap()
        .to_string();
    // A child on node 2, told node 2's cooperative socket, checkpoints itself.
    let r0 = n.seed_ref(1, &seed0);
    let empty = n.input("empty", "");
    let coop2 = format!("{}.coop", n.get("NODE2_SOCK"));
    let (code, v, err) = spawn_on(&n, 2, &r0, 1, &empty, &["--args", &coop2]);
    assert_eq!(code, 0, "{err} {v}");
    let s = v["children"][0]["stdout"].as_str().unwrap().to_string();
    let seed1 = s
        .lines()
        .find_map(|l| l.strip_prefix("hop1 seed="))
        .unwrap_or_else(|| panic!("{s}"))
        .to_string();
    // Its children on node 3 page from node 2.
    let r1 = n.seed_ref(2, &seed1);
    let (code, v, err) = spawn_on(&n, 3, &r1, 3, &empty, &[]);
    assert_eq!(code, 0, "{err} {v}");
    let hop0: u64 = (0..20000u64).map(|i| i * 3).sum();
    let mut seen = Vec::new();
    for k in v["children"].as_array().unwrap() {
        let a: Value = serde_json::from_str(k["stdout"].as_str().unwrap().trim()).unwrap();
        assert_eq!(a["hop0"], hop0);
        assert_eq!(a["hop1"], hop0 + 999);
        assert_eq!(a["pid"], k["pid"]);
        seen.push(a["index"].as_u64().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2]);
}

/// Nodes that do not drain other nodes' seeds into their caches: their
/// children depend on the seed's node for every page they have not
/// faulted in (a drained seed's children rightly outlive that node, and
/// the drain of this small seed takes tens of ms in a release build).
const UNDRAINED: &[&str] = &["--no-drain"];

/// Seed the slow program (4000 pages touched over ~4 s) on node 1 and
/// start two children on node 2; `fault` runs 300 ms in. Returns the spawn's
/// report, which must show every child killed with a reason.
fn fault_during_paging(n: &Nodes, fault: impl FnOnce()) -> Value {
    let mut cmd = Command::new(c_program("semantics"));
    cmd.arg("slow");
    let (target, _) = Target::start(cmd);
    let id = seed_from_target(|a| n.ctl(1, a), target);
    let r = n.seed_ref(1, &id);
    let go = n.input(&format!("go-{id}"), "go\n");
    let p = forkctl()
        .args([
            "--addr",
            &n.sock(2),
            "--json",
            "spawn",
            &r,
            "--count",
            "2",
            "--prefetch",
            "off",
            "--stdin",
            &go,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fault();
    let t = Instant::now();
    let o = p.wait_with_output().unwrap();
    // The deadline is 3 s: nothing may wait much longer than that.
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "children hung for {:?}",
        t.elapsed()
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "the spawn must report failure: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in v["children"].as_array().unwrap() {
        assert!(
            !k["stdout"].as_str().unwrap_or("").contains("slow"),
            "a child finished on wrong memory: {k}"
        );
        assert_eq!(k["signal"], libc::SIGKILL, "{k}");
        assert!(
            !k["reason"].as_str().unwrap_or("").is_empty(),
            "no reason given: {k}"
        );
    }
    v
}

#[test]
fn the_seed_node_dying_mid_paging_kills_children_with_a_reason() {
    if !require_root("the_seed_node_dying_mid_paging_kills_children_with_a_reason") {
        return;
    }
    let Some(n) = Nodes::up_with("nodes-kill", 3, UNDRAINED) else {
        return;
    };
    let pid = n.forkd_pid(1);
    let v = fault_during_paging(&n, || {
        // SAFETY: plain kill(2) of node 1's forkd.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    assert!(
        v["children"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("tcp:"),
        "{v}"
    );
}

#[test]
fn a_link_going_down_mid_paging_kills_children_with_a_reason() {
    if !require_root("a_link_going_down_mid_paging_kills_children_with_a_reason") {
        return;
    }
    let Some(n) = Nodes::up_with("nodes-link", 3, UNDRAINED) else {
        return;
    };
    let veth = n.get("NODE1_VETH");
    let v = fault_during_paging(&n, || {
        assert!(Command::new("ip")
            .args(["link", "set", &veth, "down"])
            .status()
            .unwrap()
            .success());
    });
    assert!(
        v["children"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("tcp:"),
        "{v}"
    );
}

#[test]
fn a_seed_dropped_mid_paging_serves_nothing_more() {
    if !require_root("a_seed_dropped_mid_paging_serves_nothing_more") {
        return;
    }
    let Some(n) = Nodes::up_with("nodes-drop", 3, UNDRAINED) else {
        return;
    };
    let sock1 = n.sock(1);
    let v = fault_during_paging(&n, || {
        let (_, ls, _) = {
            let o = forkctl()
                .args(["--addr", &sock1, "--json", "seed", "ls"])
                .output()
                .unwrap();
            (0, String::from_utf8_lossy(&o.stdout).into_owned(), ())
        };
        let ls: Value = serde_json::from_str(&ls).unwrap();
        let id = ls[0]["id"].as_str().unwrap().to_string();
        assert!(forkctl()
            .args(["--addr", &sock1, "seed", "drop", &id])
            .status()
            .unwrap()
            .success());
    });
    // Refused mid-channel ("was dropped") or at a reconnect ("no seed").
    for k in v["children"].as_array().unwrap() {
        let r = k["reason"].as_str().unwrap();
        assert!(r.contains("dropped") || r.contains("no seed"), "{v}");
    }
}

#[test]
fn a_slow_lossy_link_only_slows_children_down() {
    if !require_root("a_slow_lossy_link_only_slows_children_down") {
        return;
    }
    let Some(n) = Nodes::up("nodes-netem") else {
        return;
    };
    let (ns, dev) = (n.get("NODE1_NS"), n.get("NODE1_PEER"));
    let o = Command::new("ip")
        .args([
            "netns", "exec", &ns, "tc", "qdisc", "add", "dev", &dev, "root", "netem", "delay",
            "50ms", "loss", "5%",
        ])
        .output()
        .unwrap();
    if !o.status.success() {
        println!(
            "SKIPPED: a_slow_lossy_link_only_slows_children_down: tc netem unavailable here ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        return;
    }
    let id = python_seed(|a| n.ctl(1, a), BOTO_SERVER);
    let r = n.seed_ref(1, &id);
    let input = n.input("in", "x\n");
    let (code, v, err) = spawn_on(&n, 2, &r, 3, &input, &[]);
    assert_eq!(code, 0, "{err} {v}");
}

/// Talk raw to node 1's page server from the host.
fn page_server(n: &Nodes) -> TcpStream {
    let s = TcpStream::connect((n.get("NODE1_IP").as_str(), 7071)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

fn hello(id: &str, key: &str) -> Vec<u8> {
    let k = remotefork::transport::wire::key_bytes(key).unwrap();
    remotefork::transport::wire::hello(id, &k).unwrap().to_vec()
}

fn answer_status(s: &mut TcpStream) -> Option<u8> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
    let mut m = vec![0u8; len];
    s.read_exact(&mut m).ok()?;
    Some(h[0])
}

#[test]
fn hostile_page_server_clients_are_refused_and_others_unaffected() {
    if !require_root("hostile_page_server_clients_are_refused_and_others_unaffected") {
        return;
    }
    use remotefork::transport::wire::{hello_status, read_status, request};
    let Some(n) = Nodes::up("nodes-hostile") else {
        return;
    };
    let py = python().to_string();
    let (code, out, err) = n.ctl(
        1,
        &[
            "--json",
            "seed",
            "create",
            "--ready-line",
            "ready",
            "--",
            &py,
            "-c",
            BOTO_SERVER,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let seed: Value = serde_json::from_str(&out).unwrap();
    let id = seed["id"].as_str().unwrap().to_string();
    let key = n.seed_ref(1, &id).rsplit_once('#').unwrap().1.to_string();
    let size = seed["image_bytes"].as_u64().unwrap();

    // A good client, kept open across the hostile ones.
    let mut good = page_server(&n);
    good.write_all(&hello(&id, &key)).unwrap();
    assert_eq!(answer_status(&mut good), Some(hello_status::OK));

    // Garbage instead of a handshake.
    let mut g = page_server(&n);
    g.write_all(&[0x42; 40]).unwrap();
    assert_eq!(answer_status(&mut g), Some(hello_status::BAD_HELLO));
    // A wrong key.
    let mut w = page_server(&n);
    w.write_all(&hello(&id, &"00".repeat(16))).unwrap();
    assert_eq!(answer_status(&mut w), Some(hello_status::WRONG_KEY));
    // Out of bounds, then a huge length: refused, the channel still works.
    let mut o = page_server(&n);
    o.write_all(&hello(&id, &key)).unwrap();
    assert_eq!(answer_status(&mut o), Some(hello_status::OK));
    let read_reply = |s: &mut TcpStream| -> (u8, Vec<u8>) {
        let mut h = [0u8; 12];
        s.read_exact(&mut h).unwrap();
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        (h[4], body)
    };
    o.write_all(&request(1, &[(size, 4096)])).unwrap();
    assert_eq!(read_reply(&mut o).0, read_status::OUT_OF_RANGE);
    o.write_all(&request(2, &[(0, u32::MAX)])).unwrap();
    assert_eq!(read_reply(&mut o).0, read_status::TOO_LARGE);
    o.write_all(&request(3, &[(0, 4096)])).unwrap();
    let (st, body) = read_reply(&mut o);
    assert_eq!((st, body.len()), (read_status::OK, 4096));
    // Half a frame, then silence: the server gives up on it.
    let mut h = page_server(&n);
    h.write_all(&hello(&id, &key)).unwrap();
    assert_eq!(answer_status(&mut h), Some(hello_status::OK));
    h.write_all(&[5, 0, 0, 0, 1, 0, 0, 0, 0, 0]).unwrap();
    let t = Instant::now();
    let mut b = [0u8; 1];
    let r = h.read(&mut b);
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "the server should close a half-sent frame"
    );
    assert!(t.elapsed() < Duration::from_secs(14));

    // A client holding 10,000 connections: the page server keeps at most
    // 64 per peer (and 1024 in all) and closes the rest at once.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on this process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(20_000);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let want = (lim.rlim_cur as usize).saturating_sub(200).min(10_000);
    let addr: std::net::SocketAddr = format!("{}:7071", n.get("NODE1_IP")).parse().unwrap();
    let mut flood = Vec::with_capacity(want);
    for _ in 0..want {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            flood.push(s);
        }
    }
    println!("held {} of {want} connections", flood.len());
    assert!(
        flood.len() >= want / 2,
        "could not even connect: {}",
        flood.len()
    );
    // The ones the server kept wait for a hello; the others are closed.
    // (Connections still in the listen backlog look open too: look again
    // until the server has caught up, for up to a minute on a loaded box.)
    for s in &mut flood {
        s.set_nonblocking(true).unwrap();
    }
    let t = Instant::now();
    let mut open: Vec<TcpStream> = flood;
    let kept = loop {
        open.retain_mut(|s| {
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        if open.len() <= 64 + 8 || t.elapsed() > Duration::from_secs(60) {
            break open.len();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let flood = open;
    println!("the page server kept {kept} of them");
    assert!(
        kept <= 64 + 8,
        "the page server kept {kept} connections of one peer"
    );

    // The good client is unaffected.
    good.write_all(&request(9, &[(0, 4096), (4096, 4096)]))
        .unwrap();
    let (st, body) = read_reply(&mut good);
    assert_eq!((st, body.len()), (read_status::OK, 8192));
    // And the node still spawns remotely.
    let r = n.seed_ref(1, &id);
    let input = n.input("in", "y\n");
    let (code, v, err) = spawn_on(&n, 2, &r, 2, &input, &[]);
    assert_eq!(code, 0, "{err} {v}");
    drop(flood);
}

#[test]
fn a_cached_remote_seed_is_served_only_to_the_holder_of_its_key() {
    if !require_root("a_cached_remote_seed_is_served_only_to_the_holder_of_its_key") {
        return;
    }
    let Some(n) = Nodes::up_n("nodes-cached-key", 2) else {
        return;
    };
    let prog = c_program("confined");
    let id = command_seed(|a| n.ctl(1, a), &[], &[prog.to_str().unwrap()]);
    let r = n.seed_ref(1, &id);
    let input = n.input("exit", "exit\n");
    // With its key: node 2 fetches the seed and keeps it.
    let (code, v, err) = spawn_on(&n, 2, &r, 1, &input, &[]);
    assert_eq!(code, 0, "{err} {v}");
    // The same id with any other key is refused, though node 2 has it.
    let (origin_and_id, key) = r.split_once('#').unwrap();
    let wrong: String = key
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    let bad = format!("{origin_and_id}#{wrong}");
    let (code, _, err) = spawn_on(&n, 2, &bad, 1, &input, &[]);
    assert_ne!(code, 0, "a wrong key spawned from the cached seed");
    assert!(err.contains("wrong key"), "{err}");
    // And the right key still works.
    let (code, v, err) = spawn_on(&n, 2, &r, 1, &input, &[]);
    assert_eq!(code, 0, "{err} {v}");
}
