//! The control API: one JSON request per connection on the Unix socket, from
//! root only, and one handler per request.

use std::{collections::BTreeSet, future::Future, net::IpAddr, sync::Arc, time::Duration};

use anyhow::Result;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{info, warn};

use super::{
    report, resolve_all,
    state::{wall_ms, Shared, State},
    status,
};
use crate::{
    api::{ApplySummary, MaintenanceCommand, Request, Response, VipMaintenance},
    config::Config,
    limits::{self, Bound},
    nexthop::Resolver,
};

/// Largest request the API accepts (a configuration file, JSON-encoded).
const MAX_REQUEST: u64 = 16 << 20;

/// Control connections open at once; more wait in the socket's backlog.
const MAX_CONNECTIONS: usize = 16;

/// Serves the control API on `listener` until `shutdown` completes: one
/// task per connection, at most `MAX_CONNECTIONS` at once.
pub(crate) async fn accept(
    listener: UnixListener,
    state: &Shared,
    resolver: &Arc<Resolver>,
    shutdown: impl Future<Output = ()>,
) {
    let bound = Bound {
        name: "control",
        max_connections: MAX_CONNECTIONS,
    };
    limits::serve(listener, bound, shutdown, |stream| {
        let (state, resolver) = (state.clone(), resolver.clone());
        async move {
            let handler = |req| async move { handle(req, &state, &resolver).await };
            if let Err(e) = answer(stream, handler).await {
                warn!("control connection: {e:#}");
            }
        }
    })
    .await;
}

/// Answers one connection: reads its request, checks who sent it, and
/// writes what `handler` makes of it.
async fn answer<F, Fut>(stream: UnixStream, handler: F) -> Result<()>
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let response = if cred.uid() != 0 {
        Response::Error {
            message: "the control API is for root only".into(),
        }
    } else {
        let mut line = String::new();
        BufReader::new(read.take(MAX_REQUEST))
            .read_line(&mut line)
            .await?;
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => handler(req).await,
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        }
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

async fn handle(req: Request, state: &Shared, resolver: &Resolver) -> Response {
    let result = match req {
        Request::Status => {
            status::status(&*state.lock().await).map(|s| Response::Status(Box::new(s)))
        }
        Request::Apply { config } => apply(&config, state, resolver).await.map(Response::Applied),
        Request::Report(q) => report::report(state, &q)
            .await
            .map(|r| Response::Report(Box::new(r))),
        Request::Flows(q) => report::flows(state, &q).await,
        Request::Events { limit } => report::events(state, limit).await,
        Request::SetBackend {
            vip,
            backend,
            enabled,
        } => set_backend(state, &vip, backend, enabled).await,
        Request::Maintenance(cmd) => maintenance(state, cmd).await,
        Request::MaintenanceStatus => Ok(maintenance_status(&*state.lock().await)),
    };
    result.unwrap_or_else(|e| Response::Error {
        message: format!("{e:#}"),
    })
}

/// `lbctl backend enable|disable`.
async fn set_backend(
    state: &Shared,
    vip: &str,
    backend: IpAddr,
    enabled: bool,
) -> Result<Response> {
    let mut st = state.lock().await;
    let (bal, lifecycle) = st.balancer_and_lifecycle()?;
    let changed = lifecycle.set_disabled(bal, vip, backend, !enabled)?;
    if changed {
        st.save_lifecycle();
    }
    Ok(Response::BackendSet { changed })
}

/// `lbctl backend maintain|return` and `lbctl maintenance rollout|cancel`.
async fn maintenance(state: &Shared, cmd: MaintenanceCommand) -> Result<Response> {
    let mut st = state.lock().await;
    let (bal, lifecycle) = st.balancer_and_lifecycle()?;
    let now = wall_ms();
    let message = match &cmd {
        MaintenanceCommand::Maintain { vip, backend } => {
            let phase = lifecycle.maintain(bal, vip, *backend, now)?;
            format!("{backend} of {vip} is {}", phase.name())
        }
        MaintenanceCommand::Return { vip, backend } => {
            lifecycle.return_backend(bal, vip, *backend, now)?;
            format!("{backend} of {vip} is returning: it serves again once its health checks pass")
        }
        MaintenanceCommand::Rollout { vip } => {
            let n = lifecycle.rollout(bal, vip, now)?;
            format!("rollout of {vip} started: {n} backend(s) maintenance-pending")
        }
        MaintenanceCommand::Cancel { vip } => {
            let n = lifecycle.cancel(bal, vip, now)?;
            format!("maintenance of {vip} cancelled: {n} backend(s) back to active")
        }
    };
    st.save_lifecycle();
    Ok(Response::Maintenance { message })
}

/// `lbctl maintenance status`.
fn maintenance_status(st: &State) -> Response {
    let vips = st
        .lifecycle
        .vips()
        .map(|(life, cfg)| VipMaintenance {
            load_limit: cfg.maintenance.load_limit,
            min_spare: cfg.maintenance.min_spare,
            max_parallel: cfg.maintenance.max_parallel,
            drain_timeout_s: cfg.maintenance.drain_timeout_s,
            hook: cfg.maintenance.hook.clone(),
            life: life.clone(),
        })
        .collect();
    Response::MaintenanceStatus { vips }
}

/// `lbctl apply`: a new configuration, switched in as a whole.
async fn apply(text: &str, state: &Shared, resolver: &Resolver) -> Result<ApplySummary> {
    let new = Config::from_toml(text)?;
    state.lock().await.config.check_reload(&new)?;
    let Some(b) = &new.balancer else {
        // A decap-only agent: check_reload allowed only an identical config.
        return Ok(ApplySummary::default());
    };
    // Resolve next hops of new backends before the switch, outside the lock.
    let known: BTreeSet<IpAddr> = match &state.lock().await.balancer {
        Some(bal) => bal.backend_addresses().into_iter().collect(),
        None => BTreeSet::new(),
    };
    let fresh: Vec<IpAddr> = b
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|x| x.address))
        .filter(|a| !known.contains(a))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let next_hops = resolve_all(resolver, &fresh, Duration::from_secs(1)).await;
    let mut st = state.lock().await;
    st.config.check_reload(&new)?;
    let (bal, lifecycle) = st.balancer_and_lifecycle()?;
    let summary = bal.apply(b, &next_hops)?;
    info!(?summary, "configuration applied");
    lifecycle.sync(b, wall_ms());
    lifecycle.place_all(bal)?;
    st.save_lifecycle();
    st.collector.timeouts = Some((&b.visibility).into());
    st.config = new;
    Ok(summary)
}
