"""image-prefetcher: get container images onto nodes before pods need them."""

__version__ = "0.1.0"
