"""CRD ``openAPIV3Schema`` → JSON Schema, for validating manifests without an API server.

The Kubernetes dialect of OpenAPI v3 is close to JSON Schema draft 4/7: the differences that
matter here are the ``x-kubernetes-*`` extensions (dropped; CEL rules are not evaluated —
see :func:`cel_rules` to list them) and ``nullable`` (a value may be ``null``). Defaults
are applied with :func:`apply_defaults`, as the API server does on create and update.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import jsonschema


def to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema equivalent of a structural openAPIV3Schema (CEL rules left out)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_jsonschema(sub) for sub in value]
        elif key == "not":
            out[key] = to_jsonschema(value)
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator for objects of a CRD version whose openAPIV3Schema is ``schema``."""
    converted = to_jsonschema(schema)
    cls = jsonschema.validators.validator_for(converted, default=jsonschema.Draft7Validator)
    return cls(converted, format_checker=None)


def field_path(error: jsonschema.ValidationError) -> str:
    """``spec.images[0]``: the failing field, spelled as the API server spells it."""
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    if error.validator == "required" and isinstance(error.message, str):
        missing = error.message.split("'")[1] if "'" in error.message else "?"
        out = f"{out}.{missing}" if out else missing
    return out or "<root>"


def problems(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Every schema violation of ``obj``, as ``field: message`` lines (API-server style)."""
    found = sorted(validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
    lines = []
    for error in found:
        kind = "Required value" if error.validator == "required" else "Invalid value"
        lines.append(f"{field_path(error)}: {kind}: {error.message}")
    return lines


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Fill ``default``s of absent properties in place, as the API server does; returns obj."""
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                apply_defaults(sub, obj[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in obj.items():
                if name not in schema.get("properties", {}):
                    apply_defaults(extra, value)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            apply_defaults(schema["items"], item)
    return obj


def cel_rules(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, rule)`` for every ``x-kubernetes-validations`` rule in the schema."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path or "<root>", rule
    for name, sub in schema.get("properties", {}).items():
        yield from cel_rules(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from cel_rules(schema["items"], f"{path}[*]")
