"""``ContainerdImages``: image records in containerd's image store, named as the CRI names them.

An image record maps a name to the top descriptor (index or manifest); containerd's GC keeps
everything reachable from it. The CRI plugin lists an image for kubelet when the record is in
its namespace (``k8s.io``) and labelled ``io.cri-containerd.image=managed``; when it pulls,
it writes up to three records for one image (:func:`cri_names`):

* the reference as pulled, when it has a tag — ``registry.example.com/app:1.4``;
* the digest reference — ``registry.example.com/app@sha256:<top digest>``;
* the image ID — ``sha256:<config digest>``.

kubelet's image GC leaves an image alone when the CRI reports it pinned, which the CRI plugin
does for records labelled ``io.cri-containerd.pinned=pinned`` (containerd ≥ 1.7; 1.6 ignores
the label, which then does no harm).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from google.protobuf import field_mask_pb2

from agent.images import descriptors, digests, errors, references
from agent.images.containerd import client as client_mod
from agent.images.containerd.protos import cri_pb2, descriptor_pb2, images_pb2

LABEL_CRI_IMAGE: Final = "io.cri-containerd.image"
VALUE_CRI_MANAGED: Final = "managed"
LABEL_PINNED: Final = "io.cri-containerd.pinned"
VALUE_PINNED: Final = "pinned"
#: Marks the records this agent wrote (``ctr -n k8s.io images ls`` shows it).
LABEL_PREFETCHED: Final = "prefetcher.dev/prefetched"

_SERVICE: Final = "/containerd.services.images.v1.Images/"


@dataclass(frozen=True)
class Image:
    """One containerd image record."""

    name: str
    target: descriptors.Descriptor
    labels: Mapping[str, str] = field(default_factory=dict)


def cri_names(
    reference: references.Reference, top: digests.Digest, config: digests.Digest
) -> list[str]:
    """The record names the CRI plugin writes for ``reference`` (see the module doc)."""
    names = []
    tag = reference.tag or ("" if reference.digest is not None else references.DEFAULT_TAG)
    if tag:
        names.append(f"{reference.name}:{tag}")
    names.append(f"{reference.name}@{top}")
    names.append(str(config))
    return names


def cri_labels(*, pinned: bool) -> dict[str, str]:
    """The labels of a CRI image record; ``pinned=False`` clears the pin."""
    return {
        LABEL_CRI_IMAGE: VALUE_CRI_MANAGED,
        LABEL_PREFETCHED: "true",
        LABEL_PINNED: VALUE_PINNED if pinned else "",
    }


class ContainerdImages:
    """containerd's images service in the client's namespace."""

    def __init__(self, client: client_mod.Client, *, lease: str = ""):
        self.client = client
        self.lease = lease

    def get(self, name: str) -> Image:
        """The record ``name``. Raises :class:`NotFound`."""
        response = self.client.unary(
            _SERVICE + "Get",
            images_pb2.GetImageRequest(name=name),
            images_pb2.GetImageResponse,
            lease=self.lease,
            what=f"images.Get {name}",
        )
        return _image(response.image)

    def put(
        self, name: str, target: descriptors.Descriptor, labels: Mapping[str, str]
    ) -> Image:
        """Create the record, or point an existing one at ``target`` and merge ``labels``.

        A label with an empty value is removed (containerd's semantics).
        """
        proto = images_pb2.Image(
            name=name,
            target=descriptor_pb2.Descriptor(
                media_type=target.media_type, digest=str(target.digest), size=target.size
            ),
            labels={k: v for k, v in labels.items() if v},
        )
        try:
            response = self.client.unary(
                _SERVICE + "Create",
                images_pb2.CreateImageRequest(image=proto),
                images_pb2.CreateImageResponse,
                lease=self.lease,
                what=f"images.Create {name}",
            )
            return _image(response.image)
        except errors.AlreadyExists:
            pass
        proto.labels.update(dict(labels))
        updated = self.client.unary(
            _SERVICE + "Update",
            images_pb2.UpdateImageRequest(
                image=proto,
                update_mask=field_mask_pb2.FieldMask(
                    paths=["target", *(f"labels.{k}" for k in labels)]
                ),
            ),
            images_pb2.UpdateImageResponse,
            lease=self.lease,
            what=f"images.Update {name}",
        )
        return _image(updated.image)


@dataclass(frozen=True)
class CriImage:
    """What the CRI plugin tells kubelet about an image (``ImageService/ImageStatus``)."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    pinned: bool


def cri_image_status(client: client_mod.Client, reference: str) -> CriImage | None:
    """Ask the CRI plugin about ``reference`` as kubelet does before it pulls.

    Returns ``None`` when the CRI does not have the image (kubelet would pull it).

    Raises:
        InvalidConfiguration: the CRI plugin is not serving (``UNIMPLEMENTED``).
    """
    response = client.unary(
        "/runtime.v1.ImageService/ImageStatus",
        cri_pb2.ImageStatusRequest(image=cri_pb2.ImageSpec(image=reference)),
        cri_pb2.ImageStatusResponse,
        what=f"CRI ImageService.ImageStatus {reference}",
    )
    if not response.HasField("image") or not response.image.id:
        return None
    image = response.image
    return CriImage(
        id=image.id,
        repo_tags=tuple(image.repo_tags),
        repo_digests=tuple(image.repo_digests),
        size=image.size,
        pinned=image.pinned,
    )


def _image(image: images_pb2.Image) -> Image:
    t = image.target
    return Image(
        name=image.name,
        target=descriptors.Descriptor(
            media_type=t.media_type, digest=digests.Digest(t.digest), size=t.size
        ),
        labels=dict(image.labels),
    )
