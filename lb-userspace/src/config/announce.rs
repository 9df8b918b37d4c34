//! The `[announce]` section: how a balancer tells its BGP speaker (BIRD)
//! which VIPs to announce. The agent keeps one host route per servable VIP
//! address in a kernel routing table of its own; BIRD's kernel protocol
//! learns that table and exports it over BGP.

use super::{err, raw::RawAnnounce, validate::in_range, ConfigError};

/// Kernel table ids with a meaning of their own: unspecified, default, main, local.
const RESERVED_TABLES: [i64; 4] = [0, 253, 254, 255];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// The kernel routing table the agent owns: routes in it that are not
    /// servable VIPs are removed.
    pub table: u32,
    /// How often the announced set is checked against the table (ms); drain,
    /// undrain and shutdown act at once.
    pub refresh_ms: u64,
}

pub(super) fn validate_announce(raw: RawAnnounce) -> Result<AnnounceConfig, ConfigError> {
    let Some(table) = raw.table else {
        return err(
            "announce.table",
            "missing: the kernel routing table BIRD learns the VIP routes from (e.g. 100)",
        );
    };
    if RESERVED_TABLES.contains(&table) {
        return err(
            "announce.table",
            format!("{table} is a reserved table (0, 253 default, 254 main, 255 local)"),
        );
    }
    let table = in_range("announce.table", Some(table), 1, 1, i64::from(u32::MAX))?;
    let refresh_ms = in_range("announce.refresh_ms", raw.refresh_ms, 1000, 50, 60_000)?;
    Ok(AnnounceConfig { table, refresh_ms })
}
