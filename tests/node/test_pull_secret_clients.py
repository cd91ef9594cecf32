"""Registry clients built from an entry's own pull-secret copies, shared and closed."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from agent.images.registry import credentials
from agent.node import credentials as node_credentials
from agent.node import errors


def secret(host: str, user: str, version: str = "1") -> dict[str, Any]:
    auth = base64.b64encode(f"{user}:pw".encode()).decode()
    config = json.dumps({"auths": {host: {"auth": auth}}}).encode()
    return {"metadata": {"resourceVersion": version},
            "data": {".dockerconfigjson": base64.b64encode(config).decode()}}


class FakeClient:
    def __init__(self, keychain: credentials.Keychain) -> None:
        self.keychain = keychain
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def secrets() -> dict[str, dict[str, Any]]:
    return {"a": secret("a.test", "alice"), "b": secret("b.test", "bob")}


@pytest.fixture
def pool(secrets: dict[str, dict[str, Any]]) -> node_credentials.RegistryPool:
    async def fetch(name: str) -> dict[str, Any] | None:
        return secrets.get(name)

    return node_credentials.RegistryPool(fetch, FakeClient, "prefetcher-system")  # type: ignore[arg-type]


async def test_an_entry_gets_exactly_its_own_secrets(pool: node_credentials.RegistryPool) -> None:
    async with pool.registry(["a"]) as client:
        assert client is not None
        keychain = client.keychain  # type: ignore[attr-defined]
        assert keychain.lookup("a.test") is not None
        assert keychain.lookup("b.test") is None
    async with pool.registry([]) as anonymous:
        assert anonymous is None


async def test_clients_are_shared_rebuilt_on_change_and_closed_when_unused(
        pool: node_credentials.RegistryPool, secrets: dict[str, dict[str, Any]]) -> None:
    async with pool.registry(["a"]) as first, pool.registry(["a"]) as second:
        assert first is second
    secrets["a"] = secret("a.test", "alice2", version="2")
    async with pool.registry(["a"]) as third:
        assert third is not first
    assert first.closed  # type: ignore[union-attr]
    pool.retain([])  # no entry uses "a" any more
    async with pool.registry(["b"]):
        pass
    assert third.closed  # type: ignore[union-attr]


async def test_a_missing_copy_is_named(pool: node_credentials.RegistryPool) -> None:
    with pytest.raises(errors.MissingPullSecret, match="prefetcher-system/nope"):
        async with pool.registry(["a", "nope"]):
            pass
