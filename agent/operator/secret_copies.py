"""Copies of the prefetches' pull secrets in the operator's namespace: made and released."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from agent.kube import resources
from agent.operator import errors, kubeapi, prefetches, secrets
from agent.operator.index import State

JSON = dict[str, Any]


async def ensure_secret_copies(state: State, prefetch: prefetches.Prefetch,
                               logger: logging.Logger | Any
                               ) -> tuple[list[str], JSON, list[str]]:
    """Copy the prefetch's pull secrets into the operator namespace; return the copies'
    names, the decoded sources (for resolving digests with the same credentials), and the
    names of the secrets that do not exist (skipped)."""
    names: list[str] = []
    sources: JSON = {}
    missing: list[str] = []
    for index, name in enumerate(prefetch.pull_secrets):
        source = await state.secrets.get(kubeapi.secret_path(prefetch.namespace, name))
        if source is None:
            logger.warning(f"pull secret {prefetch.namespace}/{name} does not exist; skipped")
            missing.append(name)
            continue
        kind = str(source.get("type") or "Opaque")
        if kind not in secrets.PULL_SECRET_TYPES:
            raise errors.InvalidSpec(
                f"spec.imagePullSecrets[{index}]",
                f"secret {prefetch.namespace}/{name} has type {kind}, not one of"
                f" {', '.join(sorted(secrets.PULL_SECRET_TYPES))}; not copied")
        sources[name] = source
        copy_name = secrets.copy_name(prefetch.namespace, name)
        path = kubeapi.secret_path(state.namespace, copy_name)
        for _ in range(kubeapi.CONFLICT_RETRIES):
            existing = await state.secrets.get(path)
            if existing is not None and secrets.up_to_date(existing, source, prefetch.uid):
                break
            users = (secrets.users(existing) if existing else []) + [prefetch.uid]
            body = secrets.build_copy(source, state.namespace, users)
            try:
                if existing is None:
                    written = await state.client.create(kubeapi.secret_path(state.namespace),
                                                        body)
                else:
                    body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                    written = await state.client.replace(path, body)
                state.secrets.wrote(path, written)
                break
            except (errors.Conflict, errors.NotFound):  # changed or deleted meanwhile
                state.secrets.forget(path)
                continue
        names.append(copy_name)
    await state.secret_readers.grant(names)  # before any node is told to read them
    return names, sources, missing


async def release_secret_copies(state: State, uid: str, keep: set[str] | None = None) -> None:
    """Remove ``uid`` from the users of every copy not in ``keep``; delete unused copies.

    Every write carries the resourceVersion read (a delete, as a precondition); on a conflict
    (another prefetch sharing the copy released or took it meanwhile) the copy is read again
    and the release retried, a bounded number of times; then :class:`errors.Conflict` is
    raised (on delete no later reconcile would release it: the copy, credentials included,
    would leak)."""
    copies = await state.client.list(
        kubeapi.secret_path(state.namespace),
        labelSelector=f"{resources.LABEL_COMPONENT}={resources.COMPONENT_PULL_SECRET}",
    )
    for listed in copies:
        name = listed["metadata"]["name"]
        if keep is not None and name in keep:
            continue
        path = kubeapi.secret_path(state.namespace, name)
        copy: JSON | None = listed
        for attempt in range(kubeapi.CONFLICT_RETRIES + 1):
            if attempt:
                copy = await state.client.get(path)
            if copy is None:
                break
            users = secrets.users(copy)
            if uid not in users:
                break
            remaining = [u for u in users if u != uid]
            version = str(copy["metadata"].get("resourceVersion", ""))
            try:
                if not remaining:
                    await state.client.delete(path, resource_version=version)
                    state.secrets.wrote(path, None)
                else:
                    state.secrets.wrote(path, await state.client.merge_patch(path, {"metadata": {
                        "resourceVersion": version,
                        "annotations": {resources.ANNOTATION_USERS:
                                        json.dumps(sorted(remaining))}}}))
                break
            except errors.Conflict:
                state.secrets.forget(path)
                if attempt == kubeapi.CONFLICT_RETRIES:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
