"""Generate a large multi-layer benchmark image on disk and push it to a registry, streaming.

The image is deterministic for given parameters (sizes, counts, seed, gzip level) and cached
under ``<cache>/<key>/``: ``layer-N.tar.gz`` blobs, ``config.json``, ``manifest.json`` and
``meta.json`` (written last; its presence marks a complete cache entry). Nothing of the
image's size is held in memory: each layer is written by ``tarfile`` into a hashing writer
that feeds a gzip compressor — zlib at the level asked (default 6, as ``docker build`` and
BuildKit write layers), ``isal.igzip`` for the fast levels 0-3 — which writes the blob
through a second hashing writer.

Content is a realistic mix: per layer a few large files (8-48 MiB) holding ~35 % of its bytes
and many small files (log-normal sizes around a few KiB) holding the rest, in a ``usr/...``
directory tree shared by all layers (each layer's tar carries its parent directories, as
docker's do), plus ~1 % relative symlinks and ~0.5 % hardlinks. File data is sliced from a
pool of 4 KiB blocks, ~15 % random bytes and ~85 % word-like text, so gzip does real work
(about 2:1 at level 1, a little better at 6).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import sys
import tarfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures import images  # noqa: E402

try:
    from isal import igzip as _fast_gzip
except ImportError:  # pragma: no cover - the standard library fallback
    _fast_gzip = None  # type: ignore[assignment]

GENERATOR_VERSION = 1
MTIME = images.MTIME
BLOCK = 4096
POOL_BLOCKS = 8192  # 32 MiB of mixed content
RANDOM_FRACTION = 0.15
LARGE_FRACTION = 0.35
LARGE_MIN, LARGE_MAX = 8 << 20, 48 << 20
SMALL_CAP = 2 << 20
LAYER_BYTE_WEIGHTS = (0.10, 0.32, 0.26, 0.20, 0.12)
LAYER_FILE_WEIGHTS = (0.30, 0.25, 0.20, 0.15, 0.10)
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
_WORDS = (
    "lib include share bin local python3 site packages dist info module init config data "
    "value error return self none true false import from class def async await yield with "
    "static const void int char struct unsigned long double float buffer stream header "
    "version license copyright the and of to in is for on that by this it with as are be "
    "function object string number array index length append extend update remove insert"
).split()


@dataclass(frozen=True)
class Params:
    size: int  # uncompressed bytes of file data, all layers
    files: int  # regular files, all layers
    layers: int
    seed: int = 1
    gzip_level: int = 6  # zlib's default, what docker/buildkit write; isal for 0-3

    @property
    def key(self) -> str:
        text = json.dumps({**self.__dict__, "v": GENERATOR_VERSION}, sort_keys=True)
        return f"{self.size >> 20}MiB-{self.files}f-{self.layers}l-" + hashlib.sha256(
            text.encode()
        ).hexdigest()[:10]


@dataclass(frozen=True)
class LayerBlob:
    path: Path
    digest: str  # sha256 of the gzip blob
    diff_id: str  # sha256 of the tar
    size: int  # blob bytes
    tar_size: int
    files: int
    entries: int


@dataclass(frozen=True)
class BuiltImage:
    """An image on disk, ready to push."""

    params: Params
    directory: Path
    layers: list[LayerBlob]
    config: images.Blob
    manifest: images.Blob

    @property
    def uncompressed(self) -> int:
        return sum(layer.tar_size for layer in self.layers)

    @property
    def compressed(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def files(self) -> int:
        return sum(layer.files for layer in self.layers)

    @property
    def entries(self) -> int:
        return sum(layer.entries for layer in self.layers)


class _HashingWriter:
    """Counts and hashes what passes through to ``sink`` (a write-only file object)."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.count = 0

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        self.sink.flush()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.sink.write(view)
        self.count += len(view)
        return len(view)


class _PoolReader:
    """``read(n)`` over ``size`` bytes of the pool, starting at ``offset`` (wrapping)."""

    def __init__(self, pool: bytes, offset: int, size: int) -> None:
        self.pool, self.offset, self.left = pool, offset % len(pool), size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        parts = []
        while n > 0:
            take = min(n, len(self.pool) - self.offset)
            parts.append(self.pool[self.offset : self.offset + take])
            self.offset = (self.offset + take) % len(self.pool)
            self.left -= take
            n -= take
        return b"".join(parts)


def _pool(rng: random.Random) -> bytes:
    blocks = []
    for _ in range(POOL_BLOCKS):
        if rng.random() < RANDOM_FRACTION:
            blocks.append(rng.randbytes(BLOCK))
        else:
            words = rng.choices(_WORDS, k=BLOCK // 4)
            text = " ".join(words).encode()
            blocks.append((text + b"\n" * BLOCK)[:BLOCK])
    return b"".join(blocks)


def _split(total: int, weights: tuple[float, ...], n: int) -> list[int]:
    w = [weights[i % len(weights)] for i in range(n)]
    parts = [int(total * x / sum(w)) for x in w]
    parts[-1] += total - sum(parts)
    return parts


def _file_sizes(rng: random.Random, budget: int, count: int) -> list[int]:
    """Large files for ~LARGE_FRACTION of ``budget``, log-normal small files for the rest."""
    large: list[int] = []
    large_budget = int(budget * LARGE_FRACTION) if count > 50 else 0
    while large_budget >= LARGE_MIN and len(large) < count // 10:
        size = min(rng.randint(LARGE_MIN, LARGE_MAX), large_budget)
        large.append(size)
        large_budget -= size
    small_count = count - len(large)
    small_budget = budget - sum(large)
    raw = [rng.lognormvariate(math.log(6144), 1.6) for _ in range(small_count)]
    scale = small_budget / sum(raw) if raw else 0.0
    small = [min(SMALL_CAP, int(x * scale)) for x in raw]
    if small:  # give the capped remainder to the large files (or the last small file)
        short = small_budget - sum(small)
        if large:
            large[-1] += short
        else:
            small[-1] += short
    sizes = large + small
    rng.shuffle(sizes)
    return sizes


def _tar_info(name: str, kind: bytes, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    info.uname = info.gname = "root"
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _write_layer(
    out: Path, index: int, budget: int, count: int, pool: bytes, params: Params
) -> LayerBlob:
    rng = random.Random(f"{params.seed}-{index}")
    sizes = _file_sizes(rng, budget, count)
    tmp = out.with_suffix(".tmp")
    files = entries = 0
    with open(tmp, "wb") as raw_out:
        blob_writer = _HashingWriter(raw_out)
        if _fast_gzip is not None and params.gzip_level <= 3:
            gz: BinaryIO = _fast_gzip.IGzipFile(  # type: ignore[assignment]
                fileobj=blob_writer, mode="wb", compresslevel=params.gzip_level, mtime=0
            )
        else:
            gz = gzip.GzipFile(
                fileobj=blob_writer, mode="wb", compresslevel=params.gzip_level, mtime=0
            )  # type: ignore[assignment]
        tar_writer = _HashingWriter(gz)
        with tarfile.open(fileobj=tar_writer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            made: set[str] = set()

            def directory(path: str) -> None:
                nonlocal entries
                parts = path.split("/")
                for depth in range(1, len(parts) + 1):
                    name = "/".join(parts[:depth])
                    if name not in made:
                        made.add(name)
                        archive.addfile(_tar_info(name, tarfile.DIRTYPE))
                        entries += 1

            previous: list[str] = []
            dir_index = 0
            per_dir = 40
            for n, size in enumerate(sizes):
                if n % per_dir == 0:
                    dir_index += 1
                    pkg = f"pkg{index}_{dir_index // 8:03d}"
                    sub = f"sub{dir_index % 8}"
                    base = f"usr/{('lib', 'share', 'local/lib')[dir_index % 3]}/{pkg}/{sub}"
                    directory(base)
                name = f"{base}/f{n:05d}.{('so', 'py', 'txt', 'dat', 'h')[n % 5]}"
                if previous and n % 100 == 7:  # ~1 %: a symlink to a sibling
                    target = os.path.basename(previous[-1])
                    archive.addfile(_tar_info(name + ".lnk", tarfile.SYMTYPE, linkname=target))
                    entries += 1
                if previous and n % 200 == 13:  # ~0.5 %: a hardlink to an earlier file
                    archive.addfile(
                        _tar_info(name + ".hl", tarfile.LNKTYPE, linkname=previous[-1])
                    )
                    entries += 1
                offset = rng.randrange(len(pool) // BLOCK) * BLOCK
                info = _tar_info(name, tarfile.REGTYPE, size=size)
                if n % 9 == 0:
                    info.mode = 0o755
                archive.addfile(info, _PoolReader(pool, offset, size))  # type: ignore[arg-type]
                files += 1
                entries += 1
                previous.append(name)
        gz.close()
        raw_out.flush()
        os.fsync(raw_out.fileno())
    os.replace(tmp, out)
    return LayerBlob(
        path=out,
        digest="sha256:" + blob_writer.hash.hexdigest(),
        diff_id="sha256:" + tar_writer.hash.hexdigest(),
        size=blob_writer.count,
        tar_size=tar_writer.count,
        files=files,
        entries=entries,
    )


def _image_blobs(layers: list[LayerBlob]) -> tuple[images.Blob, images.Blob]:
    config_value = {
        "os": "linux",
        "architecture": "amd64",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": f"bench layer {n}"} for n in range(len(layers))],
    }
    config = images.Blob(images.OCI_CONFIG, images.canonical_json(config_value))
    manifest_value = {
        "schemaVersion": 2,
        "mediaType": images.OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [
            {"mediaType": LAYER_MEDIA_TYPE, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    return config, images.Blob(images.OCI_MANIFEST, images.canonical_json(manifest_value))


def is_cached(params: Params, cache: Path) -> bool:
    """Whether :func:`build` finds the image for ``params`` in ``cache``."""
    return (cache / params.key / "meta.json").exists()


def build(params: Params, cache: Path, log: Any = print) -> BuiltImage:
    """The image for ``params``, generated into ``cache`` unless it is there already."""
    directory = cache / params.key
    meta_path = directory / "meta.json"
    if is_cached(params, cache):
        meta = json.loads(meta_path.read_text())
        layers = [LayerBlob(**{**m, "path": directory / m["path"]}) for m in meta["layers"]]
        log(f"image: cached in {directory}")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        rng = random.Random(params.seed)
        pool = _pool(rng)
        budgets = _split(params.size, LAYER_BYTE_WEIGHTS, params.layers)
        counts = _split(params.files, LAYER_FILE_WEIGHTS, params.layers)
        layers = []
        for i in range(params.layers):
            log(f"image: generating layer {i + 1}/{params.layers}"
                f" ({budgets[i] >> 20} MiB, {counts[i]} files)")
            layers.append(
                _write_layer(directory / f"layer-{i}.tar.gz", i, budgets[i], counts[i], pool,
                             params)
            )
        meta_layers = [{**layer.__dict__, "path": layer.path.name} for layer in layers]
        meta_path.with_suffix(".tmp").write_text(
            json.dumps({"params": params.__dict__, "layers": meta_layers}, indent=2)
        )
        os.replace(meta_path.with_suffix(".tmp"), meta_path)
    config, manifest = _image_blobs(layers)
    return BuiltImage(params, directory, layers, config, manifest)


# -- pushing ---------------------------------------------------------------------------------


def _file_chunks(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data


class StreamingPusher(images.Pusher):
    """:class:`fixtures.images.Pusher` plus a monolithic blob PUT streamed from a file."""

    def blob_file(self, path: Path, digest: str, size: int) -> None:
        base = f"{self.base}/v2/{self.repo}/blobs"
        if self.request("HEAD", f"{base}/{digest}").status_code == 200:
            return
        started = self.request("POST", f"{base}/uploads/")
        _check(started, 202)
        location = urllib.parse.urljoin(f"{self.base}/", started.headers["location"])
        location = str(httpx.URL(location).copy_merge_params({"digest": digest}))
        done = self.request(
            "PUT", location, content=_file_chunks(path),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        _check(done, 201)


def _check(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} answered "
            f"{response.status_code}: {response.text[:300]}"
        )


def push(url: str, repo: str, tag: str, image: BuiltImage) -> str:
    """Push ``image`` as ``repo:tag`` to the registry at ``url``; returns the manifest digest."""
    pusher = StreamingPusher(url, repo, None)
    pusher.client.timeout = httpx.Timeout(600.0)
    try:
        for layer in image.layers:
            pusher.blob_file(layer.path, layer.digest, layer.size)
        pusher.blob(image.config)
        return pusher.manifest(image.manifest, tag)
    finally:
        pusher.close()
