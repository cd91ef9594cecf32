"""``prefetcher config``: print the defaults, migrate an old file, check a file.

::

    prefetcher config default              a complete, commented version 2 file
    prefetcher config migrate OLD.toml     the version 2 form of OLD.toml, on stdout
    prefetcher config check FILE|-         validate; print the effective config, secrets redacted

``migrate`` never writes to its input (redirect stdout to keep the result), as
``containerd config migrate`` does. ``check`` applies ``PREFETCHER_*`` variables on top of the
file, as a process started with that file would (``--no-env`` checks the file alone).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent import config

EXIT_OK = 0
EXIT_FAILURE = 1


def register(subparsers: Any) -> None:
    """Add ``config`` and its sub-commands to the ``prefetcher`` parser."""
    parser = subparsers.add_parser(
        "config",
        help="print, migrate and check configuration files",
        description="Print, migrate and check prefetcher configuration files (version 2 TOML).",
    )
    parser.set_defaults(func=lambda args: _usage(parser))
    commands = parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND")

    default = commands.add_parser(
        "default",
        help="print a complete, commented version 2 file with every default",
        description="Print a complete, commented version 2 configuration with every default.",
    )
    default.set_defaults(func=run_default)

    migrate = commands.add_parser(
        "migrate",
        help="print the version 2 form of an older file (the input is never rewritten)",
        description=(
            "Print the version 2 form of a version 1 file on stdout. The input file is never "
            "modified; redirect the output to keep it."
        ),
    )
    migrate.add_argument("file", metavar="OLD.toml", help="the file to migrate ('-' for stdin)")
    migrate.set_defaults(func=run_migrate)

    check = commands.add_parser(
        "check",
        help="validate a file and print the effective configuration (secrets redacted)",
        description=(
            "Validate a configuration file and print the effective configuration: defaults, "
            "the file, then PREFETCHER_* environment variables. Secrets are redacted."
        ),
    )
    check.add_argument("file", metavar="FILE", help="the file to check ('-' for stdin)")
    check.add_argument(
        "--no-env",
        action="store_true",
        help="ignore PREFETCHER_* and Downward API variables; check the file alone",
    )
    check.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing when the file is valid"
    )
    check.set_defaults(func=run_check)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _fail(command: str, error: Exception) -> int:
    print(f"prefetcher config {command}: {error}", file=sys.stderr)
    return EXIT_FAILURE


def run_default(args: argparse.Namespace) -> int:
    sys.stdout.write(config.default_toml())
    return EXIT_OK


def run_migrate(args: argparse.Namespace) -> int:
    source = "<stdin>" if args.file == "-" else args.file
    try:
        data = config.read_file(args.file, raw=True)
        version = config.file_version(data, source)
        if version == config.CURRENT_VERSION:
            config.validate(data, source=source)
            print(f"{source} is already version {version}; printing it as is", file=sys.stderr)
            sys.stdout.write(config.to_toml(data))
            return EXIT_OK
        try:
            v2, notes = config.migrate(data)
        except config.ConfigError as e:
            raise config.ConfigError(f"{source}: {e}") from None
        config.validate(v2, source=f"{source} (migrated)")
    except config.ConfigError as e:
        return _fail("migrate", e)
    header = [f"# Migrated from {source} (version 1) by `prefetcher config migrate`."]
    header += [f"#   {note}" for note in notes]
    if "mirrors" in v2.get("images", {}).get("registry", {}):
        header += [
            "# images.registry.mirrors keeps the old agent.registry_mirrors table. Prefer one",
            "# hosts.toml per registry under images.registry.config_path, e.g.",
            "# <config_path>/docker.io/hosts.toml:",
            '#   server = "https://registry-1.docker.io"',
            '#   [host."https://mirror.gcr.io"]',
            '#   capabilities = ["pull", "resolve"]',
        ]
    sys.stdout.write("\n".join(header) + "\n\n" + config.to_toml(v2))
    print(
        f"migrated {len(notes)} key(s) from version 1; {source} was not modified",
        file=sys.stderr,
    )
    return EXIT_OK


def run_check(args: argparse.Namespace) -> int:
    source = "<stdin>" if args.file == "-" else args.file
    env: dict[str, str] | None = {} if args.no_env else None
    try:
        if args.file == "-":
            settings = config.from_toml(sys.stdin.read(), source=source, env=env)
        else:
            settings = config.load(args.file, env=env)
    except config.ConfigError as e:
        return _fail("check", e)
    if not args.quiet:
        sources = "defaults and the file" if args.no_env else "defaults, the file and environment"
        sys.stdout.write(
            f"# {source} is valid. Effective configuration ({sources}); secrets redacted.\n\n"
            + config.dump_toml(settings, redact=True)
        )
    return EXIT_OK
