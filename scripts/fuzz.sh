#!/usr/bin/env bash
# Fuzzes the RAAS codec with cargo-fuzz (libFuzzer) for a bounded time.
#   scripts/fuzz.sh [SECONDS]     (default 60)
# cargo-fuzz needs nightly compiler features; with only a stable toolchain,
# RUSTC_BOOTSTRAP=1 enables them. Not part of `cargo test`: the always-on guard is
# the proptest property test in tests/codec_properties.rs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
mkdir -p corpus/codec_split
printf 'hello\nwörld\r\n\xff\xfe\n' > corpus/codec_split/seed
cargo fuzz run codec_split corpus/codec_split -- -max_total_time="$seconds" -max_len=4096 2>&1 | tail -n 20
