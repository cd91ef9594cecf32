"""The progress facade exports exactly its public names."""

from __future__ import annotations

import agent.images.progress as progress


def test_the_facade_exports_its_public_names() -> None:
    assert set(progress.__all__) == {
        "DEFAULT_MAX_REQUEST_STALLS",
        "DEFAULT_STALL_TIMEOUT",
        "BlobDone",
        "BlobProgress",
        "BlobStarted",
        "EventCallback",
        "LayerUnpacked",
        "Phase",
        "PhaseChanged",
        "ProgressEvent",
        "ProgressSnapshot",
        "PullActivity",
        "PullProgress",
        "Retry",
        "RetryPolicy",
        "StallWatchdog",
        "Stalled",
        "UnpackProgress",
        "check_interval",
        "request_read_timeout",
    }
    for name in progress.__all__:
        assert hasattr(progress, name), name


def test_the_progress_layer_imports_no_higher_service_layer() -> None:
    import ast
    import pathlib

    higher = ("registry", "content", "snapshots", "unpack", "service")
    for path in pathlib.Path(progress.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("agent"):
                inside = node.module.startswith("agent.images.progress")
                assert inside or node.module == "agent.images", (path.name, node.module)
                if node.module == "agent.images":
                    assert not {a.name for a in node.names} & set(higher), path.name
