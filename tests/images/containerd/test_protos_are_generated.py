"""The committed ``*_pb2`` modules are what ``protoc`` makes of the committed ``.proto``s."""

from __future__ import annotations

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (a development dependency) is missing")


def test_the_generated_modules_are_up_to_date() -> None:
    from agent.images.containerd.protos import generate

    assert generate.main(["--check"]) == 0, (
        "run: python -m agent.images.containerd.protos.generate"
    )


def test_the_facade_exports_its_public_names() -> None:
    import agent.images.containerd as facade

    assert set(facade.__all__) == {
        "Client",
        "ContainerdBackend",
        "ContainerdContent",
        "ContainerdError",
        "ContainerdImages",
        "ContainerdSnapshotter",
        "Finding",
        "ImportResult",
        "Leases",
        "Report",
        "cri_names",
    }
