//! The agent's own resources: the descriptor limit it raises at start.

use tracing::{info, warn};

/// The soft and hard limits on open descriptors.
fn file_limit() -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the rlimit it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((l.rlim_cur, l.rlim_max))
}

/// Raises the soft limit on open descriptors to the hard limit, and logs the
/// result. Service managers start daemons with a soft limit of 1024, which
/// a few hundred idle clients would otherwise use up, and with it the
/// sockets that health checks need.
pub fn raise_file_limit() {
    let (soft, hard) = match file_limit() {
        Ok(l) => l,
        Err(e) => {
            warn!("reading the open file limit: {e}");
            return;
        }
    };
    if soft < hard {
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the rlimit it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            let e = std::io::Error::last_os_error();
            warn!(soft, hard, "raising the open file limit: {e}");
            return;
        }
    }
    info!(limit = hard, was = soft, "open file limit");
}

#[cfg(test)]
pub(crate) mod testing {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_file_limit_is_raised_to_the_hard_limit() {
        if !testing::in_child("resources::tests::the_soft_file_limit_is_raised_to_the_hard_limit") {
            return;
        }
        let (_, hard) = file_limit().unwrap();
        let low = libc::rlimit {
            rlim_cur: 256.min(hard),
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the rlimit it is given.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        raise_file_limit();
        assert_eq!(file_limit().unwrap(), (hard, hard));
    }
}
