"""``prefetcher images ls`` looks where the images of its store are: ``--snapshotter``, else
the config's ``images.snapshotter``, else the runtime the store was pulled into, else the
local store (``pull``'s default)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent import runtimes
from agent.images import backends, records
from tests.test_cli_pull import prefetcher

from .conftest import Containerd

pytestmark = pytest.mark.root
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PREFETCHER_")}


def listed(*args: str) -> list[tuple[str, bool]]:
    ls = prefetcher("images", "ls", "--json", *args, env=ENV)
    assert ls.returncode == 0, ls.stderr
    return [(i["name"], i["unpacked"]) for i in json.loads(ls.stdout)]


def test_a_pull_into_containerd_is_listed_from_the_store_alone(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    image = images.Image([images.random_layer(20_000, files=2, seed=161)])
    images.push(fault_proxy.upstream, "ctrd/ls", "1", image)
    reference = f"{fault_proxy.host}/ctrd/ls:1"
    # Where containerd is (a non-default socket), but not which snapshotter to use.
    config = tmp_path / "config.toml"
    config.write_text(f'version = 2\n[images.containerd]\naddress = "{ctrd.address}"\n')
    root = str(tmp_path / "store")

    pulled = prefetcher("pull", reference, "--root", root, "--config", str(config),
                        "--snapshotter", "auto", "--quiet", env=ENV)
    assert pulled.returncode == 0, pulled.stderr
    assert runtimes.remembered(root) == {
        "mode": "containerd", "runtime": "containerd", "address": ctrd.address,
        "snapshotter": "overlayfs", "namespace": "k8s.io",
    }

    assert listed("--root", root) == [(reference, True)]
    # A flag (or the config) names where to look, whatever the store says.
    assert listed("--root", root, "--snapshotter", "overlayfs") == [(reference, False)]
    assert listed("--root", root, "--config", str(config), "--snapshotter", "containerd") == [
        (reference, True)
    ]

    # A pull told nothing would mix local-store images into it: refused, saying what to do.
    other = images.Image([images.random_layer(5_000, files=1, seed=163)])
    images.push(fault_proxy.upstream, "ctrd/ls", "2", other)
    mixed = prefetcher("pull", f"{fault_proxy.host}/ctrd/ls:2", "--root", root, env=ENV)
    assert mixed.returncode == 1
    assert f"the store {root} holds images of containerd at {ctrd.address}" in mixed.stderr
    assert "--snapshotter auto" in mixed.stderr
    assert listed("--root", root) == [(reference, True)]


def test_a_local_pull_is_listed_from_the_local_store(
    fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    image = images.Image([images.random_layer(10_000, files=1, seed=162)])
    images.push(fault_proxy.upstream, "local/ls", "1", image)
    reference = f"{fault_proxy.host}/local/ls:1"
    root = str(tmp_path / "store")

    pulled = prefetcher("pull", reference, "--root", root, "--quiet", env=ENV)
    assert pulled.returncode == 0, pulled.stderr
    assert listed("--root", root) == [(reference, True)]
    assert (runtimes.remembered(root) or {})["mode"] == "local"
    table = prefetcher("images", "ls", "--root", root, env=ENV).stdout.splitlines()
    assert "IMAGE ID" not in table[0]  # the local store's images have none


def test_a_store_whose_runtime_is_gone_says_where_it_looked(tmp_path: Path) -> None:
    root = tmp_path / "store"
    records.ImageRecords(root / "images.db").close()
    socket = tmp_path / "run" / "containerd.sock"
    runtimes.remember(root, backends.RuntimeInfo(
        mode="containerd", runtime="containerd", address=str(socket), namespace="k8s.io",
        snapshotter="overlayfs"))

    ls = prefetcher("images", "ls", "--root", str(root), env=ENV)
    assert ls.returncode == 1
    assert f"not reachable at {socket}" in ls.stderr
    assert f"the store {root} holds images of containerd at {socket}, as its runtime.json" \
        in ls.stderr
    assert "Traceback" not in ls.stderr
