"""ImageService.pull against the real registry (and the fault proxy in front of it)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy
from fixtures.registries import Registry

from agent.images import backends, descriptors, errors
from tests.images.pulling import ingests, keychain_for, pull, stored_blobs

AMD64 = descriptors.Platform("linux", "amd64")


def three_layer_image(seed: int) -> images.Image:
    return images.Image(
        [
            images.layer({"etc/os-release": f"ID=test{seed}\n", "bin/": b""}),
            images.random_layer(300_000, files=3, seed=seed),
            images.layer({"app/run.sh": "#!/bin/sh\necho hi\n"}, compression="zstd"),
        ]
    )


async def test_a_multi_layer_image_lands_verified_in_the_store(
    registry: Registry, tmp_root: Path
) -> None:
    image = three_layer_image(1)
    digest = images.push(registry, "pull/multi", "1.0", image)
    result = await pull(tmp_root, f"{registry.host}/pull/multi:1.0", platform=AMD64)
    assert result.digest == digest
    assert result.reference == f"{registry.host}/pull/multi:1.0"
    assert result.layers == 3
    assert stored_blobs(tmp_root) == {b.digest for b in image.blobs} | {digest}
    for blob in image.blobs:
        stored = tmp_root / "content/blobs/sha256" / blob.digest.split(":")[1]
        assert stored.read_bytes() == blob.data
    assert result.bytes_downloaded == sum(b.size for b in image.blobs)
    assert ingests(tmp_root) == []


async def test_a_second_pull_downloads_no_blob(fault_proxy: FaultProxy, tmp_root: Path) -> None:
    images.push(fault_proxy.upstream, "pull/again", "v1", three_layer_image(2))
    ref = f"{fault_proxy.host}/pull/again:v1"
    await pull(tmp_root, ref, platform=AMD64)
    fault_proxy.clear_requests()
    second = await pull(tmp_root, ref, platform=AMD64)
    assert second.bytes_downloaded == 0
    assert fault_proxy.requests_to("/blobs/") == []
    assert [r.method for r in fault_proxy.requests_to("/manifests/")] == ["HEAD"]


async def test_the_platform_is_picked_from_an_index(registry: Registry, tmp_root: Path) -> None:
    amd = images.Image([images.layer({"arch": "amd64"})])
    arm = images.Image([images.layer({"arch": "arm64"})], architecture="arm64", variant="v8")
    index_digest = images.push(registry, "pull/multiarch", "1", images.index([amd, arm]))
    ref = f"{registry.host}/pull/multiarch:1"

    result = await pull(tmp_root, ref, platform=descriptors.Platform("linux", "arm64"))
    assert result.digest == index_digest
    assert result.manifest_digest == arm.digest
    assert result.platform == "linux/arm64/v8"
    assert arm.layers[0].digest in stored_blobs(tmp_root)
    assert amd.layers[0].digest not in stored_blobs(tmp_root)

    with pytest.raises(errors.NoMatchingPlatform, match="linux/amd64") as e:
        await pull(tmp_root, ref, platform=descriptors.Platform("linux", "s390x"))
    assert "s390x" in str(e.value)


async def test_a_tampered_blob_is_refused_and_nothing_is_committed(
    registry: Registry, tmp_root: Path
) -> None:
    image = three_layer_image(3)
    images.push(registry, "pull/tampered", "1", image)
    victim = image.layers[1]
    path = registry.blob_path(victim.digest)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(errors.DigestMismatch, match=victim.digest):
        await pull(tmp_root, f"{registry.host}/pull/tampered:1", platform=AMD64)
    assert victim.digest not in stored_blobs(tmp_root)
    victim_ingest = hashlib.sha256(victim.digest.encode()).hexdigest()
    assert victim_ingest not in {p.name for p in ingests(tmp_root)}


async def test_an_interrupted_download_resumes_with_range(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = images.Image([images.random_layer(500_000, seed=4)])
    images.push(fault_proxy.upstream, "pull/resume", "1", image)
    blob = image.layers[0]
    fault_proxy.cut(f"/blobs/{blob.digest}", after=200_000, times=1)

    await pull(tmp_root, f"{fault_proxy.host}/pull/resume:1", platform=AMD64)

    gets = fault_proxy.requests_to(f"/blobs/{blob.digest}", "GET")
    assert [g.range for g in gets] == [None, "bytes=200000-"]
    assert sum(g.bytes_sent for g in gets) == blob.size
    assert blob.digest in stored_blobs(tmp_root)


async def test_an_ingest_left_by_a_killed_pull_is_resumed_not_refetched(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = images.Image([images.random_layer(400_000, seed=5)])
    images.push(fault_proxy.upstream, "pull/killed", "1", image)
    blob = image.layers[0]
    # A previous process got 150000 bytes in before it died.
    from agent.images.content import local

    writer = local.LocalStore(tmp_root / "content").writer(blob.digest, total=blob.size)
    writer.write(blob.data[:150_000])
    writer.close()

    result = await pull(tmp_root, f"{fault_proxy.host}/pull/killed:1", platform=AMD64)

    gets = fault_proxy.requests_to(f"/blobs/{blob.digest}", "GET")
    assert [g.range for g in gets] == ["bytes=150000-"]
    assert result.bytes_downloaded < blob.size


async def test_server_errors_and_rate_limits_are_retried(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = three_layer_image(6)
    images.push(fault_proxy.upstream, "pull/retry", "1", image)
    fault_proxy.respond("/manifests/", 503, times=2)
    fault_proxy.respond(f"/blobs/{image.layers[1].digest}", 429, retry_after=1, times=1)

    started = time.monotonic()
    result = await pull(tmp_root, f"{fault_proxy.host}/pull/retry:1", platform=AMD64)

    assert result.layers == 3
    assert [r.status for r in fault_proxy.requests_to("/manifests/")][:3] == [503, 503, 200]
    layer_gets = fault_proxy.requests_to(f"/blobs/{image.layers[1].digest}")
    assert [r.status for r in layer_gets] == [429, 200]
    assert layer_gets[1].started - layer_gets[0].started >= 0.95  # honoured Retry-After: 1
    assert time.monotonic() - started < 10


async def test_a_registry_that_keeps_failing_gives_a_clear_error(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    images.push(fault_proxy.upstream, "pull/down", "1", three_layer_image(7))
    fault_proxy.respond("/manifests/", 503)
    with pytest.raises(errors.Unavailable, match=fault_proxy.host):
        await pull(tmp_root, f"{fault_proxy.host}/pull/down:1", platform=AMD64)


async def test_basic_auth_uses_the_keychain_and_fails_clearly_without_it(
    basic_registry: Registry, tmp_root: Path
) -> None:
    assert basic_registry.auth is not None
    images.push(basic_registry, "private/app", "1", three_layer_image(8))
    ref = f"{basic_registry.host}/private/app:1"

    with pytest.raises(errors.Unauthorized, match=basic_registry.host):
        await pull(tmp_root, ref, platform=AMD64)
    wrong = keychain_for(basic_registry.host, basic_registry.auth[0], "wrong")
    with pytest.raises(errors.Unauthorized):
        await pull(tmp_root, ref, platform=AMD64, keychain=wrong)

    keychain = keychain_for(basic_registry.host, *basic_registry.auth)
    result = await pull(tmp_root, ref, platform=AMD64, keychain=keychain)
    assert result.layers == 3


async def test_token_auth_fetches_one_scoped_token_per_pull(
    token_registry: Registry, token_server: object, tmp_root: Path
) -> None:
    assert token_registry.auth is not None
    images.push(token_registry, "team/app", "1", three_layer_image(9))
    server = token_registry.token_server
    assert server is not None
    server.clear_requests()
    keychain = keychain_for(token_registry.host, *token_registry.auth)

    result = await pull(
        tmp_root, f"{token_registry.host}/team/app:1", platform=AMD64, keychain=keychain
    )

    assert result.layers == 3
    assert [r.scopes for r in server.requests] == [("repository:team/app:pull",)]
    assert all(r.user == token_registry.auth[0] for r in server.requests)


async def test_a_token_user_without_access_is_refused(
    token_registry: Registry, token_server: object, tmp_root: Path
) -> None:
    images.push(token_registry, "team/secret", "1", three_layer_image(10))
    keychain = keychain_for(token_registry.host, "reader", "reader-secret")
    with pytest.raises((errors.Unauthorized, errors.Denied), match="team/secret"):
        await pull(
            tmp_root, f"{token_registry.host}/team/secret:1", platform=AMD64, keychain=keychain
        )


async def test_a_redirect_to_another_host_does_not_carry_authorization(
    basic_registry: Registry, fault_proxy_factory: object, tmp_root: Path
) -> None:
    assert basic_registry.auth is not None
    image = three_layer_image(11)
    images.push(basic_registry, "private/redirected", "1", image)
    proxy: FaultProxy = fault_proxy_factory(basic_registry.url)  # type: ignore[operator]
    proxy.redirect("/blobs/")
    keychain = keychain_for(proxy.host, *basic_registry.auth)

    # Blob storage behind a redirect has its own auth (here: none, so the registry's 401).
    with pytest.raises(errors.Unauthorized):
        await pull(
            tmp_root, f"{proxy.host}/private/redirected:1", platform=AMD64, keychain=keychain
        )

    assert any(r.authorization for r in proxy.requests_to("/manifests/"))
    assert proxy.redirect_requests, "the redirect was not followed"
    assert all(r.authorization is None for r in proxy.redirect_requests)


async def test_a_redirect_to_blob_storage_is_followed(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = three_layer_image(12)
    images.push(fault_proxy.upstream, "pull/redirect", "1", image)
    fault_proxy.redirect("/blobs/")
    await pull(tmp_root, f"{fault_proxy.host}/pull/redirect:1", platform=AMD64)
    assert {b.digest for b in image.blobs} <= stored_blobs(tmp_root) | {image.manifest.digest}
    assert len(fault_proxy.redirect_requests) == 4  # config + three layers


async def test_concurrent_pulls_download_a_shared_layer_once(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    from agent.images import service
    from agent.images.registry import client, hosts

    base = images.random_layer(400_000, seed=13)
    a = images.Image([base, images.layer({"a": "a"})])
    b = images.Image([base, images.layer({"b": "b"})])
    images.push(fault_proxy.upstream, "pull/share-a", "1", a)
    images.push(fault_proxy.upstream, "pull/share-b", "1", b)
    fault_proxy.drip(f"/blobs/{base.digest}", chunk=100_000, interval=0.05)

    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(tmp_root, rc, service.ServiceOptions(),
                                    backend=backends.LocalBackend(None))
        try:
            ra, rb = await asyncio.gather(
                svc.pull(f"{fault_proxy.host}/pull/share-a:1", platform=AMD64),
                svc.pull(f"{fault_proxy.host}/pull/share-b:1", platform=AMD64),
            )
        finally:
            svc.close()
    assert len(fault_proxy.requests_to(f"/blobs/{base.digest}", "GET")) == 1
    assert ra.bytes_downloaded + rb.bytes_downloaded < 2 * base.size


@pytest.mark.parametrize(
    ("path", "message"),
    [("pull/nonexistent:1", "pull/nonexistent"), ("pull/unknown-tag:nope", "nope")],
)
async def test_unknown_repositories_and_tags_are_not_found(
    registry: Registry, tmp_root: Path, path: str, message: str
) -> None:
    images.push(registry, "pull/unknown-tag", "1", three_layer_image(14))
    with pytest.raises(errors.NotFound, match=message):
        await pull(tmp_root, f"{registry.host}/{path}", platform=AMD64)


async def test_a_bad_reference_is_refused_before_any_request(tmp_root: Path) -> None:
    with pytest.raises(errors.InvalidReference, match="lowercase"):
        await pull(tmp_root, "127.0.0.1:1/Bad/Name:1")


async def test_a_mirror_serves_first_and_the_upstream_covers_what_it_lacks(
    registry: Registry, fault_proxy_factory: object, tmp_root: Path
) -> None:
    from agent.images import service
    from agent.images.registry import client, hosts

    image = three_layer_image(15)
    images.push(registry, "pull/mirrored", "1", image)
    mirror: FaultProxy = fault_proxy_factory(registry.url)  # type: ignore[operator]
    missing = image.layers[2].digest
    mirror.respond(f"/blobs/{missing}", 404, error="BLOB_UNKNOWN")
    registry_hosts = hosts.RegistryHosts(None, mirrors={registry.host: [mirror.url]})

    async with client.RegistryClient(registry_hosts, retry=client.RetryPolicy(base=0.01)) as rc:
        svc = service.ImageService(tmp_root, rc, service.ServiceOptions(),
                                    backend=backends.LocalBackend(None))
        try:
            await svc.pull(f"{registry.host}/pull/mirrored:1", platform=AMD64)
        finally:
            svc.close()

    served = {r.path.rsplit("/", 1)[-1] for r in mirror.requests if r.status == 200}
    assert {b.digest for b in image.blobs} - {missing} <= served
    assert all(f"ns={registry.host}" in r.target for r in mirror.requests)
    assert {b.digest for b in image.blobs} <= stored_blobs(tmp_root)  # the rest from upstream


async def test_credentials_given_to_one_pull_are_not_used_by_the_next(
    basic_registry: Registry, tmp_root: Path
) -> None:
    from agent.images import service
    from agent.images.registry import client, hosts

    assert basic_registry.auth is not None
    images.push(basic_registry, "private/per-pull", "1", three_layer_image(16))
    images.push(basic_registry, "private/other", "1", three_layer_image(17))
    keychain = keychain_for(basic_registry.host, *basic_registry.auth)

    async with client.RegistryClient(hosts.RegistryHosts(None)) as anonymous, \
            client.RegistryClient(hosts.RegistryHosts(None), keychain) as entitled:
        svc = service.ImageService(tmp_root, anonymous, service.ServiceOptions(),
                                    backend=backends.LocalBackend(None))
        try:
            ok = await svc.pull(f"{basic_registry.host}/private/per-pull:1", platform=AMD64,
                                registry=entitled)
            with pytest.raises(errors.Unauthorized):
                await svc.pull(f"{basic_registry.host}/private/other:1", platform=AMD64)
        finally:
            svc.close()
    assert ok.layers == 3
