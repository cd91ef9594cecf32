"""image-prefetcher: get container images onto nodes before pods need them."""

import sys

__version__ = "0.1.0"

# httpx imports its command-line client (``httpx._main``: click, rich and pygments, a tenth
# of a second of every ``prefetcher`` start-up) whenever those happen to be installed, and
# they are: kopf needs click, the progress bars rich. Nothing here runs that client, so it is
# marked as absent, which httpx takes as "not installed" (``httpx.main`` then only prints how
# to install it). A process that imported httpx before this keeps whatever it has.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
