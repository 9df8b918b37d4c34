//! Drivers' XDP error counters (what `ethtool -S` shows), read with the
//! `SIOCETHTOOL` ioctl (`ETHTOOL_GSSET_INFO`, `ETHTOOL_GSTRINGS`,
//! `ETHTOOL_GSTATS`).
//!
//! A frame the datapath sends with `XDP_TX` or redirects is counted by
//! `lb_ingress` when it hands the frame over; a driver can still drop it (a
//! full ring, a frame longer than the peer takes) and counts that only in its
//! own statistics. Ethtool's netlink interface has no driver-private
//! statistics, hence the ioctl.

use std::{ffi::CString, io, os::fd::AsRawFd as _};

use anyhow::{bail, Context as _, Result};

const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;
/// More counters than any driver has; guards the buffer sizes.
const MAX_STATS: usize = 1 << 16;

/// Whether a driver counter counts XDP frames lost after the program's
/// verdict: veth's `rx_queue_N_xdp_tx_errors` and
/// `tx_queue_N_xdp_xmit_errors`, mlx5's `rx_xdp_tx_err` and
/// `tx_xdp_err`, virtio_net's `rx_queue_N_xdp_tx_drops`, ...; not
/// `xdp_drops`, which counts `XDP_DROP` verdicts.
pub fn is_xdp_error(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("xdp")
        && (name.contains("err") || name.ends_with("tx_drops") || name.ends_with("xmit_drops"))
}

/// The XDP error counters of `interface`, by the driver's names (none for a
/// driver without such counters).
pub fn xdp_errors(interface: &str) -> Result<Vec<(String, u64)>> {
    Ok(stats(interface)?
        .into_iter()
        .filter(|(name, _)| is_xdp_error(name))
        .collect())
}

/// Every driver statistic of `interface`, as `ethtool -S` lists them.
pub fn stats(interface: &str) -> Result<Vec<(String, u64)>> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .context("opening a socket for ethtool requests")?;
    let ioctl = |buffer: &mut [u8]| ethtool(socket.as_raw_fd(), interface, buffer);

    // ETHTOOL_GSSET_INFO: cmd, reserved, sset_mask (u64), then one u32 per set.
    let mut info = [0u8; 20];
    info[..4].copy_from_slice(&ETHTOOL_GSSET_INFO.to_ne_bytes());
    info[8..16].copy_from_slice(&(1u64 << ETH_SS_STATS).to_ne_bytes());
    ioctl(&mut info).with_context(|| format!("reading the statistics count of {interface}"))?;
    let mask = u64::from_ne_bytes(info[8..16].try_into().expect("8 bytes"));
    if mask & (1 << ETH_SS_STATS) == 0 {
        return Ok(Vec::new());
    }
    let count = u32::from_ne_bytes(info[16..20].try_into().expect("4 bytes")) as usize;
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_STATS {
        bail!("{interface} reports {count} statistics");
    }

    // ETHTOOL_GSTRINGS: cmd, string_set, len, then len names of 32 bytes.
    let mut names = vec![0u8; 12 + count * ETH_GSTRING_LEN];
    names[..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    names[4..8].copy_from_slice(&ETH_SS_STATS.to_ne_bytes());
    names[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
    ioctl(&mut names).with_context(|| format!("reading the statistics names of {interface}"))?;

    // ETHTOOL_GSTATS: cmd, n_stats, then n_stats u64 values.
    let mut values = vec![0u8; 8 + count * 8];
    values[..4].copy_from_slice(&ETHTOOL_GSTATS.to_ne_bytes());
    values[4..8].copy_from_slice(&(count as u32).to_ne_bytes());
    ioctl(&mut values).with_context(|| format!("reading the statistics of {interface}"))?;
    let returned = u32::from_ne_bytes(values[4..8].try_into().expect("4 bytes")) as usize;
    if returned != count {
        bail!("{interface} changed its statistics while they were read ({count}, then {returned})");
    }

    Ok(names[12..]
        .chunks_exact(ETH_GSTRING_LEN)
        .zip(values[8..].chunks_exact(8))
        .map(|(name, value)| {
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            (
                String::from_utf8_lossy(&name[..end]).into_owned(),
                u64::from_ne_bytes(value.try_into().expect("8 bytes")),
            )
        })
        .collect())
}

/// One `SIOCETHTOOL` request on `interface` with `buffer` as its data.
fn ethtool(fd: i32, interface: &str, buffer: &mut [u8]) -> io::Result<()> {
    let name = CString::new(interface).map_err(|_| io::ErrorKind::InvalidInput)?;
    let name = name.as_bytes_with_nul();
    if name.len() > libc::IFNAMSIZ {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    request.ifr_ifru.ifru_data = buffer.as_mut_ptr().cast();
    // SAFETY: the request names the interface and points at a buffer laid out
    // as the command in its first 4 bytes asks, sized for the count the
    // kernel itself reported (it writes no more than that count).
    let rc = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The name of interface `ifindex` in this network namespace.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has the IF_NAMESIZE bytes the call may write.
    let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_error_counters_are_recognised() {
        for name in [
            "rx_queue_0_xdp_tx_errors",
            "tx_queue_3_xdp_xmit_errors",
            "rx_xdp_tx_err",
            "tx_xdp_err",
            "rx_queue_1_xdp_tx_drops",
            "xdp_redirect_err",
        ] {
            assert!(is_xdp_error(name), "{name}");
        }
        for name in [
            "rx_queue_0_xdp_drops",
            "rx_queue_0_xdp_packets",
            "rx_queue_0_xdp_tx",
            "rx_errors",
            "peer_ifindex",
        ] {
            assert!(!is_xdp_error(name), "{name}");
        }
    }

    /// A veth pair in a namespace of its own, deleted on drop.
    struct Netns(String);

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn ip(args: &[&str]) {
        let status = std::process::Command::new("ip").args(args).status();
        assert!(status.is_ok_and(|s| s.success()), "ip {args:?}");
    }

    #[test]
    fn reads_what_ethtool_shows_for_veth() {
        let ns = Netns(format!("lbet-test-{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        ip(&[
            "-n", &ns.0, "link", "add", "va", "type", "veth", "peer", "name", "vb",
        ]);
        let shown = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0, "ethtool", "-S", "va"])
            .output()
            .expect("ethtool -S");
        let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
        let path = format!("/var/run/netns/{}", ns.0);
        let read = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("namespace file");
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            (
                stats("va").expect("veth statistics"),
                xdp_errors("va").expect("errors"),
            )
        })
        .join()
        .expect("reader thread");
        let (all, errors) = read;
        for (name, value) in &all {
            assert!(
                shown.contains(&format!("{name}: {value}")),
                "{name} in\n{shown}"
            );
        }
        let names: Vec<&str> = errors.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"rx_queue_0_xdp_tx_errors"), "{names:?}");
        assert!(names.contains(&"tx_queue_0_xdp_xmit_errors"), "{names:?}");
    }

    #[test]
    fn loopback_has_no_driver_statistics() {
        // `lo` answers ETHTOOL_GSSET_INFO with no statistics (or refuses it);
        // either way there is nothing to report and no panic.
        if let Ok(stats) = stats("lo") {
            assert!(stats.iter().all(|(name, _)| !name.is_empty()));
        }
        assert!(stats("no-such-if0").is_err());
        assert_eq!(interface_name(1).as_deref(), Some("lo"));
    }
}
