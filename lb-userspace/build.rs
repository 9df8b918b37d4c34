//! Points `LB_EBPF_OBJECT` at the eBPF object built by `cargo xtask build-ebpf`,
//! so the agent embeds it and ships as one binary.
use std::path::PathBuf;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let object = std::env::var_os("LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/lb-ebpf"));
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the eBPF object {} does not exist: run `cargo xtask build-ebpf` first (or any `cargo xtask` command, which builds it)",
            object.display()
        );
    }
    println!("cargo:rustc-env=LB_EBPF_OBJECT={}", object.display());
}
