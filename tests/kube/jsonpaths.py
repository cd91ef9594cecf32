"""The JSONPath subset CRD ``additionalPrinterColumns`` use: dotted fields and a filter
on a list by one field (``.status.conditions[?(@.type=="Ready")].reason``), as the API
server evaluates them for ``kubectl get``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_PART = re.compile(r"[^.\[]+(?:\[[^\]]*\])?")
_FILTER = re.compile(r'^(\w+)\[\?\(@\.(\w+)==["\']([^"\']*)["\']\)\]$')


def evaluate(obj: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` in ``obj``, or None (the column is then blank)."""
    node: Any = obj
    for part in _PART.findall(path):
        match = _FILTER.match(part)
        if not isinstance(node, Mapping):
            return None
        if match is None:
            node = node.get(part)
            continue
        field, key, wanted = match.groups()
        items = node.get(field)
        node = next((i for i in items or [] if isinstance(i, Mapping)
                     and str(i.get(key)) == wanted), None)
    return node
