//! The datapath pinned under bpffs, one directory per agent instance, so that
//! it forwards while no agent runs (fail static) and a starting agent adopts
//! it: `/sys/fs/bpf/lb-agent/INSTANCE/maps-vLAYOUT/MAP` for the maps and
//! `/sys/fs/bpf/lb-agent/INSTANCE/links/PROGRAM@INTERFACE` for the XDP links.
//!
//! The layout version (`lb_common::LAYOUT_VERSION`) names the maps directory,
//! so maps of another layout are never read as this agent's own. Maps of this
//! layout but other sizes (a changed `flow_table_size`, say), and maps of an
//! earlier layout this agent can convert (`MIGRATABLE_LAYOUTS`, an upgrade),
//! are migrated: new maps are pinned beside them (`maps-vLAYOUT-next`: bpffs
//! names have no dots), filled, and switched in with the program; then the
//! old ones go.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{maps::MapInfo, Ebpf};
use lb_common::LAYOUT_VERSION;
use tracing::info;

use super::{loader, max_entries, MapSizes, HOST_STORES_IN_ORDER};

/// Where every instance's directory is.
pub const PIN_ROOT: &str = "/sys/fs/bpf/lb-agent";

/// Every map the programs and the agent share, pinned. The bypass maps
/// that hold flows (entries, flows sent toward the LB, flows `lb_decap`
/// counts) and the bypass counters are pinned too, so an intermediary whose
/// agent restarts keeps sending its bypassed flows straight on; the client
/// prefixes and policies are not: the agent writes them afresh.
pub const PINNED_MAPS: [&str; 20] = [
    "SETTINGS",
    "VIPS",
    "MAGLEV",
    "BACKENDS",
    "FLOWS",
    "FLOWS_UNRECORDED",
    "TX_PORTS",
    "VIP_STATS",
    "BACKEND_STATS",
    "OUTCOMES",
    "FLOW_EVENTS",
    "EVENT_STATS",
    "MSS_CLAMPED",
    "ICMP_TOO_BIG_TOKENS",
    "DECAP_ADDRS",
    "DECAP_OUTCOMES",
    "BYPASS",
    "BYPASS_SENT",
    "BYPASS_STATS",
    "BYPASS_SEEN",
];

/// Earlier layouts whose maps `migrate::OldMaps` converts (an upgrade keeps
/// the connection table). Layout 1 had 12-byte VIP entries (two rings per
/// VIP) and one decap outcome fewer; layout 2 had 16-byte VIP entries (a
/// previous ring of the one global size) and its bypass tables unpinned;
/// layouts 1 to 3 had a kernel LRU for a connection table, and no
/// `FLOWS_UNRECORDED`; layout 4's connection table was a kernel hash;
/// layout 5's placed its flows by another slot hash (a seeded murmur3 with
/// the claim word's tag from the bits that also pick the bucket).
pub const MIGRATABLE_LAYOUTS: [u32; 5] = [1, 2, 3, 4, 5];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What a load found pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Nothing: the maps are new, and now pinned.
    Fresh,
    /// Maps of this layout and sizes: the object uses them as they are.
    Adopted,
    /// Maps of this layout and other sizes, or of an earlier layout, in `old`
    /// (of map layout `layout`): the object has new maps; the agent moves what
    /// it keeps, switches the links, then calls `Pins::finish_migration`.
    Migrating { old: PathBuf, layout: u32 },
}

/// One instance's pinned datapath.
#[derive(Debug, Clone)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    pub fn new(instance: &str) -> Pins {
        Pins {
            dir: Path::new(PIN_ROOT).join(instance),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn maps(&self) -> PathBuf {
        self.dir.join(format!("maps-v{LAYOUT_VERSION}"))
    }

    fn maps_next(&self) -> PathBuf {
        self.dir.join(format!("maps-v{LAYOUT_VERSION}-next"))
    }

    /// The pin of `program`'s link on `interface`.
    pub fn link(&self, program: &str, interface: &str) -> PathBuf {
        self.dir
            .join("links")
            .join(format!("{program}@{interface}"))
    }

    /// Loads `object` (the embedded one, or one an operator gave) over the
    /// pinned maps (see `Origin`), with the datapath logs on or off: each
    /// load sets them anew, so the next agent's choice replaces this one's.
    pub fn load(
        &self,
        sizes: &MapSizes,
        object: &[u8],
        datapath_log: bool,
    ) -> Result<(Ebpf, Origin)> {
        ensure_bpffs()?;
        let origin = self.origin(sizes)?;
        let dir = match &origin {
            Origin::Migrating { .. } => {
                // Left by a migration that did not finish: start it afresh.
                remove_tree(&self.maps_next())?;
                self.maps_next()
            }
            _ => self.maps(),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::create_dir_all(self.dir.join("links"))?;
        let paths: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|n| (*n, dir.join(n))).collect();
        let mut loader = loader(sizes, datapath_log, HOST_STORES_IN_ORDER)?;
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader
            .load(object)
            .with_context(|| format!("loading the eBPF object over {}", dir.display()))?;
        info!(dir = %dir.display(), ?origin, "datapath maps");
        Ok((ebpf, origin))
    }

    /// The maps directory of `layout`.
    fn maps_of(&self, layout: u32) -> PathBuf {
        self.dir.join(format!("maps-v{layout}"))
    }

    /// What is pinned for this layout, and whether its sizes are `sizes`.
    fn origin(&self, sizes: &MapSizes) -> Result<Origin> {
        let maps = self.maps();
        if let Some(v) = self.other_layout()? {
            if maps.exists() && MIGRATABLE_LAYOUTS.contains(&v) {
                // A migration from it finished but was cut off before the
                // old maps went: nothing uses them.
                info!(layout = v, "removing the maps of a finished upgrade");
                remove_tree(&self.maps_of(v))?;
            } else if MIGRATABLE_LAYOUTS.contains(&v) {
                return Ok(Origin::Migrating {
                    old: self.maps_of(v),
                    layout: v,
                });
            } else {
                bail!(
                    "{} holds a datapath of map layout {v}; this agent has layout {LAYOUT_VERSION} and converts only layouts {MIGRATABLE_LAYOUTS:?}. Upgrade through a release that converts it, or run `lb-agent --cleanup` to remove it (its connection table is lost)",
                    self.dir.display()
                );
            }
        }
        if !maps.exists() && self.maps_next().exists() {
            // A migration was cut off between removing the old maps and
            // renaming the new ones, which the programs already use.
            info!("completing a migration that was cut off");
            std::fs::rename(self.maps_next(), &maps).context("renaming the migrated maps")?;
        }
        if !maps.exists() {
            return Ok(Origin::Fresh);
        }
        let wanted = max_entries(sizes)?;
        for name in PINNED_MAPS {
            let path = maps.join(name);
            let migrating = Origin::Migrating {
                old: maps.clone(),
                layout: LAYOUT_VERSION,
            };
            let Ok(info) = MapInfo::from_pin(&path) else {
                return Ok(migrating);
            };
            let size = wanted.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
            if size.is_some_and(|s| s != info.max_entries()) {
                return Ok(migrating);
            }
        }
        Ok(Origin::Adopted)
    }

    /// The layout of another maps directory of the instance, if any.
    fn other_layout(&self) -> Result<Option<u32>> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(None);
        };
        let mut found = None;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let other = name
                .strip_prefix("maps-v")
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|v| *v != LAYOUT_VERSION);
            if let Some(v) = other {
                if found.is_some_and(|f| f != v) {
                    bail!(
                        "{} holds maps of two other layouts ({} and {v}); `lb-agent --cleanup` removes them (the connection table is lost)",
                        self.dir.display(),
                        found.unwrap_or_default()
                    );
                }
                found = Some(v);
            }
        }
        Ok(found)
    }

    /// After a migration's switch: the new maps take the place of this
    /// layout's, then the old maps (`old`, of this layout or an earlier one) go.
    pub fn finish_migration(&self, old: &Path) -> Result<()> {
        if old == self.maps() {
            remove_tree(old)?;
            return std::fs::rename(self.maps_next(), self.maps())
                .context("renaming the migrated maps");
        }
        std::fs::rename(self.maps_next(), self.maps()).context("renaming the migrated maps")?;
        remove_tree(old)
    }

    /// Whether anything of the instance is pinned.
    pub fn exist(&self) -> bool {
        self.dir.exists()
    }

    /// Unpins everything: links (the programs detach once no agent holds
    /// them) and maps (freed once unused).
    pub fn remove(&self) -> Result<()> {
        remove_tree(&self.dir)
    }
}

/// Removes a bpffs directory and what is pinned in it.
fn remove_tree(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Mounts bpffs on /sys/fs/bpf unless it is there (as systemd does at boot).
pub fn ensure_bpffs() -> Result<()> {
    let path = CString::new("/sys/fs/bpf").expect("no NUL");
    // SAFETY: statfs on a valid C string into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = CString::new("bpf").expect("no NUL");
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "bpffs is not mounted on /sys/fs/bpf and mounting it failed: {}",
            std::io::Error::last_os_error()
        );
    }
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use lb_common::*;

    /// Pinned maps outlive the agent that made them, so a change of the map
    /// ABI must come with a new layout version: then the old maps are refused
    /// (or migrated) instead of being misread.
    #[test]
    fn the_layout_version_follows_the_map_abi() {
        let abi = [
            size_of::<VipKey>(),
            size_of::<VipInfo>(),
            size_of::<BackendInfo>(),
            size_of::<FlowKey>(),
            size_of::<FlowState>(),
            size_of::<FlowEvent>(),
            size_of::<HostAddr>(),
            size_of::<Settings>(),
            size_of::<IcmpTokens>(),
            size_of::<TrafficCounters>(),
            size_of::<PacketCounter>(),
            size_of::<MaglevChunk>(),
            OUTCOME_COUNT as usize,
            DECAP_OUTCOME_COUNT as usize,
            size_of::<BypassEntry>(),
            BYPASS_STAT_COUNT as usize,
            super::PINNED_MAPS.len(),
            size_of::<lb_common::flow_table::FlowSlot>(),
        ];
        assert_eq!(
            (LAYOUT_VERSION, abi),
            (
                6,
                [20, 24, 40, 40, 56, 64, 20, 48, 16, 48, 16, 32, 15, 5, 32, 4, 20, 96]
            ),
            "the map ABI changed: raise LAYOUT_VERSION and update this list"
        );
    }

    /// Where a flow sits in the connection table is part of the ABI too: a
    /// table placed by another slot hash, claim word or bucket choice finds
    /// none of its flows. A change there must raise the layout version
    /// (the previous layout's table is then scanned and placed again).
    #[test]
    fn the_layout_version_follows_the_connection_table_placement() {
        use lb_common::flow_table::{buckets_of, claim_word, key_words, slot_hash};
        let key = FlowKey::v4(
            [192, 0, 2, 1],
            [198, 51, 100, 1],
            40000u16.to_be(),
            443u16.to_be(),
            6,
        );
        let keys = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let h = slot_hash(key_words(&key), &keys);
        let placement = (claim_word(key_words(&key), h), buckets_of(h, 187_500));
        assert_eq!(
            (LAYOUT_VERSION, placement),
            (6, (1_952_777_222, (173_602, 161_004))),
            "the connection table's placement changed: raise LAYOUT_VERSION and update this test"
        );
    }
}
