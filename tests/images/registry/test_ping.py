"""``RegistryClient.ping``: GET /v2/ against the real registries."""

from __future__ import annotations

import pytest
from fixtures.registries import Registry

from agent.images import errors
from agent.images.registry import client, hosts


async def ping(domain: str) -> client.PingResult:
    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        return await rc.ping(domain)


async def test_an_anonymous_registry_answers_without_an_auth_scheme(registry: Registry) -> None:
    result = await ping(registry.host)
    assert result.auth_scheme == "" and result.api_version == "registry/2.0"
    assert result.url == f"http://{registry.host}/v2/"  # the loopback fallback to plain HTTP


async def test_the_auth_scheme_a_registry_demands_is_reported(
    basic_registry: Registry, token_registry: Registry
) -> None:
    assert (await ping(basic_registry.host)).auth_scheme == "basic"
    assert (await ping(token_registry.host)).auth_scheme == "bearer"


async def test_a_host_that_does_not_answer_is_unavailable_naming_it() -> None:
    with pytest.raises(errors.Unavailable, match="127.0.0.1:9"):
        await ping("127.0.0.1:9")
