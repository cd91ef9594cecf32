"""Platforms: parse ``os/arch[/variant]``, normalise, match, and pick an index's manifest.

Normalisation follows containerd's ``platforms`` package, so that the many spellings of one
machine compare equal:

==============================  =====================
spelling                        normalised
==============================  =====================
``x86_64``, ``x86-64``          ``amd64`` (variant ``v1`` dropped)
``aarch64``, ``arm64/v8``       ``arm64`` (variant ``v8`` dropped)
``armhf``, ``arm``, ``armv7l``  ``arm/v7``
``armel``, ``armv6l``           ``arm/v6``
``i386``, ``i686``              ``386``
``macos``                       ``darwin``
==============================  =====================

Matching (:func:`matches`) is compatibility, not equality: an ``arm/v7`` host runs
``arm/v6`` and ``arm/v5`` images, an ``amd64/v3`` host runs ``v2`` and ``v1`` images, and
an ``amd64`` wanted without a variant takes any ``amd64``. :func:`select` prefers the exact
variant and falls back to the closest compatible one.
"""

from __future__ import annotations

import platform as _host
import re
from collections.abc import Iterable

from agent.images import descriptors, errors, mediatypes

_KNOWN_OS = frozenset(
    {
        "aix",
        "android",
        "darwin",
        "dragonfly",
        "freebsd",
        "illumos",
        "ios",
        "js",
        "linux",
        "netbsd",
        "openbsd",
        "plan9",
        "solaris",
        "wasip1",
        "windows",
    }
)
_PART = re.compile(r"^[A-Za-z0-9_.-]+$", re.ASCII)

#: ``uname -m`` / Go spellings → (architecture, variant). Unlisted names pass through.
_ARCH_ALIASES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "aarch64": ("arm64", ""),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "armv5l": ("arm", "v5"),
    "armv6l": ("arm", "v6"),
    "armv7l": ("arm", "v7"),
    "armv8l": ("arm", "v8"),
}


def normalize(p: descriptors.Platform) -> descriptors.Platform:
    """``p`` in containerd's canonical spelling (see the module docstring)."""
    os_name = p.os.lower()
    if os_name == "macos":
        os_name = "darwin"
    arch, variant = p.architecture.lower(), p.variant.lower()
    if arch in _ARCH_ALIASES:
        arch, alias_variant = _ARCH_ALIASES[arch]
        variant = variant or alias_variant
    if arch == "amd64":
        if variant == "v1":
            variant = ""
    elif arch == "arm64":
        if variant in ("8", "v8", "v8.0"):
            variant = ""
    elif arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return descriptors.Platform(
        os=os_name, architecture=arch, variant=variant, os_version=p.os_version
    )


def default() -> descriptors.Platform:
    """The platform of this host: ``linux/<normalised machine>`` (``linux/amd64``…).

    The OS is always ``linux``: images are pulled for Linux nodes even when this code runs
    elsewhere (tests on a laptop).
    """
    machine = _host.machine() or "amd64"
    return normalize(descriptors.Platform(os="linux", architecture=machine))


def parse(text: str) -> descriptors.Platform:
    """Parse ``os/arch[/variant]``, ``arch`` (OS ``linux``) or ``os`` (this host's arch).

    Raises:
        errors.InvalidReference: naming the text, for anything else.
    """
    parts = text.split("/") if isinstance(text, str) else []
    if not text or len(parts) > 3 or not all(_PART.match(part) for part in parts):
        raise errors.InvalidReference(
            f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/arm64 "
            "or linux/arm/v7"
        )
    if len(parts) == 1:
        word = parts[0].lower()
        if word in _KNOWN_OS or word == "macos":
            host = default()
            return normalize(
                descriptors.Platform(os=word, architecture=host.architecture, variant=host.variant)
            )
        return normalize(descriptors.Platform(os="linux", architecture=word))
    variant = parts[2] if len(parts) == 3 else ""
    return normalize(descriptors.Platform(os=parts[0], architecture=parts[1], variant=variant))


def matches(want: descriptors.Platform, have: descriptors.Platform) -> bool:
    """Whether a host that wants ``want`` can run an image built for ``have``."""
    return _rank(normalize(want), normalize(have)) is not None


def select(
    index: descriptors.Index, want: descriptors.Platform, *, what: str = ""
) -> descriptors.Descriptor:
    """The manifest of ``index`` that best fits ``want``.

    The exact platform wins; then the closest compatible variant (``arm/v6`` before
    ``arm/v5`` for an ``arm/v7`` host); ties go to the earlier entry. An entry without a
    platform is taken only when nothing else fits and it is an image manifest (containerd
    treats such entries as matching any platform).

    Args:
        what: names the image in the error (``docker.io/library/alpine:3.20``).

    Raises:
        errors.NoMatchingPlatform: listing the platforms the index offers.
    """
    want = normalize(want)
    best: tuple[int, int, descriptors.Descriptor] | None = None
    for position, desc in enumerate(index.manifests):
        if desc.platform is None:
            rank = _NO_PLATFORM_RANK if desc.media_type in mediatypes.MANIFESTS else None
        else:
            rank = _rank(want, normalize(desc.platform))
        if rank is not None and (best is None or (rank, position) < best[:2]):
            best = (rank, position, desc)
    if best is not None:
        return best[2]
    offered = offered_platforms(index.manifests)
    subject = f" for {what}" if what else ""
    raise errors.NoMatchingPlatform(
        f"no manifest{subject} matches platform {want}; the image offers "
        f"{', '.join(offered) if offered else 'no platforms'} (choose one with --platform)"
    )


def offered_platforms(manifests: Iterable[descriptors.Descriptor]) -> list[str]:
    """The distinct platforms of ``manifests`` as text, in index order, without the
    ``unknown/unknown`` entries that attestation manifests carry."""
    seen: list[str] = []
    for desc in manifests:
        if desc.platform is None or desc.platform.os == "unknown":
            continue
        text = str(desc.platform)
        if text not in seen:
            seen.append(text)
    return seen


_NO_PLATFORM_RANK = 1_000


def _rank(want: descriptors.Platform, have: descriptors.Platform) -> int | None:
    """0 for an exact match, a positive distance for a compatible one, ``None`` if the
    image cannot run on ``want``. Both platforms must be normalised."""
    if want.os != have.os or want.architecture != have.architecture:
        return None
    if want.variant == have.variant:
        return 0
    if want.architecture == "amd64" and not want.variant:
        return 1  # the variant is ignored unless asked for
    wanted, offered = _level(want.variant), _level(have.variant)
    if want.architecture in ("amd64", "arm") and wanted is not None and offered is not None:
        if offered <= wanted:
            return 1 + wanted - offered
    return None


def _level(variant: str) -> int | None:
    """``v7`` → 7; ``""`` → 1 (amd64's baseline, the only arch where "" can reach here)."""
    if not variant:
        return 1
    if variant[0] == "v" and variant[1:].isdigit():
        return int(variant[1:])
    return None
