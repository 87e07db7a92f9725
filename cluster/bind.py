"""Make Ray Serve's own gRPC servers bind the configured host instead of every interface.

Ray Serve 2.60 hard-codes `[::]` for its gRPC proxy (`serve/_private/grpc_util.py: start_grpc_server`) and for
each replica's inter-deployment gRPC server (`serve/_private/replica.py`); neither `gRPCOptions` nor
`http_options.host` reaches them, and there is no setting for it. Both end in `grpc.aio.Server.add_insecure_port`
(or `add_secure_port` under `RAY_USE_TLS`) in a Ray worker process. `rebind_serve_servers` runs in every worker
process of our job (cluster/serve_fixes.py, Ray's `worker_process_setup_hook`) and wraps those
two methods so that an address on every interface (`[::]:port`, `0.0.0.0:port`) becomes
`BLOCKSERVE_BIND_HOST:port`. Ray core's own servers are C++ and unaffected. Ray is pinned (==2.60.0), and an
integration test checks the bound sockets, so an upgrade that changes this path fails loudly instead of
silently listening everywhere. Whether the gRPC proxy's port is secure (`server.tls`) is decided in
cluster/tls.py; either way the address is rehosted here.
"""

from __future__ import annotations

import os

BIND_HOST_ENV = "BLOCKSERVE_BIND_HOST"
EVERY_INTERFACE = ("[::]", "0.0.0.0", "")


def rehost(address: str, host: str) -> str:
    """`[::]:9000` -> `127.0.0.1:9000`; an address on one interface is kept; an IPv6 host gets brackets."""
    where, _, port = address.rpartition(":")
    if where not in EVERY_INTERFACE or host in ("::", "0.0.0.0"):
        return address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rebind_serve_servers() -> None:
    host = os.environ.get(BIND_HOST_ENV)
    if not host:
        return
    from grpc.aio import _server

    server = _server.Server
    if getattr(server.add_insecure_port, "_blockserve", False):
        return
    insecure, secure = server.add_insecure_port, server.add_secure_port

    def add_insecure_port(self, address):
        return insecure(self, rehost(address, host))

    def add_secure_port(self, address, credentials):
        return secure(self, rehost(address, host), credentials)

    add_insecure_port._blockserve = True
    server.add_insecure_port, server.add_secure_port = add_insecure_port, add_secure_port
