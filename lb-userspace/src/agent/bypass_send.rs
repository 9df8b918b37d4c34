//! Bypass on a backend host (`[decap]` with `[bypass] intermediaries`):
//! `lb_decap` reports flows of bypass VIPs from client prefixes that have an
//! intermediary once they reach the VIP's `after_packets`; this loop seals
//! the instruction "flow → this backend" and sends it straight to that
//! intermediary (not through the LB). In a fleet, `bypass_fleet` fills the
//! maps and the keys from the store.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Result;
use aya::{
    maps::{MapData, RingBuf},
    Ebpf,
};
use lb_common::{addr_from_bytes, BypassEvent};
use tokio::net::UdpSocket;
use tracing::{info, warn};

use super::{bypass::read_keys, state::wall_ms};
use crate::{
    balancer::vip_key,
    bypass::{Instruction, KeyRing, Kind, Sealer},
    config::Config,
    datapath::DestMaps,
    limits::LogEvery,
};

/// Instructions sent and those that could not be.
#[derive(Default)]
pub(crate) struct SendStats {
    pub(crate) sent: AtomicU64,
    pub(crate) errors: AtomicU64,
}

pub(crate) struct Sender {
    ring: RingBuf<MapData>,
    /// The ring in use; `None` until the store gives one (events are then
    /// counted as send errors).
    keys: SharedKeys,
    pub(crate) stats: Arc<SendStats>,
    key_file: Option<super::bypass::KeyFile>,
}

pub(crate) type SharedKeys = Arc<std::sync::Mutex<Option<KeyRing>>>;

/// A backend host's part in bypass, if it has one: with `[decap]`, from its
/// file's `[bypass] intermediaries` and `vips`, or, with `[fleet]`, from the
/// store (the `Follower` fills the maps and, without a key file, the keys).
pub(crate) fn start(
    ebpf: &mut Ebpf,
    config: &Config,
) -> Result<Option<(Sender, Option<super::bypass_fleet::Follower>)>> {
    let bp = config.bypass.as_ref();
    let from_file = bp.is_some_and(|b| !b.intermediaries.is_empty());
    if config.decap.is_none() || !(from_file || config.fleet.is_some()) {
        return Ok(None);
    }
    let key_file = bp.and_then(|b| b.key_file.as_deref());
    let keys = key_file.map(read_keys).transpose()?;
    let (mut maps, ring) = DestMaps::new(ebpf)?;
    if let Some(bp) = bp {
        for (prefix, at) in &bp.intermediaries {
            maps.add_client_prefix(*prefix, *at)?;
        }
        for (address, port, protocol, after) in &bp.vips {
            maps.add_policy(&vip_key(*address, *port, *protocol), *after)?;
        }
    }
    info!(
        intermediaries = bp.map_or(0, |b| b.intermediaries.len()),
        vips = bp.map_or(0, |b| b.vips.len()),
        keys = ?keys,
        fleet = config.fleet.is_some(),
        "bypass: sending instructions for this backend"
    );
    let keys: SharedKeys = Arc::new(std::sync::Mutex::new(keys));
    let follower = config
        .fleet
        .as_ref()
        .map(|f| super::bypass_fleet::Follower {
            maps,
            keys: keys.clone(),
            keys_from_store: key_file.is_none(),
            node: f.node.clone(),
            status: Default::default(),
        });
    Ok(Some((
        Sender {
            ring,
            keys,
            stats: Arc::new(SendStats::default()),
            key_file: key_file.map(super::bypass::KeyFile::new),
        },
        follower,
    )))
}

fn instruction(e: &BypassEvent) -> (Instruction, SocketAddr) {
    let k = &e.key;
    let client = SocketAddr::new(addr_from_bytes(k.src, k.family), u16::from_be(k.sport));
    let vip = SocketAddr::new(addr_from_bytes(k.dst, k.family), u16::from_be(k.dport));
    let m = &e.intermediary;
    let to = SocketAddr::new(addr_from_bytes(m.addr, m.family), u16::from_be(m.port));
    (
        Instruction {
            kind: Kind::Bypass,
            flow: crate::bypass::Flow {
                protocol: k.proto,
                client,
                vip,
            },
            backend: addr_from_bytes(e.backend, e.backend_family),
        },
        to,
    )
}

/// Reads `lb_decap`'s events and sends the instructions.
pub(crate) async fn run(sender: Sender) {
    let Sender {
        ring,
        keys,
        stats,
        mut key_file,
    } = sender;
    let socket4 = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await;
    let socket6 = UdpSocket::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)).await;
    let mut fd =
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same for as long as the AsyncFd owns the ring buffer.
        match unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => {
                warn!("bypass: cannot poll the event ring buffer: {e}");
                return;
            }
        };
    let mut log = LogEvery::new(Duration::from_secs(10));
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let mut batch = Vec::new();
        {
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() == std::mem::size_of::<BypassEvent>() {
                    // SAFETY: the datapath writes whole BypassEvents; read unaligned.
                    batch.push(unsafe {
                        std::ptr::read_unaligned::<BypassEvent>(item.as_ptr().cast())
                    });
                }
            }
        }
        guard.clear_ready();
        if let Some(ring) = key_file.as_mut().and_then(|k| k.changed()) {
            *keys.lock().unwrap_or_else(|p| p.into_inner()) = Some(ring);
        }
        let sealed: Vec<_> = {
            let keys = keys.lock().unwrap_or_else(|p| p.into_inner());
            let Some(ring) = keys.as_ref() else {
                stats
                    .errors
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if log.ready().is_some() {
                    warn!("bypass: no keys in the store (lbctl bypass keys set): instructions not sent");
                }
                continue;
            };
            let sealer = Sealer::new(ring);
            batch
                .iter()
                .map(|e| {
                    let (i, to) = instruction(e);
                    (sealer.seal(i, wall_ms()), to)
                })
                .collect()
        };
        for (datagram, to) in sealed {
            let socket = if to.is_ipv4() { &socket4 } else { &socket6 };
            let result = match socket {
                Ok(s) => s.send_to(&datagram, to).await.map(|_| ()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            match result {
                Ok(()) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    if log.ready().is_some() {
                        warn!(%to, "bypass: sending an instruction: {err}");
                    }
                }
            }
        }
    }
}
