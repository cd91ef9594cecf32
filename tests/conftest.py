"""Shared fixtures: real registries on loopback, a fault-injecting proxy, store roots.

Registries are session-scoped and start lazily: a test pays for one only when it asks for
it, and the whole session shares it (use a fresh repository name per test). Tests using
them get the ``registry`` marker and are skipped when Debian's ``docker-registry`` is
missing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).parent) not in sys.path:  # also when tests/ becomes a package
    sys.path.insert(0, str(Path(__file__).parent))

from fixtures import faultproxy, registries, tokenserver  # noqa: E402

REGISTRY_FIXTURES = frozenset(
    {"registry", "basic_registry", "token_registry", "tls_registry", "fault_proxy"}
)
SKIP_REASON = f"{registries.BINARY} is missing (apt-get install docker-registry)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "registry: needs Debian's docker-registry binary")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = not registries.available()
    for item in items:
        if REGISTRY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.registry)
        if missing and item.get_closest_marker("registry") is not None:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def _start(
    factory: pytest.TempPathFactory, name: str, mode: registries.AuthMode,
    token_users: dict[str, tokenserver.TokenUser] | None = None,
) -> Iterator[registries.Registry]:
    if not registries.available():
        pytest.skip(SKIP_REASON)
    workdir = factory.mktemp(name)
    with registries.start_registry(workdir, mode, token_users=token_users) as running:
        yield running


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registries.Registry]:
    """An anonymous registry (pull and push without credentials)."""
    yield from _start(tmp_path_factory, "registry", "none")


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registries.Registry]:
    """A registry with htpasswd Basic auth; ``.auth`` is ``(username, password)``."""
    yield from _start(tmp_path_factory, "basic-registry", "htpasswd")


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registries.Registry]:
    """A registry with Bearer-token auth from ``.token_server``.

    Users: ``.auth`` (admin: everything everywhere) and ``reader`` / ``reader-secret``
    (pull on ``readonly/app`` only).
    """
    users = {"reader": tokenserver.TokenUser("reader-secret", {"readonly/app": {"pull"}})}
    yield from _start(tmp_path_factory, "token-registry", "token", token_users=users)


@pytest.fixture
def token_server(token_registry: registries.Registry) -> Iterator[tokenserver.TokenServer]:
    """The token registry's token server, with requests and ``expires_in`` reset per test."""
    server = token_registry.token_server
    assert server is not None
    server.clear_requests()
    expires_in = server.expires_in
    yield server
    server.expires_in = expires_in
    server.clear_requests()


@pytest.fixture
def fault_proxy_factory() -> Iterator[Callable[..., faultproxy.FaultProxy]]:
    """``start(upstream_url, **options)``: fault proxies stopped after the test."""
    proxies: list[faultproxy.FaultProxy] = []

    def start(upstream: str, **options: Any) -> faultproxy.FaultProxy:
        proxies.append(faultproxy.FaultProxy(upstream, **options).start())
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def fault_proxy(
    registry: registries.Registry,
    fault_proxy_factory: Callable[..., faultproxy.FaultProxy],
) -> faultproxy.FaultProxy:
    """A fresh fault proxy in front of the anonymous ``registry`` (no rules)."""
    return fault_proxy_factory(registry.url)


@pytest.fixture
def tmp_root(tmp_path: Path) -> Path:
    """An empty directory to use as the image service's store root."""
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registries.Registry]:
    """An anonymous registry serving HTTPS with a certificate from a throwaway CA.

    ``.tls_ca`` is the CA's PEM file, the one a client must be told to trust.
    """
    if not registries.available():
        pytest.skip(SKIP_REASON)
    from fixtures import certs

    workdir = tmp_path_factory.mktemp("tls-registry")
    server = certs.make_server_cert(workdir / "certs")
    with registries.start_registry(workdir, "none", tls=server) as running:
        yield running
