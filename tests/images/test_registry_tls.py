"""TLS against a real HTTPS registry: verified by default, a CA from hosts.toml, skip_verify.

Loopback registries are insecure by default (as in containerd and Docker), so each test
names the registry in a hosts.toml, where TLS verification is on unless it says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures import images
from fixtures.registries import Registry

from agent.images import backends, descriptors, errors, service
from agent.images.registry import client, hosts

AMD64 = descriptors.Platform("linux", "amd64")


def hosts_dir(tmp_path: Path, registry: Registry, extra: str = "") -> Path:
    directory = tmp_path / "certs.d" / registry.host
    directory.mkdir(parents=True)
    (directory / "hosts.toml").write_text(f'server = "https://{registry.host}"\n{extra}')
    return tmp_path / "certs.d"


async def pull_with(config_path: Path, ref: str, root: Path) -> service.PullResult:
    registry_hosts = hosts.RegistryHosts(config_path)
    async with client.RegistryClient(
        registry_hosts, retry=client.RetryPolicy(attempts=1)
    ) as rc:
        svc = service.ImageService(root, rc, service.ServiceOptions(),
                                    backend=backends.LocalBackend(None))
        try:
            return await svc.pull(ref, platform=AMD64)
        finally:
            svc.close()


@pytest.fixture
def pushed(tls_registry: Registry) -> str:
    images.push(tls_registry, "tls/app", "1", images.Image([images.layer({"a": "b"})]))
    return f"{tls_registry.host}/tls/app:1"


async def test_an_untrusted_certificate_is_refused_with_a_clear_error(
    tls_registry: Registry, pushed: str, tmp_path: Path
) -> None:
    with pytest.raises(errors.Unavailable, match="certificate") as e:
        await pull_with(hosts_dir(tmp_path, tls_registry), pushed, tmp_path / "root")
    assert tls_registry.host in str(e.value)


async def test_the_ca_named_in_hosts_toml_is_trusted(
    tls_registry: Registry, pushed: str, tmp_path: Path
) -> None:
    ca = tls_registry.tls_ca
    config = hosts_dir(tmp_path, tls_registry, f'ca = "{ca}"\n')
    result = await pull_with(config, pushed, tmp_path / "root")
    assert result.layers == 1


async def test_skip_verify_in_hosts_toml_accepts_any_certificate(
    tls_registry: Registry, pushed: str, tmp_path: Path
) -> None:
    config = hosts_dir(tmp_path, tls_registry, "skip_verify = true\n")
    result = await pull_with(config, pushed, tmp_path / "root")
    assert result.layers == 1
