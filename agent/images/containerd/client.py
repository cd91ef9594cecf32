"""``Client``: one gRPC channel to containerd's socket, scoped to a namespace.

Every call carries the ``containerd-namespace`` metadata header (containerd's
``namespaces.GRPCHeader``) and, inside a lease, ``containerd-lease`` (``leases.GRPCHeader``),
which is how containerd attaches what a call creates to that lease.

Calls are synchronous (the snapshotter protocol is synchronous and runs in worker threads);
a ``grpc`` channel is thread-safe, so one client serves every thread. gRPC failures are
translated in one place, :func:`translating`, into the image service's error tree and raised
``from`` the original :class:`grpc.RpcError`:

=========================================================  ====================================
gRPC status (what containerd means by it)                  image service error
=========================================================  ====================================
``NOT_FOUND``                                              :class:`~errors.NotFound`
``ALREADY_EXISTS``                                         :class:`~errors.AlreadyExists`
``FAILED_PRECONDITION`` (in use, has children, not active)  :class:`~errors.Unavailable`
``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``ABORTED``,       :class:`~errors.Unavailable`
``RESOURCE_EXHAUSTED``
``PERMISSION_DENIED``, ``UNAUTHENTICATED``,                :class:`~errors.InvalidConfiguration`
``UNIMPLEMENTED`` (a plugin that is disabled)
anything else                                              :class:`ContainerdError`
=========================================================  ====================================
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar

import grpc
from google.protobuf import message as pb_message

from agent.images import errors

#: gRPC metadata keys containerd reads.
NAMESPACE_HEADER: Final = "containerd-namespace"
LEASE_HEADER: Final = "containerd-lease"

#: Default deadline of one unary call, in seconds (streams have none: they carry layers).
DEFAULT_TIMEOUT: Final = 60.0

_MAX_MESSAGE: Final = 64 * 1024 * 1024

M = TypeVar("M", bound=pb_message.Message)


class ContainerdError(errors.ImageError):
    """containerd answered with a gRPC status this service has no better name for.

    Attributes:
        code: the :class:`grpc.StatusCode`.
    """

    reason = "ContainerdError"

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


_ERRORS: Final[dict[grpc.StatusCode, type[errors.ImageError]]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.Unavailable,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    grpc.StatusCode.ABORTED: errors.Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Unavailable,
    grpc.StatusCode.PERMISSION_DENIED: errors.InvalidConfiguration,
    grpc.StatusCode.UNAUTHENTICATED: errors.InvalidConfiguration,
    grpc.StatusCode.UNIMPLEMENTED: errors.InvalidConfiguration,
}


def error_from(e: grpc.RpcError, what: str, address: str = "") -> errors.ImageError:
    """The image service error for a failed call (``what``: ``"snapshots.Prepare extract-…"``)."""
    code = e.code() if isinstance(e, grpc.Call) else None
    details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
    message = f"containerd {what}: {details}"
    if code is grpc.StatusCode.UNAVAILABLE and address:
        message += f" (is containerd listening on {address}, and is the socket mounted?)"
    elif code is grpc.StatusCode.UNIMPLEMENTED:
        message += " (this containerd does not serve that API; is the plugin disabled?)"
    elif code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        message += " (the agent needs root, or read-write access to the socket)"
    cls = _ERRORS.get(code) if code is not None else None
    if cls is None:
        return ContainerdError(message, code)
    return cls(message)


@contextlib.contextmanager
def translating(what: str, address: str = "") -> Iterator[None]:
    """Raise gRPC failures inside the block as image service errors (see the module doc)."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from(e, what, address) from e


class Client:
    """A channel to containerd at ``address`` (a unix socket path), for ``namespace``.

    Args:
        address: containerd's gRPC socket, e.g. ``/run/containerd/containerd.sock``.
        namespace: the containerd namespace every call is made in (``k8s.io`` for the CRI).
        timeout: deadline of unary calls, in seconds.
    """

    def __init__(self, address: str, namespace: str, *, timeout: float = DEFAULT_TIMEOUT):
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        target = address if address.startswith("unix:") else f"unix:{address}"
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.default_authority", "localhost"),
            ],
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metadata(self, lease: str | None = None) -> tuple[tuple[str, str], ...]:
        """The call metadata: the namespace, and the lease when one is given."""
        md: tuple[tuple[str, str], ...] = ((NAMESPACE_HEADER, self.namespace),)
        if lease:
            md += ((LEASE_HEADER, lease),)
        return md

    def unary(
        self,
        method: str,
        request: pb_message.Message,
        response_type: type[M],
        *,
        lease: str | None = None,
        timeout: float | None = None,
        what: str = "",
    ) -> M:
        """Call ``/package.Service/Method`` and return its response.

        Raises:
            ImageError: the translated gRPC status (see the module doc).
        """
        call: Callable[..., M] = self._channel.unary_unary(
            method,
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,
        )
        with translating(what or _short(method), self.address):
            return call(
                request, metadata=self.metadata(lease), timeout=timeout or self.timeout
            )

    async def unary_async(
        self,
        method: str,
        request: pb_message.Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        what: str = "",
    ) -> M:
        """:meth:`unary` awaited: cancelling the awaiting task cancels the RPC (the server
        sees the call cancelled). ``timeout=None``: no deadline. No thread waits for the
        answer (a CRI ``PullImage`` may take minutes): gRPC's completion callback settles it."""
        call: Any = self._channel.unary_unary(
            method,
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,
        )
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[M] = loop.create_future()

        def settle(done: grpc.Future) -> None:  # a gRPC thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_copy_outcome, done, answered)

        future = call.future(request, metadata=self.metadata(), timeout=timeout)
        future.add_done_callback(settle)
        try:
            return await answered
        except asyncio.CancelledError:
            future.cancel()
            raise
        except grpc.RpcError as e:
            raise error_from(e, what or _short(method), self.address) from e

    def unary_stream(
        self,
        method: str,
        request: pb_message.Message,
        response_type: type[M],
        *,
        lease: str | None = None,
        what: str = "",
    ) -> Iterator[M]:
        """Call a server-streaming method and yield its responses."""
        call: Callable[..., Iterable[M]] = self._channel.unary_stream(
            method,
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,
        )
        rendezvous: Any = call(request, metadata=self.metadata(lease))
        try:
            with translating(what or _short(method), self.address):
                yield from rendezvous
        finally:
            rendezvous.cancel()  # a reader that stopped early ends the call; else a no-op

    def stream_stream(
        self,
        method: str,
        requests: Iterator[Any],
        response_type: type[M],
        *,
        lease: str | None = None,
    ) -> Any:
        """Start a bidirectional stream; the caller translates errors with :func:`translating`.

        Returns the call object: iterate it for responses, ``cancel()`` it to stop.
        """
        call = self._channel.stream_stream(
            method,
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,
        )
        return call(requests, metadata=self.metadata(lease))


def _serialize(message: pb_message.Message) -> bytes:
    return message.SerializeToString()


def _short(method: str) -> str:
    """``/containerd.services.snapshots.v1.Snapshots/Prepare`` → ``Snapshots.Prepare``."""
    service, _, name = method.strip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}.{name}"


def _copy_outcome(done: grpc.Future, target: asyncio.Future[Any]) -> None:
    """Settle ``target`` (on its loop) as the finished gRPC future ``done`` ended."""
    if target.done():  # the awaiting task was cancelled
        return
    try:
        target.set_result(done.result())
    except grpc.FutureCancelledError:
        target.cancel()
    except BaseException as e:  # noqa: BLE001 - the RPC's error, raised by the awaiter
        target.set_exception(e)
