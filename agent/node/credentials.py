"""Registry clients per set of pull-secret copies: an entry pulls with its own secrets only.

The operator copies each ImagePrefetch's ``imagePullSecrets`` into its namespace and names
the copies on the entry (``pullSecrets``). For every attempt the agent reads those copies
(``GET``, in that namespace only), builds a keychain from exactly them, and pulls with a
:class:`RegistryClient` holding that keychain, so an image never borrows another entry's
credentials. Clients are shared by entries with the same secrets at the same
resourceVersions (bearer tokens are cached per client), and closed once nothing uses them.
An entry without secrets pulls anonymously with the service's own client.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from agent.images.registry import client as registry_client
from agent.images.registry import credentials
from agent.node import errors

logger = logging.getLogger("agent.node")

SecretFetcher = Callable[[str], Awaitable[dict[str, Any] | None]]
ClientFactory = Callable[[credentials.Keychain], registry_client.RegistryClient]
Key = tuple[tuple[str, ...], tuple[str, ...]]


class RegistryPool:
    """Registry clients keyed by (secret names, their resourceVersions).

    Args:
        fetch: reads one secret of the operator namespace by name (None when missing).
        make_client: builds a client for a keychain (the node's hosts and settings).
        namespace: the operator namespace, for messages.
    """

    def __init__(self, fetch: SecretFetcher, make_client: ClientFactory, namespace: str) -> None:
        self._fetch = fetch
        self._make = make_client
        self.namespace = namespace
        self._clients: dict[Key, registry_client.RegistryClient] = {}
        self._users: dict[Key, int] = {}
        self._latest: dict[tuple[str, ...], Key] = {}

    @contextlib.asynccontextmanager
    async def registry(self, names: Iterable[str]) -> AsyncIterator[
            registry_client.RegistryClient | None]:
        """The client for ``names`` (None: no secrets, use the service's anonymous one).

        Raises:
            MissingPullSecret: a named copy does not exist.
            InvalidConfiguration: a copy is not a usable dockerconfigjson secret.
        """
        wanted = tuple(sorted(set(names)))
        if not wanted:
            yield None
            return
        key, bodies = await self._read(wanted)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self._make(self._keychain(bodies))
        self._latest[wanted] = key
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield client
        finally:
            self._users[key] -= 1
            await self._close_unused(keep=set(self._latest.values()))

    async def _read(self, names: tuple[str, ...]) -> tuple[Key, dict[str, dict[str, Any]]]:
        versions = []
        bodies: dict[str, dict[str, Any]] = {}
        for name in names:
            body = await self._fetch(name)
            if body is None:
                raise errors.MissingPullSecret(
                    f"pull secret {self.namespace}/{name} does not exist: the operator copies"
                    " each ImagePrefetch's imagePullSecrets there; check that the source secret"
                    " exists and the operator is running"
                )
            bodies[name] = body
            versions.append(str((body.get("metadata") or {}).get("resourceVersion", "")))
        return (names, tuple(versions)), bodies

    def _keychain(self, bodies: dict[str, dict[str, Any]]) -> credentials.Keychain:
        chains = [
            credentials.Keychain.from_dockerconfigjson_secret(
                body, f"secret {self.namespace}/{name}")
            for name, body in bodies.items()
        ]
        return credentials.Keychain.merged(*chains)

    def retain(self, name_sets: Iterable[Iterable[str]]) -> None:
        """Forget the secret sets no entry uses any more (their clients close when idle)."""
        keep = {tuple(sorted(set(n))) for n in name_sets}
        for names in [n for n in self._latest if n not in keep]:
            del self._latest[names]

    async def _close_unused(self, keep: set[Key]) -> None:
        for key in [k for k, n in self._users.items() if n == 0 and k not in keep]:
            client = self._clients.pop(key)
            del self._users[key]
            await client.aclose()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        self._users.clear()
        self._latest.clear()
