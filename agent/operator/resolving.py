"""Resolve tags to digests once in the operator, so every node pulls the same image."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from agent.images import errors, references
from agent.images.registry import client as registry_client
from agent.images.registry import credentials, hosts

logger = logging.getLogger("agent.operator.resolving")


async def resolve_one(client: registry_client.RegistryClient, ref: references.Reference,
                      timeout: float) -> str:
    """The manifest digest of ``ref``, or "" if the registry cannot be asked (then nodes
    resolve the tag themselves)."""
    if ref.digest is not None:
        return str(ref.digest)
    try:
        async with asyncio.timeout(timeout):
            desc = await client.resolve(ref)
            if desc is None:
                desc, _ = await client.fetch_manifest(ref)
            return str(desc.digest)
    except (errors.ImageError, TimeoutError, OSError) as e:
        logger.warning("cannot resolve %s from the operator (%s); nodes will resolve it", ref, e)
        return ""


async def resolve(refs: Iterable[references.Reference], keychain: credentials.Keychain,
                  timeout: float, config_path: str | None = None) -> dict[str, str]:
    """``str(ref)`` → digest ("" when unresolvable) for every reference, concurrently."""
    refs = list(refs)
    async with registry_client.RegistryClient(hosts.RegistryHosts(config_path or None),
                                              keychain) as client:
        found = await asyncio.gather(*(resolve_one(client, r, timeout) for r in refs))
    return {str(r): d for r, d in zip(refs, found, strict=True)}
