#!/usr/bin/env bash
# scripts/bench.sh: benchmarks raasd (2 workers) and the tokio baseline
# (examples/tokio_baseline.rs) on loopback with `raas bench`, and prints markdown
# tables: throughput, latency, errors and server CPU time per reply for each load
# scenario, memory with many idle connections, raasd's ratio to the baseline, and
# raasd's start-up time.
#
# Environment: BENCH_SECS (seconds per load scenario, default 5), IDLE_SECS (idle
# scenario, default 10), IDLE_CONNS (default 10000), BENCH_THREADS (load threads,
# default: raas bench's own), CARGO_TARGET_DIR.
#
# Only 127.0.0.1 is targeted; every run is bounded by `timeout`; every server this
# script starts is stopped by pid when it exits, however it exits.

set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${BENCH_SECS:-5}
IDLE_SECS=${IDLE_SECS:-10}
IDLE_CONNS=${IDLE_CONNS:-10000}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
TICKS=$(getconf CLK_TCK)
WORK=$(mktemp -d)
THREADS=()
[ -n "${BENCH_THREADS:-}" ] && THREADS=(--threads "$BENCH_THREADS")

STARTED=() # pids of the servers this script started

die() {
    echo "bench.sh: $*" >&2
    exit 1
}

# Stops one process by pid: TERM, then KILL if it is still there after 10 s.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

# Stops a server this script started and forgets it (its pid may be reused later).
stop_server() {
    local pid=$1 keep=() p
    stop_pid "$pid"
    for p in "${STARTED[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    STARTED=("${keep[@]}")
}

cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 10,000 idle connections need as many descriptors in each server process.
if [ "$(ulimit -n)" -lt 65536 ]; then
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi

echo "building (release)..." >&2
(cd "$ROOT" && cargo build --release --quiet --bins --example tokio_baseline) ||
    die "cargo build failed"

# ---------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------

# Waits up to 10 s for a regex in a log file; prints the first matching line.
wait_log() {
    local file=$1 regex=$2 i
    for ((i = 0; i < 1000; i++)); do
        if grep -m1 -E "$regex" "$file" 2>/dev/null; then return 0; fi
        sleep 0.01
    done
    return 1
}

# Starts a server command in the background; sets SERVER_PID and SERVER_ADDR.
start_server() {
    local log=$1 ready=$2
    shift 2
    "$@" 2>"$log" &
    SERVER_PID=$!
    STARTED+=("$SERVER_PID")
    wait_log "$log" "$ready" >/dev/null || die "$1 did not start; log: $(cat "$log")"
    SERVER_ADDR=$(grep -m1 -oE 'listening on 127\.0\.0\.1:[0-9]+' "$log" | cut -d' ' -f3)
    [ -n "$SERVER_ADDR" ] || die "no listening address in $log"
}

# The server's processes: the master (or only process) and its children.
server_pids() {
    local root=$1 f rest
    echo "$root"
    for f in /proc/[0-9]*/stat; do
        rest=$(cat "$f" 2>/dev/null) || continue
        rest=${rest##*) }
        set -- $rest
        [ "${2:-}" = "$root" ] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
}

# utime+stime, in clock ticks, of the server's processes (fields 14 and 15).
cpu_ticks() {
    local total=0 pid rest
    for pid in $(server_pids "$1"); do
        rest=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${rest##*) }
        set -- $rest
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

rss_kb() {
    awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}

# A number from raas bench's JSON (top-level field, or one inside latency_us), as an
# integer.
jget() {
    sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" <<<"$2" | awk 'NR == 1 { printf "%.0f", $1 }'
}

# ---------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------

ROWS=()      # markdown rows of the load table
IDLE_ROWS=() # markdown rows of the idle table
declare -A RPS CPU

# run_load NAME SERVER_LABEL ARGS...: one load scenario against SERVER_PID/ADDR.
run_load() {
    local name=$1 label=$2 json before after replies cpu_us
    shift 2
    before=$(cpu_ticks "$SERVER_PID")
    json=$(timeout $((SECS + 60)) "$BIN/raas" bench "$SERVER_ADDR" --duration "$SECS" \
        "${THREADS[@]}" --json "$@" 2>"$WORK/bench.err")
    after=$(cpu_ticks "$SERVER_PID")
    if [ -z "$json" ]; then
        ROWS+=("| $label | $name | failed: $(head -c 200 "$WORK/bench.err") | | | | | | |")
        return
    fi
    replies=$(jget replies "$json")
    cpu_us=$(awk -v t=$((after - before)) -v hz="$TICKS" -v n="$replies" \
        'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else print "-" }')
    RPS[$label/$name]=$(jget rps "$json")
    CPU[$label/$name]=$cpu_us
    ROWS+=("| $label | $name | $(jget rps "$json") | $(jget p50 "$json") | $(jget p99 "$json") \
| $(jget p999 "$json") | $(jget max "$json") | $(jget error_total "$json") | $cpu_us |")
}

# run_idle SERVER_LABEL: IDLE_CONNS connections, one line each per second; samples
# the server's resident memory while they are all open and keeps the peak.
run_idle() {
    local label=$1 before after json pid peak=0 peak_master=0 peak_workers=0 m w t i
    local rss_before=0
    for pid in $(server_pids "$SERVER_PID"); do
        rss_before=$((rss_before + $(rss_kb "$pid")))
    done
    before=$(cpu_ticks "$SERVER_PID")
    timeout $((IDLE_SECS + 60)) "$BIN/raas" bench "$SERVER_ADDR" --mode idle \
        --conns "$IDLE_CONNS" --interval 1 --duration "$IDLE_SECS" "${THREADS[@]}" \
        --json >"$WORK/idle.json" 2>"$WORK/idle.err" &
    local bench=$!
    for ((i = 0; i < (IDLE_SECS + 60) * 2; i++)); do
        kill -0 "$bench" 2>/dev/null || break
        m=$(rss_kb "$SERVER_PID")
        w=0
        for pid in $(server_pids "$SERVER_PID"); do
            [ "$pid" = "$SERVER_PID" ] || w=$((w + $(rss_kb "$pid")))
        done
        t=$((m + w))
        if [ "$t" -gt "$peak" ]; then peak=$t peak_master=$m peak_workers=$w; fi
        sleep 0.5
    done
    wait "$bench"
    after=$(cpu_ticks "$SERVER_PID")
    json=$(cat "$WORK/idle.json")
    local replies cpu_us
    replies=$(jget replies "$json")
    cpu_us=$(awk -v t=$((after - before)) -v hz="$TICKS" -v n="${replies:-0}" \
        'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else print "-" }')
    local mib='BEGIN { printf "%.1f", kb / 1024 }'
    IDLE_ROWS+=("| $label | $IDLE_CONNS | ${replies:--} | $(jget p50 "$json") | $(jget p99 "$json") \
| $(jget error_total "$json") | $(awk -v kb="$rss_before" "$mib") \
| $(awk -v kb="$peak_master" "$mib") | $(awk -v kb="$peak_workers" "$mib") \
| $(awk -v kb="$peak" "$mib") | $cpu_us |")
}

run_all() {
    local label=$1
    run_load "persist 50 conns x pipeline 16" "$label" --mode persist --conns 50 --pipeline 16
    run_load "persist 50 conns x pipeline 1" "$label" --mode persist --conns 50 --pipeline 1
    run_load "connect 16 concurrent" "$label" --mode connect --conns 16
    run_idle "$label"
}

# ---------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------

echo "raasd -w 2..." >&2
start_server "$WORK/raasd.log" 'all 2 workers accepting' \
    "$BIN/raasd" -w 2 -l 127.0.0.1:0 --pid "$WORK/raasd.pid"
RAASD_PID=$SERVER_PID
run_all raasd
stop_server "$RAASD_PID"

echo "tokio baseline..." >&2
start_server "$WORK/tokio.log" 'listening on' "$BIN/examples/tokio_baseline" 127.0.0.1:0
TOKIO_PID=$SERVER_PID
run_all tokio
stop_server "$TOKIO_PID"

# Start-up: from spawning raasd -w 3 to its "all 3 workers accepting" line (the log's
# millisecond timestamp), confirmed by a round trip; five runs.
echo "start-up..." >&2
STARTUP=()
for run in 1 2 3 4 5; do
    t0=$(date +%s%N)
    start_server "$WORK/startup.log" 'all 3 workers accepting' \
        "$BIN/raasd" -w 3 -l 127.0.0.1:0
    line=$(grep -m1 'all 3 workers accepting' "$WORK/startup.log")
    stamp=$(sed -n 's/^\[\([^ ]*\) .*/\1/p' <<<"$line")
    t1=$(date -d "$stamp" +%s%N)
    reply=$(printf 'ping\n' | timeout 10 "$BIN/raas" --retry-for 0 "$SERVER_ADDR")
    [ "$reply" = "gnip" ] || die "no round trip after start-up (got '$reply')"
    STARTUP+=("$(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f", d / 1e6 }')")
    stop_server "$SERVER_PID"
done
SORTED=($(printf '%s\n' "${STARTUP[@]}" | sort -g))

# ---------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------

echo
echo "Machine: $(nproc) CPUs, $(uname -sr); load average before the report: $(cut -d' ' -f1-3 /proc/loadavg)."
echo "Load: raas bench, ${SECS} s per scenario, 32-byte ASCII lines, every reply verified."
echo
echo "| server | scenario | replies/s | p50 µs | p99 µs | p99.9 µs | max µs | errors | server CPU µs/reply |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Idle: $IDLE_CONNS connections, each sending one line per second for ${IDLE_SECS} s; RSS from /proc/PID/status (peak of the total while connected; the tokio baseline is one process, shown as master)."
echo
echo "| server | conns | replies | p50 µs | p99 µs | errors | RSS before MiB | RSS master MiB | RSS workers MiB | RSS total MiB | server CPU µs/reply |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${IDLE_ROWS[@]}"
echo
echo "raasd / tokio:"
echo
echo "| scenario | raasd replies/s | tokio replies/s | ratio | raasd CPU µs/reply | tokio CPU µs/reply |"
echo "|---|---:|---:|---:|---:|---:|"
for name in "persist 50 conns x pipeline 16" "persist 50 conns x pipeline 1" "connect 16 concurrent"; do
    r=${RPS[raasd/$name]:-0} t=${RPS[tokio/$name]:-0}
    ratio=$(awk -v r="$r" -v t="$t" 'BEGIN { if (t > 0) printf "%.2f", r / t; else print "-" }')
    echo "| $name | $r | $t | $ratio | ${CPU[raasd/$name]:--} | ${CPU[tokio/$name]:--} |"
done
echo
echo "raasd -w 3 start-up (spawn to 'all 3 workers accepting'), 5 runs: min ${SORTED[0]} ms, median ${SORTED[2]} ms, max ${SORTED[4]} ms."
