//! The control API between `lbctl` and `lb-agent`: one JSON request per line
//! on a Unix socket only root can use, one JSON response line back.

use std::{net::IpAddr, path::Path};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use crate::config::Protocol;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Apply a whole new configuration (the TOML text of the file).
    Apply {
        config: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Applied(ApplySummary),
    Error { message: String },
}

/// Datapath counters of a VIP or a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets in from clients (each is sent on to a backend once).
    pub packets: u64,
    /// Bytes in, as received.
    pub bytes: u64,
    /// Bytes out to backends, encapsulation included.
    pub bytes_out: u64,
    pub new_flows: u64,
    /// Flows the client closed with FIN / RST.
    pub closed_fin: u64,
    pub closed_rst: u64,
}

impl From<lb_common::TrafficCounters> for Counters {
    fn from(c: lb_common::TrafficCounters) -> Self {
        Counters {
            packets: c.packets,
            bytes: c.bytes,
            bytes_out: c.bytes_out,
            new_flows: c.new_flows,
            closed_fin: c.closed_fin,
            closed_rst: c.closed_rst,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NextHopStatus {
    pub ifindex: u32,
    pub mac: String,
}

/// A backend as one VIP uses it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipBackendStatus {
    pub address: IpAddr,
    pub weight: u32,
    /// Slots this backend holds in the VIP's Maglev table.
    pub maglev_slots: u32,
}

/// A backend host, with the traffic it received over all VIPs it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub backend_id: u32,
    pub next_hop: Option<NextHopStatus>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub vip_id: u32,
    pub counters: Counters,
    pub backends: Vec<VipBackendStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutcomeStatus {
    pub outcome: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub program: String,
    pub mode: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecapStatus {
    pub addresses: Vec<IpAddr>,
    pub outcomes: Vec<OutcomeStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub interfaces: Vec<InterfaceStatus>,
    pub maglev_table_size: u32,
    pub vips: Vec<VipStatus>,
    pub backends: Vec<BackendStatus>,
    pub outcomes: Vec<OutcomeStatus>,
    pub decap: Option<DecapStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplySummary {
    pub vips_added: u32,
    pub vips_removed: u32,
    pub vips_changed: u32,
    pub vips_unchanged: u32,
    pub backends_added: u32,
    pub backends_removed: u32,
}

/// Sends one request to the agent and waits for its response.
pub async fn call(socket: &Path, request: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach lb-agent at {}: is the agent running (and are you root)?",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    write.shutdown().await?;
    let mut reply = String::new();
    BufReader::new(read).read_line(&mut reply).await?;
    if reply.is_empty() {
        bail!("lb-agent closed the connection without answering");
    }
    serde_json::from_str(&reply).context("lb-agent sent a response lbctl does not understand")
}
