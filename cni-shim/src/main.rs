//! The `weft-cni` binary: one CNI operation per run (see the library's docs).

use std::io::{Read, Write};
use std::process::ExitCode;

use rscni_types::types::ErrorResult;

fn main() -> ExitCode {
    let env = weft_cni::Env::from_process();
    if env.command.is_empty() {
        eprintln!(
            "weft-cni {}: the weft CNI plugin (CNI spec 0.3.0-1.1.0). A container runtime runs it; \
             install it with `weft setup-cni`.",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("weft-cni: reading the network configuration from stdin failed: {e}");
        return ExitCode::FAILURE;
    }
    let (text, code) = match weft_cni::run(&env, &stdin) {
        Ok(out) => (out, ExitCode::SUCCESS),
        Err((version, e)) => {
            eprintln!("weft-cni: {} failed: {}: {}", env.command, e.msg(), e.details());
            (serde_json::to_string(&ErrorResult::new(version, &e)).ok(), ExitCode::FAILURE)
        }
    };
    if let Some(t) = text {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{t}").and_then(|()| out.flush()).is_err() {
            return ExitCode::FAILURE;
        }
    }
    code
}
