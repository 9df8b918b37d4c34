//! The load balancer's agent library: configuration, Maglev, the control state
//! over the datapath maps, next-hop resolution and the control API.
//!
//! Layout:
//! - `config`: the TOML file and its validation.
//! - `maglev`: weighted Maglev tables.
//! - `datapath`: the `Datapath` trait and the kernel maps behind it.
//! - `balancer`: VIPs, backends, ids and rings; applying a configuration.
//! - `nexthop`: interface indexes and next-hop MACs through rtnetlink.
//! - `api`: requests and responses between `lbctl` and the agent.
//! - `agent`: the daemon: attach, serve the API, refresh next hops, shut down.
pub mod agent;
pub mod api;
pub mod balancer;
pub mod batch;
pub mod config;
pub mod datapath;
pub mod maglev;
pub mod nexthop;
