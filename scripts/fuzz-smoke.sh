#!/usr/bin/env bash
# A short cargo-fuzz run of the wire decoder (fuzz/fuzz_targets/decode_request.rs) over the
# committed corpus: every seed runs first, then libFuzzer mutates for FUZZ_SECONDS (default 30).
# Installs cargo-fuzz if it is missing; needs the nightly toolchain (rustup). New inputs go to a
# scratch directory, so the committed corpus never changes; a crash leaves its input in
# fuzz/artifacts/decode_request/ and fails the script. See fuzz/README.md to run it longer.
#
#   scripts/fuzz-smoke.sh                 # 30 s
#   FUZZ_SECONDS=600 scripts/fuzz-smoke.sh
#
# Cost on a fresh 2-core machine (measured under load from other builds): installing cargo-fuzz
# about 3.5 min, once per machine (cache ~/.cargo/bin to skip it); building the target in an
# empty fuzz/target about 4.5 min, seconds when cached; then the run itself.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TO_RUN="${FUZZ_SECONDS:-30}"
TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"
CARGO_FUZZ_VERSION=0.13.2
# Its own target directory: a nightly, sanitizer-instrumented build must not evict the stable
# builds of the main workspace (CARGO_TARGET_DIR from the environment would mix them).
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/fuzz/target}"

rustup toolchain list | grep -q "^$TOOLCHAIN" || rustup toolchain install "$TOOLCHAIN" --profile minimal
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (a few minutes, once)"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

cargo "+$TOOLCHAIN" fuzz build decode_request
# The first directory receives new inputs; the committed seeds are only read.
cargo "+$TOOLCHAIN" fuzz run decode_request "$scratch" fuzz/corpus/decode_request -- \
  -max_total_time="$SECONDS_TO_RUN" -dict=fuzz/decode_request.dict \
  -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
