//! How the balancer's state is written into map entries: VIP keys, address
//! markers, backend entries and the datapath settings.

use std::net::IpAddr;

use lb_common::{
    addr_bytes, BackendInfo, Settings, VipKey, BACKEND_ALLOCATED, BACKEND_AVAILABLE, BACKEND_USABLE,
};

use crate::{
    config::{BalancerConfig, Protocol},
    nexthop::NextHop,
};

/// The datapath key of a VIP.
pub fn vip_key(address: IpAddr, port: u16, protocol: Protocol) -> VipKey {
    let (addr, family) = addr_bytes(address);
    VipKey {
        addr,
        port: port.to_be(),
        proto: protocol.number(),
        family,
    }
}

/// The marker entry that makes an address known as a VIP address.
pub(super) fn marker_key(address: IpAddr) -> VipKey {
    let (addr, family) = addr_bytes(address);
    VipKey {
        addr,
        port: 0,
        proto: 0,
        family,
    }
}

/// Datapath settings: table size, tracers and events, encapsulation sources,
/// the limit on ICMP "too big" answers.
pub fn settings(config: &BalancerConfig) -> Settings {
    let (encap, visibility, dp) = (&config.encap, &config.visibility, &config.datapath);
    let mut flags = 0;
    if visibility.trace_flows {
        flags |= lb_common::SETTING_TRACE_FLOWS;
    }
    if dp.clamp_mss {
        flags |= lb_common::SETTING_CLAMP_MSS;
    }
    if dp.second_chance {
        flags |= lb_common::SETTING_SECOND_CHANCE;
    }
    let mut s = Settings {
        maglev_size: dp.maglev_table_size,
        flags,
        event_sample: visibility.event_sample,
        icmp_too_big_rate: dp.icmp_too_big_rate,
        icmp_too_big_burst: dp.icmp_too_big_burst,
        ..Settings::default()
    };
    if let Some(v4) = encap.source_v4 {
        s.src_v4 = u32::from(v4.network()).to_be();
        s.src_v4_hostmask = u32::from(v4.hostmask()).to_be();
    }
    if let Some(v6) = encap.source_v6 {
        s.src_v6 = v6.network().octets();
        let host_bits = 128 - u32::from(v6.prefix_len());
        let mask = if host_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << host_bits) - 1
        };
        s.src_v6_hostmask = mask.to_be();
    }
    s
}

/// A live backend's entry: its address, whether its flows may use it, and
/// where frames to it leave. A removed backend's entry has no flags at all.
pub(super) fn backend_info(
    address: IpAddr,
    usable: bool,
    next_hop: Option<NextHop>,
) -> BackendInfo {
    let (addr, family) = addr_bytes(address);
    let mut info = BackendInfo {
        addr,
        family,
        flags: if usable {
            BACKEND_ALLOCATED | BACKEND_USABLE | BACKEND_AVAILABLE
        } else {
            BACKEND_ALLOCATED
        },
        ..BackendInfo::default()
    };
    if let Some(nh) = next_hop {
        info.ifindex = nh.ifindex;
        info.src_mac = nh.src_mac;
        info.dst_mac = nh.dst_mac;
        info.mtu = u16::try_from(nh.mtu).unwrap_or(u16::MAX);
    }
    info
}
