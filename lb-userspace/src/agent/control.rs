//! The control API: one JSON request per connection on the Unix socket, from
//! root only, and one handler per request.

use std::{collections::BTreeSet, future::Future, net::IpAddr, sync::Arc, time::Duration};

use anyhow::{anyhow, Result};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore},
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
const MAX_REQUEST: usize = 16 << 20;
/// Request bytes the agent holds at once over all connections: a request
/// that would take more gets an error.
const REQUEST_BUDGET: usize = 64 << 20;
/// Time a client has to send its whole request, and to read the response.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections open at once; more wait in the socket's backlog.
const MAX_CONNECTIONS: usize = 16;

/// What one connection may ask of the agent.
#[derive(Debug, Clone)]
struct RequestLimits {
    /// Request bytes held at once over all connections (a permit a byte),
    /// out of `budget_bytes`.
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    max_request: usize,
    read_timeout: Duration,
    write_timeout: Duration,
}

impl RequestLimits {
    fn new(budget_bytes: usize, max_request: usize, timeouts: (Duration, Duration)) -> Self {
        RequestLimits {
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            max_request,
            read_timeout: timeouts.0,
            write_timeout: timeouts.1,
        }
    }
}

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
    let limits = RequestLimits::new(REQUEST_BUDGET, MAX_REQUEST, (READ_TIMEOUT, WRITE_TIMEOUT));
    limits::serve(listener, bound, shutdown, |stream| {
        let (state, resolver, limits) = (state.clone(), resolver.clone(), limits.clone());
        async move {
            let stop = state.clone();
            let handler = |req| async move { handle(req, &state, &resolver).await };
            match answer(stream, &limits, handler).await {
                // The agent stops once `lbctl shutdown` has its answer.
                Ok(Response::ShuttingDown { .. }) => stop.lock().await.stop.notify_one(),
                Ok(_) => {}
                Err(e) => warn!("control connection: {e:#}"),
            }
        }
    })
    .await;
}

/// Answers one connection: checks who it is from, reads its request within
/// `limits`, and writes what `handler` makes of it (or why there is no
/// request to handle). Returns the response sent.
async fn answer<F, Fut>(stream: UnixStream, limits: &RequestLimits, handler: F) -> Result<Response>
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let cred = stream.peer_cred()?;
    let (mut read, mut write) = stream.into_split();
    // The request's share of the budget is held until its response is out.
    let mut held = None;
    let response = if cred.uid() != 0 {
        Err("the control API is for root only".to_string())
    } else {
        read_request(&mut read, limits, &mut held)
            .await
            .and_then(|r| parse(&r))
    };
    let response = match response {
        Ok(req) => handler(req).await,
        Err(message) => Response::Error { message },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    tokio::time::timeout(limits.write_timeout, write.write_all(out.as_bytes()))
        .await
        .map_err(|_| {
            let s = limits.write_timeout.as_secs();
            anyhow!("the client did not read its response within {s} s")
        })??;
    drop(held);
    Ok(response)
}

/// Reads one request line (or up to the end of the stream), within the
/// read timeout and the size limit, taking the memory it needs from the
/// budget into `held`. Errors are messages for the client.
async fn read_request(
    read: &mut (impl AsyncRead + Unpin),
    limits: &RequestLimits,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<Vec<u8>, String> {
    let deadline = tokio::time::Instant::now() + limits.read_timeout;
    let mut request = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = match tokio::time::timeout_at(deadline, read.read(&mut chunk)).await {
            Err(_) => {
                let s = limits.read_timeout.as_secs_f64();
                return Err(format!("no complete request within {s} s"));
            }
            Ok(Err(e)) => return Err(format!("reading the request: {e}")),
            Ok(Ok(n)) => n,
        };
        let line_end = chunk[..n].iter().position(|b| *b == b'\n');
        let part = &chunk[..line_end.unwrap_or(n)];
        if request.len() + part.len() > limits.max_request {
            let mib = limits.max_request >> 20;
            return Err(format!("the request is larger than {mib} MiB"));
        }
        if request.capacity() - request.len() < part.len() {
            let grown = (request.capacity() * 2)
                .max(request.len() + part.len())
                .min(limits.max_request);
            let more = u32::try_from(grown - request.capacity()).expect("at most max_request");
            let permit = limits
                .budget
                .clone()
                .try_acquire_many_owned(more)
                .map_err(|_| {
                    let mib = limits.budget_bytes >> 20;
                    format!("too many large requests at once (over {mib} MiB in all); try again")
                })?;
            match held {
                Some(h) => h.merge(permit),
                None => *held = Some(permit),
            }
            request.reserve_exact(grown - request.len());
        }
        request.extend_from_slice(part);
        if line_end.is_some() || n == 0 {
            return Ok(request);
        }
    }
}

fn parse(request: &[u8]) -> Result<Request, String> {
    let text =
        std::str::from_utf8(request).map_err(|e| format!("malformed request: not UTF-8 ({e})"))?;
    serde_json::from_str(text).map_err(|e| format!("malformed request: {e}"))
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
        Request::Shutdown { detach } => Ok(shutdown(&mut *state.lock().await, detach)),
        Request::Node { action } => super::announce::node(state, action).await,
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

/// `lbctl shutdown [--detach]`: the agent stops once the answer is sent.
fn shutdown(st: &mut State, detach: bool) -> Response {
    st.detach = detach;
    info!(detach, "shutdown requested");
    Response::ShuttingDown { detach }
}

/// `lbctl maintenance status`.
pub(super) fn maintenance_status(st: &State) -> Response {
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
    if let Some(prefix) = fleet_managed(&state.lock().await.config) {
        return Err(anyhow!(
            "this balancer takes its VIPs from the fleet store ({prefix}/vips): change them with `lbctl fleet vips set`"
        ));
    }
    switch(new, state, resolver).await
}

/// The store's key prefix when the balancer's VIPs come from a fleet.
fn fleet_managed(config: &Config) -> Option<String> {
    let fleet = config.fleet.as_ref()?;
    config.balancer.as_ref().map(|_| fleet.prefix.clone())
}

/// Switches the agent to `new`, a validated configuration, as a whole: the
/// VIPs, backends and weights change, start-up settings must not.
pub(super) async fn switch(
    new: Config,
    state: &Shared,
    resolver: &Resolver,
) -> Result<ApplySummary> {
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
    st.collector
        .set_timeouts(&b.visibility, u64::from(b.datapath.flow_table_size));
    st.config = new;
    Ok(summary)
}

#[cfg(test)]
mod tests;
