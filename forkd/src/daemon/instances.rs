//! The instance table: every child this forkd started (or took over from
//! an earlier forkd) while it runs, and the last ones that ended, with the
//! start of their output.

use std::collections::HashMap;

use crate::pb;

/// Output kept per instance for `GetInstance`.
pub(super) const OUTPUT_KEPT: usize = 1 << 20;

/// One started child.
pub(super) struct InstanceRec {
    pub(super) seed_id: String,
    pub(super) pid: u32,
    pub(super) state: String,
    pub(super) labels: HashMap<String, String>,
    pub(super) started_unix_ms: u64,
    /// How it ended, once it has.
    pub(super) end: Option<pb::Exited>,
    /// Started by an earlier forkd, handed over.
    pub(super) adopted: bool,
    pub(super) notes: Vec<String>,
    /// The start of its output ([`OUTPUT_KEPT`] at most) and how much it wrote.
    pub(super) stdout: Vec<u8>,
    pub(super) stdout_bytes: u64,
    /// The tenant that owns it ("" for the operator's).
    pub(super) owner: String,
    /// The uid it runs as.
    pub(super) uid: u32,
}

impl InstanceRec {
    pub(super) fn to_pb(&self, id: &str, with_output: bool) -> pb::Instance {
        let e = self.end.clone().unwrap_or_default();
        pb::Instance {
            id: id.to_string(),
            seed_id: self.seed_id.clone(),
            pid: self.pid,
            state: self.state.clone(),
            labels: self.labels.clone(),
            started_unix_ms: self.started_unix_ms,
            ended: self.end.is_some(),
            exit_code: e.exit_code,
            signal: e.signal,
            reason: e.reason,
            adopted: self.adopted,
            notes: self.notes.clone(),
            stdout: if with_output {
                self.stdout.clone()
            } else {
                Vec::new()
            },
            stdout_bytes: self.stdout_bytes,
            owner: self.owner.clone(),
            uid: self.uid,
        }
    }
}

/// Ended instances kept (for `ListInstances` and `KillInstance`'s "not
/// running" answer); older ones are forgotten, so a long-running node's
/// table does not grow without end.
const ENDED_KEPT: usize = 10_000;

/// Started children: every running one, and the last [`ENDED_KEPT`] that ended.
#[derive(Default)]
pub(super) struct Instances {
    pub(super) map: HashMap<String, InstanceRec>,
    /// Ended ones, oldest first.
    pub(super) ended: std::collections::VecDeque<String>,
}

impl Instances {
    /// Mark `id` ended, forgetting the oldest ended beyond the cap.
    pub(super) fn end(&mut self, id: &str, end: &pb::Exited, stdout: Vec<u8>, stdout_bytes: u64) {
        let Some(i) = self.map.get_mut(id) else {
            return;
        };
        i.state = if end.signal != 0 {
            format!("killed by signal {}", end.signal)
        } else {
            format!("exited {}", end.exit_code)
        };
        i.end = Some(pb::Exited {
            stdout: Vec::new(),
            ..end.clone()
        });
        i.stdout = stdout;
        i.stdout_bytes = stdout_bytes;
        self.ended.push_back(id.to_string());
        while self.ended.len() > ENDED_KEPT {
            if let Some(old) = self.ended.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub(super) fn running(&self) -> usize {
        self.map.values().filter(|i| i.state == "running").count()
    }
}

#[cfg(test)]
mod instances_tests {
    use super::*;

    fn rec() -> InstanceRec {
        InstanceRec {
            seed_id: "s".into(),
            pid: 1,
            state: "running".into(),
            labels: HashMap::new(),
            started_unix_ms: 0,
            end: None,
            adopted: false,
            notes: Vec::new(),
            stdout: Vec::new(),
            stdout_bytes: 0,
            owner: String::new(),
            uid: 0,
        }
    }

    #[test]
    fn ended_instances_beyond_the_cap_are_forgotten_running_ones_never() {
        let mut t = Instances::default();
        t.map.insert("live".into(), rec());
        for i in 0..ENDED_KEPT + 5 {
            let id = format!("i{i}");
            t.map.insert(id.clone(), rec());
            t.end(&id, &pb::Exited::default(), Vec::new(), 0);
        }
        assert_eq!(t.map.len(), ENDED_KEPT + 1);
        assert!(t.map.contains_key("live"));
        assert_eq!(t.running(), 1);
        // The oldest ended went first; the newest are kept with their state.
        assert!(!t.map.contains_key("i0") && !t.map.contains_key("i4"));
        assert_eq!(t.map[&format!("i{}", ENDED_KEPT + 4)].state, "exited 0");
        // Ending an unknown id changes nothing.
        t.end(
            "nope",
            &pb::Exited {
                exit_code: 1,
                ..Default::default()
            },
            Vec::new(),
            0,
        );
        assert_eq!(t.map.len(), ENDED_KEPT + 1);
    }
}
