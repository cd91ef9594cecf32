"""Regenerate the ``*_pb2.py`` / ``*_pb2.pyi`` modules next to this file from its ``.proto`` files.

Run from anywhere (needs ``grpcio-tools``, a development dependency only)::

    python -m agent.images.containerd.protos.generate           # rewrite the modules
    python -m agent.images.containerd.protos.generate --check   # exit 1 if they are stale

The generated modules are committed, so installing or running the agent needs only
``protobuf`` and ``grpcio``; ``tests/images/containerd/test_protos_are_generated.py`` runs
``--check``.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The repository root: protos import each other as ``agent/images/containerd/protos/x.proto``,
#: so the generated modules import ``agent.images.containerd.protos.x_pb2``.
ROOT = HERE.parents[3]
PACKAGE_DIR = HERE.relative_to(ROOT)


def protos() -> list[Path]:
    return sorted(HERE.glob("*.proto"))


def generate(out: Path) -> None:
    """Compile every ``.proto`` here into ``out`` (mirroring the package path)."""
    from grpc_tools import protoc

    includes = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{includes}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *(str(p.relative_to(ROOT)) for p in protos()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_names() -> list[str]:
    return [f"{p.stem}_pb2{ext}" for p in protos() for ext in (".py", ".pyi")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        built = Path(tmp) / PACKAGE_DIR
        stale = [
            name
            for name in generated_names()
            if not (HERE / name).exists() or not filecmp.cmp(built / name, HERE / name, False)
        ]
        if args.check:
            for name in stale:
                print(f"stale: {PACKAGE_DIR / name}", file=sys.stderr)
            return 1 if stale else 0
        for name in generated_names():
            (HERE / name).write_bytes((built / name).read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
