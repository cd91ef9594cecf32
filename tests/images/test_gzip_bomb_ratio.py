"""The ratio guard fires for gzip too: deflate's ceiling (~1032:1) is far above the limit,
so a gzip bomb is refused soon after the grace, not only at the size limits."""

from __future__ import annotations

import io

import pytest
from fixtures import layers as L

from agent.images import errors
from agent.images.unpack import compression

MiB = 1 << 20


def test_a_gzip_bomb_is_refused_by_the_ratio_check_soon_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compression, "RATIO_GRACE_BYTES", 16 * MiB)  # 256 MiB by default
    bomb = L.gzip_bomb(64 * MiB)
    assert len(bomb) * 500 < 64 * MiB  # well past the limit, below deflate's ceiling
    stream = compression.open_layer(io.BytesIO(bomb), L.MEDIA_TYPES["gzip"])

    refused = r"ratio \d+:1 after 1\d\.\d MiB .* limit of 250:1"
    with pytest.raises(errors.UnsafeLayer, match=refused):
        while stream.read(MiB):
            pass
    assert stream.uncompressed_bytes <= 17 * MiB


def test_a_layer_that_compresses_like_real_ones_passes_the_ratio_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compression, "RATIO_GRACE_BYTES", 1 * MiB)
    text = b"".join(b"line %d of a config file, some words repeat\n" % i for i in range(200_000))
    tar = L.Layer().file("etc/big.conf", text).tar()
    stream = compression.open_layer(io.BytesIO(L.compress(tar, "gzip")), L.MEDIA_TYPES["gzip"])
    out = 0
    while data := stream.read(MiB):
        out += len(data)
    assert out == len(tar)
