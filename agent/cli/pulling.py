"""``prefetcher pull``: pull an image into the local store, as ``ctr image pull`` does."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent import config, logs, runtimes, telemetry
from agent.cli import rendering
from agent.images import durations, errors, platforms, references, service
from agent.images.registry import client as registry_client
from agent.images.registry import credentials, hosts


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pull",
        help="pull an image into the local store and unpack it",
        description=(
            "Resolve REFERENCE, download the manifest, config and layers for this host's"
            " platform (or --platform), verify every digest, commit them to the content store"
            " under --root and unpack the layers into overlay snapshots (by default; or into"
            " the node's runtime with --snapshotter auto, containerd or cri). Prints the"
            " digest. `prefetcher images ls` on the same --root then looks there too."
        ),
    )
    p.add_argument("reference", help="image reference, e.g. alpine:3.20 or host:5000/app@sha256:…")
    add_store_arguments(p, pull=True)
    p.add_argument("--platform", help="os/arch[/variant] to pull (default: this host's)")
    p.add_argument(
        "--plain-http", action="store_true", help="talk plain HTTP to the registry (as ctr)"
    )
    p.add_argument(
        "--skip-verify", "-k", action="store_true", help="do not verify the registry's TLS cert"
    )
    p.add_argument(
        "--hosts-dir",
        help="containerd-style hosts.toml directory (mirrors, CAs); default from the config",
    )
    p.add_argument(
        "--auth-file",
        help="docker config.json with credentials (default: REGISTRY_AUTH_FILE,"
        " then ~/.docker/config.json)",
    )
    p.add_argument(
        "--progress-timeout",
        metavar="DURATION",
        help="cancel the pull after this long without progress, e.g. 30s, 5m; 0 disables"
        " (default from the config: 5m)",
    )
    p.add_argument(
        "--max-concurrent-downloads", type=int, metavar="N", help="blobs downloaded at once"
    )
    p.add_argument(
        "--sync-fs",
        action="store_true",
        default=None,
        help="syncfs each layer's filesystem before its snapshot is committed",
    )
    p.add_argument(
        "--no-unpack", action="store_true", help="only fetch into the content store"
    )
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON result")
    output.add_argument("--quiet", "-q", action="store_true", help="print only the digest")
    p.add_argument(
        "--verbose", "-v", action="store_true",
        help="also log (at the configured level, default info) what the progress display shows",
    )
    p.set_defaults(func=run)


def add_store_arguments(p: argparse.ArgumentParser, *, pull: bool = False) -> None:
    """``--root``, ``--config`` and ``--snapshotter``, shared by every command that opens
    the store."""
    p.add_argument("--root", help="store directory (default: /var/lib/prefetcher as root)")
    p.add_argument("--config", help="config file (default: PREFETCHER_CONFIG or /etc/prefetcher)")
    default = (
        "images.snapshotter from the config, else overlayfs" if pull else
        "images.snapshotter from the config, else the runtime the store was pulled into,"
        " else overlayfs"
    )
    p.add_argument(
        "--snapshotter",
        choices=["auto", "overlayfs", "naive", "containerd", "cri"],
        help=f"where the images are: auto (the node's runtime, found as the agent finds it),"
        f" containerd, cri, or the local store's overlayfs / naive (default: {default})",
    )


def load_settings(args: argparse.Namespace, images: dict[str, Any] | None = None) -> Any:
    """Settings from the config file and environment, with the flags on top."""
    overrides: dict[str, Any] = {"images": dict(images or {}), "runtime": {}}
    if getattr(args, "root", None):
        overrides["runtime"]["root"] = args.root
    if getattr(args, "snapshotter", None):
        overrides["images"]["snapshotter"] = args.snapshotter
    return config.load(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    image_flags: dict[str, Any] = {}
    try:
        if args.progress_timeout is not None:
            image_flags["image_pull_progress_timeout"] = durations.parse(args.progress_timeout)
        if args.max_concurrent_downloads is not None:
            image_flags["max_concurrent_downloads"] = args.max_concurrent_downloads
        if args.sync_fs:
            image_flags["image_pull_with_sync_fs"] = True
        settings = load_settings(args, image_flags)
    except (ValueError, config.ConfigError) as e:
        print(f"prefetcher: {e}", file=sys.stderr)
        return 2
    # The progress display already tells what happens: logs would only interleave with it
    # (and break a terminal's live bars), so the CLI logs warnings unless asked for more.
    logs.setup(
        settings.runtime.log_level if args.verbose else "warning", settings.runtime.log_format
    )
    tracing = telemetry.setup(
        "prefetcher",
        enabled=settings.tracing.enabled,
        http_client_spans=settings.tracing.http_client_spans,
        node_name=settings.runtime.node_name,
    )
    # --json and --quiet print only the result: the json renderer is silent while pulling.
    renderer = rendering.make_renderer("json" if args.json or args.quiet else "auto", sys.stderr)
    try:
        result = asyncio.run(_pull(args, settings, logs.tee(renderer, logs.PullLogger())))
    except errors.ImageError as e:
        renderer.close()
        if args.json:
            print(json.dumps({"reference": args.reference, "error": e.reason, "message": str(e)}))
        print(f"prefetcher: pull {args.reference} failed: {e}", file=sys.stderr)
        return 1
    finally:
        tracing.shutdown()
    renderer.close()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif args.quiet:
        print(result.digest)
    else:
        size = human(result.size)
        got = human(result.bytes_downloaded)
        print(
            f"{result.reference}: {result.digest}\n"
            f"  platform {result.platform}, {result.layers} layers, {size}"
            f" ({got} downloaded in {result.seconds:.1f}s)"
            + (f", {result.stalls} stalls recovered" if result.stalls else "")
        )
    return 0


async def _pull(args: argparse.Namespace, settings: Any, on_event: Any) -> service.PullResult:
    img = settings.images
    ref = references.parse(args.reference)
    platform = platforms.parse(args.platform) if args.platform else None
    if not args.no_unpack:
        runtimes.check_pull_target(settings)
    runtime = runtimes.open_runtime(settings, unpack=not args.no_unpack)
    registry_hosts = hosts.RegistryHosts(
        args.hosts_dir or runtime.hosts_dir,
        plain_http=args.plain_http,
        skip_verify=args.skip_verify,
        headers=dict(img.registry.headers),
        mirrors=img.registry.mirrors,
    )
    keychain = credentials.default_keychain(args.auth_file, os.environ)
    options = service_options(settings)
    root = Path(settings.runtime.root)
    async with registry_client.RegistryClient(registry_hosts, keychain) as registry:
        svc = service.ImageService(root, registry, options, backend=runtime.backend)
        try:
            # `prefetcher images ls` (and rm, gc) on this store follow where this pull went.
            runtimes.remember(root, runtime.backend.info)
            return await svc.pull(ref, platform=platform, on_event=on_event)
        finally:
            svc.close()


def service_options(settings: Any) -> service.ServiceOptions:
    """Turn the ``[images]`` settings into the service's plain options."""
    img = settings.images
    return service.ServiceOptions(
        max_concurrent_downloads=img.max_concurrent_downloads,
        node_max_concurrent_downloads=img.node_max_concurrent_downloads,
        progress_timeout=img.image_pull_progress_timeout,
        min_bytes_per_second=img.image_pull_min_bytes_per_second,
        sync_fs=img.image_pull_with_sync_fs,
        max_layer_uncompressed_bytes=img.max_layer_uncompressed_bytes,
        max_image_uncompressed_bytes=img.max_image_uncompressed_bytes,
        max_concurrent_unpacks=img.max_concurrent_unpacks,
        discard_unpacked_layers=img.discard_unpacked_layers,
    )


def human(n: int) -> str:
    """Bytes as KiB/MiB/GiB with one decimal."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"  # pragma: no cover
