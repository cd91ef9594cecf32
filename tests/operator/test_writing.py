"""The per-node writer: coalescing, no lost entries under concurrency, conflict-free writes."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from agent.kube import specs
from agent.operator import errors, writing

JSON = dict[str, Any]


def entry(name: str, uid: str, **fields: Any) -> specs.ImageEntry:
    e: Any = {"name": name, "image": f"docker.io/library/{name}:1",
              "owners": [{"namespace": "ns", "name": f"p-{uid}", "uid": uid}],
              "pullPolicy": "IfNotPresent", "backoffLimit": 3, "pinned": False, **fields}
    return e  # type: ignore[no-any-return]


class FakeClient:
    """Records the spec writes; ``fail`` makes the next N writes fail with a 500."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str, JSON]] = []
        self.rv = 0
        self.fail = 0
        self.delay = 0.0

    async def _answer(self, verb: str, path: str, body: JSON) -> JSON:
        await asyncio.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise errors.APIError(500, "InternalError", "boom")
        self.writes.append((verb, path, copy.deepcopy(body)))
        self.rv += 1
        name = body.get("metadata", {}).get("name") or path.rsplit("/", 1)[-1]
        return {"metadata": {"name": name, "resourceVersion": str(self.rv)},
                "spec": copy.deepcopy(body["spec"])}

    async def create(self, path: str, body: JSON) -> JSON:
        return await self._answer("create", path, body)

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        return await self._answer("patch", path, body)


def make_writer(client: FakeClient, known: dict[tuple[str, str], specs.ImageEntry] | None = None,
                **options: Any) -> tuple[writing.NodeWriter, dict[str, JSON]]:
    index: dict[str, JSON] = {}
    writer = writing.NodeWriter(
        client, index.get, lambda body: index.__setitem__(body["metadata"]["name"], body),
        lambda name: index.pop(name, None), known if known is not None else {}, **options)
    return writer, index


def names(index: dict[str, JSON], node: str) -> list[str]:
    return [e["name"] for e in index[node]["spec"]["images"]]


def test_changes_of_many_prefetches_for_one_node_become_one_write() -> None:
    async def main() -> None:
        client = FakeClient()
        writer, index = make_writer(client, debounce=0.05)
        wanted = {uid: {f"img-{uid}": entry(f"img-{uid}", uid)} for uid in ("a", "b", "c")}
        await asyncio.gather(*(
            writer.write({node: writing.Change(uid, w) for node in ("n1", "n2")})
            for uid, w in wanted.items()))
        assert sorted(path for _, path, _ in client.writes) == [
            "/apis/prefetcher.dev/v1alpha1/nodeimagesets"] * 2  # one create per node
        assert names(index, "n1") == names(index, "n2") == ["img-a", "img-b", "img-c"]
        await writer.close()

    asyncio.run(main())


def test_a_change_during_a_write_is_written_next_without_losing_the_first() -> None:
    async def main() -> None:
        client = FakeClient()
        client.delay = 0.1
        writer, index = make_writer(client, debounce=0.01)
        first = asyncio.ensure_future(
            writer.write({"n1": writing.Change("a", {"x": entry("x", "a")})}))
        await asyncio.sleep(0.05)  # the first write is in flight now
        await writer.write({"n1": writing.Change("b", {"x": entry("x", "b"),
                                                       "y": entry("y", "b")})})
        await first
        assert len(client.writes) == 2
        assert client.writes[1][0] == "patch"
        images = index["n1"]["spec"]["images"]
        assert [e["name"] for e in images] == ["x", "y"]
        assert {o["uid"] for o in images[0]["owners"]} == {"a", "b"}  # owners merged
        # Withdrawing one owner keeps the other's claim on the shared entry.
        await writer.write({"n1": writing.Change("b", None)})
        images = index["n1"]["spec"]["images"]
        assert [(e["name"], [o["uid"] for o in e["owners"]]) for e in images] == [("x", ["a"])]
        await writer.close()

    asyncio.run(main())


def test_spec_writes_are_merge_patches_of_spec_images_on_the_version_read() -> None:
    async def main() -> None:
        client = FakeClient()
        writer, index = make_writer(client, debounce=0.0)
        index["n1"] = {"metadata": {"name": "n1", "resourceVersion": "7"},
                       "spec": {"images": [entry("old", "z")]},
                       "status": {"images": [{"name": "old", "phase": "Ready"}]}}
        await writer.write({"n1": writing.Change("a", {"x": entry("x", "a")})})
        [(verb, path, body)] = client.writes
        assert verb == "patch" and path.endswith("/nodeimagesets/n1")
        assert sorted(body) == ["metadata", "spec"] and list(body["spec"]) == ["images"]
        assert body["metadata"] == {"resourceVersion": "7"}  # conditional: never clobbers
        assert [e["name"] for e in body["spec"]["images"]] == ["old", "x"]
        # Nothing to change: no write at all.
        await writer.write({"n1": writing.Change("a", {"x": entry("x", "a")})})
        assert len(client.writes) == 1
        await writer.close()

    asyncio.run(main())


def test_writes_failing_on_many_nodes_are_one_warning_not_one_per_node() -> None:
    """At 5,000 nodes an API server in trouble would otherwise be 5,000 lines per reconcile."""
    warnings: list[str] = []

    class Logger:
        def warning(self, message: str) -> None:
            warnings.append(message)

    async def main() -> None:
        client = FakeClient()
        writer, _ = make_writer(client, debounce=0.0, attempts=1)
        client.fail = 3
        change = writing.Change("a", {"x": entry("x", "a")})
        failed = await writer.write({n: change for n in ("n3", "n1", "n2")}, Logger())
        assert failed == ["n1", "n2", "n3"]
        await writer.close()

    asyncio.run(main())
    assert warnings == ["NodeImageSet writes failed on 3 node(s), e.g. n1: 500 InternalError:"
                        " boom; retrying later"]


def test_failures_are_retried_a_bounded_number_of_times() -> None:
    async def main() -> None:
        client = FakeClient()
        writer, index = make_writer(client, debounce=0.0, attempts=3)
        client.fail = 2
        assert await writer.write({"n1": writing.Change("a", {"x": entry("x", "a")})}) == []
        assert names(index, "n1") == ["x"]
        client.fail = 3
        failed = await writer.write({"n1": writing.Change("b", {"y": entry("y", "b")})})
        assert failed == ["n1"]
        assert names(index, "n1") == ["x"]
        await writer.close()

    asyncio.run(main())


@pytest.mark.parametrize("prefetches", [writing.MAX_OWNERS])  # sharing one entry: the cap
def test_concurrent_reconciles_never_lose_entries(prefetches: int) -> None:
    """Many prefetches dispatching, refreshing and withdrawing on shared nodes at once."""
    async def main() -> None:
        client = FakeClient()
        client.delay = 0.002
        known: dict[tuple[str, str], specs.ImageEntry] = {}
        writer, index = make_writer(client, known, debounce=0.005, concurrency=4)
        nodes = [f"n{i}" for i in range(20)]

        async def reconcile(uid: str) -> None:
            mine = {"shared": entry("shared", uid), f"own-{uid}": entry(f"own-{uid}", uid)}
            for name, e in mine.items():
                known[(uid, name)] = e
            for _ in range(3):
                await writer.write({n: writing.Change(uid, mine) for n in nodes})
                await asyncio.sleep(0)

        uids = [f"u{i}" for i in range(prefetches)]
        await asyncio.gather(*(reconcile(uid) for uid in uids))
        for node in nodes:
            images = {e["name"]: e for e in index[node]["spec"]["images"]}
            assert set(images) == {"shared", *(f"own-{u}" for u in uids)}
            assert {o["uid"] for o in images["shared"]["owners"]} == set(uids)
        assert len(client.writes) < len(nodes) * prefetches  # coalesced
        await writer.close()

    asyncio.run(main())


def test_a_put_from_a_reconcile_still_in_flight_after_the_delete_withdraws_instead() -> None:
    async def main() -> None:
        client = FakeClient()
        writer, index = make_writer(client, debounce=0.01)
        mine = {"img-a": entry("img-a", "a")}
        theirs = {"img-b": entry("img-b", "b")}
        await writer.write({"n1": writing.Change("a", mine)})
        await writer.write({"n1": writing.Change("b", theirs)})
        writer.retired.add("a")  # the prefetch is being deleted (the delete handler ran)
        await writer.write({"n1": writing.Change("a", None)})
        # A reconcile that started before the delete now submits its (stale) put.
        await writer.write({"n1": writing.Change("a", mine)})
        assert names(index, "n1") == ["img-b"]
        await writer.close()

    asyncio.run(main())


class ConflictingClient(FakeClient):
    """An API server where another writer (a second replica) added an entry meanwhile:
    writes on a stale resourceVersion get 409, as the API server answers them."""

    def __init__(self, current: JSON) -> None:
        super().__init__()
        self.current = current
        self.conflicts = 0

    async def list(self, path: str, **params: str) -> list[JSON]:
        assert params == {"fieldSelector": "metadata.name=n1"}
        return [copy.deepcopy(self.current)]

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        if body["metadata"]["resourceVersion"] != self.current["metadata"]["resourceVersion"]:
            self.conflicts += 1
            raise errors.Conflict(409, "Conflict", "the object has been modified")
        self.current = {"metadata": {"name": "n1", "resourceVersion": "9"},
                        "spec": copy.deepcopy(body["spec"])}
        return copy.deepcopy(self.current)


def test_a_conflicting_write_is_folded_into_the_fresh_object_not_over_it() -> None:
    async def main() -> None:
        theirs = {"metadata": {"name": "n1", "resourceVersion": "8"},
                  "spec": {"images": [entry("old", "z"), entry("theirs", "b")]}}
        client = ConflictingClient(theirs)
        writer, index = make_writer(client, debounce=0.0)
        index["n1"] = {"metadata": {"name": "n1", "resourceVersion": "7"},  # stale
                       "spec": {"images": [entry("old", "z")]}}
        assert await writer.write({"n1": writing.Change("a", {"x": entry("x", "a")})}) == []
        assert client.conflicts == 1
        assert [e["name"] for e in client.current["spec"]["images"]] == ["old", "theirs", "x"]
        await writer.close()

    asyncio.run(main())


def test_no_node_image_set_is_created_for_a_node_deleted_while_its_write_waited() -> None:
    """A dispatch to thousands of nodes takes minutes to write; a Node deleted meanwhile
    must not get a NodeImageSet created after it is gone (it could not be owned by the
    Node any more, so nothing would ever collect it). Nodes that still exist get theirs."""
    async def main() -> None:
        client = FakeClient()
        nodes = {"n1": "uid-1", "n2": "uid-2"}
        writer, index = make_writer(client, debounce=0.05, node_uid=lambda n: nodes.get(n, ""),
                                    node_exists=nodes.__contains__)
        writing_ = asyncio.ensure_future(
            writer.write({n: writing.Change("a", {"x": entry("x", "a")}) for n in ("n1", "n2")}))
        await asyncio.sleep(0.01)  # queued, not flushed yet
        del nodes["n2"]  # the Node is deleted before the flush
        await writing_
        assert [body["metadata"]["name"] for _, _, body in client.writes] == ["n1"]
        assert client.writes[0][2]["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert "n2" not in index
        await writer.close()

    asyncio.run(main())
