"""Operator scale run (a benchmark, not a test): N nodes x P prefetches x I images.

Starts the emulator, the real ``prefetcher operator`` process (leader election on, as in the
chart), N nodes, and simulated agents on the emulator's loop: every 0.5 s they report each
new entry of their NodeImageSet Ready (one status merge patch per node per change, as an
agent's PATCH of /status), and every ``--heartbeat-interval`` they renew their node's
heartbeat Lease (spread evenly: N / interval renewals per second). Then it applies P
ImagePrefetches of I images each over all nodes and measures, in phases:

1. rollout: time until every prefetch is Complete, operator API requests per node per image,
   NodeImageSet writes, status writes, agent status writes per node;
2. steady state (``--steady`` seconds, heartbeats only): operator CPU % of one core, peak RSS,
   API requests and writes per second;
3. churn (``--churn``): a new prefetch, and mid-rollout 10 % of the nodes deleted (with their
   NodeImageSets, as Node garbage collection would) and 10 % added; it must converge again.

    python bench/operator_scale.py --nodes 5000 --prefetches 20 --images 5 --steady 600 --churn
    python bench/operator_scale.py --nodes 50 --prefetches 3 --images 2 --steady 20 --churn

Targets (issue 14, at 5,000 x 20 x 5 on 2 cores): requests <= 0.05 per node per image,
steady state CPU <= 5 % and peak RSS <= 256 MiB. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.kube import leases  # noqa: E402
from tests.kube.cluster import Cluster  # noqa: E402
from tests.kube.emulator import Call, KubeAPI  # noqa: E402

API = "prefetcher.dev/v1alpha1"
NAMESPACE = "prefetcher-system"
WRITES = frozenset({"create", "update", "patch", "delete"})
CONFIG = """\
[runtime]
namespace = "prefetcher-system"
health_address = ""
metrics_address = ""
[operator]
status_interval = "1s"
resync_interval = "30s"
agent_heartbeat_timeout = "{timeout}s"
resolve_digests = false
"""


class Agents:
    """Simulated agents (on the emulator's loop)."""

    def __init__(self, api: KubeAPI, heartbeat_interval: float) -> None:
        self.api = api
        self.heartbeat_interval = heartbeat_interval
        self.counts: Counter[str] = Counter()
        self.writes_per_node: Counter[str] = Counter()
        self._next_beat: dict[str, float] = {}
        self._seen: dict[str, str] = {}  # NodeImageSet -> resourceVersion looked at

    def report_ready(self, limit: int = 50) -> bool:
        """NodeImageSets whose entries are not all reported get them Ready, at most
        ``limit`` per call; True when more are left. (It runs on the emulator's loop, the
        API server's: only objects changed since the last look are looked at, and a few at
        a time, so that the simulated agents do not stall the API server's answers.)"""
        api = self.api
        rt = api.types[("prefetcher.dev", "v1alpha1", "nodeimagesets")]
        for (key, _, name), nis in list(api.store.items()):
            if key != rt.key:
                continue
            version = nis["metadata"].get("resourceVersion")
            if self._seen.get(name) == version:
                continue
            if limit <= 0:
                return True
            self._seen[name] = version
            spec = (nis.get("spec") or {}).get("images") or []
            done = {s["name"] for s in (nis.get("status") or {}).get("images") or []}
            generation = nis["metadata"].get("generation")
            # as agents do: the operator trusts results of the spec generation they saw only
            if {e["name"] for e in spec} == done and \
                    (nis.get("status") or {}).get("observedGeneration") == generation:
                continue
            status = {"observedGeneration": generation,
                      "images": [{"name": e["name"], "image": e["image"], "phase": "Ready",
                                  "bytesDone": 1000, "bytesTotal": 1000} for e in spec]}
            api._patch(rt, "", name, "status", "application/merge-patch+json",
                       {"status": status}, {})
            self.counts["status writes"] += 1
            self.writes_per_node[name] += 1
            limit -= 1
        return False

    def heartbeat(self, nodes: list[str], now: float) -> None:
        """Renew the Leases that are due (each node every heartbeat_interval, spread)."""
        for i, node in enumerate(nodes):
            due = self._next_beat.setdefault(
                node, now + self.heartbeat_interval * i / max(len(nodes), 1))
            if due > now:
                continue
            self._next_beat[node] = now + self.heartbeat_interval
            name = leases.heartbeat_name(node)
            lease = self.api.get_object(leases.API_VERSION, "leases", name, NAMESPACE) or {
                "metadata": {"name": name, "namespace": NAMESPACE,
                             "labels": leases.heartbeat_labels(),
                             "annotations": {leases.NODE_ANNOTATION: node}}}
            lease["spec"] = {"holderIdentity": f"agent-{node}", "leaseDurationSeconds": 120,
                             "renewTime": leases.micro_time()}
            self.api.put_object(leases.API_VERSION, "leases", lease)
            self.counts["heartbeats"] += 1


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _operator_calls(cluster: Cluster, since: int) -> list[Call]:
    return [c for c in cluster.calls()[since:]
            if c.user_agent.startswith(("image-prefetcher-operator", "kopf"))]


def _summary(calls: list[Call]) -> str:
    verbs = Counter((c.verb, c.resource, c.subresource) for c in calls)
    return "\n".join(f"  {n:8d} {v} {r}{'/' + s if s else ''}"
                     for (v, r, s), n in verbs.most_common(10))


class OperatorExited(Exception):
    """The operator process ended during a run (a failure: it must run until stopped)."""


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # tee / CI logs
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--prefetches", type=int, default=20)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--steady", type=float, default=600,
                        help="seconds of steady state with heartbeats (0: skip)")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0,
                        help="seconds between two renewals of one node's Lease (agent default)")
    parser.add_argument("--churn", action="store_true",
                        help="then a churn run: 10%% of nodes deleted, 10%% added mid-rollout")
    parser.add_argument("--history", type=int, default=20000,
                        help="watch events the emulator keeps for resumption")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the operator under cProfile, writing the stats to FILE")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    results: dict[str, Any] = {"nodes": args.nodes, "prefetches": args.prefetches,
                               "images": args.images}
    workdir = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    failures: list[str] = []
    gone: list[str] = []  # nodes the churn deletes (their agents stop renewing, rightly)
    print(f"load average at start {_load()}")
    # No schema validation in the emulator: in Python it costs ~35 ms per NodeImageSet
    # write of 100 entries (an API server validates in well under a millisecond), and at
    # 5,000 nodes it made the emulator, not the operator, the bottleneck: answers (the
    # leader's Lease renewals too) came seconds late. The schemas are tested elsewhere.
    with Cluster(workdir, bookmark_interval=30.0, history=args.history,
                 validate=False) as cluster:
        assert cluster.api is not None
        cluster.install_crds()
        cluster.put("v1", "namespaces", {"metadata": {"name": NAMESPACE}})
        nodes = [f"node-{i:05d}" for i in range(args.nodes)]
        for node in nodes:
            cluster.add_node(node, {"bench": "yes"})
        (workdir / "config.toml").write_text(
            CONFIG.format(timeout=int(args.heartbeat_interval * 3)))
        env = cluster.env() | {"PREFETCHER_CONFIG": str(workdir / "config.toml"),
                               "POD_NAME": "operator-bench",
                               "MALLOC_ARENA_MAX": "2"}  # as the chart's operator Deployment
        log = (workdir / "operator.log").open("wb")
        command = [str(Path(sys.executable).with_name("prefetcher")), "operator",
                   "--kubeconfig", str(cluster.kubeconfig_path)]
        if args.profile:
            command = [sys.executable, "-m", "cProfile", "-o", args.profile, *command]
        operator = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        agents = Agents(cluster.api, args.heartbeat_interval)
        live_nodes = list(nodes)
        stop = threading.Event()

        def simulate() -> None:
            while not stop.is_set():
                try:
                    simulate_once()
                except TimeoutError:  # the emulator was over 10 s late: carry on
                    print(f"  agents: the emulator did not answer in 10 s at"
                          f" {time.strftime('%H:%M:%S')}")

        def simulate_once() -> None:
            if not stop.is_set():
                while cluster.call(agents.report_ready) and not stop.is_set():
                    time.sleep(0.02)  # let the API server answer others in between
                    cluster.call(agents.heartbeat, list(live_nodes), time.monotonic())
                cluster.call(agents.heartbeat, list(live_nodes), time.monotonic())
                stop.wait(0.5)

        thread = threading.Thread(target=simulate, daemon=True)
        lag = {"max": 0.0}

        def watch_lag() -> None:
            """The emulator (the API server) answers on one loop in this process: how late
            it runs bounds how fast anyone's request is answered."""
            while not stop.is_set():
                # The emulator holds millions of objects (5,000 NodeImageSets of 100 entries,
                # its event history): each full collection of Python's cyclic GC scanned them
                # all, holding the GIL for seconds, and the API server stopped answering.
                # Frozen objects are not scanned (they are still freed when unreferenced).
                gc.freeze()
                t0 = time.monotonic()
                try:
                    cluster.call(lambda: None)
                except Exception:  # noqa: BLE001 - a timeout (10 s) is a lag too
                    pass
                late = time.monotonic() - t0
                if late > 2.0:
                    print(f"  emulator loop {late:.1f} s late at {time.strftime('%H:%M:%S')}")
                lag["max"] = max(lag["max"], late)
                stop.wait(1.0)

        threading.Thread(target=watch_lag, daemon=True).start()

        def alive() -> None:
            """Stop the run at once when the operator exits (not at the timeout)."""
            if operator.poll() is not None:
                raise OperatorExited(f"the operator exited with code {operator.returncode}")

        def sleep(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                alive()
                time.sleep(min(left, 1.0))
            alive()

        def all_complete() -> bool:
            alive()
            try:
                prefetches = cluster.list(API, "imageprefetches", "default")
            except TimeoutError:  # the emulator's loop is late (reported as its lag): ask again
                print(f"  bench: the emulator did not answer a list in 10 s at "
                      f"{time.strftime('%H:%M:%S')}", flush=True)
                return False
            return all((o.get("status") or {}).get("phase") == "Complete" for o in prefetches)

        def wait_complete(what: str) -> float:
            start = time.monotonic()
            try:
                cluster.wait_for(all_complete, timeout=args.timeout, interval=1.0)
            except AssertionError:
                ready = Counter((o.get("status") or {}).get("summary", {}).get("ready")
                                for o in cluster.list(API, "imageprefetches", "default"))
                print(f"{what}: NOT all Complete after {args.timeout}s; READY: {dict(ready)}")
                failures.append(f"{what}: not all Complete after {args.timeout}s")
            return time.monotonic() - start

        try:
            print(f"{args.nodes} nodes created; load average {_load()}")
            cluster.wait_for(lambda: alive() or b"'configure' succeeded" in
                             (workdir / "operator.log").read_bytes(), timeout=120)
            thread.start()
            # 1. Rollout.
            lag["max"] = 0.0
            before = len(cluster.calls())
            cpu0, bench_cpu0 = _cpu_seconds(operator.pid), time.process_time()
            agents.counts.clear()
            start = time.monotonic()
            for p in range(args.prefetches):
                images = [f"registry.example.com/bench/app{p}-{i}:1" for i in range(args.images)]
                cluster.put(API, "imageprefetches", {
                    "metadata": {"name": f"bench-{p}", "namespace": "default"},
                    "spec": {"images": images, "nodeSelector": {"matchLabels": {"bench": "yes"}}}})
            wait_complete("rollout")
            elapsed = time.monotonic() - start
            calls = _operator_calls(cluster, before)
            pairs = args.nodes * args.prefetches * args.images
            nis_writes = sum(1 for c in calls if c.resource == "nodeimagesets" and c.verb in WRITES)
            status_writes = sum(1 for c in calls if c.resource == "imageprefetches"
                                and c.subresource == "status" and c.verb == "patch")
            per_node = agents.writes_per_node
            rollout = {
                "seconds": round(elapsed, 1),
                "operator_cpu_s": round(_cpu_seconds(operator.pid) - cpu0, 1),
                "operator_peak_rss_mib": round(_peak_rss_mib(operator.pid), 1),
                "load_average_after": _load(),
                "emulator_lag_max_s": round(lag["max"], 2),
                "bench_cpu_s": round(time.process_time() - bench_cpu0, 1),
                "requests": len(calls),
                "requests_per_node_per_image": round(len(calls) / pairs, 4),
                "nodeimageset_writes_per_node": round(nis_writes / args.nodes, 2),
                "status_writes_per_prefetch": round(status_writes / args.prefetches, 1),
                "agent_status_writes_per_node_max": max(per_node.values(), default=0),
                "agent_status_writes_per_node_mean": round(
                    sum(per_node.values()) / max(len(per_node), 1), 2),
            }
            results["rollout"] = rollout
            print(f"nodes={args.nodes} prefetches={args.prefetches} images={args.images}")
            print(f"rollout: {json.dumps(rollout)}")
            print(_summary(calls))

            # 2. Steady state: heartbeats only.
            if args.steady > 0:
                sleep(min(5.0, args.steady))  # the last status writes settle
                before = len(cluster.calls())
                cpu0, t0 = _cpu_seconds(operator.pid), time.monotonic()
                lag["max"] = 0.0
                beats0 = agents.counts["heartbeats"]
                load0 = _load()
                sleep(args.steady)
                seconds = time.monotonic() - t0
                calls = _operator_calls(cluster, before)
                writes = [c for c in calls if c.verb in WRITES]
                steady = {
                    "seconds": round(seconds),
                    "operator_cpu_percent": round(
                        100 * (_cpu_seconds(operator.pid) - cpu0) / seconds, 2),
                    "operator_peak_rss_mib": round(_peak_rss_mib(operator.pid), 1),
                    "heartbeats_per_s": round((agents.counts["heartbeats"] - beats0) / seconds,
                                              1),
                    "api_requests_per_s": round(len(calls) / seconds, 3),
                    "api_writes_per_s": round(len(writes) / seconds, 3),
                    "load_average_before": load0, "load_average_after": _load(),
                    "emulator_lag_max_s": round(lag["max"], 2),
                }
                results["steady"] = steady
                print(f"steady state: {json.dumps(steady)}")
                if writes:
                    print(_summary(writes))

            # 3. Churn: a new prefetch; mid-rollout 10 % of nodes go, 10 % come.
            if args.churn:
                before = len(cluster.calls())
                start = time.monotonic()
                k = max(1, args.nodes // 10)
                cluster.put(API, "imageprefetches", {
                    "metadata": {"name": "churn", "namespace": "default"},
                    "spec": {"images": [f"registry.example.com/bench/churn-{i}:1"
                                        for i in range(args.images)],
                             "nodeSelector": {"matchLabels": {"bench": "yes"}}}})
                sleep(1.0)
                gone, new = live_nodes[:k], [f"node-new-{i:05d}" for i in range(k)]
                for node in gone:
                    live_nodes.remove(node)
                    cluster.delete("v1", "nodes", node)
                    if cluster.get(API, "nodeimagesets", node) is not None:
                        cluster.delete(API, "nodeimagesets", node)
                for node in new:
                    cluster.add_node(node, {"bench": "yes"})
                    live_nodes.append(node)
                wait_complete("churn")
                calls = _operator_calls(cluster, before)
                left = [n for n in gone if cluster.get(API, "nodeimagesets", n) is not None]
                churn = {"seconds": round(time.monotonic() - start, 1),
                         "requests": len(calls), "deleted_nodes": k, "added_nodes": k,
                         "nodeimagesets_of_deleted_nodes_left": len(left),
                         "complete": all_complete()}
                results["churn"] = churn
                print(f"churn: {json.dumps(churn)}")
        except OperatorExited as e:
            failures.append(str(e))
            print(f"FAIL: {e}; the end of its log:\n{_log_tail(workdir / 'operator.log')}")
        finally:
            stop.set()
            with contextlib.suppress(ProcessLookupError):  # it may have exited (a failure)
                os.killpg(operator.pid, signal.SIGTERM)
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(operator.pid, signal.SIGKILL)
                operator.wait()
    # Every simulated agent renews its Lease (the deleted nodes' go with them): an agent
    # judged dead by the operator is a misjudgement (a busy loop observing renewals late).
    dead = set(re.findall(r"the agent on node (\S+) stopped renewing its heartbeat",
                          (workdir / "operator.log").read_text(errors="replace")))
    results["agents_judged_dead"] = len(dead - set(gone))
    print(f"agents judged dead (of nodes that were not deleted): {len(dead - set(gone))}")
    if dead - set(gone):
        failures.append(f"{len(dead - set(gone))} live agents judged dead")
    failures += _missed_targets(results, args.nodes)
    results["failures"] = failures
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"operator log: {workdir / 'operator.log'}")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("PASS" if not failures else f"FAILED ({len(failures)})")
    return 1 if failures else 0


def _missed_targets(results: dict[str, Any], nodes: int) -> list[str]:
    """Issue 14's targets the results miss (the CPU one is for an idle machine; the request
    one for 1,000 nodes and more: a small run's fixed costs dominate)."""
    missed = []
    rollout, steady, churn = (results.get(k) for k in ("rollout", "steady", "churn"))
    if rollout and nodes >= 1000 and rollout["requests_per_node_per_image"] > 0.05:
        missed.append(f"requests per node per image {rollout['requests_per_node_per_image']}"
                      " > 0.05")
    if steady and steady["operator_cpu_percent"] > 5:
        missed.append(f"steady state CPU {steady['operator_cpu_percent']} % > 5 %"
                      f" (load average {steady['load_average_after']})")
    if steady and steady["operator_peak_rss_mib"] > 256:
        missed.append(f"peak RSS {steady['operator_peak_rss_mib']} MiB > 256 MiB")
    if churn and not (churn["complete"] and churn["nodeimagesets_of_deleted_nodes_left"] == 0):
        missed.append(f"churn did not converge: {churn}")
    return missed


if __name__ == "__main__":
    sys.exit(main())
