#!/usr/bin/env bash
# Three raasd "hosts" behind HAProxy, loaded through HAProxy with `raas bench`
# while each host in turn gets a binary upgrade (a new binary installed, then
# USR2). Prints requests and failures per phase; zero failures is the goal.
# Then one host is stopped gracefully (TERM, --drain-delay 3) under
# connect-per-request load: its /readyz fails at once, HAProxy takes it out,
# and not one request fails.
#
# The hosts are network namespaces joined to this one by veth pairs when run as
# root and `ip netns` works, else three loopback addresses (127.0.0.2-4).
# HAProxy (installed with apt-get when missing and possible) listens on
# 127.0.0.1 in TCP mode and health-checks every host's GET /readyz (--metrics).
#
#   scripts/multihost.sh                    # builds the release binaries first
#   NO_BUILD=1 BIN_DIR=/path/to/release scripts/multihost.sh
#   MULTIHOST_MODE=loopback scripts/multihost.sh
#
# Settings (environment): PHASE_SECS (5), CONNS (16), PIPELINE (1), WORKERS (2),
# MULTIHOST_MODE (auto|netns|loopback), KEEP=1 keeps the work directory.
# Takes about 4 x PHASE_SECS + 20 seconds; every process it starts is stopped,
# by pid, on exit, and the namespaces are removed.
set -euo pipefail

# Become a child subreaper (PR_SET_CHILD_SUBREAPER, kept across exec): a master
# started by an upgrade outlives its parent, the old master, and is then adopted
# and reaped by this script rather than by init.
if [ -z "${MULTIHOST_SUBREAPER:-}" ] && command -v python3 >/dev/null; then
    export MULTIHOST_SUBREAPER=1
    exec python3 -c 'import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
os.execv(sys.argv[1], sys.argv[1:])' "$BASH" "$0" "$@"
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/release}
PHASE_SECS=${PHASE_SECS:-5}
CONNS=${CONNS:-16}
PIPELINE=${PIPELINE:-1}
WORKERS=${WORKERS:-2}
DRAIN_SECS=${DRAIN_SECS:-3}
MODE=${MULTIHOST_MODE:-auto}
HOSTS=(1 2 3)

say() { printf '%s\n' "$*"; }
die() { printf 'multihost: %s\n' "$*" >&2; exit 1; }

# --- binaries and HAProxy -----------------------------------------------------
if [ -z "${NO_BUILD:-}" ]; then
    say "building release binaries (cargo build --release --bin raasd --bin raas)"
    (cd "$REPO" && cargo build --release --quiet --bin raasd --bin raas)
fi
[ -x "$BIN/raasd" ] && [ -x "$BIN/raas" ] || die "no raasd/raas in $BIN (set BIN_DIR)"

HAPROXY=$(command -v haproxy || true)
[ -z "$HAPROXY" ] && [ -x /usr/sbin/haproxy ] && HAPROXY=/usr/sbin/haproxy
if [ -z "$HAPROXY" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing haproxy (apt-get install -y haproxy)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
        HAPROXY=/usr/sbin/haproxy
    fi
fi
[ -n "$HAPROXY" ] && [ -x "$HAPROXY" ] || die "haproxy is needed: apt-get install haproxy"
command -v python3 >/dev/null || die "python3 is needed"

# --- clean-up: everything started here is stopped by its pid ---------------------
WORK=$(mktemp -d /tmp/raasd-multihost.XXXXXX)
NETNS=()
VETHS=()
CHILDREN=()   # processes this shell started: haproxy, the relay, the bench
MASTERS=()    # every raasd master seen (started here, or by an upgrade)

alive() { # pid is running (not gone, not a zombie)
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

stop_pids() { # TERM, wait up to 5 s, then KILL
    local pid deadline=$((SECONDS + 5))
    for pid in "$@"; do alive "$pid" && kill -TERM "$pid" 2>/dev/null; done
    for pid in "$@"; do
        while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null
    done
    return 0
}

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    local masters=() pid
    for pid in "${MASTERS[@]}"; do
        # Only raasd masters this script knows of, and only while they still are.
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = raasd-master ] && masters+=("$pid")
    done
    stop_pids "${CHILDREN[@]}" "${masters[@]}"
    for pid in "${CHILDREN[@]}" "${MASTERS[@]}"; do wait "$pid" 2>/dev/null; done
    for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null; done
    for veth in "${VETHS[@]}"; do ip link del "$veth" 2>/dev/null; done
    if [ -n "${KEEP:-}" ] || [ "$status" != 0 ]; then
        say "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers in Python: free ports, HAProxy stats, the relay, the report --------
cat >"$WORK/helper.py" <<'PY'
import json, os, signal, socket, sys, time

def free_port(hosts):
    for _ in range(200):
        s = socket.socket(); s.bind((hosts[0], 0)); port = s.getsockname()[1]; s.close()
        try:
            for h in hosts:
                t = socket.socket(); t.bind((h, port)); t.close()
            return port
        except OSError:
            continue
    sys.exit("no free port")

def stats(sock):
    s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sock)
    s.sendall(b"show stat\n"); data = b""
    while chunk := s.recv(65536):
        data += chunk
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(head, l.split(","))) for l in lines[1:] if l]
    return [r for r in rows if r["pxname"] == "raasd" and r["svname"].startswith("host")]

def relay(log, binary, *hosts):
    # raas bench --chaos sends USR2 here once per phase; each one upgrades the next
    # host: a new binary is installed at its path, then its master gets USR2.
    todo = [h.split("=", 1) for h in hosts]
    out = open(log, "a", buffering=1)
    def on_usr2(*_):
        if not todo:
            return
        path, pidfile = todo.pop(0)
        with open(binary, "rb") as src, open(path + ".new", "wb") as dst:
            dst.write(src.read())
        os.chmod(path + ".new", 0o755); os.replace(path + ".new", path)
        pid = int(open(pidfile).read())
        os.kill(pid, signal.SIGUSR2)
        out.write(f"{time.time():.3f} {pid}\n")
    signal.signal(signal.SIGUSR2, on_usr2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    out.write("ready\n")
    while True:
        signal.pause()

def report(bench, labels):
    r = json.load(open(bench)); labels = labels.split(",")
    fmt = "{:<6}{:<30}{:>7}{:>7}{:>10}{:>10}{:>11}{:>10}"
    print(fmt.format("phase", "event", "from_s", "to_s", "requests", "replies", "reconnects", "failures"))
    for p in r["phases"]:
        print(fmt.format(p["index"], labels[p["index"]], f'{p["start_s"]:.2f}', f'{p["end_s"]:.2f}',
                         p["requests"], p["replies"], p["reconnects"], sum(p["errors"].values())))
    e = r["errors"]
    print(fmt.format("total", "", "0.00", f'{r["duration_s"]:.2f}', r["requests"], r["replies"],
                     r["reconnects"], r["error_total"]))
    print(f'failures by kind: {", ".join(f"{k} {v}" for k, v in e.items())}; '
          f'{r["rps"]:.0f} replies/s; latency p50 {r["latency_us"]["p50"]} us, '
          f'p99 {r["latency_us"]["p99"]} us, max {r["latency_us"]["max"]} us')
    # With live hand-over (raasd's default) an upgrade moves connections: a reconnect
    # is a failure too, unless ALLOW_RECONNECTS=1 (for --handover off).
    reconnects = 0 if os.environ.get("ALLOW_RECONNECTS") == "1" else r["reconnects"]
    if reconnects:
        print(f"{reconnects} reconnects: the upgrades closed connections instead of moving them")
    return r["error_total"] + reconnects

cmd = sys.argv[1]
if cmd == "free-port":
    print(free_port(sys.argv[2:]))
elif cmd == "all-up":
    sys.exit(0 if [r["status"] for r in stats(sys.argv[2])] == ["UP"] * 3 else 1)
elif cmd == "stats":
    print("{:<7}{:<22}{:<8}{:>9}{:>14}{:>15}".format(
        "server", "address", "status", "sessions", "checks failed", "went DOWN"))
    down = 0
    for r in stats(sys.argv[2]):
        print("{:<7}{:<22}{:<8}{:>9}{:>14}{:>15}".format(
            r["svname"], r["addr"], r["status"], r["stot"], r["chkfail"], r["chkdown"]))
        down += int(r["chkdown"] or 0)
    sys.exit(0 if down == 0 else 1)
elif cmd == "retries":
    # What HAProxy hid from the clients: failed connects to a host, retried or
    # redispatched elsewhere.
    r = next(r for r in stats(sys.argv[2]) if r["svname"] == sys.argv[3])
    print(sum(int(r[k] or 0) for k in ("econ", "wretr", "wredis")))
elif cmd == "relay":
    relay(*sys.argv[2:])
elif cmd == "report":
    sys.exit(0 if report(*sys.argv[2:]) == 0 else 1)
PY
helper() { python3 "$WORK/helper.py" "$@"; }

# --- three hosts ----------------------------------------------------------------
setup_netns() {
    [ "$(id -u)" = 0 ] && command -v ip >/dev/null || return 1
    local net=$((100 + $$ % 100)) i ns vh vn
    for i in "${HOSTS[@]}"; do
        ns="raasd-mh-$$-$i" vh="rmh$$h$i" vn="rmh$$n$i"
        ip netns add "$ns" 2>/dev/null || return 1
        NETNS+=("$ns")
        ip link add "$vh" type veth peer name "$vn" 2>/dev/null || return 1
        VETHS+=("$vh")
        ip link set "$vn" netns "$ns" &&
            ip addr add "10.$net.$i.1/24" dev "$vh" && ip link set "$vh" up &&
            ip netns exec "$ns" ip addr add "10.$net.$i.2/24" dev "$vn" &&
            ip netns exec "$ns" ip link set "$vn" up &&
            ip netns exec "$ns" ip link set lo up || return 1
        ADDR[$i]="10.$net.$i.2:2200"
        MADDR[$i]="10.$net.$i.2:9187"
        RUN[$i]="ip netns exec $ns"
    done
}

declare -A ADDR MADDR RUN
MPORT=9187
if [ "$MODE" != loopback ] && setup_netns; then
    MODE=netns
    say "hosts: network namespaces ${NETNS[*]}, each joined by a veth pair"
else
    [ "$MODE" = netns ] && die "network namespaces are not available here"
    why="not root, or no ip netns"
    [ "$MODE" = loopback ] && why="MULTIHOST_MODE=loopback"
    for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null; done
    for veth in "${VETHS[@]}"; do ip link del "$veth" 2>/dev/null; done
    NETNS=() VETHS=()
    MODE=loopback
    port=$(helper free-port 127.0.0.2 127.0.0.3 127.0.0.4)
    MPORT=$(helper free-port 127.0.0.2 127.0.0.3 127.0.0.4)
    for i in "${HOSTS[@]}"; do
        ADDR[$i]="127.0.0.$((i + 1)):$port" MADDR[$i]="127.0.0.$((i + 1)):$MPORT" RUN[$i]=""
    done
    say "hosts: loopback addresses 127.0.0.2-4 ($why)"
fi

for i in "${HOSTS[@]}"; do
    dir="$WORK/host$i"
    mkdir -p "$dir"
    install -m 755 "$BIN/raasd" "$dir/raasd"
    # shellcheck disable=SC2086 # RUN is a command prefix, split on purpose
    ${RUN[$i]} "$dir/raasd" -w "$WORKERS" -l "${ADDR[$i]}" --graceful-timeout 10 \
        --metrics "${MADDR[$i]}" --drain-delay "$DRAIN_SECS" \
        --pid "$dir/raasd.pid" --log-file "$dir/raasd.log" \
        </dev/null >/dev/null 2>>"$dir/stderr" &
    MASTERS+=("$!")
done
for i in "${HOSTS[@]}"; do
    deadline=$((SECONDS + 10))
    until [ "$(printf 'ping\n' | "$BIN/raas" --retry-for 0 "${ADDR[$i]}" 2>/dev/null)" = gnip ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "host$i did not answer on ${ADDR[$i]}: $(cat "$WORK/host$i/stderr")"
        sleep 0.1
    done
    say "host$i: raasd -w $WORKERS on ${ADDR[$i]}, master pid $(cat "$WORK/host$i/raasd.pid")"
done

# --- HAProxy ----------------------------------------------------------------------
FRONT=$(helper free-port 127.0.0.1)
cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 1000
    stats socket $WORK/haproxy.sock mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 75s
    timeout server 75s
    retries 3
    option redispatch
frontend raas
    bind 127.0.0.1:$FRONT
    default_backend raasd
backend raasd
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2 maxconn 5000
    server host1 ${ADDR[1]} check port $MPORT
    server host2 ${ADDR[2]} check port $MPORT
    server host3 ${ADDR[3]} check port $MPORT
EOF
"$HAPROXY" -c -q -f "$WORK/haproxy.cfg" || die "bad HAProxy configuration"
"$HAPROXY" -db -f "$WORK/haproxy.cfg" </dev/null >"$WORK/haproxy.log" 2>&1 &
CHILDREN+=("$!")
deadline=$((SECONDS + 10))
until [ -S "$WORK/haproxy.sock" ] && helper all-up "$WORK/haproxy.sock" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "HAProxy did not see 3 hosts UP: $(cat "$WORK/haproxy.log")"
    sleep 0.2
done
say "haproxy $("$HAPROXY" -v | awk 'NR==1{print $3}'): tcp mode on 127.0.0.1:$FRONT, all 3 hosts UP (httpchk GET /readyz on port $MPORT)"

# --- load, and one upgrade per phase ---------------------------------------------------
: >"$WORK/relay.log"
python3 "$WORK/helper.py" relay "$WORK/relay.log" "$BIN/raasd" \
    "$WORK/host1/raasd=$WORK/host1/raasd.pid" \
    "$WORK/host2/raasd=$WORK/host2/raasd.pid" \
    "$WORK/host3/raasd=$WORK/host3/raasd.pid" &
RELAY=$!
CHILDREN+=("$RELAY")
until grep -q ready "$WORK/relay.log"; do sleep 0.05; done

BENCH=("$BIN/raas" bench --addr "127.0.0.1:$FRONT" --conns "$CONNS" --pipeline "$PIPELINE"
    --duration "$((4 * PHASE_SECS))" --json
    --chaos "$RELAY" --chaos-script USR2,USR2,USR2 --chaos-interval "$PHASE_SECS")
say "load: raas bench --addr 127.0.0.1:$FRONT --conns $CONNS --pipeline $PIPELINE --duration $((4 * PHASE_SECS)) --json --chaos RELAY --chaos-script USR2,USR2,USR2 --chaos-interval $PHASE_SECS"
say "      (every $PHASE_SECS s the relay installs a new raasd binary on the next host and sends its master USR2)"
timeout $((4 * PHASE_SECS + 20)) "${BENCH[@]}" >"$WORK/bench.json" 2>"$WORK/bench.err" &
BENCH_PID=$!
CHILDREN+=("$BENCH_PID")

ms() { # milliseconds between two log timestamps
    python3 -c 'import datetime as d, sys; t = [d.datetime.fromisoformat(a) for a in sys.argv[1:]]
print(int((t[1] - t[0]).total_seconds() * 1000))' "$1" "$2"
}

# Follow each upgrade: the pid file names a new master, .oldbin is gone, and the
# old master has exited; only then is the host done.
upgrades_ok=1
for i in "${HOSTS[@]}"; do
    pidfile="$WORK/host$i/raasd.pid"
    deadline=$((SECONDS + PHASE_SECS + 5))
    until [ "$(grep -vc ready "$WORK/relay.log")" -ge "$i" ]; do
        [ "$SECONDS" -lt "$deadline" ] || break
        sleep 0.05
    done
    old=$(sed -n "$((i + 1))p" "$WORK/relay.log" | awk '{print $2}')
    [ -n "$old" ] || { say "host$i: USR2 was never sent"; upgrades_ok=0; continue; }
    deadline=$((SECONDS + PHASE_SECS))
    while :; do
        new=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$new" ] && [ "$new" != "$old" ] && [ ! -e "$pidfile.oldbin" ] && ! alive "$old"; then
            break
        fi
        [ "$SECONDS" -lt "$deadline" ] || { new=""; break; }
        sleep 0.05
    done
    if [ -z "$new" ]; then
        say "host$i: upgrade of master $old did not complete within ${PHASE_SECS}s"
        upgrades_ok=0
        continue
    fi
    MASTERS+=("$new")
    log="$WORK/host$i/raasd.log"
    started=$(grep -m1 "master pid=$old\] upgrade: started" "$log" | cut -c2-24)
    ready=$(grep -m1 "master pid=$old\] upgrade: new master pid $new is ready" "$log" | cut -c2-24)
    exited=$(grep -m1 "master pid=$old\] exiting" "$log" | cut -c2-24)
    say "host$i: master $old -> $new: new master ready in $(ms "$started" "$ready") ms, old master drained and exited $(ms "$started" "$exited") ms after USR2; title: $(tr '\0' ' ' <"/proc/$new/cmdline" | sed 's/ *$//')"
done

bench_status=0
wait "$BENCH_PID" || bench_status=$?
say ""
labels="baseline (no upgrade)"
for i in "${HOSTS[@]}"; do labels="$labels,USR2 -> host$i (${ADDR[$i]})"; done
[ -s "$WORK/bench.json" ] || die "raas bench printed nothing (exit $bench_status): $(cat "$WORK/bench.err")"
report_ok=1
helper report "$WORK/bench.json" "$labels" || report_ok=0
say ""
stats_ok=1
helper stats "$WORK/haproxy.sock" || stats_ok=0
say ""
if [ "$report_ok" = 1 ] && [ "$stats_ok" = 1 ] && [ "$upgrades_ok" = 1 ] && [ "$bench_status" = 0 ]; then
    say "result: 3 upgrades under load through HAProxy ($MODE mode), 0 failed requests, 0 reconnects, no host ever DOWN"
else
    say "result: FAILED (bench exit $bench_status, upgrades ok $upgrades_ok, haproxy never-down $stats_ok)"
    [ -s "$WORK/bench.err" ] && cat "$WORK/bench.err"
    exit 1
fi

# --- one host stopped gracefully under connect-per-request load ---------------------
# TERM turns host1's /readyz to 503 at once; its workers keep accepting for
# --drain-delay, long enough for HAProxy (fall 2 x inter 500ms) to stop sending
# there; then it stops gracefully. A request that reached it is still served.
say ""
victim=$(cat "$WORK/host1/raasd.pid")
DRAIN_RUN=$((DRAIN_SECS + 6))
say "drain: raas bench --mode connect --conns $CONNS --duration $DRAIN_RUN; TERM to host1 (master $victim, --drain-delay $DRAIN_SECS) after 2 s"
timeout $((DRAIN_RUN + 20)) "$BIN/raas" bench --addr "127.0.0.1:$FRONT" --mode connect \
    --conns "$CONNS" --duration "$DRAIN_RUN" --json >"$WORK/drain.json" 2>"$WORK/drain.err" &
DRAIN_BENCH=$!
CHILDREN+=("$DRAIN_BENCH")
sleep 2
kill -TERM "$victim"
drain_status=0
wait "$DRAIN_BENCH" || drain_status=$?
deadline=$((SECONDS + 15))
while alive "$victim" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
alive "$victim" && die "host1's master $victim did not stop"
python3 - "$WORK/drain.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f'drain: {r["requests"]} requests, {r["replies"]} replies, {r["error_total"]} failed '
      f'({", ".join(f"{k} {v}" for k, v in r["errors"].items())})')
PY
helper stats "$WORK/haproxy.sock" >"$WORK/drain-stats.txt" || true
cat "$WORK/drain-stats.txt"
drain_errors=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["error_total"])' "$WORK/drain.json")
host1_down=$(awk '$1 == "host1" { print $3 }' "$WORK/drain-stats.txt")
host1_retried=$(helper retries "$WORK/haproxy.sock" host1)
say "drain: connects to host1 that HAProxy had to retry elsewhere: $host1_retried"
others_down=$(awk '$1 == "host2" || $1 == "host3" { n += $6 } END { print n + 0 }' "$WORK/drain-stats.txt")
[ "$DRAIN_SECS" = 0 ] || grep -q "SIGTERM: draining for ${DRAIN_SECS}s" "$WORK/host1/raasd.log" ||
    die "host1 did not drain: $(tail -5 "$WORK/host1/raasd.log")"
if [ "$drain_status" = 0 ] && [ "$drain_errors" = 0 ] && [ "$host1_retried" = 0 ] &&
    [ "$host1_down" = DOWN ] && [ "$others_down" = 0 ]; then
    say "result: host1 stopped gracefully under load after /readyz took it out of HAProxy: 0 failed requests"
else
    say "result: FAILED (drain bench exit $drain_status, $drain_errors failed requests, $host1_retried connects to host1 retried, host1 $host1_down, other hosts DOWN $others_down times)"
    [ -s "$WORK/drain.err" ] && cat "$WORK/drain.err"
    exit 1
fi
