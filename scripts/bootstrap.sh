#!/usr/bin/env bash
# Sets up a fresh Debian machine (as root) to build and test the project:
# the Debian tools the tests use (etcd-server and openssl for the fleet tests, chromium and
# chromium-driver for the dashboard test, systemd for `systemd-analyze verify` of the units), protoc and
# the well-known .proto files (etcd-client's build script needs them), LLVM 22,
# bpf-linker built against it, rust-src for the nightly toolchain that
# builds the eBPF crate, and cargo-deb (the Debian package).
# Idempotent: everything already present is skipped, so a second run takes seconds.
set -euo pipefail

log() { printf '[bootstrap] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap.sh must run as root (it installs packages)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2 procps ethtool bpftool xdp-tools tcpdump curl
  etcd-server protobuf-compiler libprotobuf-dev openssl chromium chromium-driver systemd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "Debian packages present"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "the nightly toolchain is missing; it cannot be installed on these machines" >&2
  exit 1
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
else
  log "rust-src present"
fi

if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  log "building bpf-linker against LLVM 22 (about 75 s)"
  PATH=/usr/lib/llvm-22/bin:$PATH LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
    cargo install --locked bpf-linker --version 0.13.0 \
    --no-default-features --features llvm-22
else
  log "bpf-linker present"
fi
if ! cargo deb --version >/dev/null 2>&1; then
  log "installing cargo-deb (cargo xtask dist; about 3 min)"
  cargo install --locked cargo-deb --version 3.8.0
else
  log "cargo-deb present"
fi
log "done"
