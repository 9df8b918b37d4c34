//! The VIPs this node announces through BIRD: the routes of `[announce]
//! table` follow what the balancer can serve, and go when the node is
//! drained (`lbctl node drain`, kept across restarts) or the agent stops.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use super::state::{Shared, State};
use crate::{
    announce::Announcer,
    api::{NodeAction, NodeStatus, Response, WithheldVip},
    config::{AnnounceConfig, BalancerConfig},
    limits::LogEvery,
};

/// The announcement's state, behind the agent's lock.
pub(crate) struct Announce {
    announcer: Announcer,
    /// Present while the node is drained.
    drain_file: PathBuf,
    drained: bool,
    /// Set once the agent stops: nothing is announced any more.
    stopping: bool,
    /// What the table held after the last sync.
    announced: BTreeSet<IpAddr>,
    error: Option<String>,
}

/// Where the drain mark is kept: beside the lifecycle state file.
fn drain_file(b: &BalancerConfig) -> PathBuf {
    b.state_file.with_extension("drained")
}

impl Announce {
    /// Opens the table and reads whether the node was drained before a restart.
    pub(crate) async fn start(cfg: &AnnounceConfig, b: &BalancerConfig) -> Result<Self> {
        let announcer = Announcer::new(cfg.table).await?;
        let drain_file = drain_file(b);
        let drained = drain_file.exists();
        if drained {
            info!(file = %drain_file.display(), "the node is drained: no VIP is announced");
        }
        Ok(Self {
            announcer,
            drain_file,
            drained,
            stopping: false,
            announced: BTreeSet::new(),
            error: None,
        })
    }
}

/// The addresses to announce now, and those withheld with the reason.
fn wanted(st: &State, a: &Announce) -> (BTreeSet<IpAddr>, Vec<WithheldVip>) {
    let mut wanted = BTreeSet::new();
    let mut withheld = Vec::new();
    let Some(bal) = &st.balancer else {
        return (wanted, withheld);
    };
    for (address, servable) in bal.servable_addresses() {
        let reason = if a.stopping {
            "the agent is stopping"
        } else if a.drained {
            "the node is drained"
        } else if !servable {
            "no usable backend"
        } else {
            wanted.insert(address);
            continue;
        };
        withheld.push(WithheldVip {
            address,
            reason: reason.to_string(),
        });
    }
    (wanted, withheld)
}

/// Brings the table in line with what the node can serve.
async fn sync(st: &mut State) {
    let Some(a) = st.announce.as_ref() else {
        return;
    };
    let (wanted, _) = wanted(st, a);
    let announcer = a.announcer.clone();
    let result = announcer.sync(&wanted).await;
    let Some(a) = st.announce.as_mut() else {
        return;
    };
    match result {
        Ok(changes) => {
            for address in &changes.added {
                info!(vip = %address, table = announcer.table(), "announced");
            }
            for address in &changes.removed {
                info!(vip = %address, table = announcer.table(), "withdrawn");
            }
            a.announced = wanted;
            a.error = None;
        }
        Err(e) => a.error = Some(format!("{e:#}")),
    }
}

/// Keeps the announcement in line every `every`.
pub(crate) async fn keep(state: Shared, every: Duration) {
    let mut warn_every = LogEvery::new(Duration::from_secs(60));
    loop {
        {
            let mut st = state.lock().await;
            sync(&mut st).await;
            if let Some(e) = st.announce.as_ref().and_then(|a| a.error.clone()) {
                if let Some(held) = warn_every.ready() {
                    warn!(held, "announcing the VIPs: {e}");
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Withdraws every VIP: the agent stops.
pub(crate) async fn withdraw_all(state: &Shared) {
    let mut st = state.lock().await;
    if let Some(a) = st.announce.as_mut() {
        a.stopping = true;
    } else {
        return;
    }
    sync(&mut st).await;
    if let Some(e) = st.announce.as_ref().and_then(|a| a.error.as_ref()) {
        warn!("withdrawing the VIPs on the way out: {e}");
    }
}

fn set_mark(path: &Path, drained: bool) -> Result<()> {
    if drained {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, b"drained by lbctl node drain\n")
            .with_context(|| format!("writing the drain mark {}", path.display()))
    } else {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing the drain mark {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

/// `lbctl node drain|undrain|status`.
pub(crate) async fn node(state: &Shared, action: NodeAction) -> Result<Response> {
    let mut st = state.lock().await;
    let a = st.announce.as_mut().context(
        "this agent announces no VIPs: give it an [announce] section to drain it through BIRD",
    )?;
    let drained = match action {
        NodeAction::Drain => Some(true),
        NodeAction::Undrain => Some(false),
        NodeAction::Status => None,
    };
    if let Some(drained) = drained {
        if a.drained != drained {
            // The mark first: a drain that cannot be kept is refused.
            set_mark(&a.drain_file, drained)?;
            a.drained = drained;
            info!(drained, "node drain changed by an operator");
        }
        sync(&mut st).await;
    }
    Ok(Response::Node(node_status(&st)))
}

/// What `lbctl node status` and the metrics show.
pub(crate) fn node_status(st: &State) -> NodeStatus {
    let Some(a) = st.announce.as_ref() else {
        return NodeStatus::default();
    };
    let (_, withheld) = wanted(st, a);
    NodeStatus {
        drained: a.drained,
        table: a.announcer.table(),
        announced: a.announced.iter().copied().collect(),
        withheld,
        error: a.error.clone(),
    }
}
