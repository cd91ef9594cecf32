"""Credentials stay with the host they are configured for: a redirect target (blob storage, a
CDN) never gets the registry's ``Authorization``, ``Cookie`` or ``hosts.toml`` headers, a
``401`` from it is answered only with what is configured for *it*, and credentials never go
in clear text to a token realm on another host.

The real registry sits behind the fault proxy, whose second listener (127.0.0.2) plays blob
storage on another host; the token server is the real one the token registry trusts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import httpx
import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy, Rule
from fixtures.registries import Registry
from fixtures.tokenserver import TokenServer

from agent.images import descriptors, errors, references
from agent.images.registry import client, credentials, hosts
from tests.images.pulling import FAST_RETRY, keychain_for


def _blob_image(seed: int) -> images.Image:
    return images.Image([images.random_layer(20_000, files=1, seed=seed)])


async def _read_layer(
    proxy: FaultProxy,
    repo: str,
    image: images.Image,
    keychain: credentials.Keychain,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """The image's layer, fetched through the proxy as a pull fetches it."""
    layer = image.layers[0]
    desc = descriptors.Descriptor(
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        digest=layer.digest,  # type: ignore[arg-type]
        size=layer.size,
    )
    registry_hosts = hosts.RegistryHosts(None, headers=headers)
    async with client.RegistryClient(registry_hosts, keychain, retry=FAST_RETRY) as rc:
        async with rc.open_blob(references.parse(f"{proxy.host}/{repo}:1"), desc) as body:
            return b"".join([chunk async for chunk in body.chunks()])


def _storage_asks_once(proxy: FaultProxy, challenge: str) -> Rule:
    """Blob storage answers its first request with 401 and ``challenge``, then serves."""
    return proxy.add(Rule(
        "/blobs/", "GET", times=1, listener="redirect", status=401,
        headers={"WWW-Authenticate": challenge},
    ))


async def test_a_401_from_blob_storage_gets_a_token_for_its_host_not_the_registrys_login(
    registry: Registry,
    fault_proxy_factory: Callable[..., FaultProxy],
    token_server: TokenServer,
) -> None:
    image = _blob_image(1501)
    images.push(registry, "redirect/token", "1", image)
    proxy = fault_proxy_factory(registry.url)
    proxy.redirect("/blobs/")
    _storage_asks_once(proxy, f'Bearer realm="{token_server.realm}",service="storage"')
    keychain = keychain_for(proxy.host, "registry-admin", "registry-password")

    data = await _read_layer(proxy, "redirect/token", image, keychain)

    assert data == image.layers[0].data
    # The token server was asked anonymously: blob storage has no credentials configured.
    assert [(r.user, r.status) for r in token_server.requests] == [(None, 200)]
    retried = proxy.redirect_requests[-1]
    assert retried.authorization is not None and retried.authorization.startswith("Bearer ")


async def test_blob_storage_asking_for_basic_gets_only_its_own_credentials(
    registry: Registry, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    image = _blob_image(1502)
    images.push(registry, "redirect/basic", "1", image)
    proxy = fault_proxy_factory(registry.url)
    proxy.redirect("/blobs/")
    _storage_asks_once(proxy, 'Basic realm="storage"')
    both = credentials.Keychain.merged(
        keychain_for(proxy.host, "registry-admin", "registry-password"),
        keychain_for(proxy.redirect_host, "storage-user", "storage-password"),
    )

    data = await _read_layer(proxy, "redirect/basic", image, both)

    assert data == image.layers[0].data
    storage = httpx.BasicAuth("storage-user", "storage-password")._auth_header
    assert [r.authorization for r in proxy.redirect_requests] == [None, storage]


async def test_blob_storage_asking_for_a_login_nobody_configured_is_unauthorized_by_name(
    registry: Registry, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    image = _blob_image(1503)
    images.push(registry, "redirect/nologin", "1", image)
    proxy = fault_proxy_factory(registry.url)
    proxy.redirect("/blobs/")
    _storage_asks_once(proxy, 'Basic realm="storage"')
    keychain = keychain_for(proxy.host, "registry-admin", "registry-password")

    with pytest.raises(errors.Unauthorized, match=f"{proxy.redirect_host} requires a username"):
        await _read_layer(proxy, "redirect/nologin", image, keychain)

    origin = httpx.BasicAuth("registry-admin", "registry-password")._auth_header
    assert all(r.authorization != origin for r in proxy.redirect_requests)


async def test_a_redirect_drops_cookies_and_every_configured_header_whatever_their_case(
    registry: Registry, fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    image = _blob_image(1504)
    images.push(registry, "redirect/headers", "1", image)
    proxy = fault_proxy_factory(registry.url)
    proxy.redirect("/blobs/")
    configured = {
        "X-Registry-Key": "k-123",
        "cookie": "session=abc",
        "authorization": "Bearer static-registry-token",
    }

    data = await _read_layer(
        proxy, "redirect/headers", image, credentials.Keychain.empty(), configured
    )

    assert data == image.layers[0].data
    to_registry = proxy.requests_to("/blobs/")[0].headers
    assert {k: to_registry.get(k) for k in configured} == configured
    to_storage = proxy.redirect_requests[0].headers
    assert [k for k in configured if k in to_storage] == []


# A token realm on another host cannot be served here (everything is loopback, and the realm
# must be on a different host *name*), so this one talks to an in-process registry fake.
_REGISTRY = "registry.test"
_MANIFEST = b'{"schemaVersion": 2, "config": {}, "layers": []}'


def _realm_registry(realm: str, tokens: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            tokens.append(request)
            return httpx.Response(200, json={"token": "t-1", "expires_in": 300})
        if request.headers.get("authorization") != "Bearer t-1":
            return httpx.Response(401, stream=httpx.ByteStream(b""), headers={
                "WWW-Authenticate": f'Bearer realm="{realm}",service="{_REGISTRY}"',
            })
        return httpx.Response(200, stream=httpx.ByteStream(_MANIFEST), headers={
            "Content-Type": "application/vnd.oci.image.manifest.v1+json"
        })

    return httpx.MockTransport(handle)


async def _fetch_manifest(realm: str, keychain: credentials.Keychain) -> list[httpx.Request]:
    tokens: list[httpx.Request] = []
    async with client.RegistryClient(
        hosts.RegistryHosts(None), keychain, retry=FAST_RETRY,
        transport=_realm_registry(realm, tokens),
    ) as rc:
        await rc.fetch_manifest(references.parse(f"{_REGISTRY}/team/app:1"))
    return tokens


async def test_credentials_are_not_sent_to_a_plain_http_token_realm_on_another_host() -> None:
    keychain = keychain_for(_REGISTRY, "user", "secret")
    with pytest.raises(errors.Unauthorized, match="http://auth.other.test/token.*plain HTTP"):
        await _fetch_manifest("http://auth.other.test/token", keychain)


@pytest.mark.parametrize(
    ("realm", "logged_in"),
    [
        ("https://auth.other.test/token", True),  # TLS: as Docker Hub's realm
        (f"http://{_REGISTRY}:5001/token", True),  # the registry's own host name
        ("http://auth.other.test/token", False),  # anonymous: nothing to leak
    ],
)
async def test_token_realms_that_cannot_leak_credentials_are_used(
    realm: str, logged_in: bool
) -> None:
    keychain = keychain_for(_REGISTRY, "user", "secret") if logged_in else None
    tokens = await _fetch_manifest(realm, keychain or credentials.Keychain.empty())
    assert [str(t.url.copy_with(query=None)) for t in tokens] == [realm]
    assert ("authorization" in tokens[0].headers) is logged_in

