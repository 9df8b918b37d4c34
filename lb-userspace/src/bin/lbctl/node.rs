//! `lbctl node drain|undrain|status`: this LB node's BGP announcement.

use std::path::Path;

use anyhow::Result;
use clap::Subcommand;
use lb_userspace::api::{call, NodeAction, NodeStatus, Request, Response};

use super::{expect, print};

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Withdraw every VIP of this node from BGP (kept across agent
    /// restarts): the router moves its flows to the other LB nodes, whose
    /// tables send them to the same backends.
    Drain {
        #[arg(long)]
        json: bool,
    },
    /// Announce the servable VIPs again.
    Undrain {
        #[arg(long)]
        json: bool,
    },
    /// Drained or not, the VIPs announced and those withheld (with why).
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run_node(socket: &Path, command: NodeCommand) -> Result<()> {
    let (action, json) = match command {
        NodeCommand::Drain { json } => (NodeAction::Drain, json),
        NodeCommand::Undrain { json } => (NodeAction::Undrain, json),
        NodeCommand::Status { json } => (NodeAction::Status, json),
    };
    let status = expect(
        call(socket, &Request::Node { action }).await?,
        |r| match r {
            Response::Node(s) => Ok(s),
            other => Err(other),
        },
    )?;
    print(json, &status, print_node)
}

fn print_node(s: &NodeStatus) {
    let state = if s.drained { "drained" } else { "in service" };
    println!("node {state}; VIP routes in kernel table {}", s.table);
    for a in &s.announced {
        println!("  announced  {a}");
    }
    for w in &s.withheld {
        println!("  withheld   {}  ({})", w.address, w.reason);
    }
    if let Some(e) = &s.error {
        println!("  error: {e}");
    }
}
