//! `cargo xtask demo`: the README's main command. Installs what is missing (Debian packages,
//! the eBPF toolchain, the local kube-apiserver build), builds graywatch, then runs
//! `graywatch-demo` (tests/src/demo.rs): apiserver, nodes as network namespaces with traffic,
//! agents, the aggregator, an injected fault, and the reaction times.

use std::process::Command;

use anyhow::bail;

use crate::{
    k8s, setup,
    util::{is_root, run_cmd, workspace_root},
};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Arguments for graywatch-demo, e.g. --fault delay=30ms,loss=1% --node node-b --keep.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub demo_args: Vec<String>,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates network namespaces: run it as root");
    }
    eprintln!("== 1/3 toolchain and packages (first run: a few minutes)");
    setup::run(&setup::SetupArgs::default())?;
    eprintln!("== 2/3 local kube-apiserver (first run: built from Debian's source package, ~4 min)");
    k8s::ensure_apiserver()?;
    eprintln!("== 3/3 building graywatch");
    let root = workspace_root();
    run_cmd(
        Command::new("cargo")
            .current_dir(&root)
            .args([
                "build",
                "-p",
                "graywatch-agent",
                "-p",
                "graywatch-aggregator",
                "-p",
                "graywatch-testbench",
                "-p",
                "graywatch-demo",
                "--bins",
            ])
            .env("GRAYWATCH_REQUIRE_EBPF", "1"),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), std::path::PathBuf::from);
    let bin_dir = target.join("debug");
    let mut demo = Command::new(bin_dir.join("graywatch-demo"));
    demo.arg("--bin-dir").arg(&bin_dir);
    if !args.demo_args.iter().any(|a| a == "--aggregator-config") {
        demo.arg("--aggregator-config")
            .arg(root.join("tests/demo/aggregator.toml"));
    }
    demo.args(&args.demo_args);
    run_cmd(&mut demo)
}
