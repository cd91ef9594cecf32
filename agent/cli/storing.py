"""``prefetcher images ls``, ``mount``, ``umount``, ``rm``, ``gc``: the images of a store.

Which runtime the images are in (and so whether they are unpacked, what ``rm`` unpins) is
resolved as :func:`agent.runtimes.open_for_store` says: ``--snapshotter``, else
``images.snapshotter`` from the config file or environment (``auto``: the node's runtime,
detected as the agent detects it), else the runtime the store's records were written for
(the agent's, or the last ``prefetcher pull``'s), else the local store (``pull``'s default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import config, runtimes
from agent.cli import pulling
from agent.images import errors, service
from agent.images.registry import client as registry_client
from agent.images.registry import hosts

#: How the store commands find where the images are (their ``--help``).
LOOKUP = (
    "List the images of a store (--root). Whether they are unpacked (present in the node's"
    " runtime) is looked up where --snapshotter says, else the config's images.snapshotter"
    " (auto: the node's runtime, found as the agent finds it), else the runtime the store was"
    " last pulled into (by the agent, or `prefetcher pull`); else in the local store."
)


def register(subparsers: Any) -> None:
    images = subparsers.add_parser(
        "images", help="list the images of a store", description=LOOKUP
    )
    images_sub = images.add_subparsers(dest="images_command", metavar="COMMAND", required=True)
    ls = images_sub.add_parser(
        "ls", aliases=["list"], help="list images: reference, digest, size, unpacked",
        description=LOOKUP,
    )
    pulling.add_store_arguments(ls)
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=run_ls)

    mount = subparsers.add_parser(
        "mount", help="mount an image's root filesystem read-only (to inspect it)"
    )
    mount.add_argument("reference")
    mount.add_argument("target", help="an existing empty directory")
    pulling.add_store_arguments(mount)
    mount.set_defaults(func=run_mount)

    umount = subparsers.add_parser("umount", help="unmount what `prefetcher mount` mounted")
    umount.add_argument("target")
    pulling.add_store_arguments(umount)
    umount.set_defaults(func=run_umount)

    rm = subparsers.add_parser(
        "rm", help="remove images and collect what no other image needs"
    )
    rm.add_argument("references", nargs="+", metavar="reference")
    pulling.add_store_arguments(rm)
    rm.add_argument("--json", action="store_true", help="print what was removed as JSON")
    rm.set_defaults(func=run_rm)

    gc = subparsers.add_parser("gc", help="remove blobs and snapshots no image needs")
    pulling.add_store_arguments(gc)
    gc.add_argument("--json", action="store_true", help="print what was removed as JSON")
    gc.set_defaults(func=run_gc)


@contextlib.contextmanager
def opened(args: argparse.Namespace) -> Iterator[service.ImageService]:
    """The image service on the configured store, without any registry traffic."""
    settings = pulling.load_settings(args)
    root = Path(settings.runtime.root)
    if not (root / "images.db").exists():
        raise errors.NotFound(f"no image store at {root} (pull an image there first, or --root)")
    options = pulling.service_options(settings)
    registry = registry_client.RegistryClient(hosts.RegistryHosts(None))
    backend = runtimes.open_store_backend(settings)
    svc = service.ImageService(root, registry, options, backend=backend)
    try:
        yield svc
    finally:
        svc.close()


def _guard(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
            return code
        except config.ConfigError as e:
            print(f"prefetcher: {e}", file=sys.stderr)
            return 2
        except (errors.ImageError, OSError) as e:
            print(f"prefetcher: {args.command}: {e}", file=sys.stderr)
            return 1

    return run


@_guard
def run_ls(args: argparse.Namespace) -> int:
    with opened(args) as svc:
        images = svc.list_images()
    if args.json:
        print(json.dumps([i.to_json() for i in images], indent=2))
        return 0
    # A runtime's images also have its own ID (what `crictl images` shows as IMAGE ID).
    with_id = any(i.record.image_id for i in images)
    rows = [("REFERENCE", "DIGEST", *(("IMAGE ID",) if with_id else ()), "PLATFORM", "SIZE",
             "UNPACKED", "PULLED")]
    for i in images:
        r = i.record
        pulled = datetime.datetime.fromtimestamp(r.updated).strftime("%Y-%m-%d %H:%M")
        image_id = (r.image_id.removeprefix("sha256:")[:13] or "-",) if with_id else ()
        rows.append((r.name, r.digest.short, *image_id, r.platform, pulling.human(r.size),
                     "yes" if i.unpacked else "no", pulled))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


@_guard
def run_mount(args: argparse.Namespace) -> int:
    with opened(args) as svc:
        svc.mount(args.reference, args.target)
    print(f"mounted {args.reference} read-only at {args.target}; `prefetcher umount"
          f" {args.target}` when done")
    return 0


@_guard
def run_umount(args: argparse.Namespace) -> int:
    with opened(args) as svc:
        svc.unmount(args.target)
    return 0


@_guard
def run_rm(args: argparse.Namespace) -> int:
    with opened(args) as svc:
        for reference in args.references:
            svc.image(reference)  # all must exist before anything is removed
        removed = []
        for reference in args.references:
            removed.append(asyncio.run(svc.remove(reference)))
    total = removed[-1]
    for r in removed[:-1]:
        total.blobs += r.blobs
        total.snapshots += r.snapshots
        total.bytes_freed += r.bytes_freed
    _report(args, total, removed_images=args.references)
    return 0


@_guard
def run_gc(args: argparse.Namespace) -> int:
    with opened(args) as svc:
        result = asyncio.run(svc.gc())
    _report(args, result)
    return 0


def _report(args: argparse.Namespace, result: Any, removed_images: list[str] | None = None) -> None:
    if args.json:
        out = result.to_json()
        if removed_images is not None:
            out = {"images_removed": removed_images, **out}
        print(json.dumps(out, indent=2))
        return
    for name in removed_images or []:
        print(f"removed {name}")
    print(
        f"collected {len(result.blobs)} blobs and {len(result.snapshots)} snapshots,"
        f" {pulling.human(result.bytes_freed)} freed"
    )
