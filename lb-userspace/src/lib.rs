//! The load balancer's agent library: configuration, Maglev, the control state
//! over the datapath maps, next-hop resolution and the control API.
//!
//! Layout:
//! - `config`: the TOML file and its validation.
//! - `maglev`: weighted Maglev tables.
//! - `datapath`: the `Datapath` trait and the kernel maps behind it.
//! - `balancer`: VIPs, backends, ids and rings; applying a configuration.
//! - `collector`: reads flows and counters, expires idle flows, aggregates.
//! - `health`: backend health checks and their rise/fall thresholds.
//! - `lifecycle`: maintenance drains, hooks and rolling upgrades.
//! - `nexthop`: interface indexes and next-hop MACs through rtnetlink.
//! - `api`: requests and responses between `lbctl` and the agent.
//! - `report`: reports, flow listings and events from the collector's data.
//! - `metrics`: Prometheus text exposition of the same data.
//! - `agent`: the daemon: attach, serve the API, refresh next hops, shut down.
pub mod agent;
pub mod api;
pub mod balancer;
pub mod batch;
pub mod collector;
pub mod config;
pub mod datapath;
pub mod health;
pub mod lifecycle;
pub mod maglev;
pub mod metrics;
pub mod nexthop;
pub mod report;
