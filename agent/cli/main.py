"""``prefetcher`` entry point: build the argument parser from each command module.

Each command module exposes ``register(subparsers)``, which adds its sub-parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
Expected failures (:class:`agent.images.errors.ImageError`, configuration errors) print one
line on stderr and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

import agent

#: Command modules under ``agent.cli``, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = ("pulling", "storing", "configs", "operating", "agenting")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefetcher",
        description="Get container images onto nodes before pods need them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {agent.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"agent.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"agent.cli.{name}":
                continue  # a command group not built yet
            raise
        module.register(subparsers)
    return parser


def main(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> int:
    if parser is None:
        parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = func(args)
    except KeyboardInterrupt:
        print("prefetcher: interrupted", file=sys.stderr)
        return 130
    return code


def console() -> NoReturn:
    """The ``prefetcher`` command (and ``python -m agent``): :func:`main`, then a quick exit.

    Once a command returns, its output is flushed, the other non-daemon threads are joined
    and the atexit handlers run (logging's and OpenTelemetry's flush among them), as at any
    exit; then the process ends without the interpreter's teardown: with the
    image service, gRPC and pydantic loaded that teardown is 0.15-0.25 s of garbage
    collection over some 60,000 objects, freeing memory the kernel frees anyway, on every
    ``prefetcher pull``. An exception (a bug's traceback, ``--help``'s SystemExit) takes
    the ordinary way out.

    pydantic is told it has no plugins to look for (``PYDANTIC_DISABLE_PLUGINS``, unless
    set), so the start does not read every installed distribution's entry points.

    The garbage collector is off while the command modules load: they allocate some 50,000
    long-lived objects (classes, functions, pydantic schemas, protobuf descriptors) and
    next to no garbage, and collecting over them as they grow — a dozen passes, a full one
    among them — was 40-70 ms of every start. Then they are frozen (``gc.freeze``: left out
    of every later collection, a full one included) and the collector is back on for the
    command. Only here, in a process of its own: a caller of :func:`main` keeps its
    collector as it is.
    """
    # No pydantic plugins are used here: without this, building the first model looks for
    # them in the entry points of every installed distribution, on every start (with a cold
    # page cache, a read of each one's metadata). An explicit setting is kept.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    gc.disable()
    try:
        parser = build_parser()
    finally:
        gc.freeze()
        gc.enable()
    code = main(parser=parser)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a closed reader: the ordinary exit reports it
        sys.exit(code)
    # What Py_FinalizeEx does first: the threading module's exit hooks (an executor's idle
    # workers are told to stop) and a join of every other non-daemon thread; then atexit.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
