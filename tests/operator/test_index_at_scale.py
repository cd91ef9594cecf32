"""The operator's index at thousands of nodes: memory per NodeImageSet and the cost of a
liveness answer do not grow with what every node repeats.

Each NodeImageSet watch event decodes fresh copies of all its entries (100 per node at
20 prefetches x 5 images: ~150 KiB). Kept as decoded, 5,000 nodes held ~750 MiB; the index
keeps one dict per distinct entry and status (:class:`agent.operator.index.Shared`).
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

from agent import config
from agent.kube import leases
from agent.operator import dispatching, entries, index

NODES = 300


def node_set(node: str, rv: int, *, ready: bool = True) -> dict[str, Any]:
    spec = [{"name": f"e{p}-{i}", "image": f"registry.example.com/app{p}-{i}:1",
             "owners": [{"uid": f"uid-{p}", "namespace": "default", "name": f"p{p}"}],
             "pullPolicy": "IfNotPresent", "backoffLimit": 6, "pinned": False,
             "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
            for p in range(20) for i in range(5)]
    status = [{"name": e["name"], "image": e["image"], "phase": "Ready" if ready else "Pulling",
               "bytesDone": 1000, "bytesTotal": 1000} for e in spec]
    body = {"apiVersion": "prefetcher.dev/v1alpha1", "kind": "NodeImageSet",
            "metadata": {"name": node, "resourceVersion": str(rv), "generation": 1,
                         "managedFields": [{"manager": "agent", "fieldsV1": {"f:status": {}}}]},
            "spec": {"images": spec},
            "status": {"observedGeneration": 1, "images": status}}
    return json.loads(json.dumps(body))  # as decoded from a watch event: all copies


def state() -> index.State:
    return index.State(settings=config.OperatorSettings(), namespace="ops",
                       client=None)  # type: ignore[arg-type]


def test_nodes_with_the_same_entries_share_them_in_the_index() -> None:
    st = state()
    bodies = [node_set(f"n{i}", 10 + i) for i in range(NODES)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in bodies:
            st.node_set_event("ADDED", body)
        del bodies  # what the index keeps is all that is left of the events
        per_node = (tracemalloc.get_traced_memory()[0] - before) / NODES
    finally:
        tracemalloc.stop()
    assert per_node < 12 * 1024, f"{per_node / 1024:.0f} KiB kept per node"  # was ~150
    one, other = st.node_sets["n1"], st.node_sets["n2"]
    assert one["spec"]["images"][7] is other["spec"]["images"][7]
    assert one["status"]["images"][7] is other["status"]["images"][7]
    assert "managedFields" not in one["metadata"]
    assert set(st.by_owner["uid-3"]) == {f"n{i}" for i in range(NODES)}


def test_a_differing_entry_is_kept_as_it_is() -> None:
    st = state()
    st.node_set_event("ADDED", node_set("a", 1))
    pulling = node_set("b", 2, ready=False)
    pulling["spec"]["images"][0]["pullPolicy"] = "Always"
    st.node_set_event("ADDED", pulling)
    a, b = st.node_sets["a"], st.node_sets["b"]
    assert b["spec"]["images"][0]["pullPolicy"] == "Always"
    assert a["spec"]["images"][0]["pullPolicy"] == "IfNotPresent"
    assert b["status"]["images"][3]["phase"] == "Pulling"
    assert a["status"]["images"][3]["phase"] == "Ready"
    assert a["spec"]["images"][1] is b["spec"]["images"][1]


def test_a_plan_over_thousands_of_nodes_compares_each_shared_entry_once() -> None:
    st = state()
    for i in range(NODES):
        st.node_set_event("ADDED", node_set(f"n{i}", 10 + i))
    ours = st.by_owner["uid-3"]
    desired = {name: entries.combine([e]) for name, e in next(iter(ours.values())).items()}
    calls = 0
    same = dispatching._same

    def counting(have: Any, expected: Any) -> bool:
        nonlocal calls
        calls += 1
        return same(have, expected)

    dispatching._same = counting  # type: ignore[assignment]
    try:
        plan = dispatching.plan(list(ours), ours, desired, {}, None)
    finally:
        dispatching._same = same  # type: ignore[assignment]
    assert plan.refresh == () and plan.dispatch == () and plan.withdraw == ()
    assert calls == len(desired)  # not NODES x len(desired)


def test_live_agents_answer_without_looking_at_every_node() -> None:
    """Each reconcile asks which agents are live; judging every node each time took ~2 ms at
    5,000 nodes (x 20 prefetches x every wake-up). The heartbeat watch keeps the answer: the
    question judges no node (counted), and the answer is right."""
    st = state()
    for i in range(5000):
        st.heartbeats.observe("ADDED", {"metadata": {"annotations": {
            leases.NODE_ANNOTATION: f"n{i}"}}, "spec": {"renewTime": "t"}})
    st.agent_pods_ready = {f"n{i}" for i in range(4000, 6000)}  # 1,000 without a Lease yet
    judged = 0
    alive = st.heartbeats.alive

    def counting(node: str, now: float | None = None) -> bool:
        nonlocal judged
        judged += 1
        return alive(node, now)

    st.heartbeats.alive = counting  # type: ignore[method-assign]
    live = st.live_agents(None)  # type: ignore[arg-type]
    assert judged == 0
    assert live == {f"n{i}" for i in range(6000)}
