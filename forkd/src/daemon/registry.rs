//! The seeds this node holds, kept in the state directory so a restarted
//! forkd serves them again, and the instances it started.
//!
//! Layout: `STATE/seeds/ID/` is a seed image plus `meta.json` (id, key,
//! name, origin). A seed is captured into `STATE/tmp/ID/`, fsynced, and
//! renamed into `seeds/` only when complete: a crash mid-capture leaves
//! only a `tmp/` directory, which the next start removes.
//!
//! Seeds hold processes' memory: the state directory and every directory
//! made in it are 0700, tightened at start if found wider, and every file
//! written 0600 ([`remotefork::private_fs`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use remotefork::image::SeedImage;
use remotefork::private_fs;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::pb;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// An I/O error on the state directory.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let what = what.into();
    move |source| RegistryError::Io { what, source }
}

/// What is kept next to a seed's image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedMeta {
    /// Seed id.
    pub id: String,
    /// 128-bit key, hex.
    pub key: String,
    /// Human name.
    pub name: String,
    /// Creation time.
    pub created_unix_ms: u64,
    /// The captured process's pid.
    pub source_pid: u32,
    /// Capture figures.
    pub pause_us: u64,
    /// Capture time.
    pub capture_us: u64,
    /// Made by the cooperative `checkpoint()`: each child's stdin starts
    /// with a line naming it.
    #[serde(default)]
    pub cooperative: bool,
    /// The tenant that owns it ("" for the operator's).
    #[serde(default)]
    pub owner: String,
}

/// One seed held by this node.
pub struct Seed {
    /// Its metadata.
    pub meta: SeedMeta,
    /// Its image directory.
    pub dir: PathBuf,
    /// Page store size.
    pub image_bytes: u64,
    /// Mappings.
    pub vmas: u32,
    /// A container seed's rootfs digest ("" otherwise).
    pub container_rootfs: String,
    /// Children started from it.
    pub spawned: std::sync::atomic::AtomicU64,
    restorer: Mutex<Option<Arc<remotefork::Seed>>>,
    /// Why it is damaged (a page that did not match its digest), kept in
    /// [`DAMAGED_FILE`] so a restarted forkd refuses it too.
    damaged: Mutex<Option<String>>,
}

/// A file in a seed's directory saying why the seed is damaged.
pub const DAMAGED_FILE: &str = "DAMAGED";

impl Seed {
    /// The seed's restorer, set up on first use and shared by its children
    /// (it owns the node-local cache and the pager).
    pub fn restorer(&self) -> Result<Arc<remotefork::Seed>, remotefork::RestoreError> {
        self.restorer_adopting(None)
    }

    /// [`Seed::restorer`], over the node cache a previous forkd kept
    /// (handed back by the keeper) if this forkd has none for it yet.
    pub fn restorer_adopting(
        &self,
        cache: Option<remotefork::pager::cache::CacheFds>,
    ) -> Result<Arc<remotefork::Seed>, remotefork::RestoreError> {
        if let Some(why) = self.damaged() {
            return Err(remotefork::RestoreError::Damaged(why));
        }
        let mut g = self.restorer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = g.as_ref() {
            return Ok(r.clone());
        }
        let r = Arc::new(remotefork::Seed::new_adopting(
            SeedImage::open(&self.dir)?,
            cache,
        )?);
        *g = Some(r.clone());
        Ok(r)
    }

    /// Why the seed is damaged, if a page read from it did not match its
    /// digest (noted on disk the first time, so it outlives a restart).
    pub fn damaged(&self) -> Option<String> {
        let mut g = self.damaged.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let why = self.restorer_if_started().and_then(|r| r.damaged())?;
            let f = self.dir.join(DAMAGED_FILE);
            if let Err(e) = private_fs::write(&f, why.as_bytes()) {
                warn!(file = %f.display(), error = %e, "cannot note that the seed is damaged");
            }
            *g = Some(why);
        }
        g.clone()
    }

    /// The restorer, if a child was ever started from this seed.
    pub fn restorer_if_started(&self) -> Option<Arc<remotefork::Seed>> {
        self.restorer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The API form.
    pub fn to_pb(&self, node: &str, with_key: bool) -> pb::Seed {
        pb::Seed {
            id: self.meta.id.clone(),
            key: if with_key {
                self.meta.key.clone()
            } else {
                String::new()
            },
            name: self.meta.name.clone(),
            created_unix_ms: self.meta.created_unix_ms,
            source_pid: self.meta.source_pid,
            image_bytes: self.image_bytes,
            vmas: self.vmas,
            pause_us: self.meta.pause_us,
            capture_us: self.meta.capture_us,
            node: node.to_string(),
            children_spawned: self.spawned.load(std::sync::atomic::Ordering::Relaxed),
            damaged: self.damaged().unwrap_or_default(),
            owner: self.meta.owner.clone(),
            container_rootfs: self.container_rootfs.clone(),
        }
    }
}

/// The seeds of this node.
pub struct Registry {
    state: PathBuf,
    seeds: Mutex<HashMap<String, Arc<Seed>>>,
}

impl Registry {
    /// Open the state directory, dropping half-written seeds and loading
    /// every complete one. The directory and those it holds are made 0700
    /// (a warning names each one that was wider).
    pub fn open(state: &Path) -> Result<Registry, RegistryError> {
        let seeds_dir = state.join("seeds");
        let tmp = state.join("tmp");
        let reg = Registry {
            state: state.to_path_buf(),
            seeds: Mutex::new(HashMap::new()),
        };
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(format!("clearing {}", tmp.display())))?;
        }
        for d in [state, &seeds_dir, &tmp, &reg.file_store()] {
            private_fs::dir(d).map_err(io(format!("creating {} (0700)", d.display())))?;
        }
        // Seeds written by an earlier forkd, before their modes were kept.
        for e in std::fs::read_dir(&seeds_dir)
            .map_err(io(format!("reading {}", seeds_dir.display())))?
            .flatten()
        {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if let Err(err) = private_fs::dir(&e.path()) {
                    warn!(dir = %e.path().display(), error = %err, "cannot make a seed's directory 0700");
                }
            }
        }
        for e in std::fs::read_dir(&seeds_dir)
            .map_err(io(format!("reading {}", seeds_dir.display())))?
            .flatten()
        {
            match reg.load(&e.path()) {
                Ok(s) => {
                    info!(seed = %s.meta.id, "seed loaded from the state directory");
                    reg.insert(s);
                }
                Err(err) => {
                    warn!(dir = %e.path().display(), error = %err, "skipping a seed that does not load")
                }
            }
        }
        Ok(reg)
    }

    fn load(&self, dir: &Path) -> Result<Seed, String> {
        let meta: SeedMeta = serde_json::from_slice(
            &std::fs::read(dir.join("meta.json")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let img = SeedImage::open(dir).map_err(|e| e.to_string())?;
        let d = img.descriptor();
        Ok(Seed {
            image_bytes: d.image_bytes,
            vmas: d.vmas.len() as u32,
            container_rootfs: d
                .container
                .as_ref()
                .map(|c| c.rootfs_digest.clone())
                .unwrap_or_default(),
            meta,
            dir: dir.to_path_buf(),
            spawned: Default::default(),
            restorer: Mutex::new(None),
            damaged: Mutex::new(std::fs::read_to_string(dir.join(DAMAGED_FILE)).ok()),
        })
    }

    /// A fresh directory to capture a new seed into.
    pub fn tmp_dir(&self, id: &str) -> PathBuf {
        self.state.join("tmp").join(id)
    }

    /// Make a captured seed permanent: write its metadata, fsync, rename
    /// into `seeds/`, and register it.
    pub fn commit(&self, meta: SeedMeta) -> Result<Arc<Seed>, RegistryError> {
        let tmp = self.tmp_dir(&meta.id);
        let m = tmp.join("meta.json");
        let bytes = serde_json::to_vec_pretty(&meta).map_err(|e| RegistryError::Io {
            what: "encoding meta.json".into(),
            source: e.into(),
        })?;
        private_fs::write(&m, &bytes).map_err(io(format!("writing {}", m.display())))?;
        std::fs::File::open(&m)
            .and_then(|f| f.sync_all())
            .map_err(io("fsync meta.json"))?;
        let dest = self.state.join("seeds").join(&meta.id);
        std::fs::rename(&tmp, &dest)
            .map_err(io(format!("renaming {} into place", tmp.display())))?;
        std::fs::File::open(self.state.join("seeds"))
            .and_then(|d| d.sync_all())
            .map_err(io("fsync seeds/"))?;
        let seed = self.load(&dest).map_err(|e| RegistryError::Io {
            what: format!("loading the new seed {}", meta.id),
            source: std::io::Error::other(e),
        })?;
        Ok(self.insert(seed))
    }

    fn insert(&self, seed: Seed) -> Arc<Seed> {
        let s = Arc::new(seed);
        self.seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(s.meta.id.clone(), s.clone());
        s
    }

    /// A seed by id.
    pub fn get(&self, id: &str) -> Option<Arc<Seed>> {
        self.seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every seed, oldest first.
    pub fn list(&self) -> Vec<Arc<Seed>> {
        let mut v: Vec<_> = self
            .seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|s| (s.meta.created_unix_ms, s.meta.id.clone()));
        v
    }

    /// Forget a seed and delete its image. Children already running keep
    /// what they hold (their restorer keeps the page store open).
    pub fn drop_seed(&self, id: &str) -> Result<bool, RegistryError> {
        let Some(s) = self
            .seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
        else {
            return Ok(false);
        };
        std::fs::remove_dir_all(&s.dir).map_err(io(format!("removing {}", s.dir.display())))?;
        // Kept file copies no other seed uses any more.
        remotefork::capture::prune_file_store(&self.file_store());
        Ok(true)
    }

    /// Where this node's seeds keep their copies of mapped files, each
    /// file once (seeds hard-link to them).
    pub fn file_store(&self) -> PathBuf {
        self.state.join("files")
    }

    /// Container seeds' root filesystems, one copy per content digest.
    pub fn rootfs_store(&self) -> PathBuf {
        self.state.join("rootfs")
    }

    /// Number of seeds.
    pub fn len(&self) -> usize {
        self.seeds.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// No seeds?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The page server serves the registry's seeds (looked up at each request:
/// a dropped seed is served no more).
impl remotefork::transport::tcp_server::Seeds for Registry {
    fn served(&self, id: &str) -> Option<remotefork::transport::tcp_server::ServedSeed> {
        self.get(id)
            .map(|s| remotefork::transport::tcp_server::ServedSeed {
                key: s.meta.key.clone(),
                dir: s.dir.clone(),
                image_bytes: s.image_bytes,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_state_directory_open_to_others_is_tightened() {
        let state = std::env::temp_dir().join(format!("forkd-state-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let old_seed = state.join("seeds").join("old");
        std::fs::create_dir_all(&old_seed).unwrap();
        for d in [&state, &state.join("seeds"), &old_seed] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let reg = Registry::open(&state).unwrap();
        for d in [
            state.clone(),
            state.join("seeds"),
            state.join("tmp"),
            reg.file_store(),
            old_seed,
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        // The seed that does not load is skipped, not an error.
        assert!(reg.is_empty());
        std::fs::remove_dir_all(&state).unwrap();
    }
}
