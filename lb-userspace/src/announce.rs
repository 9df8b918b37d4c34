//! VIP routes for the BGP speaker: one host route per announced VIP address
//! (`VIP/32` or `VIP/128` on `lo`) in a kernel routing table the agent owns.
//! BIRD's kernel protocol learns that table (`learn`) and its BGP sessions
//! export the routes with this node as next hop; a route removed here is
//! withdrawn from the BGP peers within BIRD's netlink notification. No BGP
//! is spoken here, and a table other than main is never used for
//! forwarding, so the routes change nothing on this host.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context as _, Result};
use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
        AddressFamily,
    },
    RouteMessageBuilder,
};

/// Writes and reads the announced routes of one kernel table.
#[derive(Clone)]
pub struct Announcer {
    handle: rtnetlink::Handle,
    table: u32,
    loopback: u32,
}

/// What one `sync` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

impl Announcer {
    /// Opens rtnetlink for `table` (inside a tokio runtime).
    pub async fn new(table: u32) -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening rtnetlink for the VIP routes")?;
        tokio::spawn(connection);
        let loopback = handle
            .link()
            .get()
            .match_name("lo".to_string())
            .execute()
            .try_next()
            .await
            .context("looking up the loopback interface")?
            .context("no loopback interface")?
            .header
            .index;
        Ok(Self {
            handle,
            table,
            loopback,
        })
    }

    pub fn table(&self) -> u32 {
        self.table
    }

    /// The host routes in the table now: what BIRD announces.
    pub async fn announced(&self) -> Result<BTreeSet<IpAddr>> {
        let mut found = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            let mut routes = self.handle.route().get(request).execute();
            while let Some(route) = routes
                .try_next()
                .await
                .with_context(|| format!("reading routing table {}", self.table))?
            {
                if let Some(address) = self.host_route(&route) {
                    found.insert(address);
                }
            }
        }
        Ok(found)
    }

    /// The destination of a host route of our table.
    fn host_route(&self, route: &RouteMessage) -> Option<IpAddr> {
        let table = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(route.header.table));
        if table != self.table || route.header.kind != RouteType::Unicast {
            return None;
        }
        let address = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        })?;
        let host_len = if address.is_ipv4() { 32 } else { 128 };
        (route.header.destination_prefix_length == host_len).then_some(address)
    }

    fn message(&self, address: IpAddr) -> Result<RouteMessage> {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(address, prefix)
            .with_context(|| format!("a host route for {address}"))?
            .output_interface(self.loopback)
            .table_id(self.table)
            .protocol(RouteProtocol::Static)
            .build())
    }

    /// Makes the table hold exactly `wanted`: missing routes are added, others
    /// removed (the table is the agent's). Returns what changed.
    pub async fn sync(&self, wanted: &BTreeSet<IpAddr>) -> Result<Changes> {
        let present = self.announced().await?;
        let mut changes = Changes::default();
        for address in wanted.difference(&present) {
            self.handle
                .route()
                .add(self.message(*address)?)
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding {address} to routing table {}", self.table))?;
            changes.added.push(*address);
        }
        for address in present.difference(wanted) {
            self.handle
                .route()
                .del(self.message(*address)?)
                .execute()
                .await
                .with_context(|| format!("removing {address} from routing table {}", self.table))?;
            changes.removed.push(*address);
        }
        Ok(changes)
    }
}
