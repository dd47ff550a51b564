//! Builds the kernel programs (agent-ebpf/) with Debian's rustc-web + bpf-linker and embeds the
//! object. Without that toolchain (e.g. a plain `cargo check` or clippy on a laptop) it embeds an
//! empty stub and the agent explains at start-up how to get a real build; set
//! `GRAYWATCH_REQUIRE_EBPF=1` to make a missing toolchain a build error instead.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("graywatch.bpf.o");
    for path in ["src", "common/src", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=GRAYWATCH_REQUIRE_EBPF");
    println!("cargo:rerun-if-env-changed=GRAYWATCH_CACHE");
    println!("cargo:rustc-check-cfg=cfg(graywatch_ebpf_stub)");

    let required = env::var_os("GRAYWATCH_REQUIRE_EBPF").is_some_and(|v| v == "1");
    match build_kernel_programs(&ebpf_dir) {
        Ok(object) => {
            std::fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
        }
        Err(why) if !required => {
            println!(
                "cargo:warning=graywatch-agent built WITHOUT kernel programs: {why}. Run `cargo xtask setup` for the eBPF toolchain."
            );
            println!("cargo:rustc-cfg=graywatch_ebpf_stub");
            std::fs::write(&out, []).expect("write the stub object");
        }
        Err(why) => panic!("building the kernel programs failed: {why}"),
    }
}

fn build_kernel_programs(ebpf_dir: &Path) -> Result<PathBuf, String> {
    let cargo = PathBuf::from("/usr/bin/cargo");
    if !cargo.exists() || !Path::new("/usr/bin/rustc").exists() {
        return Err("Debian's rustc-web/cargo-web (/usr/bin/cargo, /usr/bin/rustc) are not installed".into());
    }
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let cache = env::var_os("GRAYWATCH_CACHE").map_or_else(|| home.join(".cache/graywatch"), PathBuf::from);
    let linker_dir = cache.join("tools/bin");
    let mut path = vec![linker_dir.clone()];
    path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    if !path.iter().any(|dir| dir.join("bpf-linker").exists()) {
        return Err(format!("bpf-linker not found on PATH or in {}", linker_dir.display()));
    }

    let mut cmd = Command::new(cargo);
    cmd.current_dir(ebpf_dir).args(["build", "--release"]);
    // The outer cargo's settings (target dir, rustflags, rustup toolchain) must not leak into the
    // kernel build, which has its own .cargo/config.toml.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO") || key.starts_with("RUSTC") || key.starts_with("RUSTUP") || key == "RUSTFLAGS" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("PATH", env::join_paths(path).map_err(|e| e.to_string())?);
    cmd.env("RUSTC_BOOTSTRAP", "1");
    let output = cmd.output().map_err(|e| format!("could not run /usr/bin/cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "kernel crate build failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(ebpf_dir.join("target/bpfel-unknown-none/release/graywatch"))
}
