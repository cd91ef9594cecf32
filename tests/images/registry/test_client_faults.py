"""Registry behaviours the real registry will not produce on demand, from an in-process fake
served through ``httpx.MockTransport``: a server that ignores ``Range``, one that lies in
``Content-Range``, and a token that the registry stops accepting mid-pull."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fixtures import images

from agent.images import backends, descriptors, errors, service
from agent.images.content import local
from agent.images.registry import client, credentials, hosts

AMD64 = descriptors.Platform("linux", "amd64")
HOST = "registry.test"


class _Body(httpx.AsyncByteStream):
    """A body that streams as a network one does (``content=`` bodies are read up front)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for i in range(0, len(self.data), 16_384):
            yield self.data[i : i + 16_384]


def respond(status: int, data: bytes = b"", headers: dict[str, str] | None = None
            ) -> httpx.Response:
    return httpx.Response(status, stream=_Body(data), headers=headers)


class FakeRegistry:
    """Serves one image; ``range_mode`` says how it answers Range requests."""

    def __init__(self, image: images.Image, *, range_mode: str = "honour") -> None:
        self.image = image
        self.range_mode = range_mode
        self.blob_requests: list[httpx.Request] = []
        self.valid_tokens = {"token-1"}
        self.tokens_issued = 0
        self.require_token = False
        self.blobs = {b.digest: b.data for b in image.blobs}

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/token":
            self.tokens_issued += 1
            token = f"token-{self.tokens_issued}"
            self.valid_tokens = {token}
            return httpx.Response(200, json={"token": token, "expires_in": 300})
        if self.require_token:
            auth = request.headers.get("authorization", "")
            if auth.removeprefix("Bearer ") not in self.valid_tokens:
                return respond(401, headers={
                    "WWW-Authenticate":
                        f'Bearer realm="https://{HOST}/token",service="{HOST}"'
                })
        if "/manifests/" in path:
            data = self.image.manifest.data
            return respond(200, data if request.method == "GET" else b"", headers={
                "Content-Type": json.loads(data)["mediaType"],
                "Docker-Content-Digest": self.image.digest,
                "Content-Length": str(len(data)),
            })
        digest = path.rsplit("/", 1)[-1]
        data = self.blobs[digest]
        self.blob_requests.append(request)
        wanted = request.headers.get("range")
        if not wanted or self.range_mode == "ignore":
            return respond(200, data)
        start = int(wanted.removeprefix("bytes=").rstrip("-"))
        given = start + 7 if self.range_mode == "lie" else start
        return respond(206, data[given:], headers={
            "Content-Range": f"bytes {given}-{len(data) - 1}/{len(data)}"
        })


async def pull_from(fake: FakeRegistry, root: Path, keychain: credentials.Keychain | None = None
                    ) -> service.PullResult:
    transport = httpx.MockTransport(fake.handler)
    async with client.RegistryClient(
        hosts.RegistryHosts(None), keychain, transport=transport,
        retry=client.RetryPolicy(attempts=2, base=0.001, cap=0.001),
    ) as rc:
        # A short progress timeout keeps the resume back-off (capped at a quarter of it) short.
        options = service.ServiceOptions(progress_timeout=1.0)
        svc = service.ImageService(root, rc, options, backend=backends.LocalBackend(None))
        try:
            return await svc.pull(f"{HOST}/app:1", platform=AMD64)
        finally:
            svc.close()


def leave_partial_ingest(root: Path, layer: images.Layer, data: bytes) -> None:
    writer = local.LocalStore(root / "content").writer(layer.digest, total=layer.size)
    writer.write(data)
    writer.close()


def one_layer_image() -> images.Image:
    return images.Image([images.random_layer(100_000, seed=41)])


async def test_a_server_that_ignores_range_restarts_the_blob_from_zero(tmp_path: Path) -> None:
    image = one_layer_image()
    layer = image.layers[0]
    leave_partial_ingest(tmp_path, layer, layer.data[:30_000])
    fake = FakeRegistry(image, range_mode="ignore")

    result = await pull_from(fake, tmp_path)

    layer_gets = [r for r in fake.blob_requests if layer.digest in r.url.path]
    assert [r.headers.get("range") for r in layer_gets] == ["bytes=30000-"]
    assert result.bytes_downloaded == sum(b.size for b in image.blobs)  # all of it, again
    stored = tmp_path / "content/blobs/sha256" / layer.digest.split(":")[1]
    assert stored.read_bytes() == layer.data


async def test_a_content_range_that_does_not_start_where_asked_is_never_appended(
    tmp_path: Path,
) -> None:
    image = one_layer_image()
    layer = image.layers[0]
    leave_partial_ingest(tmp_path, layer, layer.data[:30_000])
    fake = FakeRegistry(image, range_mode="lie")

    with pytest.raises(errors.Unavailable, match="Content-Range"):
        await pull_from(fake, tmp_path)

    assert not (tmp_path / "content/blobs/sha256" / layer.digest.split(":")[1]).exists()
    # The 30000 good bytes are still there for a later resume; nothing was appended.
    [status] = local.LocalStore(tmp_path / "content").ingests()
    assert status.offset == 30_000


async def test_a_token_the_registry_stops_accepting_is_refreshed_once(tmp_path: Path) -> None:
    image = images.Image([images.layer({"a": "1"}), images.layer({"b": "2"})])
    fake = FakeRegistry(image)
    fake.require_token = True
    keychain = credentials.Keychain.from_docker_config_json(
        json.dumps({"auths": {HOST: {"username": "u", "password": "p"}}}).encode(), "test"
    )
    original = fake.handler
    served = 0

    def revoke_after_two_blobs(request: httpx.Request) -> httpx.Response:
        nonlocal served
        if "/blobs/" in request.url.path:
            served += 1
            if served == 2:
                fake.valid_tokens = set()  # revoked (or expired early) on the server side
        return original(request)

    fake.handler = revoke_after_two_blobs  # type: ignore[method-assign]
    result = await pull_from(fake, tmp_path, keychain)

    assert result.layers == 2
    assert fake.tokens_issued == 2


async def test_an_anonymous_pull_from_a_token_registry_gets_an_anonymous_token(
    tmp_path: Path,
) -> None:
    fake = FakeRegistry(one_layer_image())
    fake.require_token = True
    await pull_from(fake, tmp_path)
    assert fake.tokens_issued == 1


async def test_registry_requests_ask_for_the_bytes_as_stored_not_a_compressed_encoding(
) -> None:
    import gzip

    from agent.images import references

    manifest = images.Image([images.layer({"a": "b"})]).manifest
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("accept-encoding"))
        compress = "gzip" in (request.headers.get("accept-encoding") or "")
        body = gzip.compress(manifest.data) if compress else manifest.data
        headers = {"Content-Type": json.loads(manifest.data)["mediaType"],
                   "Docker-Content-Digest": manifest.digest}
        if compress:
            headers["Content-Encoding"] = "gzip"
        return respond(200, body, headers)

    async with client.RegistryClient(hosts.RegistryHosts(None),
                                     transport=httpx.MockTransport(handler)) as rc:
        desc, data = await rc.fetch_manifest(references.parse(f"{HOST}/a/b@{manifest.digest}"))
    assert seen == ["identity"]
    assert desc.digest == manifest.digest and data == manifest.data


async def test_a_redirect_without_location_is_a_registry_error_not_a_crash() -> None:
    from agent.images import references

    async with client.RegistryClient(
        hosts.RegistryHosts(None), retry=client.RetryPolicy(attempts=1),
        transport=httpx.MockTransport(lambda request: respond(302, b"moved")),
    ) as rc:
        with pytest.raises(errors.RegistryError, match="without a Location"):
            await rc.fetch_manifest(references.parse(f"{HOST}/a/b:1"))
