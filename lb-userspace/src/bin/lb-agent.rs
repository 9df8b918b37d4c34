//! `lb-agent --config FILE`: validates the configuration, then runs the
//! balancer and/or decapsulator until SIGINT or SIGTERM (the pinned datapath
//! keeps forwarding after it stops); `--cleanup` removes that datapath.
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
    /// Remove the instance's pinned datapath (programs, maps, connection
    /// table) and its socket, then exit. Refused while an agent runs it.
    #[arg(long, conflicts_with = "check")]
    cleanup: bool,
    /// Load this eBPF object instead of the embedded one (a build of the
    /// same map layout, e.g. a datapath fix): it replaces the running
    /// program atomically.
    #[arg(long, value_name = "PATH")]
    ebpf_object: Option<PathBuf>,
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
    if args.cleanup {
        return match agent::cleanup(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lb-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let object = match &args.ebpf_object {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                eprintln!("lb-agent: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let run = agent::run_object(
        config,
        object
            .as_deref()
            .unwrap_or(lb_userspace::datapath::EBPF_OBJECT),
        agent::shutdown_signal(),
    );
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
