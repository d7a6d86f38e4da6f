#!/usr/bin/env bash
# Instructions a server executes per `echo` call, counted by valgrind's callgrind: unlike CPU
# time, the count hardly moves with the machine's other load, so it resolves changes of a few
# percent on a shared or virtual machine where a 10 s phase's CPU time varies by a third.
#
#   scripts/instructions-per-call.sh native|warren [CALLERS] [SECONDS]
#
# Starts the server under callgrind on a fresh topic (Warren: the echo plugin, JSON logs at
# info, as `warren bench --compare` runs it), warms it up, zeroes the counters, runs
# `warren bench --topic` against it, dumps the counters and prints instructions per delivery
# (deliveries counted in the profile). The
# profile stays in target/callgrind/ for `callgrind_annotate`.
#
# Caveats: the server runs about 50 times slower, so it sees larger batches per socket read
# than at full speed (expect ±1% between runs), and under valgrind wasmtime cannot reserve its
# instance pool and falls back to on-demand allocation, so the Wasm invocation's own share is
# not the production one (`make bench` measures that). Needs valgrind and a release build
# (`cargo build --release -p warren`, `make example-plugins`).
set -euo pipefail
cd "$(dirname "$0")/.."

server=${1:?usage: $0 native|warren [CALLERS] [SECONDS]}
callers=${2:-16}
seconds=${3:-10}
warren=${WARREN:-./target/release/warren}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
[ -x "$warren" ] || { echo "no $warren: cargo build --release -p warren" >&2; exit 1; }

out=target/callgrind
mkdir -p "$out"
topic="ipc_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')_$server"
log="$out/$topic.log"
grind=(valgrind --tool=callgrind --smc-check=all-non-file --dump-instr=no
       "--callgrind-out-file=$out/$topic.%p")

case $server in
  native)
    "${grind[@]}" "$warren" bench --serve-native --topic "$topic" >"$log" 2>&1 &
    ready='^READY$' ;;
  warren)
    [ -f plugins/out/echo.wasm ] || { echo "no plugins/out/echo.wasm: make example-plugins" >&2; exit 1; }
    config="$out/$topic.toml"
    cat >"$config" <<EOF
[broker]
url = "${WARREN_BROKER_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
heartbeat = 60
[server]
name = "ipc"
watch = false
cache_dir = ""
[[handler]]
topic = "$topic"
module = "$PWD/plugins/out/echo.wasm"
EOF
    WARREN_LOG_FORMAT=json WARREN_LOG=info,lapin=warn \
      "${grind[@]}" "$warren" serve --config "$config" >"$log" 2>&1 &
    ready='"message":"ready"' ;;
  *) echo "server must be native or warren" >&2; exit 2 ;;
esac
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT

for _ in $(seq 600); do
  grep -qE "$ready" "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.5
done
grep -qE "$ready" "$log" || { echo "server not ready after 300 s" >&2; exit 1; }

load() {
  "$warren" bench --topic "$topic" --callers "$callers" --duration "$1" --casts 0 --json
}
load 2 >/dev/null
callgrind_control -z $pid >/dev/null 2>&1
load "$seconds" >/dev/null
callgrind_control -d $pid >/dev/null 2>&1
kill $pid
wait $pid 2>/dev/null || true
trap - EXIT

python3 - "$out/$topic.$pid".* <<'EOF'
import re, sys
# Per delivery the server received while the counters ran, counted in the profile itself
# (calls to lapin's Delivery::new): the load generator's rate times its window undercounts
# them, since the counters also run through its ramp-up and wind-down (by 16-24% at this
# speed, which inflated the figures before 2026-12-02).
total = deliveries = 0
for path in sys.argv[1:]:
    names, callee, file_total, file_deliveries = {}, None, 0, 0
    for line in open(path, errors="replace"):
        if line.startswith(("summary:", "totals:")):
            file_total = max(file_total, int(line.split()[1]))
        elif line.startswith(("fn=", "cfn=")):
            m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
            if m and m.group(2) is not None:
                names[m.group(1)] = m.group(2)
            name = names.get(m.group(1)) if m else line.split("=", 1)[1].strip()
            callee = name if line.startswith("cfn=") else callee
        elif line.startswith("calls=") and callee == "lapin::message::Delivery::new":
            file_deliveries += int(line[6:].split()[0])
    # The dump after zeroing is the one with the most instructions since (the final one,
    # written as the process exits, holds only the shutdown).
    if file_total > total:
        total, deliveries = file_total, file_deliveries
if not deliveries:
    sys.exit("no deliveries found in the profile")
print(f"{total / deliveries:,.0f} instructions per delivery ({deliveries} deliveries); "
      f"profiles: {' '.join(sys.argv[1:])}")
EOF
