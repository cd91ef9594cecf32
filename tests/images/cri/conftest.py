"""The CRI backend's tests run against the real CRI server of a real containerd 1.6 (its
CRI plugin), started as the containerd backend's tests start it."""

from tests.images.containerd.conftest import ctrd

__all__ = ["ctrd"]
