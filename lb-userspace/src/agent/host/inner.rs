//! The source-side balancer of a host: an ordinary balancer instance
//! (`INSTANCE-host`, its own pins, lock and control socket) run by the
//! host agent on a thread of its own, and driven through its control API as
//! `lbctl` would drive it: `apply` for new VIPs and instances, `shutdown`
//! (with `--detach` on uninstall). Over pins a previous run left, it adopts
//! the datapath, so flows survive restarts of either agent.

use std::{path::Path, thread::JoinHandle, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use tracing::{info, warn};

use crate::{
    api::{call, Request, Response},
    config::Config,
    datapath,
};

/// Time a starting balancer has to load, attach and answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Time a stopping one has to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Inner {
    pub(super) config: Config,
    pub(super) text: String,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Inner {
    /// Starts the balancer and waits until its control API answers.
    pub(super) async fn start(config: Config, text: String) -> Result<Inner> {
        let run = config.clone();
        let thread = std::thread::Builder::new()
            .name("lb-host".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(super::super::run_object(
                    run,
                    datapath::EBPF_OBJECT,
                    std::future::pending(),
                ))
            })
            .context("starting the source-side balancer's thread")?;
        let mut inner = Inner {
            config,
            text,
            thread: Some(thread),
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if call(&inner.config.socket, &Request::Status).await.is_ok() {
                info!(
                    instance = inner.config.instance,
                    "source-side balancer running"
                );
                return Ok(inner);
            }
            if !inner.alive() {
                return Err(inner
                    .join()
                    .await
                    .err()
                    .unwrap_or_else(|| anyhow!("the source-side balancer stopped as it started")));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the source-side balancer did not answer within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    async fn join(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let joined = tokio::task::spawn_blocking(move || thread.join());
        match tokio::time::timeout(STOP_TIMEOUT, joined).await {
            Ok(Ok(Ok(result))) => result,
            Ok(Ok(Err(_))) => bail!("the source-side balancer panicked"),
            Ok(Err(e)) => bail!("waiting for the source-side balancer: {e}"),
            Err(_) => bail!("the source-side balancer did not stop within {STOP_TIMEOUT:?}"),
        }
    }

    /// Switches the running balancer to `config` (VIPs and instances; its
    /// interfaces are the same).
    pub(super) async fn apply(&mut self, config: Config, text: String) -> Result<()> {
        let request = Request::Apply {
            config: text.clone(),
        };
        match call(&self.config.socket, &request).await? {
            Response::Applied(summary) => {
                info!(?summary, "source-side balancer updated");
                self.config = config;
                self.text = text;
                Ok(())
            }
            Response::Error { message } => bail!("the source-side balancer refused: {message}"),
            other => bail!("unexpected answer from the source-side balancer: {other:?}"),
        }
    }

    /// Stops the balancer; with `detach`, its programs and maps go too.
    pub(super) async fn stop(mut self, detach: bool) -> Result<()> {
        if self.alive() {
            if let Err(e) = call(&self.config.socket, &Request::Shutdown { detach }).await {
                warn!("stopping the source-side balancer: {e:#}");
            }
        }
        self.join().await?;
        if detach {
            // Also when it had died: nothing of it may stay attached.
            remove(&self.config)?;
        }
        Ok(())
    }
}

/// Removes a source-side balancer's pinned datapath and socket, whether or
/// not it runs in this process (none may run: the caller owns the role).
pub(super) fn remove(config: &Config) -> Result<()> {
    let pins = datapath::Pins::new(&config.instance);
    if pins.exist() {
        pins.remove()?;
        info!(
            instance = config.instance,
            "source-side balancer detached and unpinned"
        );
    }
    let socket: &Path = &config.socket;
    if socket.exists() {
        let _ = std::fs::remove_file(socket);
    }
    Ok(())
}
