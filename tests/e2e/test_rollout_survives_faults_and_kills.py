"""A 100-node rollout converges through API faults and ``kill -9`` of the leading operator.

Real: the emulator and two ``prefetcher operator`` replicas electing a leader through a
Lease. Simulated (100 real agents do not fit on this machine): the agents, on the
emulator's loop — each tick every new entry goes Pending → Downloading → Ready on its node
and every node's heartbeat Lease is renewed. Meanwhile the emulator answers some writes with
409 Conflict, 500 and 429 (Retry-After), some watches with 410 Gone, and drops every watch
connection now and then; the leader is killed -9 twice at random points (its pod restarts).

It must converge: every prefetch Complete; status never says Complete while a targeted node
is not Ready; entries stay put while their owner exists (no re-pull of a Ready image); and
after deletes, no entry is left whose owner is gone.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube import leases
from tests.kube.cluster import Cluster
from tests.kube.emulator import KubeAPI
from tests.kube.processes import PREFETCHER, Process, wait_until

API = "prefetcher.dev/v1alpha1"
NAMESPACE = "prefetcher-system"
NODES = [f"roll-{i:03d}" for i in range(100)]
PREFETCHES = 4
LEASE = "prefetcher-roll"
CONFIG = f"""\
[runtime]
namespace = "{NAMESPACE}"
health_address = ""
metrics_address = ""

[operator]
peering_name = "{LEASE}"
lease_duration = "3s"
lease_renew_deadline = "2s"
lease_retry_period = "300ms"
status_interval = "300ms"
resync_interval = "2s"
agent_heartbeat_timeout = "10s"
resolve_digests = false
"""
#: Rounds of injected faults (each: a few 409s, 500s, a 429, a 410 on a watch, maybe every
#: watch dropped), spread over the rollout.
FAULT_ROUNDS = 15
NEXT = {None: "Pending", "Pending": "Downloading", "Downloading": "Ready", "Ready": "Ready"}


class Agents:
    """The simulated agents and the invariants they check, on the emulator's loop."""

    def __init__(self, api: KubeAPI) -> None:
        self.api = api
        self.violations: list[str] = []
        self.seen: dict[tuple[str, str], set[str]] = {}  # (node, entry) -> owner uids
        self.counts: Counter[str] = Counter()

    def tick(self, heartbeat: bool) -> None:
        api = self.api
        rt = api.types[("prefetcher.dev", "v1alpha1", "nodeimagesets")]
        prefetch_uids = {o["metadata"]["uid"] for o in api.list_objects(API, "imageprefetches")
                         if not o["metadata"].get("deletionTimestamp")}
        for node in NODES:
            nis = api.get_object(API, "nodeimagesets", node)
            if nis is None:
                continue
            entries = (nis.get("spec") or {}).get("images") or []
            names = {e["name"] for e in entries}
            for (n, name), owners in list(self.seen.items()):
                if n == node and name not in names:
                    if owners & prefetch_uids:
                        self.violations.append(f"{node}/{name} removed while its owner exists")
                    del self.seen[(n, name)]
            for e in entries:
                self.seen[(node, e["name"])] = {o["uid"] for o in e["owners"]}
            status = {s["name"]: s for s in (nis.get("status") or {}).get("images") or []}
            images = []
            for e in entries:
                phase = NEXT[(status.get(e["name"]) or {}).get("phase")]
                images.append({"name": e["name"], "image": e["image"], "phase": phase,
                               "bytesDone": 100 if phase == "Ready" else 10,
                               "bytesTotal": 100, "attempts": 1})
            if images != list(status.values()):
                api._patch(rt, "", node, "status", "application/merge-patch+json",
                           {"status": {"images": images,
                                       "observedGeneration": nis["metadata"]["generation"]}},
                           {})
                self.counts["status writes"] += 1
            if heartbeat:
                self.renew(node)
        self.check_complete()

    def renew(self, node: str) -> None:
        name = leases.heartbeat_name(node)
        lease = self.api.get_object(leases.API_VERSION, "leases", name, NAMESPACE) or {
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": leases.heartbeat_labels(),
                         "annotations": {leases.NODE_ANNOTATION: node}}}
        lease["spec"] = {"holderIdentity": node, "leaseDurationSeconds": 40,
                         "renewTime": leases.micro_time()}
        self.api.put_object(leases.API_VERSION, "leases", lease)

    def node_set(self, node: str) -> dict[str, Any]:
        """The stored NodeImageSet, not copied (read only)."""
        return self.api.store.get((("prefetcher.dev", "v1alpha1", "nodeimagesets"), "", node)) \
            or {}

    def check_complete(self) -> None:
        """Complete (phase or condition) only when every targeted node has it all Ready."""
        for ipf in self.api.list_objects(API, "imageprefetches"):
            status = ipf.get("status") or {}
            complete = status.get("phase") == "Complete" or any(
                c["type"] == "Complete" and c["status"] == "True"
                for c in status.get("conditions") or [])
            if not complete or ipf["metadata"].get("deletionTimestamp"):
                continue  # (a deleted prefetch's entries are withdrawn; its status stays)
            uid = ipf["metadata"]["uid"]
            for node in NODES:
                nis = self.node_set(node)
                ours = [e["name"] for e in (nis.get("spec") or {}).get("images") or []
                        if any(o["uid"] == uid for o in e["owners"])]
                ready = {s["name"] for s in (nis.get("status") or {}).get("images") or []
                         if s["phase"] == "Ready"}
                if not ours or not set(ours) <= ready:
                    self.violations.append(
                        f"{ipf['metadata']['name']} Complete while {node} is not Ready")
                    return


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path, bookmark_interval=5.0) as running:
        running.install_crds()
        running.put("v1", "namespaces", {"metadata": {"name": NAMESPACE}})
        running.put("v1", "namespaces", {"metadata": {"name": "team"}})
        for node in NODES:
            running.add_node(node, {"pool": "roll"})
        yield running


def operator(cluster: Cluster, workdir: Path, pod: str) -> Process:
    config = workdir / "config.toml"
    config.write_text(CONFIG)
    return Process([PREFETCHER, "operator", "--config", str(config),
                    "--kubeconfig", str(cluster.kubeconfig_path)],
                   workdir / f"{pod}.log", cluster.env() | {"POD_NAME": pod})


def holder(cluster: Cluster) -> str:
    lease = cluster.get(leases.API_VERSION, "leases", LEASE, NAMESPACE) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def inject_faults(api: KubeAPI, rng: random.Random) -> None:
    api.fail("patch", "nodeimagesets", 409, times=rng.randint(1, 5))
    api.fail("patch", rng.choice(["nodeimagesets", "imageprefetches"]), 500,
             times=rng.randint(1, 3))
    api.fail("list", "*", 429, times=1, retry_after=1)
    api.fail("watch", rng.choice(["nodeimagesets", "nodes", "leases"]), 410)
    if rng.random() < 0.5:
        api.drop_watches()


def test_a_100_node_rollout_converges_through_faults_and_kills(
        cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.api is not None
    rng = random.Random(14)
    agents = Agents(cluster.api)
    replicas = {pod: operator(cluster, tmp_path, pod) for pod in ("op-1", "op-2")}
    replicas["op-1"].start().wait_for_output("Activity 'configure' succeeded", timeout=30)
    replicas["op-2"].start().wait_for_output("waiting to become the leader", timeout=30)

    stop = threading.Event()

    def simulate() -> None:
        beat = faults = 0
        while not stop.is_set():
            cluster.call(agents.tick, beat % 3 == 0)
            if faults < FAULT_ROUNDS and rng.random() < 0.3:
                cluster.call(inject_faults, cluster.api, rng)
                faults += 1
            for process in replicas.values():  # the kubelet restarts exited containers
                if not process.running():
                    process.start()
            beat += 1
            stop.wait(0.3)

    thread = threading.Thread(target=simulate, daemon=True)
    thread.start()
    try:
        cluster.put("v1", "namespaces", {"metadata": {"name": "team"}})
        for p in range(PREFETCHES):
            cluster.apply({"apiVersion": API, "kind": "ImagePrefetch",
                           "metadata": {"name": f"roll-{p}", "namespace": "team"},
                           "spec": {"images": [f"registry.example.com/roll/app{p}-{i}:1"
                                               for i in range(3)],
                                    "nodeSelector": {"matchLabels": {"pool": "roll"}}}})
            if p in (1, 3):  # kill the leader -9 mid-rollout; its pod restarts it
                time.sleep(rng.uniform(0.5, 2.0))
                replicas[holder(cluster)].kill()  # (restarted by simulate())

        def all_complete() -> bool:
            return all((o.get("status") or {}).get("phase") == "Complete"
                       for o in cluster.list(API, "imageprefetches", "team")) \
                and len(cluster.list(API, "imageprefetches", "team")) == PREFETCHES

        cluster.wait_for(all_complete, timeout=180, interval=0.5,
                         message="every prefetch Complete")

        # Deleting two of them (one during a failover) leaves no orphan entries.
        for ipf in cluster.list(API, "imageprefetches", "team"):
            assert "prefetcher.dev/node-entries" in ipf["metadata"].get("finalizers", []), ipf
        cluster.kubectl("delete", "ipf", "roll-0", "-n", "team", "--wait=false")
        replicas[holder(cluster)].kill()
        cluster.kubectl("delete", "ipf", "roll-2", "-n", "team", "--timeout=60s")
        wait_until(lambda: cluster.get(API, "imageprefetches", "roll-0", "team") is None,
                   timeout=60, message="roll-0 finalized")
        stop.set()
        thread.join(timeout=10)
        live = {o["metadata"]["uid"] for o in cluster.list(API, "imageprefetches", "team")}
        orphans: list[Any] = []
        owned = Counter[str]()
        for node in NODES:
            nis = cluster.get(API, "nodeimagesets", node) or {}
            for e in (nis.get("spec") or {}).get("images") or []:
                uids = {o["uid"] for o in e["owners"]}
                if not uids & live:
                    orphans.append((node, e["name"]))
                for uid in uids:
                    owned[uid] += 1
        assert orphans == []
        assert sorted(owned.values()) == [len(NODES) * 3] * 2  # every node, three images
        assert agents.violations == [], agents.violations[:5]
    finally:
        stop.set()
        for process in replicas.values():
            process.stop()
