//! `weft ca`: a mesh certificate authority kept in a directory (`ca.key`, the private key's
//! seed, mode 0600; `ca.pub`, its public key in hex). It signs a router's name and identity
//! key with an expiry, and revokes keys through the local router, which passes the
//! revocation on to the whole mesh.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rand::RngCore;
use serde_json::json;
use weft_proto::identity::{to_text, Certificate, Revocation, CERT_PREFIX, REVOCATION_PREFIX};
use weft_proto::{PeerName, PublicKey, SigningKey};
use weft_router::api::client;
use weft_router::host::identity::{read_key_file, write_atomic};

const KEY_FILE: &str = "ca.key";
const PUB_FILE: &str = "ca.pub";
/// Longest certificate lifetime `weft ca sign` gives.
const MAX_DAYS: u64 = 3650;

#[derive(Subcommand)]
pub(crate) enum CaCmd {
    /// Make a CA key pair in a directory (kept offline, away from the routers if you can).
    Init {
        /// Where to keep the CA's key.
        #[arg(long, default_value = "weft-ca")]
        dir: PathBuf,
    },
    /// Certify that a router's name uses a key (see `weft identity show` on that host); prints
    /// the certificate, which goes into identity.cert in that router's state directory.
    Sign {
        #[command(flatten)]
        who: Subject,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Write the certificate here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a router's key: the local router applies it and passes it to every peer, which
    /// all cut that router off.
    Revoke {
        #[command(flatten)]
        who: Subject,
    },
}

/// The CA and the router a certificate or a revocation is about.
#[derive(Args)]
pub(crate) struct Subject {
    /// The CA directory.
    #[arg(long, default_value = "weft-ca")]
    dir: PathBuf,
    /// The router's name.
    #[arg(long)]
    name: String,
    /// The router's identity key (64 hex digits).
    #[arg(long)]
    key: String,
}

impl Subject {
    /// The CA's key, the name and the router's key.
    fn load(&self) -> Result<(SigningKey, PeerName, PublicKey)> {
        let ca = load(&self.dir)?;
        let name: PeerName = self.name.parse().map_err(|e| anyhow::anyhow!("--name: {e}"))?;
        let key: PublicKey = self.key.parse().map_err(|e| anyhow::anyhow!("--key: {e}"))?;
        Ok((ca, name, key))
    }
}

/// A CA public key given as hex or as a file holding it.
pub(crate) fn parse_public(s: &str) -> Result<PublicKey> {
    if let Ok(k) = s.parse::<PublicKey>() {
        return Ok(k);
    }
    let text = std::fs::read_to_string(s)
        .with_context(|| format!("--ca {s:?} is neither a public key (64 hex digits) nor a readable file"))?;
    text.trim().parse::<PublicKey>().map_err(|e| anyhow::anyhow!("{s}: {e}"))
}

fn load(dir: &Path) -> Result<SigningKey> {
    let path = dir.join(KEY_FILE);
    if !path.exists() {
        bail!("there is no CA key at {}: make one with `weft ca init --dir {}`", path.display(), dir.display());
    }
    let seed: [u8; 32] = read_key_file(&path, "restore the CA key from its backup")?;
    SigningKey::from_seed(&seed).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub(crate) fn run(cmd: CaCmd, sock: &Path, as_json: bool, out: &mut impl Write) -> Result<()> {
    match cmd {
        CaCmd::Init { dir } => {
            let key_path = dir.join(KEY_FILE);
            if key_path.exists() {
                bail!("{} exists: this directory already holds a CA; refusing to replace its key", key_path.display());
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut seed = [0u8; 32];
            rand::rng().fill_bytes(&mut seed);
            let ca = SigningKey::from_seed(&seed).map_err(|e| anyhow::anyhow!(e))?;
            write_atomic(&key_path, &seed)?;
            write_atomic(&dir.join(PUB_FILE), format!("{}\n", ca.public()).as_bytes())?;
            if as_json {
                writeln!(out, "{}", json!({ "public_key": ca.public().to_string(), "dir": dir.display().to_string() }))?;
            } else {
                writeln!(out, "CA public key: {}\n(kept in {}; the private key is {})", ca.public(), dir.join(PUB_FILE).display(), key_path.display())?;
                writeln!(out, "Start every router with --ca {} and its certificate (`weft ca sign`).", ca.public())?;
            }
            Ok(())
        }
        CaCmd::Sign { who, days, out: file } => {
            if days == 0 || days > MAX_DAYS {
                bail!("--days {days} is out of range (1..={MAX_DAYS})");
            }
            let (ca, name, key) = who.load()?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).context("the clock is before 1970")?.as_secs();
            let cert = Certificate::issue(&ca, name, key, now + days * 86_400);
            let text = to_text(CERT_PREFIX, &cert);
            if let Some(f) = &file {
                std::fs::write(f, format!("{text}\n")).with_context(|| format!("writing {}", f.display()))?;
            }
            if as_json {
                writeln!(out, "{}", json!({ "name": name.to_string(), "key": key.to_string(), "expires": cert.expires, "certificate": text }))?;
            } else if file.is_none() {
                writeln!(out, "{text}")?;
            } else {
                writeln!(out, "certified {name} with key {key} until {} (Unix time)", cert.expires)?;
            }
            Ok(())
        }
        CaCmd::Revoke { who } => {
            let (ca, name, key) = who.load()?;
            let r = Revocation::issue(&ca, name, key);
            let v = client::call(sock, "POST", "/v1/identity/revoke", Some(&json!({ "revocation": to_text(REVOCATION_PREFIX, &r) })))?;
            if as_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                writeln!(out, "revoked key {key} of {name}; the mesh cuts it off as the revocation spreads")?;
            }
            Ok(())
        }
    }
}
