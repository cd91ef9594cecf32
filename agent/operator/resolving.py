"""Resolve tags to digests once in the operator, so every node pulls the same image."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable

from agent.images import errors, references
from agent.images.registry import client as registry_client
from agent.images.registry import credentials, hosts

logger = logging.getLogger("agent.operator.resolving")


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A reference's digest; or "" with ``not_found`` (the registry says there is no such
    image) or not (the registry could not be asked: nodes resolve the tag themselves)."""

    digest: str = ""
    not_found: bool = False
    message: str = ""


async def resolve_one(client: registry_client.RegistryClient, ref: references.Reference,
                      timeout: float) -> Resolution:
    """What the registry says about ``ref``."""
    if ref.digest is not None:
        return Resolution(str(ref.digest))
    try:
        async with asyncio.timeout(timeout):
            desc = await client.resolve(ref)
            if desc is None:
                desc, _ = await client.fetch_manifest(ref)
            return Resolution(str(desc.digest))
    except errors.NotFound as e:
        logger.warning("%s does not exist (%s)", ref, e)
        return Resolution(not_found=True, message=str(e) or f"{ref}: not found")
    except (errors.ImageError, TimeoutError, OSError) as e:
        logger.warning("cannot resolve %s from the operator (%s); nodes will resolve it", ref, e)
        return Resolution(message=str(e))


async def resolve(refs: Iterable[references.Reference], keychain: credentials.Keychain,
                  timeout: float, config_path: str | None = None) -> dict[str, Resolution]:
    """``str(ref)`` → :class:`Resolution` for every reference, concurrently."""
    refs = list(refs)
    async with registry_client.RegistryClient(hosts.RegistryHosts(config_path or None),
                                              keychain) as client:
        found = await asyncio.gather(*(resolve_one(client, r, timeout) for r in refs))
    return dict(zip((str(r) for r in refs), found, strict=True))
