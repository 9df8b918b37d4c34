//! Project tasks: `cargo xtask build-ebpf | build | test | demo | bench | modules | dist`.

mod dist;
mod modules;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo tasks for the load balancer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the XDP programs (bpfel-unknown-none, nightly, bpf-linker).
    BuildEbpf,
    /// Build the eBPF object, then lb-agent and lbctl.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit tests, datapath fixtures and end-to-end tests in
    /// network namespaces (needs root).
    Test {
        /// Extra arguments for `cargo test` after `--` (a test name filter, ...).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build a namespace topology (client, LB, three backends), run the agent,
    /// send real traffic, print `lbctl status`, and remove everything.
    Demo,
    /// Run the benchmarks (release build); writes target/bench/results.json
    /// and target/bench/results.md. Not part of `test`.
    Bench {
        /// Run only these sections (datapath, conntrack, maglev, control, live, srcside);
        /// results files are written only for a full run. `fuzz` runs the
        /// fuzz test with 20,000,000 packets (or LB_FUZZ_PACKETS), only when
        /// named.
        sections: Vec<String>,
        /// Also run a peer in the datapath section, through the same shim and
        /// floor: `katran=PATH/balancer.bpf.o` (see docs/BENCHMARKS.md).
        #[arg(long)]
        peer: Option<String>,
    },
    /// Check that no crate's top-level modules import each other in a circle.
    Modules,
    /// Build the Debian package (release binaries, systemd units, example
    /// configurations, man pages, completions, Grafana dashboard) into
    /// target/dist/.
    Dist,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Path of the built eBPF object.
fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/lb-ebpf")
}

/// The test build of the object that differs from the default one (feature
/// `upgrade-test`), for the upgrade test.
fn ebpf_upgrade_object() -> PathBuf {
    root().join("target/ebpf-upgrade/bpfel-unknown-none/release/lb-ebpf")
}

fn build_ebpf() -> Result<()> {
    build_ebpf_into("target/ebpf", &[])?;
    println!("eBPF object: {}", ebpf_object().display());
    Ok(())
}

fn build_ebpf_into(target: &str, extra: &[&str]) -> Result<()> {
    let dir = root().join("lb-ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir)
        // The nightly toolchain comes from lb-ebpf/rust-toolchain.toml; clear
        // what the outer (stable) cargo exported so it does not leak in.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO")
        .env("CARGO_TARGET_DIR", root().join(target))
        .args(["build", "--release", "--locked"])
        .args(extra);
    run(&mut cmd).context("building the eBPF programs (did scripts/bootstrap.sh run?)")
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args(args);
    cmd
}

fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut args = vec!["build", "--locked", "-p", "lb-userspace", "--bins"];
    if release {
        args.push("--release");
    }
    run(&mut cargo(&args))
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => build_ebpf(),
        Task::Modules => modules::check(&root()),
        Task::Dist => dist::dist().map(|_| ()),
        Task::Build { release } => build(release),
        Task::Test { args } => {
            // The package tests (tests/tests/package.rs) read target/dist.
            dist::dist()?;
            build(false)?;
            build_ebpf_into("target/ebpf-upgrade", &["--features", "upgrade-test"])?;
            let mut cmd = cargo(&["test", "--locked", "--workspace"]);
            // The namespace tests share one kernel: run test binaries' cases one
            // at a time so their topologies and timing do not interfere.
            cmd.arg("--").arg("--test-threads=1").args(&args);
            cmd.env("LB_BIN_DIR", root().join("target/debug"));
            cmd.env("LB_UPGRADE_OBJECT", ebpf_upgrade_object());
            run(&mut cmd)
        }
        Task::Bench { sections, peer } => {
            build(true)?;
            let fuzz = sections.iter().any(|s| s == "fuzz");
            let rest: Vec<&String> = sections.iter().filter(|s| *s != "fuzz").collect();
            if !fuzz || !rest.is_empty() {
                let mut cmd = cargo(&["run", "--locked", "--release", "-q", "-p", "lb-tests"]);
                cmd.args(["--bin", "lb-bench", "--"]).args(rest);
                if let Some(p) = peer {
                    cmd.args(["--peer", &p]);
                }
                run(cmd.env("LB_BIN_DIR", root().join("target/release")))?;
            }
            if fuzz {
                // The fuzz test, longer than in `cargo xtask test`.
                let packets = std::env::var("LB_FUZZ_PACKETS").unwrap_or("20000000".into());
                let mut cmd = cargo(&["test", "--locked", "--release", "-p", "lb-tests"]);
                cmd.args(["--test", "fuzz", "--", "--nocapture"]);
                run(cmd
                    .env("LB_BIN_DIR", root().join("target/release"))
                    .env("LB_FUZZ_PACKETS", packets))?;
            }
            Ok(())
        }
        Task::Demo => {
            build(false)?;
            run(cargo(&[
                "run", "--locked", "-q", "-p", "lb-tests", "--bin", "lb-demo",
            ])
            .env("LB_BIN_DIR", root().join("target/debug")))
        }
    }
}
