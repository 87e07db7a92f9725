"""Checks `blockserve serve` runs before starting Ray: fail in a second with a message, not minutes later in a
replica's traceback. The checkpoint's metadata must load (config, tokenizer, weight index and headers), and the
gRPC and HTTP ports must be free on `server.host`, and the `server.tls` files must load (cluster/tls.py).
"""

from __future__ import annotations

import socket

from cluster import tls
from cluster.config import ClusterConfig, ConfigFileError


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port. SO_REUSEADDR (not SO_REUSEPORT) so a socket lingering
    in TIME_WAIT is not mistaken for a server, while a listening one (even with SO_REUSEPORT) is found."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check(config: ClusterConfig) -> None:
    """Raise ConfigFileError naming every problem found."""
    from model.tokenizer import Tokenizer
    from model.weights import checkpoint_problems

    problems = []
    path = config.model.path
    problems += [f"model.path: {p}" for p in checkpoint_problems(path)]
    if not problems:
        try:
            Tokenizer.from_dir(path)
        except Exception as e:
            problems.append(f"model.path: tokenizer.json does not load: {e}")
    s = config.server
    for name, port in (("server.grpc_port", s.grpc_port), ("server.http_port", s.http_port)):
        if port_in_use(s.host, port):
            problems.append(
                f"{name}: {s.host}:{port} is already in use (another blockserve or program listens there); "
                "stop it or choose another port"
            )
    problems += tls.problems(s.tls)
    if problems:
        raise ConfigFileError("cannot start:\n  " + "\n  ".join(problems))
