"""The test infrastructure works against the real registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from fixtures import faultproxy, images, registries, tokenserver

MANIFEST_ACCEPT = {"Accept": f"{images.OCI_MANIFEST}, {images.OCI_INDEX}"}


def small_image(seed: int = 0) -> images.Image:
    return images.Image([
        images.layer({"etc/hello": f"hello {seed}\n", "bin/": b""}),
        images.layer({"app/data.bin": bytes(range(256)) * 4}, compression="zstd"),
    ])


def bearer(server: tokenserver.TokenServer, scope: str, auth: tuple[str, str]) -> str:
    response = httpx.get(server.realm, params={"service": server.service, "scope": scope},
                         auth=auth)
    response.raise_for_status()
    return f"Bearer {response.json()['token']}"


def test_anonymous_registry_serves_a_pushed_manifest_by_tag(registry: registries.Registry) -> None:
    image = small_image()
    digest = images.push(registry, "smoke/plain", "v1", image)
    response = httpx.get(f"{registry.url}/v2/smoke/plain/manifests/v1", headers=MANIFEST_ACCEPT)
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == digest == image.digest
    assert response.content == image.manifest.data


def test_multi_platform_index_is_pushed_with_its_children(registry: registries.Registry) -> None:
    amd64, arm64 = small_image(1), images.Image(small_image(1).layers, architecture="arm64")
    digest = images.push(registry, "smoke/multi", "v1", images.index([amd64, arm64]))
    response = httpx.get(f"{registry.url}/v2/smoke/multi/manifests/v1", headers=MANIFEST_ACCEPT)
    assert response.headers["Docker-Content-Digest"] == digest
    platforms = [m["platform"]["architecture"] for m in response.json()["manifests"]]
    assert platforms == ["amd64", "arm64"]
    child = httpx.get(f"{registry.url}/v2/smoke/multi/manifests/{arm64.digest}",
                      headers=MANIFEST_ACCEPT)
    assert child.status_code == 200


def test_basic_registry_needs_the_password(basic_registry: registries.Registry) -> None:
    digest = images.push(basic_registry, "smoke/basic", "v1", small_image())
    url = f"{basic_registry.url}/v2/smoke/basic/manifests/v1"
    assert httpx.get(url, headers=MANIFEST_ACCEPT).status_code == 401
    assert httpx.get(url, headers=MANIFEST_ACCEPT, auth=("admin", "wrong")).status_code == 401
    response = httpx.get(url, headers=MANIFEST_ACCEPT, auth=basic_registry.auth)
    assert response.headers["Docker-Content-Digest"] == digest


def test_token_registry_accepts_tokens_from_its_token_server(
    token_registry: registries.Registry, token_server: tokenserver.TokenServer,
) -> None:
    assert token_registry.auth is not None
    digest = images.push(token_registry, "smoke/token", "v1", small_image())
    url = f"{token_registry.url}/v2/smoke/token/manifests/v1"
    challenge = httpx.get(url, headers=MANIFEST_ACCEPT)
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"].startswith(f'Bearer realm="{token_server.realm}"')
    token = bearer(token_server, "repository:smoke/token:pull", token_registry.auth)
    response = httpx.get(url, headers={**MANIFEST_ACCEPT, "Authorization": token})
    assert response.headers["Docker-Content-Digest"] == digest
    assert token_server.requests[-1].granted == (
        {"type": "repository", "name": "smoke/token", "actions": ["pull"]},
    )


def test_token_server_grants_only_the_scopes_a_user_has(
    token_registry: registries.Registry, token_server: tokenserver.TokenServer,
) -> None:
    images.push(token_registry, "readonly/app", "v1", small_image())
    token = bearer(token_server, "repository:readonly/app:pull,push", ("reader", "reader-secret"))
    assert token_server.requests[-1].granted == (
        {"type": "repository", "name": "readonly/app", "actions": ["pull"]},
    )
    with httpx.Client(base_url=token_registry.url, headers={"Authorization": token}) as client:
        pulled = client.get("/v2/readonly/app/manifests/v1", headers=MANIFEST_ACCEPT)
        assert pulled.status_code == 200
        assert client.post("/v2/readonly/app/blobs/uploads/").status_code == 401
    other = bearer(token_server, "repository:smoke/token:pull", ("reader", "reader-secret"))
    assert token_server.requests[-1].granted == ()
    denied = httpx.get(f"{token_registry.url}/v2/smoke/token/tags/list",
                       headers={"Authorization": other})
    assert denied.status_code == 401
    wrong = httpx.get(token_server.realm, params={"scope": "repository:readonly/app:pull"},
                      auth=("reader", "nope"))
    assert wrong.status_code == 401


def test_short_lived_tokens_really_expire_at_the_registry(
    token_registry: registries.Registry, token_server: tokenserver.TokenServer,
) -> None:
    assert token_registry.auth is not None
    images.push(token_registry, "smoke/expiry", "v1", small_image())
    token_server.expires_in = 1
    token = bearer(token_server, "repository:smoke/expiry:pull", token_registry.auth)
    url = f"{token_registry.url}/v2/smoke/expiry/tags/list"
    assert httpx.get(url, headers={"Authorization": token}).status_code == 200
    expires_at = token_server.requests[-1].expires_at
    assert expires_at is not None and expires_at - time.time() <= 2
    time.sleep(max(0.0, expires_at - time.time()) + 0.05)
    assert httpx.get(url, headers={"Authorization": token}).status_code == 401


@pytest.fixture(scope="module")
def big_layer(registry: registries.Registry) -> images.Layer:
    big = images.random_layer(512 * 1024, seed=7, compression="none")
    images.push(registry, "smoke/big", "v1", images.Image([big]))
    return big


def test_proxy_passes_bodies_and_headers_through(
    fault_proxy: faultproxy.FaultProxy, big_layer: images.Layer,
) -> None:
    url = f"{fault_proxy.url}/v2/smoke/big/blobs/{big_layer.digest}"
    with httpx.Client() as client:  # one keep-alive connection for both requests
        assert client.get(url).content == big_layer.data
        ranged = client.get(url, headers={"Range": "bytes=100-199"})
    assert ranged.status_code == 206
    assert ranged.content == big_layer.data[100:200]
    first, second = fault_proxy.requests
    assert (first.status, first.bytes_sent, first.done) == (200, big_layer.size, True)
    assert second.range == "bytes=100-199"


def test_proxy_answers_injected_statuses_the_given_number_of_times(
    fault_proxy: faultproxy.FaultProxy, big_layer: images.Layer,
) -> None:
    fault_proxy.respond(r"/blobs/", 429, retry_after=2, error="TOOMANYREQUESTS", times=1)
    url = f"{fault_proxy.url}/v2/smoke/big/blobs/{big_layer.digest}"
    refused = httpx.get(url)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "2"
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert httpx.get(url).status_code == 200


def test_proxy_stall_keeps_the_socket_silent(
    fault_proxy: faultproxy.FaultProxy, big_layer: images.Layer,
) -> None:
    rule = fault_proxy.stall(r"/blobs/sha256:", after=1000)
    url = f"{fault_proxy.url}/v2/smoke/big/blobs/{big_layer.digest}"
    received = bytearray()
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("GET", url, timeout=httpx.Timeout(5.0, read=0.3)) as response:
            assert response.headers["Content-Length"] == str(big_layer.size)
            for chunk in response.iter_raw():
                received += chunk
    assert bytes(received) == big_layer.data[:1000]
    assert rule.hits == 1
    assert fault_proxy.requests[0].bytes_sent == 1000


def test_proxy_cut_closes_the_connection_mid_body(
    fault_proxy: faultproxy.FaultProxy, big_layer: images.Layer,
) -> None:
    fault_proxy.cut(r"/blobs/", after=4096, times=1)
    url = f"{fault_proxy.url}/v2/smoke/big/blobs/{big_layer.digest}"
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    assert fault_proxy.requests[0].bytes_sent == 4096
    assert httpx.get(url).content == big_layer.data


def test_proxy_corrupts_and_drips_bodies(
    fault_proxy: faultproxy.FaultProxy, big_layer: images.Layer,
) -> None:
    url = f"{fault_proxy.url}/v2/smoke/big/blobs/{big_layer.digest}"
    fault_proxy.corrupt(r"/blobs/", offset=10, count=2, times=1)
    corrupted = httpx.get(url).content
    assert len(corrupted) == big_layer.size and corrupted != big_layer.data
    assert corrupted[10] == big_layer.data[10] ^ 0xFF and corrupted[12:] == big_layer.data[12:]
    fault_proxy.drip(r"/blobs/", chunk=256 * 1024, interval=0.1, times=1)
    started = time.monotonic()
    assert httpx.get(url).content == big_layer.data
    assert time.monotonic() - started >= 0.1


async def test_one_stalled_stream_does_not_hold_up_the_others(
    fault_proxy: faultproxy.FaultProxy, big_layer: images.Layer,
) -> None:
    fault_proxy.stall(r"/blobs/", after=100, times=1)
    url = f"{fault_proxy.url}/v2/smoke/big/blobs/{big_layer.digest}"

    async def fetch(client: httpx.AsyncClient) -> int | str:
        try:
            return len((await client.get(url)).content)
        except httpx.ReadTimeout:
            return "stalled"

    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.3)) as client:
        results = await asyncio.gather(*(fetch(client) for _ in range(3)))
    assert sorted(results, key=str) == [big_layer.size, big_layer.size, "stalled"]


def test_push_through_the_proxy_keeps_uploads_on_the_proxy(
    fault_proxy: faultproxy.FaultProxy,
) -> None:
    image = small_image(2)
    assert images.push(fault_proxy.url, "smoke/proxied", "v1", image) == image.digest
    uploads = fault_proxy.requests_to(r"/blobs/uploads/.+", method="PUT")
    assert [r.status for r in uploads] == [201, 201, 201]


def test_redirect_target_records_the_authorization_it_received(
    fault_proxy: faultproxy.FaultProxy, big_layer: images.Layer,
) -> None:
    fault_proxy.redirect(r"/blobs/sha256:")
    url = f"{fault_proxy.url}/v2/smoke/big/blobs/{big_layer.digest}"
    redirect = httpx.get(url, headers={"Authorization": "Bearer secret"})
    assert redirect.status_code == 307
    location = redirect.headers["Location"]
    assert location.startswith("http://127.0.0.2:")
    assert httpx.get(location, headers={"Authorization": "Bearer secret"}).content == (
        big_layer.data
    )
    followed = httpx.get(url, headers={"Authorization": "Bearer secret"}, follow_redirects=True)
    assert followed.content == big_layer.data  # httpx drops it on a cross-origin redirect
    first, second = fault_proxy.redirect_requests
    assert first.authorization == "Bearer secret"
    assert second.authorization is None


def test_redirect_target_serves_blobs_of_an_auth_registry_with_its_own_credentials(
    basic_registry: registries.Registry,
    fault_proxy_factory: Callable[..., faultproxy.FaultProxy],
) -> None:
    blob = images.layer({"redirected": "yes"})
    images.push(basic_registry, "smoke/redirected", "v1", images.Image([blob]))
    storage_auth = basic_registry.basic_authorization
    proxy = fault_proxy_factory(basic_registry.url, redirect_authorization=storage_auth)
    proxy.redirect(r"/blobs/")
    url = f"{proxy.url}/v2/smoke/redirected/blobs/{blob.digest}"
    response = httpx.get(url, auth=basic_registry.auth, follow_redirects=True)
    assert response.content == blob.data
    assert [r.authorization for r in proxy.redirect_requests] == [None]
    assert proxy.requests[0].authorization == storage_auth


def test_tampered_blob_storage_changes_the_served_bytes(registry: registries.Registry) -> None:
    tampered = images.layer({"tamper/me": "original"}, compression="none")
    images.push(registry, "smoke/tamper", "v1", images.Image([tampered]))
    path = registry.blob_path(tampered.digest)
    assert path.read_bytes() == tampered.data
    data = bytearray(tampered.data)
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    served = httpx.get(f"{registry.url}/v2/smoke/tamper/blobs/{tampered.digest}")
    assert served.status_code == 200
    assert served.content == bytes(data) != tampered.data
