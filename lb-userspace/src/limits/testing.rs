//! Helpers for tests that need a process of their own, a socket path,
//! captured logs or the resident memory.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};

/// A fresh path for a Unix socket in the temporary directory.
pub(crate) fn socket_path(name: &str) -> std::path::PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("lb-{name}-{}-{n}.sock", std::process::id()))
}

/// Where captured log lines go.
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the log lines written (on this thread) while the guard lives.
pub(crate) fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || Logs(writer.clone()))
        .with_ansi(false)
        .finish();
    (buf, tracing::subscriber::set_default(subscriber))
}

/// Resident memory of this process in bytes.
pub(crate) fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Samples resident memory every 2 ms until `growth` is asked for.
pub(crate) struct PeakRss {
    before: u64,
    done: Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<u64>,
}

impl PeakRss {
    pub(crate) fn start() -> Self {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let before = rss();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss());
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak.max(rss())
        });
        PeakRss {
            before,
            done,
            sampler,
        }
    }

    /// How much higher than at the start resident memory went, in MiB.
    pub(crate) fn growth_mib(self) -> u64 {
        self.done.store(true, Ordering::Relaxed);
        let peak = self.sampler.join().unwrap();
        peak.saturating_sub(self.before) >> 20
    }
}

/// Runs the test `name` (its path from the crate root) alone in a child
/// process, for tests that change process-wide settings such as resource
/// limits; returns true in that child, false in the parent once the
/// child passed.
pub(crate) fn in_child(name: &str) -> bool {
    const CHILD: &str = "LB_TEST_CHILD";
    if std::env::var(CHILD).is_ok_and(|n| n == name) {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} in a child process:\n{text}"
    );
    false
}
