//! `lb-agent --config FILE`: validates the configuration, then runs the
//! balancer and/or decapsulator until SIGINT or SIGTERM.
use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use lb_userspace::{agent, config::Config};

#[derive(Parser)]
#[command(version, about = "XDP layer-4 load balancer agent")]
struct Args {
    /// The TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the configuration and exit without attaching anything.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("lb-agent: cannot read {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_toml(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "lb-agent: invalid configuration {}: {e}",
                args.config.display()
            );
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lb-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(config, agent::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
