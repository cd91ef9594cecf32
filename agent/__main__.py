"""``python -m agent …`` is ``prefetcher …``."""

from agent.cli.main import console

console()
