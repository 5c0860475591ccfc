//! The cooperative API from Rust: warm state, `remotefork::checkpoint()`,
//! children compute with it; an `on_restore` hook gives each child state of
//! its own.

use std::sync::atomic::{AtomicU32, Ordering};

/// Set in each child by the restore hook: that child's own pid.
static HOOK_PID: AtomicU32 = AtomicU32::new(0);

fn main() {
    let table: Vec<u64> = (0..100_000u64).map(|i| i * 7 + 3).collect();
    remotefork::on_restore(|| HOOK_PID.store(std::process::id(), Ordering::Relaxed));
    match remotefork::checkpoint("coop-rust") {
        Ok(remotefork::Checkpoint::Child {
            instance_id,
            index,
            args,
        }) => {
            let sum: u64 = table.iter().sum();
            let hook = HOOK_PID.load(Ordering::Relaxed);
            println!("{{\"child\": {index}, \"instance\": \"{instance_id}\", \"args\": \"{args}\", \"sum\": {sum}, \"hook_pid\": {hook}}}");
        }
        Ok(remotefork::Checkpoint::Parent { seed_id, .. }) => {
            println!("parent seed={seed_id}");
            println!("parent continues {}", table.iter().sum::<u64>());
        }
        Err(e) => {
            eprintln!("checkpoint failed: {e}");
            std::process::exit(2);
        }
    }
}
