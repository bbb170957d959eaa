#!/usr/bin/env bash
# scripts/ab.sh: compares two raasd builds under the same load, alternating runs so
# that the noise of a shared machine falls on both alike, and prints the median of
# each scenario and their ratio (B / A): replies per second, and the server's CPU time
# (master and workers, read from /proc) per reply.
#
#   scripts/ab.sh A_BIN_DIR B_BIN_DIR
#
# Each directory holds a release `raasd`; the load generator is B's `raas`. To build A
# from an older commit: git worktree add /tmp/a COMMIT && (cd /tmp/a &&
# CARGO_TARGET_DIR=/tmp/a-target cargo build --release --bin raasd), then pass
# /tmp/a-target/release. Environment: RUNS (per build and scenario, default 5), SECS
# (per run, default 3), WORKERS (default 2), A_ARGS and B_ARGS (more raasd options for
# each side: one build against itself with `A_ARGS="--sandbox off" B_ARGS="--sandbox
# on"`). Besides the ratio of the medians, the last column is the median of the ratios
# of each round (B's run against the A run just before it), which cancels the drift of
# a busy machine between rounds. SCENARIOS: a `|`-separated subset of the scenarios
# (as the first column writes them). Against the tokio baseline: a directory whose
# `raasd` is `#!/bin/sh` + `exec .../release/examples/tokio_baseline "$4"`. Only
# 127.0.0.1 is targeted; every server is stopped by pid.

set -uo pipefail
A=${1:?usage: scripts/ab.sh A_BIN_DIR B_BIN_DIR}
B=${2:?usage: scripts/ab.sh A_BIN_DIR B_BIN_DIR}
RUNS=${RUNS:-5}
SECS=${SECS:-3}
WORKERS=${WORKERS:-2}
A_ARGS=${A_ARGS:-}
B_ARGS=${B_ARGS:-}
RAAS=$B/raas
SERVER=""

cleanup() { [ -n "$SERVER" ] && kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# run BIN_DIR "RAASD-ARGS" SCENARIO-ARGS... : prints replies/s of one run.
run() {
    local dir=$1 extra=$2 port
    shift 2
    port=$(free_port)
    # shellcheck disable=SC2086
    "$dir/raasd" -w "$WORKERS" -l "127.0.0.1:$port" $extra 2>/dev/null &
    SERVER=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.02
    done
    local json
    json=$(timeout $((SECS + 20)) "$RAAS" bench "127.0.0.1:$port" --duration "$SECS" --json "$@" 2>/dev/null)
    # Replies per second, and the server's CPU time (master and workers, from /proc)
    # per reply in microseconds, as "RPS/CPU".
    python3 - "$SERVER" "$json" <<'PY'
import json, os, sys
pid, r = int(sys.argv[1]), json.loads(sys.argv[2])
ticks = os.sysconf("SC_CLK_TCK")
def cpu(p):
    try:
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except OSError:
        return 0
kids = [int(d) for d in os.listdir("/proc") if d.isdigit() and os.path.exists(f"/proc/{d}/stat")
        and open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid)]
total = cpu(pid) + sum(cpu(k) for k in kids)
print(f'{int(r["rps"])}/{total / ticks * 1e6 / max(r["replies"], 1):.2f}')
PY
    kill -TERM "$SERVER" 2>/dev/null
    wait "$SERVER" 2>/dev/null
    SERVER=""
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }

printf '%-28s %12s %12s %7s %9s %9s %7s %7s\n' scenario "A median/s" "B median/s" "B/A" "A us/rep" "B us/rep" "B/A" "rounds"
ALL="connect --conns 16|persist --conns 50 --pipeline 1|persist --conns 50 --pipeline 16"
IFS='|' read -r -a CHOSEN <<<"${SCENARIOS:-$ALL}"
for scenario in "${CHOSEN[@]}"; do
    scenario="--mode $scenario"
    a_runs=()
    b_runs=()
    for _ in $(seq "$RUNS"); do
        # shellcheck disable=SC2086
        a_runs+=("$(run "$A" "$A_ARGS" $scenario)")
        # shellcheck disable=SC2086
        b_runs+=("$(run "$B" "$B_ARGS" $scenario)")
    done
    a=$(printf '%s\n' "${a_runs[@]%/*}" | median)
    b=$(printf '%s\n' "${b_runs[@]%/*}" | median)
    a_cpu=$(printf '%s\n' "${a_runs[@]#*/}" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    b_cpu=$(printf '%s\n' "${b_runs[@]#*/}" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    # The CPU ratio of each round (B against the A run just before it), and its median.
    rounds=$(python3 -c "
import statistics, sys
a = [float(r.split('/')[1]) for r in sys.argv[1].split()]
b = [float(r.split('/')[1]) for r in sys.argv[2].split()]
print(f'{statistics.median(y / x for x, y in zip(a, b) if x):.3f}')" "${a_runs[*]}" "${b_runs[*]}")
    printf '%-28s %12s %12s %7s %9s %9s %7s %7s   (A: %s; B: %s)\n' "${scenario//--mode /}" "$a" "$b" \
        "$(python3 -c "print(f'{$b/$a:.2f}' if $a else '-')")" "$a_cpu" "$b_cpu" \
        "$(python3 -c "print(f'{$b_cpu/$a_cpu:.2f}' if $a_cpu else '-')")" "$rounds" "${a_runs[*]}" "${b_runs[*]}"
done
