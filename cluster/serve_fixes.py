"""Fixes for Ray Serve 2.60, applied in every Ray worker process of our job (Ray's `worker_process_setup_hook`,
named by cluster/env.py `ray_init_kwargs`; on Kubernetes the chart names it in every Ray container's
environment): before any Serve actor exists in that process.

1. Binding (cluster/bind.py): Serve's gRPC proxy and replica servers listen on `server.host`, not `[::]`.
2. Dropped cancellations: when a gRPC client goes away while Serve's proxy is suspended at `yield result` in
   `gRPCProxy.send_request_to_replica` (grpc stops iterating the handler and never closes it) or before the
   proxy has made its call to the Router, Serve never cancels that call: `ProxyResponseGenerator` cancels only
   on a CancelledError inside `__anext__`. The Router, still connected to the proxy, streams on and renews the
   engine lease until `limits.max_request_s` (measured: about 1 in 5 of 100 randomly cancelled streams on a
   loaded machine). Here a done-callback on the client's gRPC context cancels the call whatever the proxy was
   doing. The call is found through a context variable that `ProxyResponseGenerator.__init__` reports to, not
   through the method's locals: Serve wraps that method in a tracing decorator, which hid them from an
   earlier version of this fix. The engine's leases remain the backstop (deployments/leases.py).
3. Deadlines: Serve does not pass the client's gRPC deadline on; the time remaining goes to the Router as
   metadata (`forward_deadline`), and from there to the Engine.
4. TLS (cluster/tls.py): the gRPC proxy's port is added with server credentials when `server.tls` names a
   certificate, and a client CA at the HTTP proxy means client certificates are required.

Ray is pinned (==2.60.0) and the integration tests exercise each, so an upgrade that moves these fails loudly.
"""

from __future__ import annotations

import contextvars
import logging

import grpc

from cluster.bind import rebind_serve_servers
from cluster.tls import require_client_certificates, secure_grpc_proxy
from deployments.leases import DEADLINE_METADATA

log = logging.getLogger("blockserve.serve_fixes")


# The watch of the RPC the current proxy task serves: Serve's `ProxyResponseGenerator` (its call to the Router)
# registers with it when it is made, inside `send_request_to_replica` and so in this task's context.
_WATCH: contextvars.ContextVar[DroppedCallWatch | None] = contextvars.ContextVar(
    "blockserve_watch", default=None
)


class DroppedCallWatch:
    """Cancels the proxy's call to the Router once the client's RPC has ended, whatever the proxy was doing.

    The client can end its RPC before that call exists, while the proxy is suspended at a `yield` (grpc then
    stops iterating the handler without closing it), or while the proxy awaits the Router: each case ends here
    (grpc's done-callback on the client's context), and a call made after the client left is cancelled as soon
    as it is made."""

    def __init__(self):
        self.client_gone = False
        self.response = None  # ray.serve._private.proxy_response_generator.ProxyResponseGenerator

    def attach(self, response) -> None:
        self.response = response
        if self.client_gone:
            self.cancel()

    def client_done(self, _context=None) -> None:
        self.client_gone = True
        self.cancel()

    def cancel(self) -> None:
        response = self.response
        try:
            if response is not None and not response._done and not response.cancelled():
                response._response.cancel()
        except Exception as e:  # never fail the proxy over a cancellation; the engine's lease is the backstop
            log.warning("could not cancel the call of a client that left: %s", e)


def cancel_dropped_streams() -> None:
    """Cancel the call to the Router when the client's RPC is done, whatever state the proxy was in."""
    from ray.serve._private import proxy_response_generator as prg
    from ray.serve._private.proxy import gRPCProxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    send = gRPCProxy.send_request_to_replica
    if getattr(send, "_blockserve", False):
        return
    init = prg.ProxyResponseGenerator.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        watch = _WATCH.get()
        if watch is not None:
            watch.attach(self)

    # Serve's method may be wrapped (its tracing decorator): only its arguments and the response object are
    # relied on here, not its locals.
    async def send_request_to_replica(self, *args, **kwargs):
        proxy_request = kwargs.get("proxy_request")
        context = getattr(proxy_request, "context", None)
        if _client_gone(context):  # cancelled before the proxy got here: do not call the Router at all
            yield ResponseStatus(
                grpc.StatusCode.CANCELLED, is_error=True, message="the client cancelled the call"
            )
            return
        forward_deadline(proxy_request)
        watch = DroppedCallWatch()
        _WATCH.set(watch)  # this task serves this one RPC
        if context is not None and hasattr(context, "add_done_callback"):
            context.add_done_callback(watch.client_done)
        async for item in send(self, *args, **kwargs):
            if watch.client_gone:
                watch.cancel()
            yield item

    send_request_to_replica._blockserve = True
    prg.ProxyResponseGenerator.__init__ = __init__
    gRPCProxy.send_request_to_replica = send_request_to_replica


def _client_gone(context) -> bool:
    try:
        return context is not None and bool(context.done())
    except Exception:  # a context without done(): assume the client is there
        return False


def forward_deadline(proxy_request) -> None:
    """Put the client's remaining gRPC deadline into the metadata the Router sees (Serve drops deadlines).

    The Router's copy of the context (`ray_serve_grpc_context`) is pickled when the proxy calls the replica,
    which happens after this runs. A value the client sent under the same key is replaced, never trusted."""
    copy = getattr(proxy_request, "ray_serve_grpc_context", None)
    context = getattr(proxy_request, "context", None)
    if copy is None or context is None:
        return
    try:
        remaining = context.time_remaining()
    except Exception:  # a context without deadlines: the server's maximum applies
        remaining = None
    metadata = [(k, v) for k, v in copy._invocation_metadata if k != DEADLINE_METADATA]
    if remaining is not None:
        metadata.append((DEADLINE_METADATA, f"{remaining:.3f}"))
    copy._invocation_metadata = metadata
    copy._invocation_metadata_dict = dict(metadata)


def apply() -> None:
    rebind_serve_servers()
    secure_grpc_proxy()
    require_client_certificates()
    cancel_dropped_streams()
