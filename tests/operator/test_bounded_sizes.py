"""NodeImageSets stay far below etcd's 1.5 MiB object limit, and a prefetch that would take
a node past a cap is refused on that node alone, not with the rest of its batch."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.kube import specs
from agent.node import reconciling as node_reconciling
from agent.operator import status, writing

from .test_writing import FakeClient, entry, make_writer

CRD = yaml.safe_load((Path(__file__).parents[2] / "crds" /
                      "nodeimagesets.prefetcher.dev.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
SPEC_ITEM = SCHEMA["spec"]["properties"]["images"]
STATUS_ITEM = SCHEMA["status"]["properties"]["images"]


def test_the_writer_enforces_the_caps_the_crd_declares() -> None:
    assert SPEC_ITEM["maxItems"] == STATUS_ITEM["maxItems"] == writing.MAX_ENTRIES
    props = SPEC_ITEM["items"]["properties"]
    assert props["owners"]["maxItems"] == writing.MAX_OWNERS
    # The budget of owner references of the whole object (a CEL rule: the schema cannot).
    assert [r["rule"] for r in SPEC_ITEM["x-kubernetes-validations"]] == [
        f"self.map(e, size(e.owners)).sum() <= {writing.MAX_OWNER_REFS}"]
    assert props["pullSecrets"]["maxItems"] == writing.MAX_SECRETS
    message = STATUS_ITEM["items"]["properties"]["message"]["maxLength"]
    assert message == node_reconciling.MAX_MESSAGE


def owners_per_entry(spread: str) -> list[int]:
    """How the budget of owner references is spent over the entries: evenly (8 each), or
    as many entries at the per-entry cap as it allows, the others with one owner."""
    if spread == "even":
        return [writing.MAX_OWNER_REFS // writing.MAX_ENTRIES] * writing.MAX_ENTRIES
    full = (writing.MAX_OWNER_REFS - writing.MAX_ENTRIES) // (writing.MAX_OWNERS - 1)
    return [writing.MAX_OWNERS] * full + [1] * (writing.MAX_ENTRIES - full)


@pytest.mark.parametrize("spread", ["even", "skewed"])
def test_a_full_node_image_set_stays_below_a_mebibyte(spread: str) -> None:
    """Every cap reached, with names as long as real ones get (63-character namespaces and
    names, 100-character image references) and the longest message: under 1 MiB (etcd's
    limit is 1.5 MiB), however the owner references are spread."""
    counts = owners_per_entry(spread)
    assert sum(counts) <= writing.MAX_OWNER_REFS and max(counts) <= writing.MAX_OWNERS
    owners = [{"namespace": "n" * 63, "name": f"{i:02d}" + "p" * 61,
               "uid": "00000000-0000-0000-0000-0000000000" + f"{i:02d}"}
              for i in range(writing.MAX_OWNERS)]
    spec = [{"name": f"{i:03d}" + "e" * 60, "image": "r" * 100, "digest": "sha256:" + "a" * 64,
             "owners": owners[:counts[i]],
             "pullSecrets": [f"ipf-{j:02d}-" + "s" * 40 for j in range(writing.MAX_SECRETS)],
             "pullPolicy": "IfNotPresent", "backoffLimit": 3, "pinned": False,
             "timeoutSeconds": 3600, "progressTimeout": "5m",
             "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
            for i in range(writing.MAX_ENTRIES)]
    state = node_reconciling.ImageState("x" * 63, image="r" * 100, phase="Failed",
                                        digest="sha256:" + "a" * 64, reason="Unauthorized",
                                        message="m" * 5000, start_time="2026-01-01T00:00:00Z",
                                        completion_time="2026-01-01T00:00:00Z",
                                        last_progress_time="2026-01-01T00:00:00Z",
                                        next_retry_time="2026-01-01T00:00:00Z",
                                        bytes_done=10**12, bytes_total=10**12, attempts=999)
    items = [state.to_status()] * writing.MAX_ENTRIES
    body = {"apiVersion": "prefetcher.dev/v1alpha1", "kind": "NodeImageSet",
            "metadata": {"name": "n" * 253}, "spec": {"images": spec},
            "status": {"images": items, "summary": node_reconciling.summary(items)}}
    size = len(json.dumps(body, separators=(",", ":")))
    assert size < 2**20, size  # with room for metadata and managedFields


def test_up_to_64_prefetches_share_an_image_on_a_node_and_the_next_is_refused_alone() -> None:
    """The decision (docs/limits.md): a 9th prefetch of the same image on a node is fine now;
    the 65th is refused there, alone, with a reason its status shows."""
    async def main() -> None:
        client = FakeClient()
        writer, index = make_writer(client, debounce=0.01)
        uids = [f"u{i:02d}" for i in range(writing.MAX_OWNERS + 1)]
        for uid in uids:
            await writer.write({"n1": writing.Change(uid, {"shared": entry("shared", uid),
                                                          f"own-{uid}": entry(f"own-{uid}", uid)})})
        images = {e["name"]: e for e in index["n1"]["spec"]["images"]}
        assert [o["uid"] for o in images["shared"]["owners"]] == uids[:-1]
        # Refused whole, on this node: neither its shared entry nor its own one.
        assert f"own-{uids[-1]}" not in images and f"own-{uids[-2]}" in images
        assert writer.refused == {(uids[-1], "n1"): "docker.io/library/shared:1 already has"
                                  " 64 ImagePrefetches owning it on the node (at most 64)"}
        await writer.close()

    asyncio.run(main())


def test_owner_references_past_the_nodes_budget_are_refused_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writing, "MAX_OWNER_REFS", 5)

    async def main() -> None:
        client = FakeClient()
        writer, index = make_writer(client, debounce=0.01)
        await writer.write({"n1": writing.Change("a", {n: entry(n, "a") for n in "pqr"})})
        await writer.write({"n1": writing.Change("b", {n: entry(n, "b") for n in "pqr"})})
        await writer.write({"n1": writing.Change("c", {"p": entry("p", "c")})})
        owners = {e["name"]: [o["uid"] for o in e["owners"]]
                  for e in index["n1"]["spec"]["images"]}
        assert owners == {"p": ["a", "c"], "q": ["a"], "r": ["a"]}
        assert writer.refused == {("b", "n1"): "the node's image entries already have 3 owner"
                                  " references in all (at most 5: one per ImagePrefetch per"
                                  " image)"}
        await writer.close()

    asyncio.run(main())


def test_a_prefetch_past_the_cap_is_refused_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writing, "MAX_ENTRIES", 3)

    async def main() -> None:
        client = FakeClient()
        writer, index = make_writer(client, debounce=0.01)
        index["n1"] = {"metadata": {"name": "n1", "resourceVersion": "1"},
                       "spec": {"images": [entry("a", "x"), entry("b", "x")]}}
        small = {"c": entry("c", "y")}
        big: dict[str, specs.ImageEntry] = {"d": entry("d", "z"), "e": entry("e", "z")}
        failed = await asyncio.gather(writer.write({"n1": writing.Change("z", big)}),
                                      writer.write({"n1": writing.Change("y", small)}))
        assert failed == [[], []]
        assert [e["name"] for e in index["n1"]["spec"]["images"]] == ["a", "b", "c"]
        assert writer.refused == {("z", "n1"): "the node already has 2 image entries"
                                                " (at most 3)"}
        await writer.close()

    asyncio.run(main())


def test_failure_messages_in_the_prefetch_status_are_bounded() -> None:
    from agent.operator import dispatching
    rep = dispatching.NodeReport("a", dispatching.FAILED, {"img": {
        "name": "img", "phase": "Failed", "reason": "X", "message": "m" * 10_000}})
    st: dict[str, Any] = dict(status.aggregate(
        generation=1, completion_policy="Always", desired_nodes=["a"], dispatched=["a"],
        reports={"a": rep}, images=[status.ResolvedImage("i", "img", "i", "")], previous={},
        now="t"))
    assert len(st["failures"][0]["message"]) == status.MAX_MESSAGE
