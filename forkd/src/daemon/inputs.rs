//! Inputs staged with `PutInput`, for spawns to give their children
//! (`stdin_ref`): bounded in size, kept a while after their last use.

use std::sync::Arc;
use std::time::Instant;

use tonic::Status;

use super::{auth, State};
use crate::pb;

/// A staged input, its owner and when it was last used.
pub(super) type Staged = (Arc<Vec<u8>>, String, Instant);

/// Largest staged input.
pub(super) const MAX_INPUT: usize = 256 << 20;
/// Staged inputs held in all.
const MAX_INPUTS: usize = 1 << 30;
/// How long a staged input is kept after its last use.
const INPUT_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

impl State {
    /// A staged input, by id.
    pub(super) fn input(&self, id: &str, who: &auth::Principal) -> Result<Arc<Vec<u8>>, Status> {
        let mut g = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let (d, _, used) = g
            .get_mut(id)
            .filter(|(_, o, _)| who.may_see(o))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no staged input {id:?} (unknown, or expired {} s after its last use)",
                    INPUT_KEPT.as_secs()
                ))
            })?;
        *used = Instant::now();
        Ok(d.clone())
    }

    /// Stage `data` for `owner`, unless staged inputs would exceed
    /// [`MAX_INPUTS`] in all (expired ones are forgotten first).
    pub(super) fn stage_input(&self, data: Vec<u8>, owner: String) -> Result<pb::InputRef, Status> {
        let id = crate::random_hex(8).map_err(|e| Status::internal(e.to_string()))?;
        let bytes = data.len() as u64;
        let mut g = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|_, (_, _, used)| used.elapsed() < INPUT_KEPT);
        let held: usize = g.values().map(|(d, _, _)| d.len()).sum();
        if held + data.len() > MAX_INPUTS {
            return Err(Status::resource_exhausted(format!(
                "staged inputs would exceed {} MiB in all; try again once earlier ones expire ({} s after their last use)",
                MAX_INPUTS >> 20,
                INPUT_KEPT.as_secs()
            )));
        }
        g.insert(id.clone(), (Arc::new(data), owner, Instant::now()));
        Ok(pb::InputRef { id, bytes })
    }
}
