"""Label and field selectors, parsed as the API server parses them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Matcher = Callable[[Mapping[str, Any]], bool]

_SET_RE = re.compile(r"^\s*(!?)([A-Za-z0-9_./-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_RE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|=|!=)\s*([A-Za-z0-9_./-]*)\s*$")


class SelectorError(ValueError):
    """The selector text does not parse; the message names the bad term."""


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    return [t for t in (t.strip() for t in terms) if t]


def label_selector(text: str | None) -> Callable[[Mapping[str, str]], bool]:
    """A predicate over a labels dict for ``text`` (``a=b,c!=d,e in (x,y),f,!g``)."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_terms(text or ""):
        eq = _EQ_RE.match(term)
        if eq:
            key, op, value = eq.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
            continue
        st = _SET_RE.match(term)
        if not st:
            raise SelectorError(f"unable to parse requirement: {term!r}")
        negate, key, op, values = st.groups()
        if op:
            allowed = {v.strip() for v in values.split(",") if v.strip()}
            if op == "in":
                checks.append(lambda labels, k=key, a=allowed: labels.get(k) in a)
            else:
                checks.append(lambda labels, k=key, a=allowed: labels.get(k) not in a)
        elif negate:
            checks.append(lambda labels, k=key: k not in labels)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels) for check in checks)


def dig(obj: Mapping[str, Any], path: str) -> Any:
    """The value at dotted ``path`` (``metadata.name``), or ``None``."""
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def field_selector(text: str | None) -> Matcher:
    """A predicate over a whole object for ``text`` (``metadata.name=x,spec.nodeName!=y``).

    Any dotted field is accepted (a real server accepts a per-resource subset; every
    resource supports ``metadata.name`` and ``metadata.namespace``).
    """
    checks: list[Matcher] = []
    for term in _split_terms(text or ""):
        eq = _EQ_RE.match(term)
        if not eq:
            raise SelectorError(f"invalid field selector: {term!r}")
        path, op, value = eq.groups()

        def check(obj: Mapping[str, Any], p: str = path, o: str = op, v: str = value) -> bool:
            actual = dig(obj, p)
            text = "" if actual is None else str(actual).lower() if isinstance(actual, bool) \
                else str(actual)
            return (text != v) if o == "!=" else (text == v)

        checks.append(check)
    return lambda obj: all(check(obj) for check in checks)
