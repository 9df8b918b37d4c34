//! `cargo xtask dist`: the Debian package, built with cargo-deb (installed
//! by `scripts/bootstrap.sh`) from `[package.metadata.deb]` in
//! `lb-userspace/Cargo.toml`: the release binaries (lb-agent embeds the
//! eBPF object), the systemd units, example configurations, man pages and
//! shell completions generated from the clap definitions, and the Grafana
//! dashboard. Writes `target/dist/lb-agent_VERSION_ARCH.deb`.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{build, cargo, root, run};

pub fn dist() -> Result<PathBuf> {
    build(true)?;
    let dist = root().join("target/dist");
    let docs = dist.join("docs");
    if docs.exists() {
        std::fs::remove_dir_all(&docs).context("clearing target/dist/docs")?;
    }
    for (bin, args) in [
        ("lb-agent", vec!["--generate-docs"]),
        ("lbctl", vec!["generate-docs"]),
    ] {
        let out = docs.join(bin);
        run(Command::new(root().join("target/release").join(bin))
            .args(&args)
            .arg(&out))?;
        // Man pages are installed compressed, reproducibly (no name, no time).
        let pages: Vec<PathBuf> = std::fs::read_dir(out.join("man"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        run(Command::new("gzip").arg("-9nf").args(&pages))?;
    }
    for old in std::fs::read_dir(&dist)? {
        let path = old?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            std::fs::remove_file(&path)?;
        }
    }
    if !cargo(&["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bail!("cargo-deb is missing: run scripts/bootstrap.sh (or `cargo install --locked cargo-deb`)");
    }
    run(cargo(&[
        "deb",
        "--locked",
        "--no-build",
        "--strip",
        "-p",
        "lb-userspace",
        "--output",
    ])
    .arg(&dist))?;
    let deb = std::fs::read_dir(&dist)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo deb wrote no package")?;
    Ok(deb)
}
