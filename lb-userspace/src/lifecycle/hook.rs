//! The maintenance hook runner: the operator's program with its environment,
//! in its own process group, killed as a whole at its timeout.

use std::{process::ExitStatus, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    process::Child,
};

use super::HookJob;

/// The end of the hook's standard error kept for its error message.
const TAIL_BYTES: usize = 4096;
/// The error message shows at most this much of the last line.
const LINE_CHARS: usize = 300;
/// How long standard error is still read after the hook exits (whatever it
/// left running may hold it open).
const AFTER_EXIT: Duration = Duration::from_secs(1);

/// The hook's outcome: success, or what went wrong (exit status, the last
/// line of its standard error, a timeout). The hook runs in its own process
/// group, which is killed as a whole at the timeout. Its standard output is
/// discarded; of its standard error only the end is kept.
pub async fn run_hook(job: &HookJob) -> std::result::Result<(), String> {
    let mut cmd = tokio::process::Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", job.argv[0]))?;
    let group = child.id();
    let mut tail = Tail::default();
    let run = wait_keeping_tail(&mut child, &mut tail);
    match tokio::time::timeout(Duration::from_secs(job.timeout_s), run).await {
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
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => {
            let line = tail.last_line();
            Err(if line.is_empty() {
                format!("{status}")
            } else {
                format!("{status}: {line}")
            })
        }
    }
}

/// Waits for the hook to exit while keeping the end of its standard error.
async fn wait_keeping_tail(child: &mut Child, tail: &mut Tail) -> std::io::Result<ExitStatus> {
    let stderr = child.stderr.take().expect("standard error is piped");
    let read = tail.read_from(stderr);
    tokio::pin!(read);
    let mut read_all = false;
    let status = tokio::select! {
        status = child.wait() => status?,
        () = &mut read => {
            read_all = true;
            child.wait().await?
        }
    };
    if !read_all {
        let _ = tokio::time::timeout(AFTER_EXIT, read).await;
    }
    Ok(status)
}

/// The last bytes of an output, at most `2 * TAIL_BYTES`.
#[derive(Debug, Default)]
struct Tail {
    kept: Vec<u8>,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.kept.extend_from_slice(bytes);
        if self.kept.len() > 2 * TAIL_BYTES {
            self.kept.drain(..self.kept.len() - TAIL_BYTES);
        }
    }

    /// Reads `output` to its end (or a read error), keeping its tail.
    async fn read_from(&mut self, mut output: impl AsyncRead + Unpin) {
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = output.read(&mut chunk).await {
            self.push(&chunk[..n]);
        }
    }

    /// The last non-blank line kept, cut to `LINE_CHARS` characters.
    fn last_line(&self) -> String {
        let text = String::from_utf8_lossy(&self.kept);
        let line = text.trim().lines().last().unwrap_or("");
        line.chars().take(LINE_CHARS).collect()
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

    /// 200 MB on each output: the agent keeps the end of standard error
    /// only, and its memory stays flat.
    #[tokio::test]
    async fn a_hook_that_writes_a_lot_costs_little_memory() {
        if !crate::limits::testing::in_child(
            "lifecycle::hook::tests::a_hook_that_writes_a_lot_costs_little_memory",
        ) {
            return;
        }
        let peak = crate::limits::testing::PeakRss::start();
        let e = run_hook(&job(
            "head -c 200000000 /dev/zero; head -c 200000000 /dev/zero >&2; \
             printf '\\nlast words\\n\\n' >&2; exit 4",
            60,
        ))
        .await
        .unwrap_err();
        let grew = peak.growth_mib();
        eprintln!("resident memory grew by {grew} MiB at most");
        assert!(e.ends_with("exit status: 4: last words"), "{e}");
        assert!(grew < 16, "resident memory grew by {grew} MiB");
    }

    /// Exit status 0 is success even when something the hook started still
    /// holds its standard error open.
    #[tokio::test]
    async fn a_hook_is_done_when_it_exits() {
        let started = std::time::Instant::now();
        let r = run_hook(&job("sleep 3.217 & echo started >&2; exit 0", 10)).await;
        assert_eq!(r, Ok(()));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn the_tail_keeps_the_end_only() {
        let mut t = Tail::default();
        for _ in 0..10_000 {
            t.push(&[b'x'; 1000]);
            assert!(t.kept.len() <= 2 * TAIL_BYTES);
        }
        t.push(b"\nfirst\nsecond line, the last\n\n");
        assert_eq!(t.last_line(), "second line, the last");
        t.push(&[b'y'; 1000]);
        assert_eq!(t.last_line(), "y".repeat(LINE_CHARS));
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
