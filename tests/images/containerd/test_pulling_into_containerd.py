"""``prefetcher pull`` with ``snapshotter = "containerd"``: the whole CLI against the test's
own containerd, configured the way a node would be (a config file)."""

from __future__ import annotations

import json
from pathlib import Path

from fixtures import images
from fixtures.faultproxy import FaultProxy

from tests.images.containerd.conftest import Containerd
from tests.images.pulling import stored_blobs
from tests.test_cli_pull import prefetcher


def config_file(tmp_path: Path, ctrd: Containerd) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        "version = 2\n[images]\nsnapshotter = \"containerd\"\n"
        f"[images.containerd]\naddress = \"{ctrd.address}\"\nnamespace = \"k8s.io\"\n"
    )
    return path


def test_a_cli_pull_lands_in_containerd_and_a_second_one_fetches_nothing(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    image = images.Image([images.random_layer(150_000, files=5, seed=81),
                          images.layer({"etc/app.conf": "x=1\n"})])
    images.push(fault_proxy.upstream, "ctrd/cli", "1", image)
    ref = f"{fault_proxy.host}/ctrd/cli:1"
    args = ["pull", ref, "--root", str(tmp_path / "store"), "--config",
            str(config_file(tmp_path, ctrd)), "--json"]

    first = prefetcher(*args)
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["chain_id"]
    listed = ctrd.ctr("images", "ls", "-q").stdout.split()
    assert ref in listed
    assert ctrd.snapshots().get(result["chain_id"]) == "Committed"
    # The layers live in containerd now; the agent's own store keeps no copy of them.
    assert not {layer.digest for layer in image.layers} & stored_blobs(tmp_path / "store")
    ls = json.loads(prefetcher("images", "ls", "--root", str(tmp_path / "store"), "--config",
                               args[-2], "--json").stdout)
    assert [(i["name"], i["unpacked"]) for i in ls] == [(ref, True)]
    # The image's ID as the CRI reports it to kubelet (`crictl images`): its config digest.
    assert result["image_id"] == ls[0]["image_id"] == image.config.digest

    fault_proxy.clear_requests()
    second = json.loads(prefetcher(*args).stdout)
    assert second["bytes_downloaded"] == 0
    assert fault_proxy.requests_to("/blobs/", "GET") == []
