//! The maintenance hook runner: the operator's program with its environment,
//! in its own process group, killed as a whole at its timeout.

use std::time::Duration;

use super::HookJob;

/// The hook's outcome: success, or what went wrong (exit status, the end of
/// its standard error, a timeout). The hook runs in its own process group,
/// which is killed as a whole at the timeout.
pub async fn run_hook(job: &HookJob) -> std::result::Result<(), String> {
    let mut cmd = tokio::process::Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", job.argv[0]))?;
    let group = child.id();
    let run = tokio::time::timeout(Duration::from_secs(job.timeout_s), child.wait_with_output());
    match run.await {
        Err(_) => {
            if let Some(pid) = group {
                // SAFETY: kill(2) on the process group the hook leads.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            Err(format!(
                "timed out after {} s and was killed",
                job.timeout_s
            ))
        }
        Ok(Err(e)) => Err(format!("waiting for {}: {e}", job.argv[0])),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            Err(if tail.is_empty() {
                format!("{}", out.status)
            } else {
                format!("{}: {tail}", out.status)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(script: &str, timeout_s: u64) -> HookJob {
        HookJob {
            vip: (
                "198.18.10.1".parse().unwrap(),
                80,
                crate::config::Protocol::Tcp,
            ),
            backend: "198.18.0.11".parse().unwrap(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![
                ("LB_BACKEND".into(), "198.18.0.11".into()),
                ("LB_VIP_NAME".into(), "web".into()),
            ],
            timeout_s,
        }
    }

    #[tokio::test]
    async fn hooks_see_their_environment_and_report_failures() {
        assert_eq!(
            run_hook(&job(
                r#"test "$LB_BACKEND $LB_VIP_NAME" = "198.18.0.11 web""#,
                5
            ))
            .await,
            Ok(())
        );
        let e = run_hook(&job("echo starting; echo 'disk full' >&2; exit 3", 5))
            .await
            .unwrap_err();
        assert!(
            e.contains("exit status: 3") && e.contains("disk full"),
            "{e}"
        );
        let e = run_hook(&HookJob {
            argv: vec!["/nonexistent/upgrade".into()],
            ..job("", 5)
        })
        .await
        .unwrap_err();
        assert!(e.contains("cannot run /nonexistent/upgrade"), "{e}");
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed() {
        let started = std::time::Instant::now();
        // A background child too: the whole process group goes.
        let e = run_hook(&job("sleep 29.123 & sleep 29.123; wait", 1))
            .await
            .unwrap_err();
        assert!(e.contains("timed out after 1 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|d| std::fs::read(d.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains("29.123"))
            .count();
        assert_eq!(left, 0, "hook processes survived the timeout");
    }
}
