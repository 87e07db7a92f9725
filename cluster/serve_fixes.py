"""Fixes for Ray Serve 2.60, applied in every Ray worker process of our job (Ray's `worker_process_setup_hook`,
named by cluster/env.py `ray_init_kwargs`): before any Serve actor exists in that process.

1. Binding (cluster/bind.py): Serve's gRPC proxy and replica servers listen on `server.host`, not `[::]`.
2. Dropped cancellations: when a gRPC client goes away while Serve's proxy is suspended at `yield result` in
   `gRPCProxy.send_request_to_replica` (not awaiting the replica), grpc closes that generator with
   GeneratorExit and the proxy never cancels the call to the Router, which streams on (measured on main: ~7%
   of cancelled streams kept their engine row). `ProxyResponseGenerator` cancels its response only on a
   CancelledError inside `__anext__` (and the closed generator sits in a reference cycle until the cyclic GC
   runs). Here a done-callback on the client's gRPC context cancels the unfinished response as soon as the
   client's RPC ends, whatever the proxy was doing. The engine's leases remain the backstop for whatever is
   still lost (deployments/leases.py).

Ray is pinned (==2.60.0) and the integration tests exercise both, so an upgrade that moves these fails loudly.
"""

from __future__ import annotations

import logging

from cluster.bind import rebind_serve_servers

log = logging.getLogger("blockserve.serve_fixes")


def cancel_dropped_streams() -> None:
    """Cancel the call to the Router when the client's RPC is done, whatever state the proxy was in."""
    from ray.serve._private.proxy import gRPCProxy

    send = gRPCProxy.send_request_to_replica
    if getattr(send, "_blockserve", False):
        return

    async def send_request_to_replica(self, *args, **kwargs):
        inner = send(self, *args, **kwargs)
        context = getattr(kwargs.get("proxy_request"), "context", None)

        def on_done(_) -> None:  # the client's RPC ended: finished, cancelled or disconnected
            try:
                frame = inner.ag_frame  # None once the proxy's generator has finished
                response = frame.f_locals.get("response_generator") if frame is not None else None
                if response is not None and not response._done and not response.cancelled():
                    response._response.cancel()
            except Exception as e:  # never fail the proxy over a cancellation
                log.debug("could not cancel a dropped response: %s", e)

        if context is not None and hasattr(context, "add_done_callback"):
            context.add_done_callback(on_done)
        async for item in inner:
            yield item

    send_request_to_replica._blockserve = True
    gRPCProxy.send_request_to_replica = send_request_to_replica


def apply() -> None:
    rebind_serve_servers()
    cancel_dropped_streams()
