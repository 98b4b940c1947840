//! The peer's identity, kept in the state directory: a stable name, its identity key
//! (Ed25519, `identity.key`: the key its name is bound to, see `weft_proto::identity`) and a
//! static Noise key pair. The UID is fresh on every start.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::RngCore;
use weft_proto::{PeerName, SigningKey};

/// What a router is, across restarts.
pub struct Identity {
    /// Stable 48-bit name.
    pub name: PeerName,
    /// Static Noise private key (X25519).
    pub private_key: [u8; 32],
    /// Its public half.
    pub public_key: [u8; 32],
    /// The identity key.
    pub signing: SigningKey,
}

/// The file that holds the identity key's 32-byte seed.
pub const IDENTITY_KEY_FILE: &str = "identity.key";

/// Reads a key file of exactly `N` bytes. A file of another size is corrupt: the error names
/// it and says what to do (`remedy`).
pub fn read_key_file<const N: usize>(path: &Path, remedy: &str) -> Result<[u8; N]> {
    let b = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match <[u8; N]>::try_from(b.as_slice()) {
        Ok(k) => Ok(k),
        Err(_) => bail!("{} is corrupt ({} bytes, want {N}); {remedy}", path.display(), b.len()),
    }
}

/// [`read_key_file`], or on first use a key from `make`, written (mode 0600) before it is used.
fn load_or_make<const N: usize>(path: &Path, remedy: &str, make: impl FnOnce() -> Result<[u8; N]>) -> Result<[u8; N]> {
    if path.exists() {
        return read_key_file(path, remedy);
    }
    let k = make()?;
    write_atomic(path, &k)?;
    Ok(k)
}

/// Loads the identity key from `dir`, making one on first use.
pub fn load_or_create_signing(dir: &Path) -> Result<SigningKey> {
    let path = dir.join(IDENTITY_KEY_FILE);
    let remedy = "restore it from a backup, or remove it and run `weft identity forget` for this host's name on every peer";
    let seed = load_or_make(&path, remedy, || {
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        Ok(seed)
    })?;
    SigningKey::from_seed(&seed).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Makes a fresh static key pair: (private, public).
pub type Keygen = fn() -> Result<([u8; 32], [u8; 32])>;

/// Loads the identity from `dir`, creating it (and `dir`, mode 0700) on first start with a key
/// pair from `keygen` (the handshake's; this module only keeps the keys).
/// A present but unreadable or corrupt file stops the start with a message naming it.
pub fn load_or_create(dir: &Path, name_override: Option<PeerName>, keygen: Keygen) -> Result<Identity> {
    fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making state directory {} private", dir.display()))?;
    let name_file = dir.join("name");
    let name = match name_override {
        Some(n) => {
            write_atomic(&name_file, format!("{n}\n").as_bytes())?;
            n
        }
        None if name_file.exists() => {
            let s = fs::read_to_string(&name_file).with_context(|| format!("reading {}", name_file.display()))?;
            s.trim().parse().with_context(|| {
                format!("{} is corrupt; fix it or remove it to get a new peer name", name_file.display())
            })?
        }
        None => {
            let n = PeerName::random(&mut rand::rng());
            write_atomic(&name_file, format!("{n}\n").as_bytes())?;
            n
        }
    };
    let key_file = dir.join("noise.key");
    // The file holds the private key then the public key, 32 bytes each.
    let pair: [u8; 64] = load_or_make(&key_file, "remove it to make a new key pair", || {
        let (private, public) = keygen().context("generating a static key pair")?;
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(&private);
        k[32..].copy_from_slice(&public);
        Ok(k)
    })?;
    let mut private_key = [0u8; 32];
    let mut public_key = [0u8; 32];
    private_key.copy_from_slice(&pair[..32]);
    public_key.copy_from_slice(&pair[32..]);
    let signing = load_or_create_signing(dir)?;
    Ok(Identity { name, private_key, public_key, signing })
}

/// The file a deliberate re-key leaves for the router's next start: the old key's signed
/// hand-over of the name to the new key, which the router passes on to its peers.
pub const REKEY_FILE: &str = "identity.rekey";
/// The text prefix of a re-key.
pub const REKEY_PREFIX: &str = "weft-rekey-v1";
/// The file a certificate is read from when `--cert` is not given.
pub const CERT_FILE: &str = "identity.cert";

/// Replaces the identity key in `dir` with a new one, leaving the old key's signed hand-over in
/// [`REKEY_FILE`]. Run while the router is stopped. Returns (old, new) public keys.
pub fn rekey(dir: &Path, name: PeerName) -> Result<(weft_proto::PublicKey, weft_proto::PublicKey)> {
    let path = dir.join(IDENTITY_KEY_FILE);
    if !path.exists() {
        bail!("{} does not exist: this host has no identity key to hand over yet (start the router once)", path.display());
    }
    let old = load_or_create_signing(dir)?;
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let new = SigningKey::from_seed(&seed).map_err(|e| anyhow::anyhow!(e))?;
    let handover = weft_proto::identity::Rekey::issue(&old, name, new.public());
    // The hand-over first: a crash before the key is replaced leaves a hand-over the router
    // ignores (its new key is not in use), never a new key without one.
    write_atomic(&dir.join(REKEY_FILE), weft_proto::identity::to_text(REKEY_PREFIX, &handover).as_bytes())?;
    write_atomic(&path, &seed)?;
    Ok((old.public(), new.public()))
}

/// The hand-over left by [`rekey`], if any.
pub fn load_rekey(dir: &Path) -> Result<Option<weft_proto::identity::Rekey>> {
    let path = dir.join(REKEY_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    weft_proto::identity::from_text(REKEY_PREFIX, &text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: {e}; remove it if the re-key is long done", path.display()))
}

/// Reads a certificate file (`weft ca sign`'s output).
pub fn load_certificate(path: &Path) -> Result<weft_proto::identity::Certificate> {
    let text = fs::read_to_string(path).with_context(|| format!("reading certificate {}", path.display()))?;
    weft_proto::identity::from_text(weft_proto::identity::CERT_PREFIX, &text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A fresh UID for this start.
pub fn fresh_uid() -> u64 {
    rand::rng().next_u64()
}

/// Writes `data` to `path` so that a crash leaves the old or the new content,
/// never a torn file: write a temporary file, fsync, rename, fsync the directory.
/// The file is readable by its owner only.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o600)
}

/// [`write_atomic`] with the file's permission bits (e.g. 0o755 for a program).
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let write = || -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        // The umask may have taken bits away at creation, and an old file keeps its mode.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        f.write_all(data).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(parent) = path.parent() {
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_keygen() -> Result<([u8; 32], [u8; 32])> {
        Ok((rand::random(), rand::random()))
    }

    #[test]
    fn identity_is_stable_and_corruption_is_refused() {
        let dir = std::env::temp_dir().join(format!("weft-id-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = load_or_create(&dir, None, fake_keygen).expect("create");
        let b = load_or_create(&dir, None, fake_keygen).expect("load");
        assert_eq!(a.name, b.name);
        assert_eq!(a.public_key, b.public_key);
        assert_eq!(a.signing.public(), b.signing.public());
        fs::write(dir.join(IDENTITY_KEY_FILE), [1u8; 31]).expect("write");
        let err = load_or_create(&dir, None, fake_keygen).err().expect("corrupt identity key refused");
        assert!(format!("{err:#}").contains("identity.key is corrupt"), "{err:#}");
        fs::write(dir.join(IDENTITY_KEY_FILE), [1u8; 32]).expect("write");
        fs::write(dir.join("name"), "not a name").expect("write");
        let err = load_or_create(&dir, None, fake_keygen).err().expect("corrupt name refused");
        assert!(format!("{err:#}").contains("name is corrupt"), "{err:#}");
        fs::write(dir.join("name"), format!("{}\n", a.name)).expect("write");
        fs::write(dir.join("noise.key"), [1u8; 5]).expect("write");
        let err = load_or_create(&dir, None, fake_keygen).err().expect("corrupt key refused");
        assert!(format!("{err:#}").contains("noise.key is corrupt"), "{err:#}");
        let _ = fs::remove_dir_all(&dir);
    }
}
