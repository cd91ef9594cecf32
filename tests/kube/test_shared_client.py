"""The one Kubernetes client (agent.kube.client) against the emulator: pages, rotated tokens,
throttling and the error tree the operator and the agent share."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.kube import client as kube_client
from agent.kube import connections, errors

from .cluster import Cluster


def connect(cluster: Cluster, **fields: object) -> kube_client.Client:
    return kube_client.Client(connections.Connection(server=cluster.url, **fields))  # type: ignore[arg-type]


def test_lists_are_read_page_by_page_and_nothing_is_lost(cluster: Cluster) -> None:
    for i in range(7):
        cluster.add_node(f"page-{i}")

    async def main() -> list[str]:
        client = connect(cluster)
        try:
            pages = [len(p) async for p in client.pages("/api/v1/nodes", limit=3)]
            assert pages == [3, 3, 1]
            return [n["metadata"]["name"] for n in await client.list("/api/v1/nodes")]
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [f"page-{i}" for i in range(7)]
    lists = [c for c in cluster.calls() if c.verb == "list" and c.resource == "nodes"]
    assert len(lists) == 3 + 1


def test_a_rotated_service_account_token_is_read_again_from_its_file(
        cluster: Cluster, tmp_path: Path) -> None:
    """The kubelet rotates the projected token; the old one stops working (401). A client
    that read the file once would fail from then on."""
    assert cluster.api is not None
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    cluster.call(cluster.api.rotate_token, "first-token")
    cluster.add_node("tok")

    async def main() -> None:
        client = connect(cluster, token_path=str(token_file))
        try:
            assert await client.get("/api/v1/nodes/tok") is not None
            token_file.write_text("second-token\n")
            cluster.call(cluster.api.rotate_token, "second-token")  # type: ignore[union-attr]
            assert await client.get("/api/v1/nodes/tok") is not None
            cluster.call(cluster.api.rotate_token, "third-token")  # type: ignore[union-attr]
            with pytest.raises(errors.Unauthorized):  # the file was not updated: a real 401
                await client.get("/api/v1/nodes/tok")
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_kubeconfig_token_file_is_found_and_followed(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "sa-token").write_text("from-file")
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{cluster.url}"}}}}]
users: [{{name: u, user: {{tokenFile: sa-token}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    connection = connections.load_connection(str(kubeconfig))
    assert connection.token_path == str(tmp_path / "sa-token")
    assert connection.current_token() == "from-file"
    (tmp_path / "sa-token").write_text("rotated")
    assert connection.to_kopf().token == "rotated"  # kopf's re-login after a 401


def test_throttling_and_failures_map_to_one_error_tree(cluster: Cluster) -> None:
    assert cluster.api is not None
    cluster.add_node("busy")
    cluster.call(cluster.api.fail, "get", "nodes", 429, times=2, retry_after=0)

    async def main() -> None:
        client = connect(cluster)
        try:
            # Told when to come back (Retry-After): retried, as client-go does.
            assert await client.get("/api/v1/nodes/busy") is not None
            assert client.requests == 3
            cluster.call(cluster.api.fail, "get", "nodes", 429)  # type: ignore[union-attr]
            cluster.call(cluster.api.fail, "patch", "nodes", 409)  # type: ignore[union-attr]
            cluster.call(cluster.api.fail, "get", "nodes", 500)  # type: ignore[union-attr]
            with pytest.raises(errors.TooManyRequests) as throttled:  # not told: raised
                await client.get("/api/v1/nodes/x")
            assert throttled.value.retry_after is None and throttled.value.temporary
            with pytest.raises(errors.Conflict):
                await client.merge_patch("/api/v1/nodes/x", {"metadata": {}})
            with pytest.raises(errors.APIError) as failed:
                await client.get("/api/v1/nodes/x")
            assert failed.value.status == 500 and failed.value.temporary
            assert await client.get("/api/v1/nodes/x") is None  # faults consumed: 404
        finally:
            await client.aclose()
        dead = kube_client.Client(connections.Connection(server="http://127.0.0.1:9"))
        try:
            with pytest.raises(errors.Unavailable) as unreachable:
                await dead.get("/api/v1/nodes")
            assert unreachable.value.status == 0 and unreachable.value.temporary
        finally:
            await dead.aclose()

    asyncio.run(main())
