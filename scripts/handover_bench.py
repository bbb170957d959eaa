#!/usr/bin/env python3
"""scripts/handover_bench.py: how long a HUP takes to move 10,000 idle connections
from 2 retiring workers to the new generation, and what an active client's latency
does meanwhile.

    cargo build --release --bin raasd && python3 scripts/handover_bench.py [RUNS]

(RAASD=PATH measures another build, CONNS and PACE_MS change the load.)

Each run starts `target/release/raasd -w 2` on a free loopback port, opens CONNS
(default 10,000) idle connections (each answers one line first, so it is accepted),
starts one client doing roundtrips back to back, sends HUP, and polls /proc until the
old workers are gone (they exit once every batch is settled), checks that the new
workers hold every connection, then checks that every idle connection still
answers on the same socket, and prints the hand-over time and the active client's
latency percentiles in the second around the HUP. Only 127.0.0.1 is used; raasd is
stopped by pid however the run ends.
"""

import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAASD = os.environ.get("RAASD", os.path.join(ROOT, "target", "release", "raasd"))
CONNS = int(os.environ.get("CONNS", "10000"))
# The active client does one exchange every PACE_MS (0: back to back).
PACE_MS = float(os.environ.get("PACE_MS", "2"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
        except (OSError, IndexError):
            pass
    return out


def is_alive(pid):
    """Not gone and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sockets_of(pid):
    try:
        return sum(
            1
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        )
    except OSError:
        return 0


def roundtrip(sock, line):
    sock.sendall(line + b"\n")
    want = line[::-1] + b"\n"
    got = b""
    while len(got) < len(want):
        chunk = sock.recv(len(want) - len(got))
        if not chunk:
            raise RuntimeError("end of file")
        got += chunk
    if got != want:
        raise RuntimeError(f"wrong reply {got!r}")


def one_run():
    port = free_port()
    server = subprocess.Popen(
        [RAASD, "-w", "2", "-l", f"127.0.0.1:{port}", "--max-conns", str(CONNS + 100)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.01)
        idle = []
        for i in range(CONNS):
            s = socket.create_connection(("127.0.0.1", port))
            roundtrip(s, b"idle %d" % i)
            idle.append(s)
        old = children(server.pid)
        # Baseline: what the old workers hold (idle connections plus listeners etc.).
        held_before = sum(sockets_of(w) for w in old)

        latencies = []  # (time, seconds)
        stop = threading.Event()

        def active():
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            n = 0
            while not stop.is_set():
                t = time.perf_counter()
                roundtrip(s, b"active %d" % n)
                took = time.perf_counter() - t
                latencies.append((time.time(), took))
                n += 1
                if PACE_MS > 0 and took < PACE_MS / 1000:
                    time.sleep(PACE_MS / 1000 - took)

        worker = threading.Thread(target=active)
        worker.start()
        time.sleep(1.0)
        hup = time.time()
        os.kill(server.pid, signal.SIGHUP)
        moved_at = None
        # Done when the old workers are gone (a retiring worker exits once every batch
        # it offered is settled and nothing stayed with it). Only the existence of
        # their /proc entries is polled: listing 10,000 descriptors each millisecond
        # would take a core from the workers being measured.
        while time.time() - hup < 10:
            if not any(is_alive(w) for w in old):
                moved_at = time.time()
                break
            time.sleep(0.001)
        new = [w for w in children(server.pid) if w not in old]
        held = sum(sockets_of(w) for w in new)
        if moved_at is not None and held < CONNS:
            raise RuntimeError(f"the new workers hold {held} sockets, fewer than {CONNS}")
        time.sleep(0.5)
        stop.set()
        worker.join()
        if moved_at is None:
            raise RuntimeError("the connections did not all move within 10 s")
        for i, s in enumerate(idle):
            roundtrip(s, b"after %d" % i)
            s.close()
        window = [l for (t, l) in latencies if hup - 0.1 <= t <= moved_at + 0.1]
        before = [l for (t, l) in latencies if hup - 1.0 <= t < hup - 0.1]
        return moved_at - hup, window, before, held_before
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, CONNS * 2 + 1000)), hard))
    times, longest, steady = [], [], []
    for r in range(runs):
        took, window, before, _ = one_run()
        times.append(took)
        longest.append(max(window))
        steady.append(max(before))
        print(
            f"run {r + 1}: {CONNS} idle connections moved in {took * 1000:.0f} ms; active client "
            f"(one exchange every {PACE_MS:g} ms) during the hand-over: {len(window)} exchanges, "
            f"p50 {pct(window, 0.5) * 1e6:.0f} us, p99 {pct(window, 0.99) * 1e6:.0f} us, "
            f"longest wait {max(window) * 1e3:.1f} ms (the 0.9 s before: p50 "
            f"{pct(before, 0.5) * 1e6:.0f} us, longest {max(before) * 1e3:.1f} ms); "
            f"every idle connection answered again"
        )
    print(
        f"medians over {runs} runs: hand-over {statistics.median(times) * 1000:.0f} ms; "
        f"active client's longest wait {statistics.median(longest) * 1e3:.1f} ms during it, "
        f"{statistics.median(steady) * 1e3:.1f} ms in the steady state before"
    )


if __name__ == "__main__":
    main()
