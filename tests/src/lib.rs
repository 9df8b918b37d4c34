//! Test support: packet builders, the `BPF_PROG_TEST_RUN` fixture harness, and
//! network-namespace topologies for end-to-end tests and the demo.
pub mod bypass;
pub mod etcd;
pub mod fixture;
pub mod hosts;
pub mod packet;
pub mod scaleout;
pub mod topology;
