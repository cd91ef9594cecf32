"""Minimal protobuf definitions of containerd's gRPC API and the CRI, and their generated
modules. See :mod:`agent.images.containerd` for why the modules are committed and
:mod:`.generate` for how they are rebuilt."""
