//! The load balancer's agent library. Imports go one way, from the top of
//! this list down (a CI step checks there is no circle):
//!
//! - `agent`: the daemon: start-up, its state, loops, control API handlers,
//!   status, reports and metrics.
//! - `api`: requests and responses between `lbctl` and the agent.
//! - `bypass`: instructions between hosts for flows that skip the LB: their
//!   wire format, keys (HMAC-SHA256) and the receiver's checks.
//! - `fleet`: the etcd store of a fleet: connection over TLS, key schema,
//!   node, status and service records.
//! - `health`: backend health checks, load polls, and their scheduler.
//! - `lifecycle`: maintenance drains, hooks, rolling upgrades, load levels,
//!   and the operator's disabled flag.
//! - `balancer`: VIPs, backends, ids and rings; applying a configuration;
//!   the ordered switch-over of a VIP's pairs.
//! - `collector`: reads flows and counters, expires idle flows, aggregates.
//! - `datapath`: the `Datapath` trait, the kernel maps behind it, and the
//!   fake for unit tests.
//! - `nexthop`: interface indexes, next-hop MACs and link MTUs through rtnetlink.
//! - `ethtool`: drivers' XDP error counters (`ethtool -S`).
//! - `config`: the TOML file and its validation.
//! - `maglev`: weighted Maglev tables.
//! - `docs`: man pages and shell completions from the binaries' clap
//!   definitions (for the Debian package).
//! - `limits`: what keeps clients from using up the agent: the descriptor
//!   limit, bounded listeners, errors that mean the agent ran short.
//!
//! Below all of them, `lb-common` holds the map ABI and address encoding.
pub mod agent;
pub mod api;
pub mod balancer;
pub mod bypass;
pub mod collector;
pub mod config;
pub mod datapath;
pub mod docs;
pub mod ethtool;
pub mod fleet;
pub mod health;
pub mod lifecycle;
pub mod limits;
pub mod maglev;
pub mod nexthop;
