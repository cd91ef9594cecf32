"""A blob whose bytes fail their digest once (a flaky proxy or CDN) is discarded and fetched
once more before the pull fails; a layer unpacked while it downloaded is redone from the good
copy. A blob that is corrupt every time still fails the pull, after exactly two downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import descriptors, errors
from agent.images.progress import events
from tests.images.pulling import ingests, pull, stored_blobs

AMD64 = descriptors.Platform("linux", "amd64")


def _image(seed: int) -> images.Image:
    return images.Image([
        images.layer({"etc/hostname": "corrupt\n"}),
        images.random_layer(400_000, files=4, seed=seed),
    ])


@pytest.mark.parametrize("snapshotter", [
    "", "naive",
    pytest.param("overlayfs", marks=pytest.mark.skipif(os.geteuid() != 0, reason="needs root")),
])
async def test_a_blob_corrupted_once_is_fetched_again_and_the_pull_succeeds(
    fault_proxy: FaultProxy, tmp_root: Path, snapshotter: str
) -> None:
    image = _image(401)
    images.push(fault_proxy.upstream, "corrupt/once", "1", image)
    victim = image.layers[1]
    fault_proxy.corrupt(f"/blobs/{victim.digest}", offset=150_000, count=3, times=1)
    seen: list[events.ProgressEvent] = []

    result = await pull(
        tmp_root, f"{fault_proxy.host}/corrupt/once:1", platform=AMD64,
        snapshotter=snapshotter, on_event=seen,
    )

    gets = fault_proxy.requests_to(f"/blobs/{victim.digest}", "GET")
    assert [(g.range, g.bytes_sent) for g in gets] == [(None, victim.size)] * 2
    assert victim.digest in stored_blobs(tmp_root)
    assert result.retries == 1
    assert any(isinstance(e, events.Retry) and "hashed to" in e.reason for e in seen)
    if snapshotter:
        assert result.chain_id  # unpacked from the good copy (diff IDs checked)


async def test_a_blob_corrupt_every_time_fails_after_a_second_download(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = _image(402)
    images.push(fault_proxy.upstream, "corrupt/always", "1", image)
    victim = image.layers[1]
    fault_proxy.corrupt(f"/blobs/{victim.digest}", offset=10, count=1)

    with pytest.raises(errors.DigestMismatch, match=victim.digest):
        await pull(tmp_root, f"{fault_proxy.host}/corrupt/always:1", platform=AMD64)

    assert len(fault_proxy.requests_to(f"/blobs/{victim.digest}", "GET")) == 2
    assert victim.digest not in stored_blobs(tmp_root)
    # The bad bytes are gone. (The other layer's download, cancelled by the failure if it
    # was still running, keeps its ingest for a resume, as any cancelled download does.)
    assert victim.digest not in [(p / "ref").read_text() for p in ingests(tmp_root)]
