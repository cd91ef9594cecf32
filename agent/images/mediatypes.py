"""OCI and Docker media types, and what each says about compression."""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIGS = frozenset({OCI_CONFIG, DOCKER_CONFIG})

#: What a manifest GET asks for, most preferred first (as containerd sends it).
MANIFEST_ACCEPT = ", ".join(
    [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX, "*/*;q=0.8"]
)

_COMPRESSION = {
    OCI_LAYER: "none",
    OCI_LAYER_NONDIST: "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_NONDIST_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_NONDIST_ZSTD: "zstd",
}


def is_layer(media_type: str) -> bool:
    """Whether ``media_type`` is a layer this service can unpack."""
    return media_type in _COMPRESSION


def compression(media_type: str) -> str:
    """``"gzip"``, ``"zstd"`` or ``"none"`` for a layer media type.

    Raises:
        KeyError: for a media type that is not a known layer type.
    """
    return _COMPRESSION[media_type]
