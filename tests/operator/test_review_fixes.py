"""Regressions from the review: shared digests, stale completion, cordons, secret copies."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest

from agent import config
from agent.images import references
from agent.kube import resources
from agent.operator import (
    dispatching,
    entries,
    errors,
    index,
    nodes,
    prefetches,
    secret_copies,
    status,
    status_writes,
    times,
)

JSON = dict[str, Any]
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def prefetch(name: str, uid: str, **fields: Any) -> prefetches.Prefetch:
    return prefetches.Prefetch(namespace="default", name=name, uid=uid, generation=1,
                               images=(("nginx:latest", references.parse("nginx:latest")),),
                               **fields)


def body(**spec: Any) -> JSON:
    spec.setdefault("images", ["nginx:1.27"])
    return {"metadata": {"namespace": "ns", "name": "p", "uid": "u1", "generation": 1},
            "spec": spec}


def test_two_prefetches_that_resolved_different_digests_settle_on_one_entry_digest() -> None:
    ref = references.parse("nginx:latest")
    ca = entries.contribution(prefetch("a", "ua"), ref, D1, [], "")
    cb = entries.contribution(prefetch("b", "ub"), ref, D2, [], "")
    known = {("ua", ca["name"]): ca, ("ub", cb["name"]): cb}
    node = entries.upsert([], [ca], known)
    writes = 0
    for _ in range(4):
        for c in (ca, cb):
            ours = entries.owned(node, c["owners"][0]["uid"])
            if dispatching._differs(ours, {c["name"]: c}, known):
                node = entries.upsert(node, [c], known)
                writes += 1
    assert writes == 1  # b joins once; nobody rewrites the digest after that
    assert node[0]["digest"] == D1
    assert {o["uid"] for o in node[0]["owners"]} == {"ua", "ub"}
    # The owner that set the digest leaves: the remaining owner's digest takes over.
    left = entries.release(node, "ua", known=known)
    assert left[0]["digest"] == D2
    # Either owner accepts the entry's digest in the node's report.
    rep = dispatching.report("n", {ca["name"]: node[0]},
                             {"images": [{"name": ca["name"], "phase": "Ready", "digest": D1}]},
                             True)
    assert rep.state == dispatching.READY


def test_a_sole_owner_still_refreshes_its_own_new_digest() -> None:
    ref = references.parse("nginx:latest")
    old = entries.contribution(prefetch("a", "ua"), ref, D1, [], "")
    new = entries.contribution(prefetch("a", "ua"), ref, D2, [], "")
    node = entries.upsert([], [old])
    assert dispatching._differs(entries.owned(node, "ua"), {new["name"]: new}, {})
    assert entries.upsert(node, [new], {("ua", new["name"]): new})[0]["digest"] == D2


class StatusClient:
    def __init__(self) -> None:
        self.patches: list[list[JSON]] = []

    async def json_patch(self, path: str, operations: list[JSON]) -> JSON:
        self.patches.append(copy.deepcopy(operations))
        return {}


def state(client: Any) -> index.State:
    return index.State(settings=config.OperatorSettings(), namespace="ops", client=client)


def test_a_status_write_nulls_a_completion_time_the_server_still_holds() -> None:
    client = StatusClient()
    st = state(client)
    server = {"observedGeneration": 1, "phase": "Complete",
              "completionTime": "2026-01-01T00:00:00Z"}
    obj = {"metadata": {"namespace": "ns", "name": "p", "uid": "u1", "generation": 2},
           "status": server}
    previous = {"observedGeneration": 1, "phase": "Complete"}  # popped by reconcile
    new = {"observedGeneration": 2, "phase": "Progressing"}
    asyncio.run(status_writes.write_status(st, obj, previous, new,
                                         times.utcnow(), urgent=True))
    test, write = client.patches[0]
    assert test == {"op": "test", "path": "/metadata/uid", "value": "u1"}
    assert write["path"] == "/status" and "completionTime" not in write["value"]
    assert write["value"] == new


def test_cordoned_or_not_ready_nodes_keep_the_entries_already_dispatched() -> None:
    def node(name: str, ready: bool = True, cordoned: bool = False, pool: str = "web") -> Any:
        return nodes.Node(name, {"pool": pool}, ready, cordoned)
    p = prefetches.parse(body(nodeSelector={"matchLabels": {"pool": "web"}}))
    all_nodes = [node("a", cordoned=True), node("b", ready=False), node("c", cordoned=True),
                 node("d", pool="db")]
    # Not dispatched yet: readiness and cordons gate the dispatch.
    assert nodes.select(p, all_nodes) == []
    # Dispatched: kept while they still match; a node that stopped matching is withdrawn.
    targets = nodes.select(p, all_nodes, dispatched={"a", "b", "d"})
    assert targets == ["a", "b"]
    plan = dispatching.plan(targets, {"a": {}, "b": {}, "d": {}}, {}, {}, None)
    assert plan.withdraw == ("d",) and plan.dispatch == ()


class SecretClient:
    """Copies in the operator namespace; the first ``conflicts`` writes fail with 409 after
    another user changed the copy (as a concurrent release would)."""

    def __init__(self, users: list[str], conflicts: int) -> None:
        self.copy: JSON | None = {"metadata": {
            "name": "ipf-x-regcred", "resourceVersion": "1",
            "labels": {resources.LABEL_COMPONENT: resources.COMPONENT_PULL_SECRET},
            "annotations": {resources.ANNOTATION_USERS: json.dumps(users)}}}
        self.conflicts = conflicts
        self.deletes: list[str] = []

    def _users(self) -> list[str]:
        assert self.copy is not None
        return list(json.loads(self.copy["metadata"]["annotations"][resources.ANNOTATION_USERS]))

    def _other_released(self) -> None:
        assert self.copy is not None
        users = self._users()
        users.remove(next(u for u in users if u != "me"))
        self.copy["metadata"]["annotations"][resources.ANNOTATION_USERS] = json.dumps(users)
        self.copy["metadata"]["resourceVersion"] = str(int(
            self.copy["metadata"]["resourceVersion"]) + 1)

    async def list(self, path: str, **params: str) -> list[JSON]:
        return [copy.deepcopy(self.copy)] if self.copy else []

    async def get(self, path: str) -> JSON | None:
        return copy.deepcopy(self.copy)

    def _check(self, version: str) -> None:
        assert self.copy is not None
        if self.conflicts:
            self.conflicts -= 1
            self._other_released()
        if version != self.copy["metadata"]["resourceVersion"]:
            raise errors.Conflict(409, "Conflict", "modified")

    async def merge_patch(self, path: str, patch: JSON) -> JSON:
        self._check(patch["metadata"]["resourceVersion"])
        assert self.copy is not None
        self.copy["metadata"]["annotations"].update(patch["metadata"]["annotations"])
        return {}

    async def delete(self, path: str, *, resource_version: str = "") -> None:
        assert resource_version, "a delete must carry a resourceVersion precondition"
        self._check(resource_version)
        self.deletes.append(path)
        self.copy = None


def test_prefetches_deleted_together_do_not_leak_their_shared_secret_copy() -> None:
    client = SecretClient(["me", "other"], conflicts=1)
    asyncio.run(secret_copies.release_secret_copies(state(client), "me"))
    assert client.copy is None and client.deletes  # the other left first; we deleted it


def test_a_secret_copy_that_keeps_conflicting_raises_for_kopf_to_retry() -> None:
    client = SecretClient(["me"] + [f"o{i}" for i in range(40)], conflicts=40)
    with pytest.raises(errors.Conflict):
        asyncio.run(secret_copies.release_secret_copies(state(client), "me"))


def test_a_finished_prefetch_whose_nodes_left_reads_complete_not_pending() -> None:
    new = status.aggregate(
        generation=1, completion_policy="Always", desired_nodes=[], dispatched=[], reports={},
        images=[], previous={"completionTime": "2026-01-01T00:00:00Z"}, now="x")
    complete = next(c for c in new["conditions"] if c["type"] == "Complete")
    assert (new["phase"], complete["status"]) == ("Complete", "True")


def test_removed_pull_secrets_are_removed_from_node_entries() -> None:
    ref = references.parse("nginx:latest")
    p = prefetch("a", "ua")
    before = entries.contribution(p, ref, D1, ["ipf-1-regcred"], "")
    after = entries.contribution(p, ref, D1, [], "")
    node = entries.upsert([], [before])
    assert dispatching._differs(entries.owned(node, "ua"), {after["name"]: after}, {})
    node = entries.upsert(node, [after], {("ua", after["name"]): after})
    assert "pullSecrets" not in node[0]


class SourceClient:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def get(self, path: str) -> JSON | None:
        return {"metadata": {"name": "tls", "namespace": "ns", "resourceVersion": "1"},
                "type": self.kind, "data": {"tls.crt": "eA=="}}


def test_only_registry_credential_secrets_are_copied_others_are_an_invalid_spec() -> None:
    p = prefetches.parse(body(imagePullSecrets=[{"name": "tls"}]))
    with pytest.raises(errors.InvalidSpec) as e:
        asyncio.run(secret_copies.ensure_secret_copies(
            state(SourceClient("kubernetes.io/tls")), p, None))
    assert e.value.field == "spec.imagePullSecrets[0]" and "ns/tls" in str(e.value)
