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
    /// A container seed's child: its container.
    pub(super) container: Option<ContainerRec>,
}

/// A container child's container, as the instance table shows it.
pub(super) struct ContainerRec {
    /// Its cgroup while it runs (usage is read live); none after.
    pub(super) cgroup: Option<std::sync::Arc<remotefork::container::ChildCgroup>>,
    /// What `ListInstances` shows (usage as last read).
    pub(super) status: pb::ContainerStatus,
}

impl ContainerRec {
    /// The record of a child with this cgroup.
    pub(super) fn new(
        cg: std::sync::Arc<remotefork::container::ChildCgroup>,
        spec: &remotefork::container::ChildSpec,
        info: Option<&remotefork::container::ContainerInfo>,
    ) -> ContainerRec {
        let l = cg.limits;
        let status = pb::ContainerStatus {
            cgroups: cg.paths().iter().map(|p| p.display().to_string()).collect(),
            memory_limit_bytes: l.memory_bytes.unwrap_or(0),
            pids_limit: l.pids.unwrap_or(0),
            cpu_limit: l.cpu_micros.map_or(0.0, |c| c as f64 / 1e6),
            network: match spec.network {
                remotefork::container::Network::Loopback => "loopback".into(),
                remotefork::container::Network::None => "none".into(),
            },
            namespaces: ["pid", "mnt", "uts", "ipc", "net"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            rootfs_digest: info.map(|i| i.rootfs_digest.clone()).unwrap_or_default(),
            ..Default::default()
        };
        ContainerRec {
            cgroup: Some(cg),
            status,
        }
    }

    fn to_pb(&self) -> pb::ContainerStatus {
        let mut s = self.status.clone();
        if let Some(cg) = &self.cgroup {
            let u = cg.usage();
            s.memory_bytes = u.memory_bytes;
            s.pids = u.pids;
            s.cpu_us = u.cpu_us;
        }
        s
    }
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
            container: self.container.as_ref().map(ContainerRec::to_pb),
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
        if let Some(c) = i.container.as_mut() {
            // The last usage read stays; the cgroup goes with the child.
            c.status = c.to_pb();
            c.cgroup = None;
        }
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
            container: None,
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
