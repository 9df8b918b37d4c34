//! Katran as an optional peer in the datapath benchmark
//! (`lb-bench datapath --peer katran=PATH/balancer.bpf.o`).
//!
//! The operator builds Katran's `balancer.bpf.o` (nothing of Katran is in this
//! repository). It is loaded with `bpftool prog loadall ... pinmaps` under a
//! per-process bpffs directory, and its maps are filled the way KatranLb fills
//! them: `ctl_array[0]` = the default router's MAC, `vip_miss_stats[0]`
//! zeroed, one LRU hash per possible CPU placed in `lru_mapping`, reals from
//! id 1, VIPs numbered in the order added, and a Maglev ring of 65537 slots per
//! VIP in `ch_rings`. Its output is checked packet by packet (the real chosen
//! must be the one Katran's jhash and the ring give) and its counters after
//! every timed run, so a misconfigured peer cannot produce a figure.
use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
};
use lb_userspace::maglev;

/// Katran's compile-time constants (balancer_consts.h defaults).
const RING_SIZE: u32 = 65537;
const MAX_VIPS: u32 = 512;
const CH_RINGS_SIZE: u32 = MAX_VIPS * RING_SIZE;
const F_IPV6: u8 = 1;
/// Connections per second and CPU above which Katran skips the LRU insert.
pub const MAX_CONN_RATE: u32 = 125_000;
/// The default router's MAC that Katran writes as the Ethernet destination.
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// Global counters, at `MAX_VIPS + index` in `stats` (`lb_stats`: v1, v2).
#[derive(Clone, Copy, Debug)]
pub enum Stat {
    /// v1: packets to a VIP; v2: connection-table misses.
    Lru = 0,
    /// v1: TCP SYN misses; v2: TCP non-SYN misses.
    LruMiss = 1,
    /// v1: new connections in the current second.
    NewConnRate = 2,
    /// v1: packets that found no per-CPU LRU.
    FallbackLru = 3,
    Tx = 17,
    Pass = 19,
}

/// A VIP as the benchmark configures it on both sides.
pub struct Vip {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub reals: Vec<IpAddr>,
}

pub struct Katran {
    pin_dir: PathBuf,
    prog: Xdp,
    stats: PerCpuArray<MapData, [u64; 2]>,
    lru_mapping: MapData,
    lru_fds: Vec<OwnedFd>,
    lru_size: u32,
    /// Real id (index + 1) → address.
    reals: Vec<IpAddr>,
    /// Per VIP (in `vip_num` order): its key fields and its ring.
    vips: Vec<(IpAddr, u16, u8, Vec<u32>)>,
}

impl Drop for Katran {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn addr16(a: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

fn pinned(dir: &Path, name: &str) -> Result<MapData> {
    MapData::from_pin(dir.join("maps").join(name))
        .with_context(|| format!("Katran object has no map {name} (is this balancer.bpf.o?)"))
}

/// `BPF_MAP_CREATE` of an LRU hash (aya 0.14 creates no standalone LRU maps).
fn create_lru(key_size: u32, value_size: u32, entries: u32) -> Result<OwnedFd> {
    let mut attr = [0u8; 72];
    for (i, v) in [9u32, key_size, value_size, entries].iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    attr[28..28 + 10].copy_from_slice(b"katran_lru");
    // SAFETY: the bpf syscall with a correctly sized, zero-padded attribute.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) };
    ensure!(
        fd >= 0,
        "BPF_MAP_CREATE (LRU hash): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_MAP_UPDATE_ELEM` of a map-in-map slot (aya 0.14 takes no raw fd there).
fn set_inner_map(outer: &MapData, index: u32, inner: &OwnedFd) -> Result<()> {
    let key = index;
    let value = inner.as_raw_fd() as u32;
    let mut attr = [0u8; 32];
    attr[..4].copy_from_slice(&(outer.fd().as_fd().as_raw_fd() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(&key as *const u32 as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(&value as *const u32 as u64).to_ne_bytes());
    // SAFETY: key and value outlive the call; the attribute is zero-padded.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 2, attr.as_ptr(), attr.len()) };
    ensure!(
        r == 0,
        "lru_mapping[{index}]: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

impl Katran {
    /// Loads the object, pins it under a directory of this process, and
    /// configures `vips`; each CPU's LRU holds `lru_size` flows.
    pub fn load(object: &Path, vips: &[Vip], lru_size: u32) -> Result<Katran> {
        ensure!(
            object.is_file(),
            "--peer katran={}: no such file",
            object.display()
        );
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/lb-bench-katran-{}",
            std::process::id()
        ));
        lb_userspace::datapath::ensure_bpffs()?;
        let _ = std::fs::remove_dir_all(&pin_dir);
        std::fs::create_dir_all(&pin_dir).context("bpffs directory")?;
        let out = Command::new("bpftool")
            .arg("prog")
            .arg("loadall")
            .arg(object)
            .arg(pin_dir.join("prog"))
            .args(["type", "xdp", "pinmaps"])
            .arg(pin_dir.join("maps"))
            .output()
            .context("running bpftool")?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&pin_dir);
            bail!(
                "bpftool prog loadall {}: {}",
                object.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let prog = Xdp::from_pin(
            pin_dir.join("prog/balancer_ingress"),
            aya_obj::programs::XdpAttachType::Interface,
        )
        .context("Katran object has no program balancer_ingress")?;
        let mut k = Katran {
            stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(pinned(&pin_dir, "stats")?))?,
            lru_mapping: pinned(&pin_dir, "lru_mapping")?,
            pin_dir,
            prog,
            lru_fds: Vec::new(),
            lru_size,
            reals: Vec::new(),
            vips: Vec::new(),
        };
        k.configure(vips)?;
        Ok(k)
    }

    fn configure(&mut self, vips: &[Vip]) -> Result<()> {
        let dir = self.pin_dir.clone();
        let mut ctl: Array<_, [u8; 8]> =
            Array::try_from(aya::maps::Map::Array(pinned(&dir, "ctl_array")?))?;
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&GW_MAC);
        ctl.set(0, mac, 0)?;
        let mut miss: Array<_, [u8; 20]> =
            Array::try_from(aya::maps::Map::Array(pinned(&dir, "vip_miss_stats")?))?;
        miss.set(0, [0u8; 20], 0)?;
        for cpu in 0..aya::util::nr_cpus().map_err(|(m, e)| anyhow::anyhow!("{m}: {e}"))? {
            self.fresh_lru(cpu as u32)?;
        }
        let mut reals: Array<_, [u8; 20]> =
            Array::try_from(aya::maps::Map::Array(pinned(&dir, "reals")?))?;
        let mut vip_map: HashMap<_, [u8; 20], [u8; 8]> =
            HashMap::try_from(aya::maps::Map::HashMap(pinned(&dir, "vip_map")?))?;
        let mut rings: Array<_, u32> =
            Array::try_from(aya::maps::Map::Array(pinned(&dir, "ch_rings")?))?;
        for (num, vip) in vips.iter().enumerate() {
            let mut entries = Vec::new();
            for r in &vip.reals {
                // Reals are shared between VIPs, like KatranLb's refcounted reals.
                let id = match self.reals.iter().position(|x| x == r) {
                    Some(i) => i as u32 + 1,
                    None => {
                        self.reals.push(*r);
                        let id = self.reals.len() as u32;
                        let mut def = [0u8; 20];
                        def[..16].copy_from_slice(&addr16(*r));
                        def[16] = if r.is_ipv6() { F_IPV6 } else { 0 };
                        reals.set(id, def, 0)?;
                        id
                    }
                };
                let identity = addr16(*r).to_vec();
                entries.push(maglev::Entry {
                    id,
                    identity,
                    weight: 1,
                });
            }
            let mut key = [0u8; 20];
            key[..16].copy_from_slice(&addr16(vip.addr));
            key[16..18].copy_from_slice(&vip.port.to_be_bytes());
            key[18] = vip.proto;
            let mut meta = [0u8; 8];
            meta[4..].copy_from_slice(&(num as u32).to_ne_bytes());
            vip_map.insert(key, meta, 0)?;
            let ring = maglev::build(&entries, RING_SIZE);
            for (slot, id) in ring.iter().enumerate() {
                rings.set(num as u32 * RING_SIZE + slot as u32, id, 0)?;
            }
            self.vips.push((vip.addr, vip.port, vip.proto, ring));
        }
        Ok(())
    }

    /// Puts an empty LRU in `lru_mapping[cpu]` (KatranLb: one per CPU).
    pub fn fresh_lru(&mut self, cpu: u32) -> Result<()> {
        let fd = create_lru(40, 16, self.lru_size)?;
        set_inner_map(&self.lru_mapping, cpu, &fd)?;
        match self.lru_fds.get_mut(cpu as usize) {
            Some(old) => *old = fd,
            None => self.lru_fds.push(fd),
        }
        Ok(())
    }

    pub fn prog_fd(&self) -> Result<&ProgramFd> {
        Ok(self.prog.fd()?)
    }

    /// A global counter, summed over CPUs: (v1, v2).
    pub fn stat(&self, s: Stat) -> Result<(u64, u64)> {
        let v = self.stats.get(&(MAX_VIPS + s as u32), 0)?;
        Ok(v.iter().fold((0, 0), |a, x| (a.0 + x[0], a.1 + x[1])))
    }

    /// Zeroes the new-connection rate counter (do before every new-flow run,
    /// and keep each run under `MAX_CONN_RATE` packets).
    pub fn reset_conn_rate(&mut self) -> Result<()> {
        let n = aya::util::nr_cpus().map_err(|(m, e)| anyhow::anyhow!("{m}: {e}"))?;
        let zero = PerCpuValues::try_from(vec![[0u64; 2]; n])?;
        self.stats
            .set(MAX_VIPS + Stat::NewConnRate as u32, zero, 0)?;
        Ok(())
    }

    /// Runs `frame` once through Katran itself and checks its verdict and
    /// output: passed unchanged, or encapsulated to the real that Katran's
    /// hash and the ring give, with the default router's MAC.
    pub fn verify(&self, frame: &[u8], expect_tx: bool) -> Result<()> {
        let mut out = vec![0u8; frame.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let r = self.prog.test_run(opts).context("Katran test run")?;
        let out = &out[..r.data_size_out as usize];
        if !expect_tx {
            ensure!(
                r.return_value == 2,
                "Katran: verdict {} (expected XDP_PASS)",
                r.return_value
            );
            ensure!(out == frame, "Katran changed a passed frame");
            return Ok(());
        }
        ensure!(
            r.return_value == 3,
            "Katran: verdict {} (expected XDP_TX)",
            r.return_value
        );
        ensure!(
            out[..6] == GW_MAC,
            "Katran: Ethernet destination {:x?}",
            &out[..6]
        );
        let (want, v6_client) = self.predict(frame)?;
        let inner = &frame[14..];
        let (dst, proto, rest) = match u16::from_be_bytes([out[12], out[13]]) {
            0x0800 => (
                IpAddr::from(<[u8; 4]>::try_from(&out[30..34])?),
                out[23],
                &out[34..],
            ),
            0x86dd => (
                IpAddr::from(<[u8; 16]>::try_from(&out[38..54])?),
                out[20],
                &out[54..],
            ),
            t => bail!("Katran output has ethertype {t:#x}"),
        };
        ensure!(rest == inner, "Katran: the inner packet changed");
        ensure!(
            proto == if v6_client { 41 } else { 4 },
            "Katran: outer protocol {proto}"
        );
        ensure!(
            dst == want,
            "Katran sent to {dst}, its hash and ring give {want}"
        );
        Ok(())
    }

    /// The real Katran's hash (jhash over source and ports, seeded as in
    /// balancer_consts.h) and the VIP's ring give for `frame`.
    fn predict(&self, frame: &[u8]) -> Result<(IpAddr, bool)> {
        let (v6, l3) = match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 => (false, &frame[14..]),
            0x86dd => (true, &frame[14..]),
            t => bail!("ethertype {t:#x}"),
        };
        let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = if v6 {
            (
                IpAddr::from(<[u8; 16]>::try_from(&l3[8..24])?),
                IpAddr::from(<[u8; 16]>::try_from(&l3[24..40])?),
                l3[6],
                &l3[40..],
            )
        } else {
            let ihl = usize::from(l3[0] & 0xf) * 4;
            (
                IpAddr::from(<[u8; 4]>::try_from(&l3[12..16])?),
                IpAddr::from(<[u8; 4]>::try_from(&l3[16..20])?),
                l3[9],
                &l3[ihl..],
            )
        };
        let dport = u16::from_be_bytes([l4[2], l4[3]]);
        let ports = u32::from_le_bytes([l4[0], l4[1], l4[2], l4[3]]);
        let hash = match src {
            IpAddr::V4(a) => jhash_2words(u32::from_le_bytes(a.octets()), ports, CH_RINGS_SIZE),
            IpAddr::V6(a) => jhash_2words(jhash(&a.octets(), MAX_VIPS), ports, CH_RINGS_SIZE),
        };
        let (_, _, _, ring) = self
            .vips
            .iter()
            .find(|(a, p, pr, _)| *a == dst && *p == dport && *pr == proto)
            .context("frame is not addressed to a configured VIP")?;
        let id = ring[(hash % RING_SIZE) as usize];
        Ok((self.reals[id as usize - 1], v6))
    }
}

fn final_(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

fn mix(mut a: u32, mut b: u32, mut c: u32) -> (u32, u32, u32) {
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(4);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(6);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(8);
    b = b.wrapping_add(a);
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(16);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(19);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(4);
    b = b.wrapping_add(a);
    (a, b, c)
}

/// Linux's `jhash` (as Katran's jhash.h).
fn jhash(key: &[u8], initval: u32) -> u32 {
    let word = |k: &[u8], i: usize| {
        let mut w = [0u8; 4];
        for (j, b) in k.iter().skip(i * 4).take(4).enumerate() {
            w[j] = *b;
        }
        u32::from_le_bytes(w)
    };
    let init = 0xdead_beef_u32
        .wrapping_add(key.len() as u32)
        .wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut k = key;
    while k.len() > 12 {
        a = a.wrapping_add(word(k, 0));
        b = b.wrapping_add(word(k, 1));
        c = c.wrapping_add(word(k, 2));
        (a, b, c) = mix(a, b, c);
        k = &k[12..];
    }
    if k.is_empty() {
        return c;
    }
    final_(
        a.wrapping_add(word(k, 0)),
        b.wrapping_add(word(k, 1)),
        c.wrapping_add(word(k, 2)),
    )
}

fn jhash_2words(a: u32, b: u32, initval: u32) -> u32 {
    let iv = initval.wrapping_add(0xdead_beef).wrapping_add(8);
    final_(a.wrapping_add(iv), b.wrapping_add(iv), iv)
}
