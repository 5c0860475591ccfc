//! An example scheduler on the public API of `remotefork`: it places N
//! children of one seed over several nodes by free capacity, restarts
//! children that fail, and prints a summary.
//!
//! Each node is a worker process running this program with `--worker`:
//! it opens the seed (a local directory, or another node's seed by its
//! reference `ADDR/ID#KEY` over TCP, as a remote node would) and starts
//! the children it is given, each on a thread of its own (a lazy child
//! dies with the thread that spawned it). The scheduler talks to workers
//! over their stdin and stdout, one line per message.
//!
//! ```text
//! scheduler --seed DIR | --seed-ref ADDR/ID#KEY --nodes a=2,b=3 --children 20
//!           [--retries 3] [--fail-every K] [--eager] [--no-template]
//! ```
//!
//! Every child gets its job number as a line on stdin and is expected to
//! answer one line on stdout; the scheduler prints `job J on NODE: ANSWER`.
//! `--fail-every K` makes each worker kill every K-th child it starts
//! (a real crash of a real child) to show restarts.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio as PStdio};
use std::sync::mpsc;
use std::time::Instant;

use remotefork::{ExitReason, RemoteOptions, Seed, SpawnOptions, Stdio};

/// Command-line options shared by the scheduler and its workers.
#[derive(Debug, Default, Clone)]
struct Args {
    seed: Option<String>,
    seed_ref: Option<String>,
    nodes: Vec<(String, usize)>,
    children: usize,
    retries: usize,
    fail_every: usize,
    eager: bool,
    no_template: bool,
    worker: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        retries: 3,
        ..Default::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--seed" => a.seed = Some(val()?),
            "--seed-ref" => a.seed_ref = Some(val()?),
            "--children" => a.children = val()?.parse().map_err(|e| format!("--children: {e}"))?,
            "--retries" => a.retries = val()?.parse().map_err(|e| format!("--retries: {e}"))?,
            "--fail-every" => {
                a.fail_every = val()?.parse().map_err(|e| format!("--fail-every: {e}"))?
            }
            "--worker" => a.worker = Some(val()?),
            "--eager" => a.eager = true,
            "--no-template" => a.no_template = true,
            "--nodes" => {
                for n in val()?.split(',') {
                    let (name, cap) = n
                        .split_once('=')
                        .ok_or_else(|| format!("--nodes: {n:?} is not NAME=CAPACITY"))?;
                    let cap = cap.parse().map_err(|e| format!("--nodes {n}: {e}"))?;
                    a.nodes.push((name.to_string(), cap));
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.seed.is_none() == a.seed_ref.is_none() {
        return Err("give one of --seed DIR or --seed-ref ADDR/ID#KEY".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scheduler: {e}");
            std::process::exit(2);
        }
    };
    let r = match &args.worker {
        Some(name) => worker(&args, name),
        None => schedule(&args),
    };
    if let Err(e) = r {
        eprintln!("scheduler: {e}");
        std::process::exit(1);
    }
}

/// A node: open the seed, then start a child per `run J` line.
fn worker(args: &Args, name: &str) -> Result<(), String> {
    let seed = match (&args.seed, &args.seed_ref) {
        (Some(dir), _) => Seed::open(dir.as_ref()),
        (_, Some(r)) => Seed::open_remote(
            &r.parse().map_err(|e| format!("{e}"))?,
            &RemoteOptions::default(),
        ),
        _ => unreachable!("checked in parse"),
    }
    .map_err(|e| format!("node {name}: opening the seed: {e}"))?;
    let seed = std::sync::Arc::new(seed);
    let opts = SpawnOptions::default()
        .lazy(!args.eager)
        .template(!args.no_template);
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    println!("ready");
    let mut started = 0usize;
    let mut threads = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(job) = line.strip_prefix("run ") else {
            continue;
        };
        started += 1;
        let crash = args.fail_every > 0 && started.is_multiple_of(args.fail_every);
        let (seed, out, job) = (seed.clone(), out.clone(), job.to_string());
        threads.push(std::thread::spawn(move || {
            let answer = run_child(&seed, &opts, &job, crash);
            let msg = match answer {
                Ok(a) => format!("done {job} ok {a}"),
                Err(e) => format!("done {job} fail {e}"),
            };
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(o, "{msg}");
            let _ = o.flush();
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Start one child, give it `job`, read its answer, reap it.
fn run_child(seed: &Seed, opts: &SpawnOptions, job: &str, crash: bool) -> Result<String, String> {
    let mut child = seed
        .spawn(Stdio::Piped, Stdio::Piped, Stdio::Null, opts)
        .map_err(|e| e.to_string())?;
    if crash {
        child.kill().map_err(|e| e.to_string())?;
    }
    let mut input = child.take_stdin().ok_or("no stdin pipe")?;
    // A killed child has closed its end: EPIPE here, its exit says why.
    let _ = writeln!(input, "{job}");
    drop(input);
    let mut answer = String::new();
    let _ = BufReader::new(child.take_stdout().ok_or("no stdout pipe")?).read_line(&mut answer);
    match child.wait().map_err(|e| e.to_string())? {
        ExitReason::Exited(0) if !answer.trim().is_empty() => Ok(answer.trim().to_string()),
        ExitReason::Exited(0) => Err("exited without answering".into()),
        other => Err(format!("child {} {other}", child.pid())),
    }
}

/// One worker process, as the scheduler sees it.
struct Node {
    name: String,
    capacity: usize,
    running: usize,
    input: std::process::ChildStdin,
    proc: std::process::Child,
    placed: usize,
    ok: usize,
    failed: usize,
}

fn schedule(args: &Args) -> Result<(), String> {
    if args.nodes.is_empty() {
        return Err("--nodes NAME=CAPACITY,... is needed".into());
    }
    let t0 = Instant::now();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut nodes = Vec::new();
    for (i, (name, cap)) in args.nodes.iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.arg("--worker").arg(name);
        match (&args.seed, &args.seed_ref) {
            (Some(d), _) => cmd.arg("--seed").arg(d),
            (_, Some(r)) => cmd.arg("--seed-ref").arg(r),
            _ => unreachable!("checked in parse"),
        };
        if args.fail_every > 0 {
            cmd.arg("--fail-every").arg(args.fail_every.to_string());
        }
        if args.eager {
            cmd.arg("--eager");
        }
        if args.no_template {
            cmd.arg("--no-template");
        }
        let mut p = cmd
            .stdin(PStdio::piped())
            .stdout(PStdio::piped())
            .spawn()
            .map_err(|e| format!("starting node {name}: {e}"))?;
        let out = p.stdout.take().ok_or("no worker stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((i, l)).is_err() {
                    return;
                }
            }
            let _ = tx.send((i, "gone".into()));
        });
        nodes.push(Node {
            name: name.clone(),
            capacity: *cap,
            running: 0,
            input: p.stdin.take().ok_or("no worker stdin")?,
            proc: p,
            placed: 0,
            ok: 0,
            failed: 0,
        });
    }
    drop(tx);
    // Every node opens the seed first.
    let mut ready = 0;
    while ready < nodes.len() {
        let (i, l) = rx.recv().map_err(|_| "every node is gone")?;
        match l.as_str() {
            "ready" => ready += 1,
            "gone" => {
                return Err(format!(
                    "node {} did not start (see its error above)",
                    nodes[i].name
                ))
            }
            _ => {}
        }
    }
    let mut queue: VecDeque<usize> = (0..args.children).collect();
    let mut attempts: HashMap<usize, usize> = HashMap::new();
    let mut answers: Vec<Option<(String, String)>> = vec![None; args.children];
    let (mut done, mut restarted, mut lost) = (0usize, 0usize, 0usize);
    while done < args.children {
        // Place what fits, each on the node with the most free capacity.
        while let Some(&job) = queue.front() {
            let Some(n) = nodes
                .iter_mut()
                .filter(|n| n.running < n.capacity)
                .max_by_key(|n| n.capacity - n.running)
            else {
                break;
            };
            queue.pop_front();
            writeln!(n.input, "run {job}").map_err(|e| format!("node {}: {e}", n.name))?;
            n.running += 1;
            n.placed += 1;
        }
        let (i, l) = rx.recv().map_err(|_| "every node is gone")?;
        let mut w = l.splitn(4, ' ');
        let (Some("done"), Some(job), Some(status)) = (w.next(), w.next(), w.next()) else {
            if l == "gone" {
                return Err(format!("node {} ended with work on it", nodes[i].name));
            }
            continue;
        };
        let job: usize = job.parse().map_err(|_| format!("bad line {l:?}"))?;
        let detail = w.next().unwrap_or("").to_string();
        let n = &mut nodes[i];
        n.running -= 1;
        if status == "ok" {
            n.ok += 1;
            println!("job {job} on {}: {detail}", n.name);
            answers[job] = Some((n.name.clone(), detail));
            done += 1;
            continue;
        }
        n.failed += 1;
        let a = attempts.entry(job).or_insert(0);
        *a += 1;
        if *a <= args.retries {
            eprintln!("job {job} failed on {} ({detail}); restarting it", n.name);
            restarted += 1;
            queue.push_back(job);
        } else {
            eprintln!(
                "job {job} failed on {} ({detail}); giving up after {} tries",
                n.name, *a
            );
            lost += 1;
            done += 1;
        }
    }
    for n in &mut nodes {
        // Closing its stdin ends a worker once its children are reaped.
        let _ = n.input.flush();
    }
    let ok = answers.iter().filter(|a| a.is_some()).count();
    println!(
        "summary: {} children over {} nodes in {:.1} ms: {ok} ok, {lost} failed for good, {restarted} restarted",
        args.children,
        nodes.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    for n in nodes {
        println!(
            "node {}: capacity {}, placed {}, ok {}, failed {}",
            n.name, n.capacity, n.placed, n.ok, n.failed
        );
        drop(n.input);
        let mut p = n.proc;
        let _ = p.wait();
    }
    if lost > 0 {
        return Err(format!("{lost} children failed for good"));
    }
    Ok(())
}
