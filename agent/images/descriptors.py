"""OCI value types: descriptors, platforms, manifests, indexes and image configs.

Parsed strictly from JSON: a field of the wrong type or a missing required field is an
:class:`~agent.images.errors.InvalidManifest` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.images import digests, errors, mediatypes

#: Manifests, indexes and configs larger than this are refused (containerd uses 4 MiB).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    @classmethod
    def from_json(cls, obj: Any, where: str = "platform") -> Platform:
        obj = _object(obj, where)
        return cls(
            os=_str(obj, "os", where, required=True),
            architecture=_str(obj, "architecture", where, required=True),
            variant=_str(obj, "variant", where),
            os_version=_str(obj, "os.version", where),
        )


@dataclass(frozen=True)
class Descriptor:
    """``{mediaType, digest, size}`` pointing at a blob, with optional platform/annotations."""

    media_type: str
    digest: digests.Digest
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: Any, where: str = "descriptor") -> Descriptor:
        obj = _object(obj, where)
        digest_text = _str(obj, "digest", where, required=True)
        try:
            digest = digests.Digest(digest_text)
        except errors.InvalidReference as e:
            raise errors.InvalidManifest(f"{where}.digest: {e}") from e
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise errors.InvalidManifest(f"{where}.size: expected a non-negative integer")
        platform = obj.get("platform")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise errors.InvalidManifest(f"{where}.annotations: expected an object")
        urls = obj.get("urls") or []
        return cls(
            media_type=_str(obj, "mediaType", where, required=True),
            digest=digest,
            size=size,
            platform=Platform.from_json(platform, f"{where}.platform") if platform else None,
            annotations={str(k): str(v) for k, v in annotations.items()},
            urls=tuple(str(u) for u in urls),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.platform:
            out["platform"] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, media_type: str) -> Index:
        obj = _load(data, "index")
        items = obj.get("manifests")
        if not isinstance(items, list):
            raise errors.InvalidManifest("index.manifests: expected a list")
        return cls(
            media_type=obj.get("mediaType") or media_type,
            manifests=tuple(
                Descriptor.from_json(m, f"index.manifests[{i}]") for i, m in enumerate(items)
            ),
        )


@dataclass(frozen=True)
class Manifest:
    """An OCI image manifest or Docker schema 2 manifest."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, media_type: str) -> Manifest:
        obj = _load(data, "manifest")
        if obj.get("schemaVersion") != 2:
            raise errors.InvalidManifest(
                "manifest.schemaVersion: expected 2 (Docker schema 1 images are not supported;"
                " push the image again with a current client)"
            )
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise errors.InvalidManifest("manifest.layers: expected a list")
        manifest = cls(
            media_type=obj.get("mediaType") or media_type,
            config=Descriptor.from_json(obj.get("config"), "manifest.config"),
            layers=tuple(
                Descriptor.from_json(x, f"manifest.layers[{i}]") for i, x in enumerate(layers)
            ),
        )
        if manifest.config.size > MAX_MANIFEST_BYTES:
            # Refused before it is fetched or read: a config is parsed in memory.
            raise errors.InvalidManifest(
                f"manifest.config ({manifest.config.digest}) is {manifest.config.size} bytes,"
                f" more than the {MAX_MANIFEST_BYTES}-byte limit for image configs"
            )
        for i, layer in enumerate(manifest.layers):
            if not mediatypes.is_layer(layer.media_type):
                raise errors.UnsupportedMediaType(
                    f"manifest.layers[{i}] ({layer.digest}) has media type "
                    f"{layer.media_type!r}, which is not an image layer this service can unpack"
                )
        return manifest


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config this service needs: platform and ``rootfs.diff_ids``."""

    platform: Platform
    diff_ids: tuple[digests.Digest, ...]
    raw: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @classmethod
    def parse(cls, data: bytes) -> ImageConfig:
        obj = _load(data, "config")
        rootfs = _object(obj.get("rootfs"), "config.rootfs")
        if rootfs.get("type") != "layers":
            raise errors.InvalidManifest("config.rootfs.type: expected 'layers'")
        ids = rootfs.get("diff_ids")
        if not isinstance(ids, list):
            raise errors.InvalidManifest("config.rootfs.diff_ids: expected a list")
        try:
            diff_ids = tuple(digests.Digest(str(d)) for d in ids)
        except errors.InvalidReference as e:
            raise errors.InvalidManifest(f"config.rootfs.diff_ids: {e}") from e
        return cls(
            platform=Platform(
                os=str(obj.get("os", "")),
                architecture=str(obj.get("architecture", "")),
                variant=str(obj.get("variant", "")),
            ),
            diff_ids=diff_ids,
            raw=obj,
        )


def media_type_of(data: bytes, header: str = "") -> str:
    """The media type of a manifest body: its own ``mediaType`` field, else the header.

    An OCI manifest may omit ``mediaType``; then ``manifests`` means an index and
    ``config`` a manifest.
    """
    obj = _load(data, "manifest")
    mt = obj.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if header and header.split(";")[0].strip() in mediatypes.INDEXES | mediatypes.MANIFESTS:
        return header.split(";")[0].strip()
    if "manifests" in obj:
        return mediatypes.OCI_INDEX
    if "config" in obj:
        return mediatypes.OCI_MANIFEST
    raise errors.InvalidManifest("manifest has no mediaType, manifests or config field")


def _load(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise errors.InvalidManifest(
            f"{what} is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit"
        )
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.InvalidManifest(f"{what} is not valid JSON: {e}") from e
    return _object(obj, what)


def _object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise errors.InvalidManifest(f"{where}: expected an object")
    return obj


def _str(obj: dict[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise errors.InvalidManifest(f"{where}.{key}: required")
        return ""
    if not isinstance(value, str):
        raise errors.InvalidManifest(f"{where}.{key}: expected a string")
    return value
