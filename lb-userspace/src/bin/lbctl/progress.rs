//! `lbctl maintenance rollout --wait`: follows a rollout until it completes
//! (exit 0) or fails: cancelled, or a backend's hook failed (an error that
//! says what to do next). On a terminal a progress bar, otherwise one line
//! per change.

use std::{io::IsTerminal as _, net::IpAddr, path::Path, time::Duration};

use anyhow::{anyhow, bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lb_userspace::{
    api::{call, Request, Response, VipMaintenance},
    lifecycle::Phase,
};

/// How often the agent is asked.
const POLL: Duration = Duration::from_millis(500);

/// Where a rollout stands.
#[derive(Debug, PartialEq)]
struct Progress {
    done: u64,
    total: u64,
    /// What the backends not done are doing, e.g. "198.18.0.11 draining 40%".
    busy: Vec<String>,
    outcome: Option<Result<(), String>>,
}

fn progress(v: &VipMaintenance) -> Progress {
    let life = &v.life;
    let total = life.backends.len() as u64;
    let done = life
        .backends
        .values()
        .filter(|r| life.up_to_date(r) && r.phase == Phase::Active)
        .count() as u64;
    let busy = life
        .backends
        .iter()
        .filter(|(_, r)| r.phase != Phase::Active)
        .map(|(a, r)| match r.drain_progress() {
            Some(p) => format!("{a} {} {:.0}%", r.phase.name(), p * 100.0),
            None => format!("{a} {}", r.phase.name()),
        })
        .collect();
    let failed: Vec<(&IpAddr, Option<&String>)> = life
        .backends
        .iter()
        .filter(|(_, r)| r.phase == Phase::HookFailed)
        .map(|(a, r)| (a, r.last_error.as_ref()))
        .collect();
    let outcome = match (&life.rollout, failed.first()) {
        (_, Some((a, error))) => Some(Err(format!(
            "the maintenance hook of {a} failed{}; fix the backend, then `lbctl backend maintain {} {a}` runs the hook again, or `lbctl maintenance cancel {}` stops the rollout",
            error.map(|e| format!(": {e}")).unwrap_or_default(),
            life.name,
            life.name
        ))),
        (Some(r), None) if r.cancelled_ms.is_some() => Some(Err(format!(
            "the rollout of {} was cancelled; `lbctl maintenance rollout {} --wait` starts another",
            life.name, life.name
        ))),
        (Some(r), None) if r.finished_ms.is_some() => Some(Ok(())),
        (None, None) => Some(Err(format!("{} has no rollout", life.name))),
        _ => None,
    };
    Progress {
        done,
        total,
        busy,
        outcome,
    }
}

async fn vip_state(socket: &Path, vip: &str) -> Result<VipMaintenance> {
    match call(socket, &Request::MaintenanceStatus).await? {
        Response::MaintenanceStatus { vips } => vips
            .into_iter()
            .find(|v| v.life.name == vip)
            .ok_or_else(|| anyhow!("VIP {vip} is gone from the agent's configuration")),
        Response::Error { message } => Err(anyhow!(message)),
        other => Err(anyhow!("unexpected response: {other:?}")),
    }
}

/// Follows the rollout of `vip` until it ends.
pub async fn wait_rollout(socket: &Path, vip: &str) -> Result<()> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} rollout of {prefix}: [{bar:30}] {pos}/{len} backends  {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(vip.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last: Option<Progress> = None;
    loop {
        let p = progress(&vip_state(socket, vip).await?);
        match &bar {
            Some(bar) => {
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(p.busy.join(", "));
            }
            None if last.as_ref() != Some(&p) => {
                println!(
                    "rollout of {vip}: {}/{} backends done{}",
                    p.done,
                    p.total,
                    if p.busy.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", p.busy.join(", "))
                    }
                );
            }
            None => {}
        }
        match &p.outcome {
            Some(Ok(())) => {
                if let Some(bar) = &bar {
                    bar.finish_with_message("complete");
                }
                println!(
                    "rollout of {vip} complete: {}/{} backends up to date",
                    p.done, p.total
                );
                return Ok(());
            }
            Some(Err(why)) => {
                if let Some(bar) = &bar {
                    bar.abandon_with_message("failed");
                }
                bail!("{why}");
            }
            None => {}
        }
        last = Some(p);
        tokio::time::sleep(POLL).await;
    }
}
