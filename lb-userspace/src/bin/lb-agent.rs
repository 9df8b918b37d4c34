//! `lb-agent --config FILE`: validates the configuration, then runs the
//! balancer and/or decapsulator until SIGINT or SIGTERM (the pinned datapath
//! keeps forwarding after it stops); `--cleanup` removes that datapath;
//! `--log-format json` writes one JSON object per log record;
//! `--datapath-log` adds the programs' records of packets dropped or passed.
use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, ValueEnum};
use lb_userspace::{agent, config::Config};

#[derive(Parser)]
#[command(name = "lb-agent", version, about = "XDP layer-4 load balancer agent")]
struct Args {
    /// The TOML configuration file.
    #[arg(long, short, required_unless_present = "generate_docs")]
    config: Option<PathBuf>,
    /// How log records are written to stderr: `text` for people, `json`
    /// (one object per line) for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Write man pages and shell completions under DIR, then exit (used
    /// to build the package).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
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
    /// Log why the datapath drops or passes each packet (outcome, protocol,
    /// addresses, ports; forwarded packets are not logged), under the log
    /// target `lb_datapath`. For debugging: every such packet makes a
    /// record. Restarting the agent with or without it switches the running
    /// datapath without losing flows; off, it costs nothing per packet.
    #[arg(long, env = "LB_AGENT_DATAPATH_LOG")]
    datapath_log: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr at `RUST_LOG`'s level (`info` by default).
fn init_logs(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.generate_docs {
        return match lb_userspace::docs::generate(Args::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    init_logs(args.log_format);
    let config_path = args.config.expect("clap requires --config");
    let text = match std::fs::read_to_string(&config_path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("lb-agent: cannot read {}: {e}", config_path.display());
            return ExitCode::from(2);
        }
    };
    let mut config = match Config::from_toml(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "lb-agent: invalid configuration {}: {e}",
                config_path.display()
            );
            return ExitCode::from(2);
        }
    };
    config.datapath_log = args.datapath_log;
    if args.check {
        println!("{}: valid", config_path.display());
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
