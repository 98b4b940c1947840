//! `weft secret` and the password checks at launch: no router, no root needed.

use std::process::Command;

fn weft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft"))
}

#[test]
fn secret_prints_a_fresh_strong_password() {
    let a = weft().arg("secret").output().expect("run weft secret");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let a = String::from_utf8(a.stdout).expect("utf-8");
    let a = a.trim_end();
    assert_eq!(a.len(), 43, "{a:?}");
    assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{a:?}");
    let b = weft().args(["secret", "--json"]).output().expect("run weft secret --json");
    assert!(b.status.success());
    let v: serde_json::Value = serde_json::from_slice(&b.stdout).expect("json");
    let b = v["secret"].as_str().expect("secret field");
    assert_eq!(b.len(), 43);
    assert_ne!(a, b, "each call makes a new one");
}

#[test]
fn launch_refuses_a_placeholder_password_and_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("weft-secret-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("password");
    std::fs::write(&file, "CHANGE-ME-to-a-long-random-string\n").expect("write");
    let sock = dir.join("weft.sock");
    for args in [
        vec!["launch".to_string(), "--password-file".into(), file.display().to_string()],
        vec!["launch".to_string(), "--password".into(), "changeme".into()],
    ] {
        let out = weft()
            .arg("--api-socket")
            .arg(&sock)
            .args(&args)
            .args(["--state-dir", &dir.display().to_string()])
            .env_remove("WEFT_PASSWORD")
            .output()
            .expect("run weft launch");
        assert!(!out.status.success(), "a placeholder password was accepted: {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("placeholder") && err.contains("weft secret"), "{err}");
    }
    assert!(!sock.exists(), "nothing started");
    let _ = std::fs::remove_dir_all(&dir);
}
