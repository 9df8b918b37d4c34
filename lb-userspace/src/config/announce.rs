//! The `[announce]` section: how a balancer tells its BGP speaker (BIRD)
//! which VIPs to announce. The agent keeps one host route per servable VIP
//! address in a kernel routing table of its own; BIRD's kernel protocol
//! learns that table and exports it over BGP.

use super::{err, raw::RawAnnounce, validate::in_range, ConfigError};

/// Kernel table ids with a meaning of their own: unspecified, default, main, local.
const RESERVED_TABLES: [i64; 4] = [0, 253, 254, 255];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// The kernel routing table the agent owns: host routes in it that are not
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

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
socket = "/run/lb-test/lb.sock"
[datapath]
interfaces = ["eth0"]
[encap]
source_v4 = "198.18.200.0/24"
source_v6 = "fd00:200::/96"
"#;

    fn parse(section: &str) -> Result<Config, crate::config::ConfigError> {
        Config::from_toml(&format!("{BASE}{section}"))
    }

    #[test]
    fn section_parses_with_defaults_and_is_optional() {
        let c = parse("[announce]\ntable = 100\n").unwrap();
        let a = c.announce.unwrap();
        assert_eq!((a.table, a.refresh_ms), (100, 1000));
        assert!(parse("").unwrap().announce.is_none());
        let big = parse("[announce]\ntable = 4000000000\nrefresh_ms = 50\n").unwrap();
        assert_eq!(big.announce.unwrap().table, 4_000_000_000);
    }

    #[test]
    fn every_bad_field_is_named() {
        for (section, field) in [
            ("[announce]\n", "announce.table"),
            ("[announce]\ntable = 254\n", "announce.table"),
            ("[announce]\ntable = 0\n", "announce.table"),
            ("[announce]\ntable = -1\n", "announce.table"),
            ("[announce]\ntable = 5000000000\n", "announce.table"),
            (
                "[announce]\ntable = 100\nrefresh_ms = 10\n",
                "announce.refresh_ms",
            ),
            (
                "[announce]\ntable = 100\nrefresh_ms = 600000\n",
                "announce.refresh_ms",
            ),
        ] {
            let e = parse(section).expect_err(section);
            assert_eq!(e.field, field, "{section}: {e}");
        }
        // An unknown key is refused too.
        assert!(parse("[announce]\ntable = 100\nspeaker = \"bird\"\n").is_err());
        // Without a balancer there is nothing to announce.
        let e = Config::from_toml(
            "[decap]\ninterfaces = [\"eth0\"]\naddresses = [\"198.18.0.11\"]\n[announce]\ntable = 100\n",
        )
        .expect_err("announce without datapath");
        assert_eq!(e.field, "announce");
    }

    #[test]
    fn cannot_change_on_reload() {
        let old = parse("[announce]\ntable = 100\n").unwrap();
        let new = parse("[announce]\ntable = 101\n").unwrap();
        assert_eq!(old.check_reload(&new).unwrap_err().field, "announce");
        assert!(old.check_reload(&old.clone()).is_ok());
    }
}
