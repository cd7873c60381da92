"""Scenario A on a cluster: CPU per relay of two nodes plus Redis, against one process.

Three set-ups, measured in one invocation so that the machine's noise hits them alike:

* **one process**: signald alone, every pair on it (what bench.py's scenario A measures);
* **cluster, kept**: two nodes on one redis-server, every pair on the first node (the second
  runs idle beside it, and its CPU counts), so no relay touches Redis: the same load as one
  process, through the cluster's code path;
* **cluster, split**: the same, but each pair has one member on each node, so every relay
  crosses Redis (node -> PUBLISH -> the other node's subscription).

Each client keeps ``--window`` candidates in flight to its partner (scenario A). The figure is
**server CPU-seconds per 1,000 relays**, where "server" is every signald process plus
redis-server; the report gives each cluster set-up as a ratio to one process. Targets: kept
<= 1.25x, split <= 3x. Everything talks to 127.0.0.1 or a unix socket in a temporary
directory; every phase is bounded in time.

Run: ``bench/.venv/bin/python bench/cluster.py [--pairs 50] [--duration 10] [--runs 3]``
(``bench/run`` makes ``bench/.venv``; any venv with signald installed works). Findings: CLUSTER.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import loadgen  # beside this file

PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
#: Bound on one client's connect-and-join.
JOIN_TIMEOUT = 30.0
TARGETS = {"kept": 1.25, "split": 3.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"not within {START_TIMEOUT} s: {what}")


class Process:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_signald(directory: Path, name: str, cluster: str | None) -> tuple[Process, int]:
    port = free_port()
    config = directory / f"{name}.toml"
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", "[log]", 'level = "warning"']
    if cluster:
        lines += ["[cluster]", f'redis_url = "{cluster}"']
    config.write_text("\n".join(lines) + "\n")
    process = Process([PYTHON, "-m", "signald", "--config", str(config)], directory / f"{name}.log")

    def healthy() -> bool:
        if process.proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {process.log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return b'"status":"healthy"' in sock.recv(65536)
        except OSError:
            return False

    wait_until(healthy, f"{name} is healthy")
    return process, port


def start_redis(directory: Path) -> tuple[Process, str]:
    redis = shutil.which("redis-server")
    if redis is None:
        raise RuntimeError("redis-server is missing (scripts/install-test-packages installs it)")
    sock = directory / "redis.sock"
    args = [redis, "--port", "0", "--unixsocket", str(sock), "--dir", str(directory), "--save", ""]
    process = Process([*args, "--appendonly", "no", "--maxmemory-policy", "noeviction"], directory / "redis.log")
    wait_until(sock.exists, "redis-server listens")
    return process, f"unix://{sock}"


async def join(port: int, room: str, on_relay: Any) -> loadgen.Client:
    client = loadgen.Client(on_relay)
    client.join_on_upgrade(room, "bench")
    await asyncio.get_running_loop().create_connection(lambda: client, "127.0.0.1", port)
    await asyncio.wait_for(client.joined, JOIN_TIMEOUT)
    return client


async def throughput(ports: list[tuple[int, int]], pids: list[int], args: argparse.Namespace) -> dict[str, float]:
    """Scenario A with pair ``i``'s members on ``ports[i % len(ports)]``; CPU of ``pids``."""
    received = 0
    running = True

    def on_relay(client: loadgen.Client, payloads: list[bytes]) -> None:
        nonlocal received
        received += len(payloads)
        sender = client.partner
        if running and sender is not None:
            sender.send(sender.frame * len(payloads))  # as many delivered, so many more in flight

    clients = []
    for i in range(args.pairs):
        first_port, second_port = ports[i % len(ports)]
        first = await join(first_port, f"p{i}", on_relay)
        second = await join(second_port, f"p{i}", on_relay)
        first.partner, second.partner = second, first
        clients += [first, second]
    for client in clients:
        assert client.partner is not None
        client.frame = loadgen.client_frame(loadgen.candidate_message(client.partner.peer_id, 0, "signald"))
        client.send(client.frame * args.window)
    await asyncio.sleep(args.warmup)
    before, cpu_before, wall_before = received, sum(map(cpu_seconds, pids)), time.perf_counter()
    await asyncio.sleep(args.duration)
    count, cpu, wall = received - before, sum(map(cpu_seconds, pids)) - cpu_before, time.perf_counter() - wall_before
    running = False
    loadgen.close_all(clients)
    await asyncio.sleep(0.5)
    return {"relays_per_s": count / wall, "cpu_ms_per_1000": 1e6 * cpu / count if count else float("inf")}


def run_once(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="signald-bench-", dir="/tmp") as tmp:
        directory = Path(tmp)
        alone, port = start_signald(directory, "alone", None)
        try:
            results["one process"] = asyncio.run(throughput([(port, port)], [alone.proc.pid], args))
        finally:
            alone.stop()
        redis, url = start_redis(directory)
        try:
            one, port1 = start_signald(directory, "node1", url)
            two, port2 = start_signald(directory, "node2", url)
            pids = [one.proc.pid, two.proc.pid, redis.proc.pid]
            try:
                results["kept"] = asyncio.run(throughput([(port1, port1)], pids, args))
                results["split"] = asyncio.run(throughput([(port1, port2)], pids, args))
            finally:
                one.stop()
                two.stop()
        finally:
            redis.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # loadgen's clients read its options (the protocol: signald's); ports are given per client here.
    loadgen.ARGS = loadgen.parse_args(["throughput", "--port", "0", "--server-pid", "0"])
    runs = []
    for run in range(args.runs):
        runs.append(run_once(args))
        print(f"run {run + 1}: {json.dumps(runs[-1])}", file=sys.stderr)
    print("| set-up | relays/s | server CPU ms per 1,000 relays | ratio to one process | target |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("one process", "kept", "split"):
        rate = statistics.median(r[name]["relays_per_s"] for r in runs)
        cost = statistics.median(r[name]["cpu_ms_per_1000"] for r in runs)
        ratios = [r[name]["cpu_ms_per_1000"] / r["one process"]["cpu_ms_per_1000"] for r in runs]
        ratio = statistics.median(ratios)
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target}x: {'met' if ratio <= target else 'MISSED'}"
        spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(runs) > 1 else ""
        print(f"| {name} | {rate:,.0f} | {cost:.1f} | {ratio:.2f}x{spread} | {verdict} |")


if __name__ == "__main__":
    main()
