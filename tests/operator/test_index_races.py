"""The shared index (:class:`agent.operator.index.State`) is changed only on the event loop,
never while a reconcile iterates it.

kopf runs a plain ``def`` handler in a thread: when the Node and NodeImageSet handlers were
such functions, they changed the index while reconciles iterated it ("dictionary changed
size during iteration" in 106 of 1,021 runs under node churn). The handlers are ``async``
now; these tests catch a reintroduction: every handler the operator registers is a
coroutine function, and node and NodeImageSet churn delivered as kopf delivers it (through
kopf's own invocation, which would use a thread for a ``def``) while reconciles iterate the
index breaks nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from typing import Any

import kopf
from kopf._core.actions import invocation

from agent import config
from agent.operator import handlers, index, nodes, prefetches
from agent.operator import main as operator_main

JSON = dict[str, Any]


def registered() -> dict[str, Any]:
    """The operator's own kopf handlers (name → function), from kopf's default registry as
    ``prefetcher operator`` runs it."""
    assert operator_main.__name__  # importing the operator registers its handlers
    found: dict[str, Any] = {}
    for part in vars(kopf.get_default_registry()).values():
        if hasattr(part, "get_all_handlers"):
            for handler in part.get_all_handlers():
                if handler.fn.__module__.startswith("agent."):
                    found[handler.fn.__name__] = handler.fn
    return found


def test_every_kopf_handler_of_the_operator_is_a_coroutine_function() -> None:
    found = registered()
    assert {"configure", "stop", "node_changed", "node_set_changed", "prefetch_changed",
            "run_prefetch", "prefetch_deleted"} <= set(found)
    threaded = sorted(name for name, fn in found.items()
                      if not inspect.iscoroutinefunction(fn))
    assert threaded == [], f"kopf would run these in threads, beside the reconciles: {threaded}"


def node(i: int) -> JSON:
    return {"metadata": {"name": f"churn-{i}", "uid": f"uid-{i}",
                         "labels": {"pool": "churn"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def node_set(i: int, owners: int) -> JSON:
    return {"metadata": {"name": f"churn-{i}", "resourceVersion": str(1000 + i)},
            "spec": {"images": [{"name": "img", "image": "docker.io/library/x:1",
                                 "owners": [{"namespace": "ns", "name": f"p{o}",
                                             "uid": f"p{o}"} for o in range(owners)]}]}}


def test_node_churn_while_reconciles_iterate_the_index() -> None:
    found = registered()
    prefetch = prefetches.parse({
        "metadata": {"namespace": "ns", "name": "p0", "uid": "p0", "generation": 1},
        "spec": {"images": ["x:1"], "nodeSelector": {"matchLabels": {"pool": "churn"}}}})

    async def main() -> int:
        st = index.State(settings=config.OperatorSettings(), namespace="ops",
                         client=None)  # type: ignore[arg-type]
        memo = kopf.Memo(state=st)
        for i in range(2000):
            st.node_event("ADDED", node(i))
            st.node_set_event("ADDED", node_set(i, 4))
        for o in range(50):
            st.wakers[f"p{o}"] = asyncio.Event()
        done = asyncio.Event()
        iterations = 0

        async def reconciles() -> None:  # what a reconcile iterates, as often as it can
            nonlocal iterations
            while not done.is_set():
                targets = nodes.select(prefetch, st.nodes.values(), {}, st.runnable)
                assert all(name.startswith("churn-") for name in targets)
                st.wake_node(f"churn-{iterations % 4000}")
                st.wake()
                iterations += 1
                await asyncio.sleep(0)

        async def churn() -> None:  # nodes deleted and added, their NodeImageSets rewritten
            rnd = random.Random(14)
            try:
                for _ in range(600):
                    i = rnd.randrange(4000)
                    kind = rnd.choice(("ADDED", "DELETED"))
                    await invocation.invoke(found["node_changed"], kwargs={
                        "type": kind, "body": node(i), "memo": memo})
                    await invocation.invoke(found["node_set_changed"], kwargs={
                        "type": kind, "body": node_set(i, rnd.randrange(1, 8)), "memo": memo})
            finally:
                done.set()

        await asyncio.wait_for(asyncio.gather(reconciles(), churn()), timeout=60)
        # The per-owner index agrees with the NodeImageSets it was built from.
        for name, body in st.node_sets.items():
            for owner in body["spec"]["images"][0]["owners"]:
                assert name in st.by_owner[owner["uid"]]
        return iterations

    assert asyncio.run(main()) > 0
    assert handlers.MAX_COALESCE > 0  # the module under test is the one kopf runs
