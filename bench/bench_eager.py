"""The eager swap's cost and effect, on the testbed, in one invocation.

For each mode (no routers, routers with `--eager off` (late swap only), routers with
`--eager always`): 200 sequential connections from a pod on node2 to an asyncio echo server on
node1, each: connect(), write 64 KiB, read the echo, close. Printed per mode: connect() time
and connect-to-echo time (p50, p99), bytes that left node2 on the VXLAN device per
connection, and the routers' swap counters (eager, late).

    sudo python bench/bench_eager.py [--connections 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ebpfrouter.demo import PACKAGE_ROOT, Routers, child_env, wait_line  # noqa: E402
from ebpfrouter.testbed import Testbed  # noqa: E402

APPS = str(ROOT / "tests" / "ebpfrouter" / "eager_apps.py")
CLIENT = r"""
import json, socket, sys, time
host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = b"x" * size
conn_us, total_us = [], []
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port))
    t1 = time.perf_counter()
    s.sendall(b"hi\n")
    f = s.makefile("rb")
    f.readline()
    s.sendall(data)
    got = 0
    while got < size:
        chunk = f.read1(65536)
        assert chunk
        got += len(chunk)
    t2 = time.perf_counter()
    s.close()
    conn_us.append((t1 - t0) * 1e6)
    total_us.append((t2 - t0) * 1e6)
print(json.dumps({"connect_us": conn_us, "total_us": total_us}))
"""


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


def run_mode(bed: Testbed, mode: str, n: int, port: int) -> dict:
    routers = None
    tmp = tempfile.TemporaryDirectory(prefix="er-bench-eager-")
    if mode != "none":
        routers = Routers(bed, Path(tmp.name))
        (Path(tmp.name) / "rules").mkdir()
        routers.start(extra_args={node.name: ["--eager", mode] for node in bed.nodes})
    server = bed.popen("n1p0", [sys.executable, APPS, "server", "asyncio", str(port)],
                       stdout=subprocess.PIPE, text=True, env=child_env(), cwd=str(PACKAGE_ROOT))
    try:
        wait_line(server, "echo server")
        time.sleep(1.0)  # the announcement reaches node2
        vx0 = bed.link_stats("node2", "flannel.1")["tx_bytes"]
        out = bed.run("n2p0", [sys.executable, "-c", CLIENT, bed.pod("n1p0").ip, str(port),
                               str(n), str(64 << 10)], timeout=600)
        vx1 = bed.link_stats("node2", "flannel.1")["tx_bytes"]
        times = json.loads(out.stdout)
        stats = {}
        if routers is not None:
            time.sleep(0.5)
            eng = routers.status("node2")["engine"]["stats"]
            stats = {k: eng.get(k, 0) for k in ("swapped_eager", "swapped_late", "eager_fallback",
                                                "closed_young")}
        return {"mode": mode,
                "connect_p50_us": pct(times["connect_us"], 50),
                "connect_p99_us": pct(times["connect_us"], 99),
                "echo_p50_us": pct(times["total_us"], 50),
                "echo_p99_us": pct(times["total_us"], 99),
                "vxlan_bytes_per_conn": (vx1 - vx0) / n, **stats}
    finally:
        server.kill()
        server.wait()
        if routers is not None:
            routers.stop()
        tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=200)
    args = ap.parse_args()
    bed = Testbed.up(2, 1)
    try:
        rows = [run_mode(bed, mode, args.connections, 7400 + i)
                for i, mode in enumerate(("none", "off", "always"))]
    finally:
        bed.down()
    print("| mode | connect p50 / p99 (us) | connect to 64 KiB echo p50 / p99 (us) | "
          "VXLAN bytes per connection | eager / late swaps |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['connect_p50_us']:.0f} / {r['connect_p99_us']:.0f} | "
              f"{r['echo_p50_us']:.0f} / {r['echo_p99_us']:.0f} | "
              f"{r['vxlan_bytes_per_conn']:.0f} | "
              f"{r.get('swapped_eager', '-')} / {r.get('swapped_late', '-')} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
