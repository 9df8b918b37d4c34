//! Man pages and shell completions generated from a binary's clap
//! definition (`clap_mangen`, `clap_complete`), for the Debian package:
//! `cargo xtask dist` runs each binary's hidden generator.

use std::path::Path;

use anyhow::{Context as _, Result};
use clap_complete::Shell;

/// Writes `DIR/man/NAME.1` (and one page per subcommand,
/// `NAME-SUB.1`), and `DIR/completions/{NAME.bash, _NAME, NAME.fish}`.
pub fn generate(cmd: clap::Command, dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cmd = cmd;
    cmd.build();
    write_pages(&cmd, &man, cmd.get_name().to_string())?;
    let name = cmd.get_name().to_string();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}

/// The page of `cmd` (named `page`), then those of its visible subcommands.
fn write_pages(cmd: &clap::Command, dir: &Path, page: String) -> Result<()> {
    let path = dir.join(format!("{page}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(page.clone())
        .render(&mut out)
        .with_context(|| format!("rendering {page}.1"))?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, dir, format!("{page}-{}", sub.get_name()))?;
    }
    Ok(())
}
