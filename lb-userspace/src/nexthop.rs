//! Next-hop resolution for backends: the output interface, the MAC pair to write into
//! forwarded frames and the MTU they must fit, looked up with rtnetlink (route, neighbour and
//! link tables).

use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::pin;

use anyhow::{anyhow, bail, Context};
use futures::{Stream, StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use rtnetlink::packet_route::{
    link::{LinkAttribute, LinkXdp, XdpAttached},
    neighbour::{NeighbourAttribute, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType, RouteVia},
    AddressFamily, RouteNetlinkMessage,
};

/// Where packets toward a backend leave this host and to which MAC they go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// Output interface (from the route lookup).
    pub ifindex: u32,
    /// MAC address of that interface.
    pub src_mac: [u8; 6],
    /// MAC of the gateway (if the route has one) or of the destination itself.
    pub dst_mac: [u8; 6],
    /// The largest IP packet the way to the backend carries: the output interface's MTU, or the
    /// route's (an `mtu` route attribute, or a path MTU the kernel learned) when smaller.
    pub mtu: u32,
}

/// Resolves next hops with rtnetlink in the current network namespace.
pub struct Resolver {
    handle: rtnetlink::Handle,
}

/// Reports kernel changes that can move a next hop: neighbour entries, IPv4
/// and IPv6 routes, and links (a changed MTU included). The agent re-resolves when one arrives instead
/// of waiting for its next periodic refresh.
pub struct ChangeWatcher {
    // Kept so the connection task stays alive.
    _handle: rtnetlink::Handle,
    messages: futures::channel::mpsc::UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl ChangeWatcher {
    /// Must be called inside a tokio runtime.
    pub fn new() -> anyhow::Result<Self> {
        use rtnetlink::sys::AsyncSocket as _;
        let runtime = tokio::runtime::Handle::try_current()
            .context("nexthop::ChangeWatcher::new must be called inside a tokio runtime")?;
        let (mut connection, handle, messages) =
            rtnetlink::new_connection().context("cannot open rtnetlink socket")?;
        let socket = connection.socket_mut().socket_mut();
        // An unbound netlink socket has no port id and receives no multicast.
        socket.bind_auto().context("binding the rtnetlink socket")?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
        ] {
            socket
                .add_membership(group)
                .with_context(|| format!("joining rtnetlink group {group}"))?;
        }
        runtime.spawn(connection);
        Ok(Self {
            _handle: handle,
            messages,
        })
    }

    /// Waits for the next change; `false` if the watch ended.
    pub async fn changed(&mut self) -> bool {
        self.messages.next().await.is_some()
    }

    /// Discards changes already queued (one refresh covers them all).
    pub fn drain(&mut self) {
        while self.messages.try_recv().is_ok() {}
    }
}

/// What `ip route get` says about a destination.
struct Route {
    oif: u32,
    gateway: Option<IpAddr>,
    /// The route's own MTU (attribute or learned path MTU), if it has one.
    mtu: Option<u32>,
}

/// An output interface's Ethernet address and MTU.
struct Link {
    mac: [u8; 6],
    mtu: u32,
    name: String,
}

/// Neighbour states whose link-layer address may be used (the kernel's `NUD_VALID`).
const NUD_VALID: u16 = libc::NUD_PERMANENT
    | libc::NUD_NOARP
    | libc::NUD_REACHABLE
    | libc::NUD_PROBE
    | libc::NUD_STALE
    | libc::NUD_DELAY;

/// Port of the datagram that triggers neighbour resolution: "discard", so a backend that
/// receives it does nothing.
const DISCARD_PORT: u16 = 9;

impl Resolver {
    /// Opens the rtnetlink socket (bound to the calling thread's network namespace) and spawns
    /// its connection task.
    /// Must be called inside a tokio runtime.
    pub fn new() -> anyhow::Result<Self> {
        // Checked up front because both the socket registration and the spawn would panic
        // outside a runtime.
        let runtime = tokio::runtime::Handle::try_current()
            .context("nexthop::Resolver::new must be called inside a tokio runtime")?;
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open rtnetlink socket")?;
        runtime.spawn(connection);
        Ok(Self { handle })
    }

    /// Resolves the next hop toward `dst`.
    ///
    /// Returns `Ok(None)` while the neighbour (the gateway, or `dst` if it is on-link) has no
    /// usable link-layer address yet; resolution has then been triggered and the caller should
    /// retry later.
    /// Returns `Err` if there is no unicast route to `dst`.
    pub async fn resolve(&self, dst: IpAddr) -> anyhow::Result<Option<NextHop>> {
        let route = self.route(dst).await?;
        let ifindex = route.oif;
        // The interface is checked before the neighbour so that a non-Ethernet output fails at once
        // instead of reporting "not resolved yet" forever.
        let link = self.link(ifindex).await?;
        let mtu = route.mtu.map_or(link.mtu, |m| m.min(link.mtu));
        match self
            .neighbour(ifindex, route.gateway.unwrap_or(dst))
            .await?
        {
            Some(dst_mac) => Ok(Some(NextHop {
                ifindex,
                src_mac: link.mac,
                dst_mac,
                mtu,
            })),
            None => {
                trigger_resolution(dst, ifindex).await;
                Ok(None)
            }
        }
    }

    /// The name of the interface the route toward `dst` leaves by: on a
    /// host, the host side of the veth of the guest that has `dst`.
    pub async fn interface_toward(&self, dst: IpAddr) -> anyhow::Result<String> {
        let route = self.route(dst).await?;
        if let Some(gateway) = route.gateway {
            bail!("{dst} is reached through the gateway {gateway}, not a local interface");
        }
        Ok(self.link(route.oif).await?.name)
    }

    /// Returns the ifindex of the interface called `name`.
    pub async fn ifindex(&self, name: &str) -> anyhow::Result<u32> {
        let link = first(self.handle.link().get().match_name(name).execute())
            .await
            .map_err(|e| refused(e, format_args!("no interface named {name:?}")))?
            .ok_or_else(|| anyhow!("no interface named {name:?}"))?;
        Ok(link.header.index)
    }

    /// The id of the XDP program attached to interface `name`, if any, and
    /// its mode as the kernel reports it (`native`, `generic`, ...).
    pub async fn xdp_program(&self, name: &str) -> anyhow::Result<Option<(u32, &'static str)>> {
        let link = first(self.handle.link().get().match_name(name).execute())
            .await
            .map_err(|e| refused(e, format_args!("no interface named {name:?}")))?
            .ok_or_else(|| anyhow!("no interface named {name:?}"))?;
        let Some(xdp) = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        }) else {
            return Ok(None);
        };
        let id = xdp.iter().find_map(|x| match x {
            LinkXdp::ProgId(id) if *id != 0 => Some(*id),
            _ => None,
        });
        let mode = xdp
            .iter()
            .find_map(|x| match x {
                LinkXdp::Attached(XdpAttached::Driver) => Some("native"),
                LinkXdp::Attached(XdpAttached::SocketBuffer) => Some("generic"),
                LinkXdp::Attached(XdpAttached::Hardware) => Some("offload"),
                LinkXdp::Attached(XdpAttached::Multiple) => Some("multiple"),
                _ => None,
            })
            .unwrap_or("unknown");
        Ok(id.map(|id| (id, mode)))
    }

    /// Asks the kernel for the route it would use for `dst` (`ip route get`): output interface,
    /// gateway and MTU.
    async fn route(&self, dst: IpAddr) -> anyhow::Result<Route> {
        let mut request = RouteMessage::default();
        request.header.address_family = family(dst);
        request.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        request
            .attributes
            .push(RouteAttribute::Destination(dst.into()));
        // A Destination attribute makes rtnetlink send a single lookup rather than a table dump.
        let route = first(self.handle.route().get(request).execute())
            .await
            .map_err(|e| refused(e, format_args!("no route to {dst}")))?
            .ok_or_else(|| anyhow!("no route to {dst}: empty reply from the kernel"))?;
        if route.header.kind != RouteType::Unicast {
            bail!(
                "no unicast route to {dst} (the kernel returned a {:?} route)",
                route.header.kind
            );
        }
        let (mut oif, mut gateway, mut mtu) = (None, None, None);
        for attribute in route.attributes {
            match attribute {
                RouteAttribute::Metrics(metrics) => {
                    mtu = metrics.into_iter().find_map(|m| match m {
                        RouteMetric::Mtu(v) if v > 0 => Some(v),
                        _ => None,
                    });
                }
                RouteAttribute::Oif(index) => oif = Some(index),
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(a.into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(a.into()),
                // IPv4 routes with an IPv6 next hop (RFC 5549) carry it in RTA_VIA.
                RouteAttribute::Via(RouteVia::Inet(a)) => gateway = Some(a.into()),
                RouteAttribute::Via(RouteVia::Inet6(a)) => gateway = Some(a.into()),
                _ => {}
            }
        }
        let oif = oif.ok_or_else(|| anyhow!("route to {dst} has no output interface"))?;
        Ok(Route { oif, gateway, mtu })
    }

    /// MAC address and MTU of interface `ifindex`.
    async fn link(&self, ifindex: u32) -> anyhow::Result<Link> {
        let link = first(self.handle.link().get().match_index(ifindex).execute())
            .await
            .map_err(|e| refused(e, format_args!("no interface with index {ifindex}")))?
            .ok_or_else(|| anyhow!("no interface with index {ifindex}"))?;
        let (mut mac, mut mtu, mut name) = (None, None, String::new());
        for attribute in link.attributes {
            match attribute {
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a).ok(),
                LinkAttribute::Mtu(m) => mtu = Some(m),
                LinkAttribute::IfName(n) => name = n,
                _ => {}
            }
        }
        Ok(Link {
            mac: mac.ok_or_else(|| anyhow!("interface {ifindex} has no Ethernet address"))?,
            mtu: mtu.ok_or_else(|| anyhow!("interface {ifindex} has no MTU"))?,
            name,
        })
    }

    /// Link-layer address of neighbour `addr` on `ifindex`, if the entry exists and is usable.
    async fn neighbour(&self, ifindex: u32, addr: IpAddr) -> anyhow::Result<Option<[u8; 6]>> {
        // rtnetlink's NeighbourGetRequest always dumps the whole table; the kernel can look up one
        // entry (neigh_get) when given the device and NDA_DST, so the request is built by hand.
        let mut query = NeighbourMessage::default();
        query.header.family = family(addr);
        query.header.ifindex = ifindex;
        query
            .attributes
            .push(NeighbourAttribute::Destination(addr.into()));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(query));
        request.header.flags = NLM_F_REQUEST;
        let replies = self
            .handle
            .clone()
            .request(request)
            .context("rtnetlink connection is closed")?;
        let reply = pin!(replies)
            .next()
            .await
            .ok_or_else(|| anyhow!("no reply to neighbour lookup for {addr}"))?;
        let entry = match reply.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(entry)) => entry,
            NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => return Ok(None),
            NetlinkPayload::Error(e) => {
                bail!("neighbour lookup for {addr} on interface {ifindex} failed: {e}")
            }
            other => bail!("unexpected reply to neighbour lookup for {addr}: {other:?}"),
        };
        if u16::from(entry.header.state) & NUD_VALID == 0 {
            return Ok(None);
        }
        Ok(entry
            .attributes
            .into_iter()
            .find_map(|attribute| match attribute {
                NeighbourAttribute::LinkLayerAddress(mac) => <[u8; 6]>::try_from(mac).ok(),
                _ => None,
            }))
    }
}

/// Makes the kernel start ARP / neighbour discovery, which it only does when it has a packet to
/// send. Sent to `dst` rather than the gateway so it takes exactly the route that was looked up
/// (also for `onlink` gateways that no connected route covers). Failures are ignored: the caller
/// retries anyway.
async fn trigger_resolution(dst: IpAddr, ifindex: u32) {
    let (bind, target): (SocketAddr, SocketAddr) = match dst {
        IpAddr::V4(a) => ((Ipv4Addr::UNSPECIFIED, 0).into(), (a, DISCARD_PORT).into()),
        // The scope id is needed for a link-local `dst` and ignored by the kernel otherwise.
        IpAddr::V6(a) => (
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            SocketAddrV6::new(a, DISCARD_PORT, 0, ifindex).into(),
        ),
    };
    if let Ok(socket) = tokio::net::UdpSocket::bind(bind).await {
        let _ = socket.send_to(&[], target).await;
    }
}

/// First message of a reply stream.
async fn first<T>(
    replies: impl Stream<Item = Result<T, rtnetlink::Error>>,
) -> Result<Option<T>, rtnetlink::Error> {
    pin!(replies).try_next().await
}

/// Reports a kernel error reply as `what` plus the errno text, and any other failure (a broken
/// connection, an undecodable reply) as what it is, so that those are not mistaken for "not
/// found".
fn refused(error: rtnetlink::Error, what: impl Display) -> anyhow::Error {
    match error {
        rtnetlink::Error::NetlinkError(e) => anyhow!("{what} ({e})"),
        other => anyhow::Error::new(other).context("rtnetlink request failed"),
    }
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::process::Command;
    use std::time::{Duration, Instant};

    const LOCAL_IF: &str = "lbnh-a";
    const PEER_IF: &str = "lbnh-b";

    /// Runs a command given as one whitespace-separated string and returns its stdout.
    fn sh(command: &str) -> String {
        let mut words = command.split_whitespace();
        let program = words.next().expect("empty command");
        let out = Command::new(program)
            .args(words)
            .output()
            .expect("spawn command");
        assert!(
            out.status.success(),
            "`{command}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn parse_mac(text: &str) -> [u8; 6] {
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("hex MAC byte"))
            .collect();
        bytes.try_into().expect("6-byte MAC")
    }

    /// Two namespaces joined by a veth pair; deleted on drop, also when the test panics.
    struct NetnsPair {
        local: String,
        peer: String,
    }

    impl NetnsPair {
        fn new() -> Self {
            // Unique per test, as tests run in parallel.
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let pid = std::process::id();
            let pair = Self {
                local: format!("lbnh-test-{pid}-{n}a"),
                peer: format!("lbnh-test-{pid}-{n}b"),
            };
            let (l, p) = (&pair.local, &pair.peer);
            for ns in [l, p] {
                sh(&format!("ip netns add {ns}"));
                // DAD would keep the kernel-made link-local addresses tentative (unanswered)
                // for a while.
                sh(&format!(
                    "ip netns exec {ns} sysctl -qw net.ipv6.conf.all.accept_dad=0 \
                     net.ipv6.conf.default.accept_dad=0"
                ));
            }
            sh(&format!(
                "ip -n {l} link add {LOCAL_IF} type veth peer name {PEER_IF} netns {p}"
            ));
            for (ns, dev, v4, v6) in [
                (l, LOCAL_IF, "198.18.0.1/24", "fd00:18::1/64"),
                (p, PEER_IF, "198.18.0.2/24", "fd00:18::2/64"),
            ] {
                sh(&format!("ip -n {ns} addr add {v4} dev {dev}"));
                sh(&format!("ip -n {ns} addr add {v6} dev {dev} nodad"));
                sh(&format!("ip -n {ns} link set {dev} up"));
                sh(&format!("ip -n {ns} link set lo up"));
            }
            let peer_ll = pair.peer_link_local();
            sh(&format!("ip -n {l} route add 198.19.0.0/24 via 198.18.0.2"));
            sh(&format!(
                "ip -n {l} route add fd00:19::/64 via {peer_ll} dev {LOCAL_IF}"
            ));
            pair
        }

        /// Reads /sys/class/net/DEV/FILE inside namespace `ns` (`ip netns exec` mounts its sysfs).
        fn sys(ns: &str, dev: &str, file: &str) -> String {
            sh(&format!(
                "ip netns exec {ns} cat /sys/class/net/{dev}/{file}"
            ))
            .trim()
            .to_owned()
        }

        fn peer_link_local(&self) -> String {
            let out = sh(&format!(
                "ip -n {} -6 -o addr show dev {PEER_IF} scope link",
                self.peer
            ));
            let mut words = out.split_whitespace().skip_while(|w| *w != "inet6");
            let cidr = words.nth(1).expect("peer has a link-local address");
            cidr.split('/').next().unwrap_or(cidr).to_owned()
        }
    }

    impl Drop for NetnsPair {
        fn drop(&mut self) {
            for ns in [&self.local, &self.peer] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    /// Retries `resolve` like the agent does until the neighbour answers.
    async fn resolve_eventually(resolver: &Resolver, dst: IpAddr) -> NextHop {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match resolver.resolve(dst).await {
                Ok(Some(hop)) => return hop,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("resolve({dst}) did not converge: {other:?}"),
            }
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("IP address literal")
    }

    #[test]
    fn new_outside_runtime_fails() {
        assert!(Resolver::new().is_err());
    }

    #[test]
    fn watcher_reports_neighbour_changes() {
        let pair = NetnsPair::new();
        let local = pair.local.clone();
        let worker = std::thread::spawn(move || {
            let ns = File::open(format!("/var/run/netns/{local}")).expect("open netns file");
            // SAFETY: plain syscall on a valid fd; it switches only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async {
                let mut watcher = ChangeWatcher::new().expect("watcher");
                sh(&format!(
                    "ip -n {local} neigh replace 198.18.0.77 lladdr 02:00:00:00:00:77 dev {LOCAL_IF}"
                ));
                let changed = tokio::time::timeout(Duration::from_secs(2), watcher.changed()).await;
                assert_eq!(changed.ok(), Some(true), "no change reported for a new neighbour");
                watcher.drain();
                sh(&format!("ip -n {local} link set {LOCAL_IF} mtu 1400"));
                let changed = tokio::time::timeout(Duration::from_secs(2), watcher.changed()).await;
                assert_eq!(changed.ok(), Some(true), "no change reported for a new MTU");
            });
        });
        let result = worker.join();
        drop(pair);
        result.expect("watcher test thread panicked");
    }

    #[test]
    fn resolves_in_namespace_pair() {
        let pair = NetnsPair::new();
        let local = pair.local.clone();
        let expected = NextHop {
            ifindex: NetnsPair::sys(&local, LOCAL_IF, "ifindex")
                .parse()
                .expect("ifindex"),
            src_mac: parse_mac(&NetnsPair::sys(&local, LOCAL_IF, "address")),
            dst_mac: parse_mac(&NetnsPair::sys(&pair.peer, PEER_IF, "address")),
            mtu: NetnsPair::sys(&local, LOCAL_IF, "mtu")
                .parse()
                .expect("mtu"),
        };
        let worker = std::thread::spawn(move || {
            let ns = File::open(format!("/var/run/netns/{local}")).expect("open netns file");
            // SAFETY: plain syscall on a valid fd; it switches only this thread, which has no
            // sockets yet.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async {
                let resolver = Resolver::new().expect("resolver");
                let index = resolver.ifindex(LOCAL_IF).await.expect("ifindex");
                assert_eq!(index, expected.ifindex);
                let err = resolver
                    .ifindex("nonexistent0")
                    .await
                    .expect_err("nonexistent0 must not resolve");
                assert!(err.to_string().contains("nonexistent0"), "{err}");

                // Direct and via-gateway (IPv4 and IPv6 link-local) destinations, each starting
                // from an empty neighbour table so that resolution has to be triggered.
                for dst in ["198.18.0.2", "fd00:18::2", "198.19.0.5", "fd00:19::5"] {
                    sh(&format!("ip -n {local} neigh flush dev {LOCAL_IF}"));
                    let first = resolver.resolve(ip(dst)).await;
                    assert!(first.is_ok(), "{dst}: {first:?}");
                    let hop = resolve_eventually(&resolver, ip(dst)).await;
                    assert_eq!(hop, expected, "{dst}");
                }

                // Nobody answers for .99: the entry stays INCOMPLETE (then FAILED), never resolved.
                for _ in 0..2 {
                    let silent = resolver.resolve(ip("198.18.0.99")).await;
                    assert!(matches!(silent, Ok(None)), "{silent:?}");
                }
                let entry = sh(&format!("ip -n {local} neigh show 198.18.0.99"));
                assert!(
                    entry.contains("INCOMPLETE") || entry.contains("FAILED"),
                    "{entry}"
                );

                sh(&format!(
                    "ip -n {local} neigh add 198.18.0.77 lladdr 02:00:00:00:00:77 \
                     dev {LOCAL_IF} nud permanent"
                ));
                let fixed = resolver.resolve(ip("198.18.0.77")).await.expect("resolve");
                assert_eq!(
                    fixed.map(|h| h.dst_mac),
                    Some(parse_mac("02:00:00:00:00:77"))
                );

                for dst in ["198.19.255.1", "fd00:ffff::1"] {
                    let err = resolver.resolve(ip(dst)).await.expect_err(dst);
                    let text = err.to_string();
                    assert!(text.contains(&format!("no route to {dst}")), "{text}");
                }
                let own = resolver.resolve(ip("198.18.0.1")).await;
                assert!(own.is_err(), "local address: {own:?}");

                // The MTU: the link's, or a smaller one on the route; a link change shows.
                sh(&format!(
                    "ip -n {local} route add 198.19.1.0/24 via 198.18.0.2 mtu 1300"
                ));
                sh(&format!(
                    "ip -n {local} route add 198.19.2.0/24 via 198.18.0.2 mtu 9000"
                ));
                let mtu = |dst: &'static str| {
                    let resolver = &resolver;
                    async move { resolve_eventually(resolver, ip(dst)).await.mtu }
                };
                assert_eq!(mtu("198.19.1.5").await, 1300);
                assert_eq!(mtu("198.19.2.5").await, expected.mtu);
                sh(&format!("ip -n {local} link set {LOCAL_IF} mtu 1400"));
                assert_eq!(mtu("198.18.0.2").await, 1400);
                assert_eq!(mtu("fd00:18::2").await, 1400);
            });
        });
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
    }
}
