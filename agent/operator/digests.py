"""The digest memo: each prefetch generation's tags resolved to digests, once.

A digest, once known for a generation, is kept (in memory, and in ``status.images[].digest``
so a restarted operator reuses it): under ``pullPolicy: IfNotPresent`` for every later
generation too (a moved tag does not make every node pull again), under ``Always`` for the
generation. A reference the registry could not be asked about (unreachable, timeout) has no
digest yet: nodes resolve it themselves meanwhile, and the operator asks again after a
growing delay, never replacing a digest with nothing. A reference the registry says does
not exist is remembered as such (the prefetch fails once, not on every node) and asked
about again after the same growing delay (a late push heals it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.images import errors as image_errors
from agent.images import references
from agent.images.registry import credentials
from agent.operator import prefetches, resolving

if TYPE_CHECKING:
    from agent.operator.index import State

RETRY_INITIAL = 10.0
RETRY_MAX = 600.0


@dataclasses.dataclass
class Memo:
    """What one generation's references resolved to so far.

    Attributes:
        digests: normalised reference → digest (only known ones).
        not_found: normalised reference → the registry's message.
        retry_at: monotonic time at which the unresolved ones are asked about again.
    """

    digests: dict[str, str] = dataclasses.field(default_factory=dict)
    not_found: dict[str, str] = dataclasses.field(default_factory=dict)
    retry_at: float = 0.0
    delay: float = RETRY_INITIAL

    def unresolved(self, refs: list[references.Reference]) -> list[references.Reference]:
        return [r for r in refs if str(r) not in self.digests]


def from_status(previous: Mapping[str, Any], prefetch: prefetches.Prefetch) -> dict[str, str]:
    """Digests the status already holds that this generation may reuse."""
    same_generation = previous.get("observedGeneration") == prefetch.generation
    if prefetch.pull_policy != "IfNotPresent" and not same_generation:
        return {}
    known: dict[str, str] = {}
    for img in previous.get("images") or []:
        if not img.get("digest") or not img.get("image"):
            continue
        try:
            known[str(references.parse(str(img["image"])))] = str(img["digest"])
        except image_errors.ImageError:
            continue
    return known


async def resolved_digests(state: State, prefetch: prefetches.Prefetch,
                           previous: Mapping[str, Any], sources: Mapping[str, Any]) -> Memo:
    """The memo of this generation, after asking the registry about what is unresolved
    (when due)."""
    key = (prefetch.uid, prefetch.generation)
    refs = [ref for _, ref in prefetch.images]
    memo = state.digests.get(key)
    if memo is None:
        memo = Memo()
        if prefetch.pull_policy == "IfNotPresent":  # carried over from the last generation
            for (uid, _), older in state.digests.items():
                if uid == prefetch.uid:
                    memo.digests.update(older.digests)
        memo.digests.update(from_status(previous, prefetch))
        for ref in refs:
            if ref.digest is not None:
                memo.digests[str(ref)] = str(ref.digest)
        for old in [k for k in state.digests if k[0] == prefetch.uid]:
            del state.digests[old]
        state.digests[key] = memo
    wanted = memo.unresolved(refs)
    now = time.monotonic()
    if not wanted or not state.settings.resolve_digests or now < memo.retry_at:
        return memo
    found = await resolving.resolve(wanted, _keychain(prefetch, sources),
                                    state.settings.resolve_timeout, state.registry_config_path)
    for ref in wanted:
        result = found[str(ref)]
        memo.not_found.pop(str(ref), None)
        if result.digest:
            memo.digests[str(ref)] = result.digest
        elif result.not_found:
            memo.not_found[str(ref)] = result.message
    if memo.unresolved(refs):
        memo.retry_at = now + memo.delay
        memo.delay = min(memo.delay * 2, RETRY_MAX)
    return memo


def _keychain(prefetch: prefetches.Prefetch, sources: Mapping[str, Any]) -> credentials.Keychain:
    keychains = []
    for name, source in sources.items():
        try:
            keychains.append(credentials.Keychain.from_dockerconfigjson_secret(
                source, f"secret {prefetch.namespace}/{name}"))
        except image_errors.ImageError:
            continue
    return credentials.Keychain.merged(*keychains) if keychains else credentials.Keychain.empty()
