"""The digest memo: each prefetch generation's tags resolved to digests, once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.images import errors as image_errors
from agent.images.registry import credentials
from agent.operator import prefetches, resolving
from agent.operator.index import State


async def resolved_digests(state: State, prefetch: prefetches.Prefetch, previous: Mapping[str, Any],
                           sources: Mapping[str, Any]) -> dict[str, str]:
    """Digests per normalised reference: resolved once per generation (and per operator
    process under pullPolicy Always); under IfNotPresent, digests already in the status of
    this generation are reused after a restart."""
    key = (prefetch.uid, prefetch.generation)
    if key in state.digests:
        return state.digests[key]
    known: dict[str, str] = {}
    if prefetch.pull_policy == "IfNotPresent":
        for img in previous.get("images") or []:
            if img.get("digest") and img.get("resolved"):
                known[img["resolved"].split("@")[0]] = img["digest"]
    refs = [ref for _, ref in prefetch.images]
    missing = [r for r in refs if str(r) not in known]
    if missing and state.settings.resolve_digests:
        keychains = []
        for name, source in sources.items():
            try:
                keychains.append(credentials.Keychain.from_dockerconfigjson_secret(
                    source, f"secret {prefetch.namespace}/{name}"))
            except image_errors.ImageError:
                continue
        keychain = credentials.Keychain.merged(*keychains) if keychains else None
        known.update(await resolving.resolve(
            missing, keychain or credentials.Keychain.empty(),
            state.settings.resolve_timeout, state.registry_config_path))
    for ref in refs:
        if ref.digest is not None:
            known[str(ref)] = str(ref.digest)
    state.digests[key] = {str(r): known.get(str(r), "") for r in refs}
    return state.digests[key]
