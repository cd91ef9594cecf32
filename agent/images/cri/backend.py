"""``CriBackend``: the node's runtime pulls, through the CRI ``ImageService.PullImage``.

What this mode can and cannot report: the CRI's ``PullImage`` is one unary call with no
progress stream, so a pull reports its phases (resolving, then ``Unpacking`` while the
runtime pulls, with :data:`NO_BYTE_PROGRESS` as the phase message), its duration and its
result, but no byte or layer progress. A stall cannot be told from a slow pull either: the
progress timeout bounds the whole call, which is cancelled when it runs out
(:class:`~agent.images.errors.PullStalled` with the reason).

The image service still resolves the reference and fetches the manifest and config into its
own store (small, and it names the exact image the runtime is asked for); the layers are the
runtime's business. The runtime is asked for the reference as given (``name:tag``), so its
records carry the tag kubelet looks up; ``ImageStatus`` says whether it is present.

Pinning: the CRI has no call to pin an image against kubelet's image GC; a runtime pins by
its own configuration (CRI-O ``pinned_images``). ``pinned`` is therefore not applied here.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Sequence
from typing import Final

from agent.images import descriptors, digests, durations, errors, records, references
from agent.images.backends import backend as backend_api
from agent.images.containerd import client as client_mod
from agent.images.containerd.protos import cri_pb2
from agent.images.content import store
from agent.images.progress import events

#: The phase message while the runtime pulls (the node's status shows it).
NO_BYTE_PROGRESS: Final = (
    "the runtime pulls through the CRI (PullImage), which reports no byte or layer progress;"
    " the progress timeout bounds the whole pull"
)

_IMAGES: Final = "/runtime.v1.ImageService/"
_RUNTIME: Final = "/runtime.v1.RuntimeService/"


class CriBackend:
    """The runtime serving the CRI at ``address`` pulls the images.

    Call :meth:`check` once at start: it asks the runtime's version, and raises
    :class:`~agent.images.errors.InvalidConfiguration` when nothing answers there.
    """

    def __init__(self, address: str):
        self.client = client_mod.Client(address, "k8s.io")
        self.runtime_name = ""
        self.runtime_version = ""

    # -- start-up ------------------------------------------------------------------------

    def check(self) -> None:
        """Ask the runtime its name and version (``RuntimeService.Version``)."""
        try:
            response = self.client.unary(
                _RUNTIME + "Version",
                cri_pb2.VersionRequest(version="v1"),
                cri_pb2.VersionResponse,
                timeout=10,
                what="CRI RuntimeService.Version",
            )
        except errors.ImageError as e:
            raise errors.InvalidConfiguration(
                f"no CRI runtime answers at {self.client.address}: {e}"
            ) from e
        self.runtime_name = response.runtime_name
        self.runtime_version = response.runtime_version

    # -- the image service's backend ---------------------------------------------------

    @property
    def info(self) -> backend_api.RuntimeInfo:
        return backend_api.RuntimeInfo(
            mode="cri",
            runtime=self.runtime_name,
            version=self.runtime_version,
            address=self.client.address,
            byte_progress=False,
        )

    @property
    def unpacks(self) -> bool:
        return True

    @property
    def store_snapshotter(self) -> None:
        return None

    def cleanup(self) -> None:
        """Nothing of ours lives in the runtime between pulls."""

    def close(self) -> None:
        self.client.close()

    def layers_to_fetch(
        self, manifest: descriptors.Manifest, diff_ids: Sequence[digests.Digest]
    ) -> list[descriptors.Descriptor]:
        return []  # the runtime fetches the layers itself

    def layer_sink(
        self,
        ref: references.Reference,
        manifest: descriptors.Manifest,
        diff_ids: Sequence[digests.Digest],
    ) -> None:
        """Layers go into the service's content store."""
        return None

    async def unpack(self, job: backend_api.Unpacking) -> backend_api.Unpacked:
        """``PullImage`` of the reference, bounded by the progress timeout."""
        job.progress.set_phase(events.Phase.UNPACKING, NO_BYTE_PROGRESS)
        request = cri_pb2.PullImageRequest(
            image=cri_pb2.ImageSpec(image=str(job.ref)), auth=_auth_config(job)
        )
        call = self.client.unary_async(
            _IMAGES + "PullImage",
            request,
            cri_pb2.PullImageResponse,
            what=f"CRI ImageService.PullImage {job.ref}",
        )
        if job.progress_timeout <= 0:
            response = await call
        else:
            try:
                response = await asyncio.wait_for(call, job.progress_timeout)
            except TimeoutError:
                message = (
                    f"the runtime's CRI PullImage of {job.ref} did not finish within the"
                    f" progress timeout ({durations.format(job.progress_timeout)}); the CRI"
                    " reports no progress, so the whole pull is bounded by it: cancelled"
                )
                job.progress.stalled(None, message, fatal=True)
                raise errors.PullStalled(message) from None
        for layer in job.manifest.layers:
            job.layer_unpacked(layer.digest)
        # The runtime unpacked the layers into snapshots of its own, which are not ours to
        # name: no chain ID, only the image's ID in the runtime.
        return backend_api.Unpacked(image_id=response.image_ref)

    def is_unpacked(self, record: records.ImageRecord, blobs: store.BlobProvider) -> bool:
        """Whether the runtime reports the image present (``ImageStatus``)."""
        try:
            return self.image_status(record.name) is not None
        except errors.ImageError:
            return False

    def image_status(self, reference: str) -> cri_pb2.Image | None:
        """What kubelet would learn about ``reference`` (``None``: not present)."""
        response = self.client.unary(
            _IMAGES + "ImageStatus",
            cri_pb2.ImageStatusRequest(image=cri_pb2.ImageSpec(image=reference)),
            cri_pb2.ImageStatusResponse,
            what=f"CRI ImageService.ImageStatus {reference}",
        )
        return response.image if response.HasField("image") and response.image.id else None

    def release(self, record: records.ImageRecord) -> None:
        """Nothing to do: the runtime keeps the image until kubelet's image GC removes it."""

    def mount(self, record: records.ImageRecord, target: str | os.PathLike[str]) -> None:
        raise errors.NotFound(
            f"{record.name} lives in the node's runtime ({self.runtime_name or 'CRI'}) here;"
            " inspect it with `crictl inspecti`"
        )

    def unmount(self, target: str | os.PathLike[str]) -> None:
        raise errors.NotFound("images live in the node's runtime here: nothing is mounted")


def _auth_config(job: backend_api.Unpacking) -> cri_pb2.AuthConfig | None:
    """The pull's credential for the image's registry, as the CRI takes it."""
    cred = job.registry.keychain.lookup(job.ref.domain, job.ref.path)
    if cred is None or cred.is_empty:
        return None
    auth = ""
    if cred.username or cred.password:
        auth = base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()
    return cri_pb2.AuthConfig(
        username=cred.username,
        password=cred.password,
        auth=auth,
        # No server_address: containerd parses it as a URL (a bare "host:port" is refused)
        # and kubelet's own pulls pass the credential for this image's registry alone.
        identity_token=cred.identity_token,
        registry_token=cred.registry_token,
    )
