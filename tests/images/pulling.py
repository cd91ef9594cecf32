"""Test helper: pull through a real ImageService + RegistryClient, as the CLI wires them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.images import backends, descriptors, service
from agent.images.progress import events
from agent.images.registry import client, credentials, hosts

#: Fast retries, so retry tests take milliseconds, not seconds.
FAST_RETRY = client.RetryPolicy(attempts=4, base=0.02, cap=0.1)


def keychain_for(host: str, username: str, password: str) -> credentials.Keychain:
    config = {"auths": {host: {"username": username, "password": password}}}
    return credentials.Keychain.from_docker_config_json(json.dumps(config).encode(), "test")


async def pull(
    root: Path,
    reference: str,
    *,
    keychain: credentials.Keychain | None = None,
    platform: descriptors.Platform | None = None,
    on_event: list[events.ProgressEvent] | None = None,
    retry: client.RetryPolicy = FAST_RETRY,
    svc: service.ImageService | None = None,
    **options: Any,
) -> service.PullResult:
    """Pull ``reference`` into ``root``; ``options`` are ServiceOptions fields, and
    ``snapshotter`` names the local store's snapshotter (default ``""``: content only)."""
    snapshotter = options.pop("snapshotter", "")
    async with client.RegistryClient(hosts.RegistryHosts(None), keychain, retry=retry) as rc:
        own = svc is None
        if svc is None:
            svc = service.ImageService(root, rc, service.ServiceOptions(**options),
                                       backend=backends.open_store(root, snapshotter))
        else:
            svc.registry = rc
        try:
            return await svc.pull(
                reference,
                platform=platform,
                on_event=on_event.append if on_event is not None else None,
            )
        finally:
            if own:
                svc.close()


def stored_blobs(root: Path) -> set[str]:
    blobs = root / "content" / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in blobs.iterdir()} if blobs.exists() else set()


def ingests(root: Path) -> list[Path]:
    ingest = root / "content" / "ingest"
    return list(ingest.iterdir()) if ingest.exists() else []
