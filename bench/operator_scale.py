"""Operator scale run (a benchmark, not a test): N nodes x P prefetches x I images.

Starts the emulator, the real ``prefetcher operator`` process, N nodes, and simulated agents
(they mark every entry of their NodeImageSet Ready, with a heartbeat, as soon as it appears),
then applies P ImagePrefetches of I images each over all nodes and measures the time until
every prefetch is Complete, the operator's API requests per node per image, and its status
writes per prefetch.

    python bench/operator_scale.py --nodes 1000 --prefetches 20 --images 5

Results (bench/README.md has the details): 1,000 nodes x 20 prefetches x 5 images, all
Complete in 73 s, 1,763 operator requests (0.018 per node per image; 1.03 NodeImageSet
writes per node), 30 status writes per prefetch; 300 nodes: 16.5 s (before the per-node
writer: 12/20 Complete after 300 s).
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kube.cluster import Cluster  # noqa: E402
from tests.kube.emulator import KubeAPI  # noqa: E402

API = "prefetcher.dev/v1alpha1"
CONFIG = """\
[runtime]
namespace = "prefetcher-system"
health_address = ""
metrics_address = ""
[operator]
status_interval = "1s"
resync_interval = "30s"
resolve_digests = false
"""


def _report_ready(api: KubeAPI) -> int:
    """On the emulator's loop: every NodeImageSet whose entries are not all reported gets
    them reported Ready, with a heartbeat, by a status merge patch (as an agent's PATCH of
    /status would do, without the HTTP). Returns the number of status writes."""
    rt = api.types[("prefetcher.dev", "v1alpha1", "nodeimagesets")]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    writes = 0
    for (key, _, name), nis in list(api.store.items()):
        if key != rt.key:
            continue
        spec = (nis.get("spec") or {}).get("images") or []
        done = {s["name"] for s in (nis.get("status") or {}).get("images") or []}
        generation = nis["metadata"].get("generation")
        if {e["name"] for e in spec} <= done and \
                (nis.get("status") or {}).get("observedGeneration") == generation:
            continue
        status = {"agent": {"version": "bench", "heartbeatTime": now},
                  # as agents do: the operator trusts results of the spec they saw only
                  "observedGeneration": generation,
                  "images": [{"name": e["name"], "phase": "Ready", "bytesDone": 1000,
                              "bytesTotal": 1000} for e in spec]}
        api._patch(rt, "", name, "status", "application/merge-patch+json",
                   {"status": status}, {})
        writes += 1
    return writes


def simulate_agents(cluster: Cluster, stop: threading.Event, counts: Counter[str]) -> None:
    """Agents that report every entry Ready as soon as it appears (polling every 0.5 s, so
    one status write per node per change, as agents with a status_interval would)."""
    assert cluster.api is not None
    while not stop.is_set():
        counts["status writes"] += cluster.call(_report_ready, cluster.api)
        stop.wait(0.5)


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--prefetches", type=int, default=20)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--history", type=int, default=5000,
                        help="watch events the emulator keeps for resumption")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the operator under cProfile, writing the stats to FILE")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    with Cluster(workdir, bookmark_interval=30.0, history=args.history) as cluster:
        cluster.install_crds()
        for i in range(args.nodes):
            cluster.add_node(f"node-{i:05d}", {"bench": "yes"})
        (workdir / "config.toml").write_text(CONFIG)
        env = cluster.env()
        env["PREFETCHER_CONFIG"] = str(workdir / "config.toml")
        log = (workdir / "operator.log").open("wb")
        command = [str(Path(sys.executable).with_name("prefetcher")), "operator",
                   "--kubeconfig", str(cluster.kubeconfig_path)]
        if args.profile:
            command = [sys.executable, "-m", "cProfile", "-o", args.profile, *command]
        operator = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        stop = threading.Event()
        agent_counts: Counter[str] = Counter()
        agents = threading.Thread(target=simulate_agents, args=(cluster, stop, agent_counts),
                                  daemon=True)
        try:
            cluster.wait_for(lambda: b"'configure' succeeded" in
                             (workdir / "operator.log").read_bytes(), timeout=60)
            agents.start()
            before = len(cluster.calls())
            start = time.monotonic()
            cpu_operator, cpu_bench = _cpu_seconds(operator.pid), time.process_time()
            for p in range(args.prefetches):
                images = [f"registry.example.com/bench/app{p}-{i}:1" for i in range(args.images)]
                cluster.put(API, "imageprefetches", {
                    "metadata": {"name": f"bench-{p}", "namespace": "default"},
                    "spec": {"images": images, "nodeSelector": {"matchLabels": {"bench": "yes"}}}})

            def complete() -> bool:
                return all(
                    (o.get("status") or {}).get("phase") == "Complete"
                    for o in cluster.list(API, "imageprefetches", "default"))

            try:
                cluster.wait_for(complete, timeout=args.timeout, interval=1.0)
            except AssertionError:
                phases = Counter((o.get("status") or {}).get("summary", {}).get("ready")
                                 for o in cluster.list(API, "imageprefetches", "default"))
                print(f"NOT all Complete after {args.timeout}s; READY columns: {dict(phases)}")
            elapsed = time.monotonic() - start
            cpu_operator = _cpu_seconds(operator.pid) - cpu_operator
            cpu_bench = time.process_time() - cpu_bench
            calls = [c for c in cluster.calls()[before:]
                     if c.user_agent.startswith(("image-prefetcher", "kopf"))]
            verbs = Counter((c.verb, c.resource, c.subresource) for c in calls)
            pairs = args.nodes * args.prefetches * args.images
            print(f"nodes={args.nodes} prefetches={args.prefetches} images={args.images}")
            print(f"time to all Complete: {elapsed:.1f}s (CPU: operator {cpu_operator:.0f}s,"
                  f" emulator + simulated agents {cpu_bench:.0f}s)")
            print(f"simulated agent status writes: {agent_counts['status writes']}")
            nis_writes = sum(n for (v, r, _), n in verbs.items()
                             if r == "nodeimagesets" and v in ("create", "patch", "update"))
            print(f"NodeImageSet spec writes: {nis_writes}"
                  f" ({nis_writes / args.nodes:.2f} per node)")
            print(f"operator API requests: {len(calls)}"
                  f" = {len(calls) / pairs:.3f} per node per image"
                  f" ({len(calls) / args.nodes:.1f} per node)")
            status_writes = verbs[("patch", "imageprefetches", "status")]
            print(f"status writes: {status_writes} ({status_writes / args.prefetches:.1f}"
                  " per prefetch)")
            for (verb, resource, sub), n in verbs.most_common(8):
                print(f"  {n:8d} {verb} {resource}{'/' + sub if sub else ''}")
        finally:
            stop.set()
            os.killpg(operator.pid, signal.SIGTERM)
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(operator.pid, signal.SIGKILL)
                operator.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
