//! `cargo xtask fuzz`: the fuzz targets — bounded property tests over untrusted input (protobuf
//! summaries → fleet view, procfs/cgroup/tracefs parsers, config files) — with many more cases
//! than the `cargo xtask test` run, optimised. cargo-fuzz (libFuzzer, nightly) is not used: the
//! same properties run on stable, in CI, with a fixed bound.

use std::process::Command;

use crate::util::{run_cmd, workspace_root};

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Cases per property (`cargo xtask test` runs 2000–3000).
    #[arg(long, default_value_t = 100_000)]
    pub cases: u32,
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    for (package, target) in [
        ("graywatch-aggregator", "fuzz_ingest"),
        ("graywatch-agent", "fuzz_parsers"),
    ] {
        run_cmd(
            Command::new("cargo")
                .current_dir(workspace_root())
                .args(["test", "--release", "-p", package, "--test", target])
                .env("GRAYWATCH_FUZZ_CASES", args.cases.to_string()),
        )?;
    }
    Ok(())
}
