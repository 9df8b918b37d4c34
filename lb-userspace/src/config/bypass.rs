//! A VIP's bypass policy: `bypass = { after_packets = N, protocols = [...] }`
//! (off without it). With it, the backends' hosts may tell client hosts'
//! intermediaries to send a flow straight to its backend once N of its
//! packets went through the LB; an agent with `[datapath] bypass_source`
//! acts as such an intermediary for the VIP.

use serde::Deserialize;

use super::{err, validate::in_range, ConfigError, Protocol};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBypass {
    pub after_packets: Option<i64>,
    pub protocols: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassPolicy {
    /// Packets of a flow the LB forwards before the instruction is sent.
    pub after_packets: u32,
    pub protocols: Vec<Protocol>,
}

pub const DEFAULT_AFTER_PACKETS: i64 = 1;
pub const MAX_AFTER_PACKETS: i64 = 1000;

/// `f` names the policy (`vips[i].bypass`); `vip` is the VIP's protocol,
/// which the list must name (a policy that applies to nothing is a mistake).
pub fn validate_bypass(
    f: &str,
    raw: RawBypass,
    vip: Protocol,
) -> Result<BypassPolicy, ConfigError> {
    let after_packets = in_range(
        &format!("{f}.after_packets"),
        raw.after_packets,
        DEFAULT_AFTER_PACKETS,
        1,
        MAX_AFTER_PACKETS,
    )?;
    let names = raw.protocols.unwrap_or_else(|| vec![vip.to_string()]);
    let mut protocols = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let p = match name.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return err(
                    format!("{f}.protocols[{i}]"),
                    format!("{other:?} is neither \"tcp\" nor \"udp\""),
                )
            }
        };
        if protocols.contains(&p) {
            return err(
                format!("{f}.protocols[{i}]"),
                format!("{name:?} is named twice"),
            );
        }
        protocols.push(p);
    }
    if !protocols.contains(&vip) {
        return err(
            format!("{f}.protocols"),
            format!("does not name the VIP's protocol \"{vip}\": the policy would do nothing"),
        );
    }
    Ok(BypassPolicy {
        after_packets,
        protocols,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(after: Option<i64>, protocols: Option<&[&str]>) -> RawBypass {
        RawBypass {
            after_packets: after,
            protocols: protocols.map(|p| p.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn defaults_and_bad_policies_name_the_field() {
        let ok = validate_bypass("vips[0].bypass", raw(None, None), Protocol::Tcp).unwrap();
        assert_eq!(ok.after_packets, 1);
        assert_eq!(ok.protocols, vec![Protocol::Tcp]);
        let cases = [
            (raw(Some(0), None), "vips[0].bypass.after_packets"),
            (raw(Some(1001), None), "vips[0].bypass.after_packets"),
            (raw(None, Some(&["sctp"])), "vips[0].bypass.protocols[0]"),
            (
                raw(None, Some(&["tcp", "tcp"])),
                "vips[0].bypass.protocols[1]",
            ),
            (raw(None, Some(&["udp"])), "vips[0].bypass.protocols"),
            (raw(None, Some(&[])), "vips[0].bypass.protocols"),
        ];
        for (r, field) in cases {
            let e = validate_bypass("vips[0].bypass", r, Protocol::Tcp).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }
}
