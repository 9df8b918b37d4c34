//! `lbctl`: the operator's CLI against a running `lb-agent`.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use lb_userspace::{
    api::{call, Request, Response, Status},
    config::{socket_text, Config, DEFAULT_SOCKET},
};

#[derive(Parser)]
#[command(version, about = "Control a running lb-agent")]
struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, env = "LBCTL_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show VIPs, backends, weights and counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply a new configuration file atomically (established flows are kept).
    Apply {
        /// The TOML configuration file.
        #[arg(long, short)]
        file: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn print_status(s: &Status) {
    for i in &s.interfaces {
        println!("interface {:<12} {:<11} {}", i.name, i.program, i.mode);
    }
    for v in &s.vips {
        println!();
        println!(
            "VIP {} {} {}  packets {}  bytes {}  new flows {}",
            v.name,
            v.protocol,
            socket_text(v.address, v.port),
            v.counters.packets,
            human_bytes(v.counters.bytes),
            v.counters.new_flows
        );
        println!("  {:<40} {:>6} {:>7}", "backend", "weight", "share");
        for b in &v.backends {
            let share = if s.maglev_table_size > 0 {
                100.0 * f64::from(b.maglev_slots) / f64::from(s.maglev_table_size)
            } else {
                0.0
            };
            println!(
                "  {:<40} {:>6} {:>6.1}%",
                b.address.to_string(),
                b.weight,
                share
            );
        }
    }
    if !s.backends.is_empty() {
        println!();
        println!("backends (traffic over all their VIPs):");
        println!(
            "  {:<40} {:>19} {:>10} {:>11} {:>10}",
            "backend", "next hop", "packets", "bytes", "new flows"
        );
        for b in &s.backends {
            let nh = b
                .next_hop
                .as_ref()
                .map(|n| n.mac.clone())
                .unwrap_or_else(|| "unresolved".into());
            println!(
                "  {:<40} {:>19} {:>10} {:>11} {:>10}",
                b.address.to_string(),
                nh,
                b.counters.packets,
                human_bytes(b.counters.bytes),
                b.counters.new_flows
            );
        }
    }
    if !s.outcomes.is_empty() {
        println!();
        println!("datapath outcomes:");
        for o in s.outcomes.iter().filter(|o| o.packets > 0) {
            println!(
                "  {:<24} {:>12} packets {:>12}",
                o.outcome,
                o.packets,
                human_bytes(o.bytes)
            );
        }
    }
    if let Some(d) = &s.decap {
        println!();
        let addrs: Vec<String> = d.addresses.iter().map(|a| a.to_string()).collect();
        println!("decapsulating for {}:", addrs.join(", "));
        for o in &d.outcomes {
            println!(
                "  {:<24} {:>12} packets {:>12}",
                o.outcome,
                o.packets,
                human_bytes(o.bytes)
            );
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Status { json } => match call(&cli.socket, &Request::Status).await? {
            Response::Status(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
            Response::Status(s) => print_status(&s),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected response: {other:?}"),
        },
        Command::Apply { file, json } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Same validation the agent does, so mistakes show before anything is sent.
            Config::from_toml(&text)
                .with_context(|| format!("invalid configuration {}", file.display()))?;
            match call(&cli.socket, &Request::Apply { config: text }).await? {
                Response::Applied(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
                Response::Applied(s) => println!(
                    "applied: {} VIPs added, {} changed, {} unchanged, {} removed; {} backends added, {} removed",
                    s.vips_added, s.vips_changed, s.vips_unchanged, s.vips_removed, s.backends_added, s.backends_removed
                ),
                Response::Error { message } => bail!("the agent refused the configuration: {message}"),
                other => bail!("unexpected response: {other:?}"),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Behave like other CLIs when piped into `head`: end quietly on a closed pipe.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
