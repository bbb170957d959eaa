#!/usr/bin/env bash
# Checks raasd's /metrics with the two readers that matter outside this repo:
# Prometheus's own `promtool check metrics` (parser and naming linter) and the
# Python client's parser. `cargo test` checks the same exposition with a strict
# reader of its own (tests/common/exposition.rs); this is the second opinion.
#
#   scripts/metrics_check.sh        # uses target/debug/raasd (built if missing)
#   BIN=/path/to/raasd scripts/metrics_check.sh
#
# Installs what is missing when it can: promtool from the Debian package
# `prometheus` (apt-get, as root), prometheus_client with pip. Starts one raasd
# on loopback, serves some lines, reloads it (HUP) and kills a worker, so that
# labelled samples appear; stops it, by pid, on exit.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/raasd}
die() { printf 'metrics_check: %s\n' "$*" >&2; exit 1; }

if ! command -v promtool >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "promtool is needed: apt-get install prometheus"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
    python3 -m pip install --quiet prometheus_client
fi
if [ ! -x "$BIN" ]; then
    (cd "$REPO" && cargo build --quiet --bin raasd)
fi

WORK=$(mktemp -d /tmp/raasd-metrics.XXXXXX)
PID=""
cleanup() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
LISTEN=127.0.0.1:$(free_port)
METRICS=127.0.0.1:$(free_port)
"$BIN" -w 2 -l "$LISTEN" --metrics "$METRICS" 2>"$WORK/raasd.log" &
PID=$!

# Serves lines, waits for the counters, reloads, kills a worker and scrapes once the
# replacement is up: the exposition then has counters, gauges and labelled samples.
python3 - "$LISTEN" "$METRICS" "$PID" "$WORK/metrics.txt" <<'EOF'
import os, signal, socket, sys, time, urllib.request
listen, metrics, master, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def until(what, cond, secs=10):
    end = time.time() + secs
    while time.time() < end:
        try:
            value = cond()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"metrics_check: timed out waiting for {what}")

def scrape():
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as r:
        return r.read().decode()

def workers():
    with open(f"/proc/{master}/task/{master}/children") as f:
        return [int(p) for p in f.read().split()]

until("the metrics endpoint", scrape)
host, port = listen.rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=5) as c:
    f = c.makefile("rwb")
    for i in range(100):
        f.write(f"line {i}\n".encode())
    f.flush()
    for i in range(100):
        assert f.readline() == f"line {i}"[::-1].encode() + b"\n"
until("100 requests counted", lambda: "\nraasd_requests_total 100\n" in scrape())
os.kill(master, signal.SIGHUP)
until("the reload", lambda: 'reason="reload"} 2' in scrape())
until("2 workers", lambda: len(workers()) == 2)
os.kill(workers()[0], signal.SIGKILL)
until("the killed worker replaced", lambda: "raasd_workers_accepting 2\n" in scrape()
      and scrape().count("raasd_worker_restarts_total{") >= 2)
open(out, "w").write(scrape())
EOF

echo "metrics_check: promtool check metrics"
promtool check metrics <"$WORK/metrics.txt" || {
    cat "$WORK/metrics.txt" >&2
    die "promtool refused the exposition"
}

echo "metrics_check: prometheus_client parser"
python3 - "$WORK/metrics.txt" <<'EOF'
import sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
assert samples.get("raasd_requests_total") == 100, samples
assert samples.get("raasd_workers_target") == 2, samples
print(f"metrics_check: {len(samples)} sample names read")
EOF
echo "metrics_check: ok"
