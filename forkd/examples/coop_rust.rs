//! The cooperative API from Rust: warm state, `remotefork::checkpoint()`,
//! children compute with it.

fn main() {
    let table: Vec<u64> = (0..100_000u64).map(|i| i * 7 + 3).collect();
    match remotefork::checkpoint("coop-rust") {
        Ok(remotefork::Checkpoint::Child {
            instance_id,
            index,
            args,
        }) => {
            let sum: u64 = table.iter().sum();
            println!("{{\"child\": {index}, \"instance\": \"{instance_id}\", \"args\": \"{args}\", \"sum\": {sum}}}");
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
