"""Fixes for Ray Serve 2.60, applied in every Ray worker process of our job (Ray's `worker_process_setup_hook`,
named by cluster/env.py `ray_init_kwargs`): before any Serve actor exists in that process.

1. Binding (cluster/bind.py): Serve's gRPC proxy and replica servers listen on `server.host`, not `[::]`.
2. Dropped cancellations: when a gRPC client goes away while Serve's proxy is suspended at `yield result` in
   `gRPCProxy.send_request_to_replica` (not awaiting the replica), grpc closes that generator with
   GeneratorExit and the proxy never cancels the call to the Router, which streams on (measured on main: ~7%
   of cancelled streams kept their engine row). `ProxyResponseGenerator` cancels its response only on a
   CancelledError inside `__anext__`; here it also cancels when it is dropped unfinished (its `__del__` runs as
   soon as the proxy's closed generator releases it). The engine's leases remain the backstop for whatever is
   still lost (deployments/leases.py).

Ray is pinned (==2.60.0) and the integration tests exercise both, so an upgrade that moves these fails loudly.
"""

from __future__ import annotations

import logging

from cluster.bind import rebind_serve_servers

log = logging.getLogger("blockserve.serve_fixes")


def cancel_dropped_streams() -> None:
    from ray.serve._private.proxy_response_generator import ProxyResponseGenerator

    if getattr(ProxyResponseGenerator, "_blockserve_cancels_on_drop", False):
        return

    def __del__(self) -> None:
        try:
            if not self._done and not self._response.cancelled():
                self._response.cancel()
        except Exception as e:  # never raise from a finalizer
            log.debug("could not cancel a dropped response: %s", e)

    ProxyResponseGenerator.__del__ = __del__
    ProxyResponseGenerator._blockserve_cancels_on_drop = True


def apply() -> None:
    rebind_serve_servers()
    cancel_dropped_streams()
