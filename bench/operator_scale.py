"""Operator scale run (a benchmark, not a test): N nodes x P prefetches x I images.

Starts the emulator, the real ``prefetcher operator`` process, N nodes, and simulated agents
(they mark every entry of their NodeImageSet Ready, with a heartbeat, as soon as it appears),
then applies P ImagePrefetches of I images each over all nodes and measures the time until
every prefetch is Complete, the operator's API requests per node per image, and its status
writes per prefetch.

    python bench/operator_scale.py --nodes 1000 --prefetches 20 --images 5
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


def simulate_agents(cluster: Cluster, stop: threading.Event) -> None:
    """Every NodeImageSet gets its entries reported Ready (one status write per change)."""
    while not stop.is_set():
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for nis in cluster.list(API, "nodeimagesets"):
            spec = (nis.get("spec") or {}).get("images") or []
            done = {s["name"] for s in (nis.get("status") or {}).get("images") or []}
            if {e["name"] for e in spec} <= done:
                continue
            nis["status"] = {
                "agent": {"version": "bench", "heartbeatTime": now},
                "images": [{"name": e["name"], "phase": "Ready", "bytesDone": 1000,
                            "bytesTotal": 1000} for e in spec],
            }
            cluster.put(API, "nodeimagesets", nis)
        stop.wait(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--prefetches", type=int, default=20)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    with Cluster(workdir, bookmark_interval=30.0) as cluster:
        cluster.install_crds()
        for i in range(args.nodes):
            cluster.add_node(f"node-{i:05d}", {"bench": "yes"})
        (workdir / "config.toml").write_text(CONFIG)
        env = cluster.env()
        env["PREFETCHER_CONFIG"] = str(workdir / "config.toml")
        log = (workdir / "operator.log").open("wb")
        operator = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefetcher")), "operator", "--kubeconfig",
             str(cluster.kubeconfig_path)], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        stop = threading.Event()
        agents = threading.Thread(target=simulate_agents, args=(cluster, stop), daemon=True)
        try:
            cluster.wait_for(lambda: b"'configure' succeeded" in
                             (workdir / "operator.log").read_bytes(), timeout=60)
            agents.start()
            before = len(cluster.calls())
            start = time.monotonic()
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
            calls = [c for c in cluster.calls()[before:]
                     if c.user_agent.startswith(("image-prefetcher", "kopf"))]
            verbs = Counter((c.verb, c.resource, c.subresource) for c in calls)
            pairs = args.nodes * args.prefetches * args.images
            print(f"nodes={args.nodes} prefetches={args.prefetches} images={args.images}")
            print(f"time to all Complete: {elapsed:.1f}s")
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
