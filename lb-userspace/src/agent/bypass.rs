//! Bypass in the agent. On a client host (`[datapath] bypass_source` with
//! `[bypass] listen`): `lb_source` runs on the interfaces in place of
//! `lb_ingress` (which it hands other frames to), instructions are received
//! on a UDP socket and checked by the intermediary, and a sweep ends the
//! entries whose backend left the VIP or whose flow went idle. On a backend
//! host (`[decap]` with `[bypass] intermediaries`): see `send`.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::{maps::ProgramArray, programs::Xdp, Ebpf};
use tokio::net::UdpSocket;
use tracing::{info, warn};

use super::state::{wall_ms, Shared};
use crate::{
    bypass::{
        intermediary::{BalancerTables, Intermediary},
        KeyRing, Verifier, DEFAULT_MAX_NONCES,
    },
    config::{BypassConfig, Config},
    datapath::{BypassMaps, Pins},
    limits::LogEvery,
};

/// The source intermediary's part of the agent's state.
pub(crate) struct Source {
    pub(crate) maps: BypassMaps,
    pub(crate) intermediary: Intermediary,
    /// Per entry, its packet count at the last sweep and since when it has
    /// not moved.
    idle: HashMap<lb_common::FlowKey, (u64, u64)>,
    pub(crate) revoked_by_sweep: u64,
    keys: KeyFile,
}

/// A key file followed for rotation: read again when its modification time
/// changes; a file that no longer reads keeps the ring in use (logged).
pub(crate) struct KeyFile {
    path: std::path::PathBuf,
    modified: Option<std::time::SystemTime>,
}

impl KeyFile {
    pub(crate) fn new(path: &Path) -> KeyFile {
        KeyFile {
            path: path.to_path_buf(),
            modified: modified(path),
        }
    }

    /// The new ring if the file changed and reads.
    pub(crate) fn changed(&mut self) -> Option<KeyRing> {
        let now = modified(&self.path);
        if now == self.modified {
            return None;
        }
        self.modified = now;
        match read_keys(&self.path) {
            Ok(ring) => {
                info!(keys = ?ring, "bypass: key file read again");
                Some(ring)
            }
            Err(e) => {
                warn!("bypass: {e:#}; the keys in use stay");
                None
            }
        }
    }
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads a key file (errors name the file and the field).
pub(crate) fn read_keys(path: &Path) -> Result<KeyRing> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("bypass.key_file: reading {}", path.display()))?;
    KeyRing::parse(&text).with_context(|| format!("bypass.key_file {}", path.display()))
}

/// Whether this configuration runs the source intermediary.
pub(crate) fn is_source(config: &Config) -> bool {
    config
        .balancer
        .as_ref()
        .is_some_and(|b| b.datapath.bypass_source)
}

/// Loads `lb_source` and makes `lb_ingress` the program it hands other
/// frames to. `BYPASS_NEXT` is pinned in the instance's directory, so the
/// hand-over keeps working while no agent runs.
pub(crate) fn load_source(ebpf: &mut Ebpf, pins: &Pins) -> Result<()> {
    let prog: &mut Xdp = ebpf
        .program_mut("lb_source")
        .context("the eBPF object has no program lb_source")?
        .try_into()?;
    prog.load().context("loading lb_source (verifier)")?;
    let map = ebpf
        .take_map("BYPASS_NEXT")
        .context("the eBPF object has no BYPASS_NEXT")?;
    let mut next = ProgramArray::try_from(map)?;
    let ingress: &Xdp = ebpf
        .program("lb_ingress")
        .context("the eBPF object has no program lb_ingress")?
        .try_into()?;
    next.set(0, ingress.fd()?, 0)
        .context("writing BYPASS_NEXT")?;
    let pin = pins.dir().join("bypass-next");
    let _ = std::fs::remove_file(&pin);
    next.pin(&pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

fn start_source(ebpf: &mut Ebpf, bp: &BypassConfig) -> Result<Source> {
    // Validation made sure a source intermediary has its key file.
    let key_file = bp
        .key_file
        .as_deref()
        .context("bypass.key_file: a source intermediary needs it")?;
    let ring = read_keys(key_file)?;
    info!(keys = ?ring, "bypass: source intermediary");
    Ok(Source {
        maps: BypassMaps::new(ebpf)?,
        intermediary: Intermediary::new(Verifier::new(ring, bp.window_ms, DEFAULT_MAX_NONCES)),
        idle: HashMap::new(),
        revoked_by_sweep: 0,
        keys: KeyFile::new(key_file),
    })
}

/// What a configuration's bypass roles start with, before the state exists.
pub(crate) struct Parts {
    source: Option<Source>,
    socket: Option<UdpSocket>,
    sender: Option<super::bypass_send::Sender>,
    follower: Option<super::bypass_fleet::Follower>,
}

/// Fills the bypass maps, reads the keys and binds the instruction socket.
pub(crate) async fn start(ebpf: &mut Ebpf, config: &Config) -> Result<Parts> {
    let (sender, follower) = match super::bypass_send::start(ebpf, config)? {
        Some((sender, follower)) => (Some(sender), follower),
        None => (None, None),
    };
    let Some(bp) = &config.bypass else {
        return Ok(Parts {
            source: None,
            socket: None,
            sender,
            follower,
        });
    };
    let source = if is_source(config) {
        Some(start_source(ebpf, bp)?)
    } else {
        None
    };
    let socket = if source.is_some() {
        bind(bp).await?
    } else {
        None
    };
    Ok(Parts {
        source,
        socket,
        sender,
        follower,
    })
}

/// Puts the parts in the state and starts their loops.
pub(crate) async fn spawn(
    state: &Shared,
    config: &Config,
    parts: Parts,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    {
        let mut st = state.lock().await;
        st.bypass = parts.source;
        st.bypass_sent = parts.sender.as_ref().map(|s| s.stats.clone());
    }
    if let Some(sender) = parts.sender {
        tasks.push(tokio::spawn(super::bypass_send::run(sender)));
    }
    if let (Some(follower), Some(fleet)) = (parts.follower, &config.fleet) {
        tasks.push(tokio::spawn(super::bypass_fleet::follow(
            follower,
            fleet.clone(),
        )));
    }
    if let (Some(socket), Some(bp)) = (parts.socket, &config.bypass) {
        tasks.push(tokio::spawn(receive(state.clone(), socket)));
        tasks.push(tokio::spawn(sweep(
            state.clone(),
            Duration::from_secs(1),
            Duration::from_secs(bp.idle_timeout_s),
        )));
    }
}

/// Receives instructions on `socket` and applies the accepted ones.
pub(crate) async fn receive(state: Shared, socket: UdpSocket) {
    let mut buf = [0u8; 2048];
    let mut log = LogEvery::new(Duration::from_secs(10));
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                warn!("bypass: receiving: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut guard = state.lock().await;
        let s = &mut *guard;
        let (Some(balancer), Some(source)) = (s.balancer.as_ref(), s.bypass.as_mut()) else {
            continue;
        };
        let mut tables = BalancerTables {
            balancer,
            maps: &mut source.maps,
        };
        match source
            .intermediary
            .receive(&buf[..n], wall_ms(), &mut tables)
        {
            Ok(i) => tracing::debug!(%from, ?i, "bypass: instruction applied"),
            Err(r) => {
                if log.ready().is_some() {
                    warn!(%from, reason = r.reason(), "bypass: instruction refused: {r}");
                }
            }
        }
    }
}

/// Every `every`: ends entries whose backend is no longer the VIP's (down,
/// disabled, removed, or its id given to another backend) and entries idle
/// for `idle`.
pub(crate) async fn sweep(state: Shared, every: Duration, idle: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let mut guard = state.lock().await;
        let s = &mut *guard;
        let (Some(balancer), Some(source)) = (s.balancer.as_ref(), s.bypass.as_mut()) else {
            continue;
        };
        if let Some(ring) = source.keys.changed() {
            source.intermediary.verifier_mut().set_ring(ring);
        }
        if let Err(e) = sweep_once(balancer, source, wall_ms(), idle.as_millis() as u64) {
            warn!("bypass: sweep: {e:#}");
        }
    }
}

fn sweep_once(
    balancer: &crate::balancer::Balancer<crate::datapath::KernelDatapath>,
    source: &mut Source,
    now_ms: u64,
    idle_ms: u64,
) -> Result<()> {
    let ids: BTreeMap<u32, std::net::IpAddr> = balancer.backend_ids().into_iter().collect();
    let entries = source.maps.entries()?;
    let mut seen = HashMap::new();
    for (key, entry) in entries {
        let flow = flow_of(&key);
        let protocol = crate::config::Protocol::from_number(key.proto);
        let still = match (ids.get(&entry.backend_id), protocol) {
            (Some(addr), Some(p)) => {
                balancer.bypass_target(flow.vip.ip(), flow.vip.port(), p, *addr)
                    == Some(entry.backend_id)
            }
            _ => false,
        };
        let (last_packets, since) = source.idle.get(&key).copied().unwrap_or((u64::MAX, now_ms));
        let since = if entry.packets != last_packets {
            now_ms
        } else {
            since
        };
        if !still || now_ms.saturating_sub(since) >= idle_ms {
            if source.maps.remove(&key)? {
                source.revoked_by_sweep += 1;
            }
            continue;
        }
        seen.insert(key, (entry.packets, since));
    }
    source.idle = seen;
    Ok(())
}

/// The flow a key stands for (client → VIP).
pub(crate) fn flow_of(key: &lb_common::FlowKey) -> crate::bypass::Flow {
    let src = lb_common::addr_from_bytes(key.src, key.family);
    let dst = lb_common::addr_from_bytes(key.dst, key.family);
    crate::bypass::Flow {
        protocol: key.proto,
        client: std::net::SocketAddr::new(src, u16::from_be(key.sport)),
        vip: std::net::SocketAddr::new(dst, u16::from_be(key.dport)),
    }
}

/// Binds the instruction socket.
async fn bind(bp: &BypassConfig) -> Result<Option<UdpSocket>> {
    let Some(addr) = bp.listen else {
        return Ok(None);
    };
    let socket = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("bypass.listen: binding {addr}"))?;
    info!(%addr, "bypass: receiving instructions");
    Ok(Some(socket))
}

/// What `lbctl status` and the metrics show of bypass, if this agent has a
/// part in it.
pub(crate) fn status(st: &super::state::State) -> Result<Option<crate::api::BypassStatus>> {
    let (sent, send_errors) = st.bypass_sent.as_ref().map_or((0, 0), |s| {
        use std::sync::atomic::Ordering::Relaxed;
        (s.sent.load(Relaxed), s.errors.load(Relaxed))
    });
    let Some(source) = &st.bypass else {
        return Ok(st.bypass_sent.as_ref().map(|_| crate::api::BypassStatus {
            sent,
            send_errors,
            ..Default::default()
        }));
    };
    let stats = source.maps.stats()?;
    let i = &source.intermediary;
    Ok(Some(crate::api::BypassStatus {
        entries: source.maps.entries()?.len() as u64,
        accepted: i.accepted(),
        revoked: i.revoked(),
        refused: i
            .refused()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        ended_by_agent: source.revoked_by_sweep,
        packets_direct: stats[lb_common::BYPASS_SENT_DIRECT as usize],
        packets_to_lb: stats[lb_common::BYPASS_PASSED as usize],
        ended_by_datapath: stats[lb_common::BYPASS_ENDED as usize],
        packets_refreshed: stats[lb_common::BYPASS_REFRESHED as usize],
        sent,
        send_errors,
    }))
}

/// The intermediary's bypassed flows for `lbctl report`, largest first,
/// with what it sent on each leg; empty on an agent that is none.
pub(crate) fn bypassed_flows(
    st: &super::state::State,
    backends: &[(u32, std::net::IpAddr)],
    now_ns: u64,
) -> Result<Vec<crate::api::BypassedFlow>> {
    let Some(source) = &st.bypass else {
        return Ok(Vec::new());
    };
    let mut entries = source.maps.entries()?;
    entries.sort_unstable_by_key(|(_, e)| std::cmp::Reverse(e.bytes));
    Ok(entries
        .iter()
        .map(|(key, e)| {
            let flow = flow_of(key);
            crate::api::BypassedFlow {
                client: flow.client,
                vip: flow.vip,
                protocol: crate::config::Protocol::from_number(key.proto)
                    .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
                backend: backends
                    .iter()
                    .find(|(id, _)| *id == e.backend_id)
                    .map(|(_, a)| *a),
                bypassed: true,
                client_to_backend: crate::collector::Leg {
                    packets: e.packets,
                    bytes: e.bytes,
                },
                client_to_lb_packets: u64::from(e.lb_packets),
                idle_s: (e.last_ns != 0).then(|| now_ns.saturating_sub(e.last_ns) as f64 / 1e9),
            }
        })
        .collect())
}
