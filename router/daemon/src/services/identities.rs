//! The names this router has bound to keys (claims, re-keys and CA revocations), kept in the
//! state directory so that a restart does not forget who is who: without it, a host that
//! restarts while a peer is down would pin whatever key next claims that peer's name.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use weft_proto::router::IdentityState;

use crate::host::identity::write_atomic;

/// The file under the state directory.
pub const STATE_FILE: &str = "identities";

/// The identities file and whether what it holds is behind the router's.
pub struct IdentityStore {
    path: PathBuf,
    dirty: bool,
}

impl IdentityStore {
    /// The store at `dir`/[`STATE_FILE`].
    pub fn new(dir: &Path) -> Self {
        IdentityStore { path: dir.join(STATE_FILE), dirty: false }
    }

    /// What an earlier run saved, if anything. A file that does not decode stops the start:
    /// dropping it silently would forget every binding.
    pub fn load(&self) -> Result<Option<IdentityState>> {
        if !self.path.exists() {
            return Ok(None);
        }
        let b = std::fs::read(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        let st = postcard::from_bytes(&b).with_context(|| {
            format!(
                "{} is corrupt; restore it from a backup, or remove it to bind peers' names again on first use",
                self.path.display()
            )
        })?;
        Ok(Some(st))
    }

    /// Marks the file as behind.
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    /// Writes the state `state` gives if it changed since the last write (only then is it
    /// asked for). The file is small (a claim is about 110 bytes), so it is written in place of
    /// a queue: the next call retries a failure.
    pub fn save_if_changed(&mut self, state: impl FnOnce() -> IdentityState) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes = postcard::to_stdvec(&state()).context("encoding the identities")?;
        write_atomic(&self.path, &bytes)?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::identity::Claim;
    use weft_proto::{PeerName, SigningKey};

    #[test]
    fn saved_identities_load_and_corruption_is_refused() {
        let dir = std::env::temp_dir().join(format!("weft-identities-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut store = IdentityStore::new(&dir);
        assert!(store.load().expect("nothing yet").is_none());
        let key = SigningKey::from_seed(&[3; 32]).expect("key");
        let st = IdentityState { claims: vec![Claim::self_signed(&key, PeerName::from_u64(9))], ..Default::default() };
        store.save_if_changed(|| unreachable!("clean: nothing asked for")).expect("clean: nothing written");
        assert!(store.load().expect("still nothing").is_none());
        store.changed();
        store.save_if_changed(|| st.clone()).expect("save");
        assert_eq!(store.load().expect("load"), Some(st));
        std::fs::write(dir.join(STATE_FILE), [0xff; 7]).expect("write");
        let err = store.load().expect_err("corrupt");
        assert!(format!("{err:#}").contains("is corrupt"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
