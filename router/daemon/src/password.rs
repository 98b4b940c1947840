//! The network password: what is refused or warned about at launch, how it is stretched into
//! the Noise pre-shared key (Argon2id, salted by the mesh name), and fresh strong secrets for
//! `weft secret`. See `docs/protocol.md`, "Password and PSK".

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use base64ct::{Base64UrlUnpadded, Encoding};

/// The mesh name when the operator gives none. Every mesh that keeps it shares one salt, so
/// the docs ask operators to set their own.
pub const DEFAULT_MESH: &str = "weft";
/// Longest mesh name, in bytes.
pub const MAX_MESH_NAME: usize = 64;
/// Argon2id memory, KiB (64 MiB).
pub const KDF_MEMORY_KIB: u32 = 64 * 1024;
/// Argon2id passes.
pub const KDF_PASSES: u32 = 3;
/// Argon2id lanes.
pub const KDF_LANES: u32 = 1;
/// Domain label of the salt.
const SALT_LABEL: &[u8] = b"weft mesh salt v2";
/// Shortest password that is not warned about.
pub const MIN_LENGTH: usize = 12;
/// Fewest estimated bits that are not warned about (see [`estimate_bits`]).
pub const MIN_BITS: f64 = 60.0;
/// Random bytes in a secret from [`generate_secret`].
pub const SECRET_BYTES: usize = 32;

/// Passwords that are placeholders or the first guesses of anyone, compared after
/// [`normalise`]. Any password that starts with "changeme" is refused too (the Kubernetes
/// manifest once shipped `CHANGE-ME-to-a-long-random-string`).
const PLACEHOLDERS: &[&str] = &[
    "password", "passw0rd", "secret", "secretpassword", "weft", "weftpassword", "weftsecret", "admin", "default",
    "letmein", "test", "testing", "example", "placeholder", "yourpassword", "mypassword", "yourpasswordhere",
    "yoursecret", "yoursecrethere", "insertpasswordhere", "replaceme", "todo", "fixme", "xxx", "xxxx", "xxxxxx",
    "xxxxxxxx", "123456", "12345678", "123456789", "1234567890", "qwerty", "abc123", "000000", "111111",
];

/// What the launch check found in an acceptable password.
#[derive(Clone, Debug, PartialEq)]
pub enum Strength {
    /// Long and varied enough.
    Strong,
    /// Accepted, but guessable: say so loudly. The text says why and what to do.
    Weak(String),
}

/// Lowercase letters and digits only: "Change-Me!" and "changeme" are the same placeholder.
fn normalise(password: &str) -> String {
    password.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// Refuses a known placeholder (an error that says what to do), and grades the rest.
pub fn check(password: &str) -> Result<Strength> {
    let n = normalise(password);
    if n.starts_with("changeme") || PLACEHOLDERS.contains(&n.as_str()) {
        bail!(
            "the network password is a placeholder or a first guess ({password:?}): anyone can join the mesh with it. \
             Make a strong one with `weft secret` and give the same one to every router (--password, WEFT_PASSWORD or --password-file)"
        );
    }
    let chars = password.chars().count();
    let bits = estimate_bits(password);
    if chars < MIN_LENGTH || bits < MIN_BITS {
        return Ok(Strength::Weak(format!(
            "the network password is weak ({chars} characters, about {bits:.0} bits by weft's estimate; \
             want at least {MIN_LENGTH} characters and {MIN_BITS:.0} bits): whoever reaches a router's TCP port or records \
             one handshake can try guesses offline. Make a strong one with `weft secret`"
        )));
    }
    Ok(Strength::Strong)
}

/// A deliberately simple estimate of a password's entropy in bits, on the pessimistic side for
/// human passwords: `min(length, 2 × distinct characters) × log2(alphabet)`, where the alphabet
/// is the sum of the classes the password uses (26 lowercase, 26 uppercase, 10 digits, 33 ASCII
/// symbols and space, 100 for anything else). Repeats count little: "aaaaaaaaaaaaaaaa" is about
/// 9 bits, a 43-character `weft secret` about 256.
pub fn estimate_bits(password: &str) -> f64 {
    let (mut lower, mut upper, mut digit, mut symbol, mut other) = (false, false, false, false, false);
    let mut distinct = std::collections::BTreeSet::new();
    for c in password.chars() {
        distinct.insert(c);
        match c {
            'a'..='z' => lower = true,
            'A'..='Z' => upper = true,
            '0'..='9' => digit = true,
            c if c.is_ascii() => symbol = true,
            _ => other = true,
        }
    }
    let alphabet: u32 = [(lower, 26), (upper, 26), (digit, 10), (symbol, 33), (other, 100)]
        .iter()
        .filter(|(used, _)| *used)
        .map(|(_, n)| n)
        .sum();
    if alphabet < 2 {
        return 0.0;
    }
    let length = password.chars().count().min(2 * distinct.len());
    length as f64 * f64::from(alphabet).log2()
}

/// Checks a mesh name: 1 to 64 bytes of printable characters.
pub fn check_mesh_name(mesh: &str) -> Result<()> {
    if mesh.is_empty() || mesh.len() > MAX_MESH_NAME || mesh.chars().any(char::is_control) {
        bail!("the mesh name {mesh:?} must be 1 to {MAX_MESH_NAME} bytes without control characters (--mesh or WEFT_MESH)");
    }
    Ok(())
}

/// The salt of a mesh: SHA-256 over a fixed label and the mesh name. Every mesh with another
/// name has another salt, so no guessing work is shared between meshes.
pub fn mesh_salt(mesh: &str) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(SALT_LABEL);
    ctx.update(mesh.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The Argon2id parameters with `memory_kib` of memory (the real ones use [`KDF_MEMORY_KIB`]).
fn argon2(memory_kib: u32) -> Result<argon2::Argon2<'static>> {
    let params = argon2::Params::new(memory_kib, KDF_PASSES, KDF_LANES, Some(32))
        .map_err(|e| anyhow!("Argon2id parameters (m={memory_kib} KiB, t={KDF_PASSES}, p={KDF_LANES}): {e}"))?;
    Ok(argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params))
}

fn derive_with(password: &str, mesh: &str, memory_kib: u32) -> Result<[u8; 32]> {
    check_mesh_name(mesh)?;
    let mut out = [0u8; 32];
    argon2(memory_kib)?
        .hash_password_into(password.as_bytes(), &mesh_salt(mesh), &mut out)
        .map_err(|e| anyhow!("stretching the network password with Argon2id ({} MiB): {e}", memory_kib / 1024))?;
    Ok(out)
}

/// Stretches the network password into the 32-byte Noise PSK: Argon2id (m = 64 MiB, t = 3,
/// p = 1, version 0x13) with the salt of `mesh`. Blocking and slow on purpose (a fraction of a
/// second): call it once at launch, off the async runtime. Returns the key and how long it took.
pub fn derive_psk(password: &str, mesh: &str) -> Result<([u8; 32], Duration)> {
    let t0 = Instant::now();
    let psk = derive_with(password, mesh, KDF_MEMORY_KIB)?;
    Ok((psk, t0.elapsed()))
}

/// A fresh strong password: 32 bytes from the OS's random source, base64url without padding
/// (43 characters that need no quoting in a shell or a YAML file).
pub fn generate_secret() -> Result<String> {
    let mut b = [0u8; SECRET_BYTES];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| anyhow!("the OS random source failed; try again"))?;
    Ok(Base64UrlUnpadded::encode_string(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_refused_and_say_what_to_do() {
        for p in ["CHANGE-ME-to-a-long-random-string", "changeme", "Change Me!", "password", "Secret", "weft", "123456", "changeme-please"] {
            let e = check(p).err().unwrap_or_else(|| panic!("{p:?} accepted"));
            assert!(format!("{e:#}").contains("weft secret"), "{e:#}");
        }
    }

    #[test]
    fn short_or_repetitive_passwords_are_weak_and_long_varied_ones_strong() {
        for p in ["right", "s3cret", "hunter2", "aaaaaaaaaaaaaaaaaaaa", "abababababababab", "Tr0ub4dor&3"] {
            assert!(matches!(check(p), Ok(Strength::Weak(ref w)) if w.contains("weft secret")), "{p:?}: {:?}", check(p));
        }
        for p in ["correct horse battery staple", "weft-lab-demo-2026", "Xk3-pQ9_vL2mN8"] {
            assert_eq!(check(p).expect("accepted"), Strength::Strong, "{p:?}: {:.0} bits", estimate_bits(p));
        }
    }

    #[test]
    fn the_estimate_counts_classes_and_distinct_characters() {
        assert_eq!(estimate_bits(""), 0.0);
        assert!((estimate_bits("abcdefghijkl") - 12.0 * 26f64.log2()).abs() < 1e-9);
        // Two distinct characters count for four at most.
        assert!((estimate_bits("abababababab") - 4.0 * 26f64.log2()).abs() < 1e-9);
        assert!((estimate_bits("aB3$") - 4.0 * 95f64.log2()).abs() < 1e-9);
    }

    #[test]
    fn secrets_are_strong_fresh_and_url_safe() {
        let a = generate_secret().expect("secret");
        let b = generate_secret().expect("secret");
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{a}");
        assert_eq!(Base64UrlUnpadded::decode_vec(&a).expect("decodes").len(), SECRET_BYTES);
        assert_eq!(check(&a).expect("accepted"), Strength::Strong);
    }

    #[test]
    fn the_psk_depends_on_password_and_mesh() {
        // Small memory for speed: the derivation is the same function.
        let k = |p: &str, m: &str| derive_with(p, m, 64).expect("derive");
        assert_eq!(k("a long password", "weft"), k("a long password", "weft"));
        assert_ne!(k("a long password", "weft"), k("another password", "weft"));
        assert_ne!(k("a long password", "weft"), k("a long password", "prod"));
        assert_ne!(mesh_salt("a"), mesh_salt("b"));
        assert!(derive_with("x", "", 64).is_err(), "an empty mesh name is refused");
        assert!(check_mesh_name(&"m".repeat(MAX_MESH_NAME + 1)).is_err());
    }

    /// The real parameters, against a vector computed independently (Python's argon2-cffi:
    /// argon2.low_level.hash_secret_raw(b"correct horse battery staple", sha256(b"weft mesh salt v2weft"),
    /// time_cost=3, memory_cost=65536, parallelism=1, hash_len=32, type=ID, version=19)).
    #[test]
    fn the_psk_is_argon2id_with_the_documented_parameters() {
        let (psk, took) = derive_psk("correct horse battery staple", DEFAULT_MESH).expect("derive");
        eprintln!("Argon2id m=64 MiB t=3 p=1 took {took:?}");
        assert_eq!(to_hex(&psk), EXPECTED);
    }

    const EXPECTED: &str = "a0f7f1e203b1ed80ba59a74b1669640d530ea9068b779af95eca37af9d12173d";

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
