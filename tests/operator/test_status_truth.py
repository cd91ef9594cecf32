"""Status that never lies: Complete means every node has every image Ready for the current
spec; results of a previous spec are not trusted; spec changes reach dispatched nodes."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from agent.images import references
from agent.kube import specs
from agent.operator import dispatching, entries, prefetches, status, writing

JSON = dict[str, Any]
D1 = "sha256:" + "1" * 64
IMAGE = status.ResolvedImage("nginx", "img", "docker.io/library/nginx:1.27", "")


def node_report(node: str, state: str, phase: str, **fields: Any) -> dispatching.NodeReport:
    return dispatching.NodeReport(node, state, {"img": {"name": "img", "phase": phase,
                                                        **fields}})  # type: ignore[typeddict-item]


def aggregate(reports: dict[str, dispatching.NodeReport], previous: JSON) -> JSON:
    return dict(status.aggregate(
        generation=1, completion_policy="Always", desired_nodes=list(reports),
        dispatched=list(reports), reports=reports, images=[IMAGE], previous=previous,
        now="2026-01-02T00:00:00Z"))


def condition(st: JSON, type_: str) -> JSON:
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_a_failed_prefetch_whose_node_retries_is_progressing_not_complete() -> None:
    failed = aggregate({"a": node_report("a", dispatching.READY, "Ready"),
                        "b": node_report("b", dispatching.FAILED, "Failed", reason="Timeout")},
                       {})
    assert failed["phase"] == "Failed" and failed["completionTime"]
    # The agent on b retries the failed entry: b is downloading again.
    retrying = aggregate({"a": node_report("a", dispatching.READY, "Ready"),
                          "b": node_report("b", dispatching.PULLING, "Downloading")}, failed)
    assert retrying["phase"] == "Progressing"
    assert "completionTime" not in retrying
    assert condition(retrying, "Complete")["status"] == "False"
    assert condition(retrying, "Failed")["status"] == "False"
    healed = aggregate({"a": node_report("a", dispatching.READY, "Ready"),
                        "b": node_report("b", dispatching.READY, "Ready")}, retrying)
    assert healed["phase"] == "Complete" and healed["completionTime"] == "2026-01-02T00:00:00Z"
    assert condition(healed, "Complete")["status"] == "True"


def test_a_prefetch_failed_everywhere_does_not_show_full_progress() -> None:
    st = aggregate({n: node_report(n, dispatching.FAILED, "Failed", reason="Unpack",
                                   bytesDone=100, bytesTotal=100) for n in ("a", "b")}, {})
    assert st["phase"] == "Failed"
    assert st["summary"]["progress"] == "0%"


def test_a_node_status_older_than_our_dispatch_is_not_trusted() -> None:
    wanted = {"img": entries.contribution(
        prefetches.parse({"metadata": {"namespace": "ns", "name": "p", "uid": "u",
                                       "generation": 2},
                          "spec": {"images": ["nginx:1.27"]}}),
        references.parse("nginx:1.27"), "", [], "")}
    wanted = {wanted["img"]["name"]: wanted["img"]}
    name = next(iter(wanted))
    # The agent's last write saw generation 4; our entries changed at generation 5.
    old = {"observedGeneration": 4, "images": [{"name": name, "phase": "Failed",
                                                "reason": "Unauthorized"}]}
    assert dispatching.report("n", wanted, old, True, None, 5).state == dispatching.PULLING
    assert dispatching.report("n", wanted, old, False, None, 5).state == \
        dispatching.AGENT_UNAVAILABLE
    seen = {**old, "observedGeneration": 5}
    assert dispatching.report("n", wanted, seen, True, None, 5).state == dispatching.FAILED


def contribution(**spec: Any) -> specs.ImageEntry:
    p = prefetches.parse({"metadata": {"namespace": "ns", "name": "p", "uid": "u",
                                       "generation": 1},
                          "spec": {"images": ["nginx:1.27"], **spec}})
    return entries.contribution(p, p.images[0][1], D1, [], "00-trace")


def test_changed_limits_and_policies_reach_nodes_already_dispatched() -> None:
    before = contribution(timeoutSeconds=60, progressTimeout="1m", backoffLimit=3)
    on_node = {before["name"]: before}
    for change in ({"timeoutSeconds": 600}, {"progressTimeout": "5m"}, {"backoffLimit": 6},
                   {"completionPolicy": "Never"}, {"pullPolicy": "Always"}):
        after = contribution(**{"timeoutSeconds": 60, "progressTimeout": "1m",
                                "backoffLimit": 3, **change})
        plan = dispatching.plan(["n"], {"n": on_node}, {after["name"]: after},
                                {}, None, known={("u", after["name"]): after})
        assert plan.refresh == ("n",), change
    # Back from Always to IfNotPresent, and from pinned to not: also written.
    pinned = contribution(pullPolicy="Always", completionPolicy="Never")
    plain = contribution()
    plan = dispatching.plan(["n"], {"n": {pinned["name"]: pinned}}, {plain["name"]: plain},
                            {}, None, known={("u", plain["name"]): plain})
    assert plan.refresh == ("n",)
    # Nothing changed but the trace: no write.
    same = {**before, "traceparent": "00-other"}
    assert dispatching.plan(["n"], {"n": on_node}, {same["name"]: same}, {}, None,
                            known={("u", same["name"]): same}).refresh == ()


def test_an_unresolved_digest_never_replaces_the_entrys_digest() -> None:
    resolved = contribution()
    blip = {k: v for k, v in resolved.items() if k != "digest"}
    merged = entries.upsert([resolved], [blip], {("u", blip["name"]): blip})  # type: ignore[list-item]
    assert merged[0]["digest"] == D1


class GenerationClient:
    """Answers spec writes as the API server does: generation + 1 when the spec changed."""

    def __init__(self) -> None:
        self.objects: dict[str, JSON] = {}

    async def create(self, path: str, body: JSON) -> JSON:
        obj = copy.deepcopy(body)
        obj["metadata"]["generation"] = 1
        self.objects[obj["metadata"]["name"]] = obj
        return copy.deepcopy(obj)

    async def merge_patch(self, path: str, patch: JSON) -> JSON:
        obj = self.objects[path.rsplit("/", 1)[-1]]
        if obj["spec"] != patch["spec"]:
            obj["spec"] = copy.deepcopy(patch["spec"])
            obj["metadata"]["generation"] += 1
        return copy.deepcopy(obj)


def test_the_writer_remembers_the_generation_that_carries_each_prefetchs_entries() -> None:
    async def main() -> None:
        client = GenerationClient()
        index: dict[str, JSON] = {}
        writer = writing.NodeWriter(client, index.get,  # type: ignore[arg-type]
                                    lambda b: index.__setitem__(b["metadata"]["name"], b),
                                    lambda n: index.pop(n, None), {}, debounce=0.01)
        a = contribution()
        await writer.write({"n": writing.Change("u", {a["name"]: a})})
        assert writer.generations[("u", "n")] == 1
        other = {**a, "name": "other", "owners": [{"namespace": "ns", "name": "q",
                                                   "uid": "v"}]}
        await writer.write({"n": writing.Change("v", {"other": other})})  # type: ignore[dict-item]
        # Another prefetch's write does not make ours wait for the agent again.
        assert writer.generations == {("u", "n"): 1, ("v", "n"): 2}
        changed = contribution(timeoutSeconds=5)
        await writer.write({"n": writing.Change("u", {changed["name"]: changed})})
        assert writer.generations[("u", "n")] == 3
        # A prefetch deleted after its put was queued: the flush withdraws it instead.
        future = writer.submit("n", writing.Change("v", {"other": other}))  # type: ignore[dict-item]
        writer.retired.add("v")
        await future
        assert [e["name"] for e in index["n"]["spec"]["images"]] == [a["name"]]
        await writer.close()

    asyncio.run(main())
