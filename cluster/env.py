"""The one home for blockserve's environment variables, and for the environment Ray needs on these machines.

Modelled on vLLM's `vllm/envs.py`: each variable is declared once below, with the `BLOCKSERVE_` prefix, a
one-line comment and a parser, and is read as a module attribute (`env.BLOCKSERVE_GRPC_PORT`). Values are
parsed on every access, so a changed `os.environ` (a test, a CLI flag) is seen at once, and a bad value fails
with a message naming the variable.

`LOOPBACK_ENV` / `apply_loopback_env` / `ray_init_kwargs` keep a local Ray cluster on loopback (each entry of
LOOPBACK_ENV says why it is needed, as checked on Ray 2.60). The Makefile exports the same values; a test holds them equal.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    BLOCKSERVE_MODEL_PATH: str
    BLOCKSERVE_GRPC_PORT: int
    BLOCKSERVE_LOG_LEVEL: str

# The checkpoint shipped as package data of `model` (model/assets/); `model` sits beside `cluster` both in a
# checkout and in site-packages, so no import of `model` (and torch) is needed to find it.
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "model" / "assets" / "tiny-diffusiongemma"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _raw(name: str, default: str) -> str:
    # An empty value means "unset", as a blank `export X=` in a shell script usually intends.
    return os.environ.get(name) or default


def _port(name: str, default: int) -> int:
    raw = _raw(name, str(default))
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a port number; set it to an integer in 1..65535") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{name}={port} is out of range; set it to an integer in 1..65535")
    return port


def _log_level(name: str, default: str) -> str:
    level = _raw(name, default).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{name}={level!r} is not a log level; set it to one of {', '.join(LOG_LEVELS)}")
    return level


environment_variables: dict[str, Callable[[], Any]] = {
    # Directory of the checkpoint to serve (config.json, tokenizer, *.safetensors); default: the shipped one.
    "BLOCKSERVE_MODEL_PATH": lambda: _raw("BLOCKSERVE_MODEL_PATH", str(DEFAULT_MODEL_PATH)),
    # Port of Ray Serve's gRPC proxy, where clients connect.
    "BLOCKSERVE_GRPC_PORT": lambda: _port("BLOCKSERVE_GRPC_PORT", 9000),
    # Level of blockserve's loggers: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).
    "BLOCKSERVE_LOG_LEVEL": lambda: _log_level("BLOCKSERVE_LOG_LEVEL", "INFO"),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(environment_variables))


# What a local Ray cluster needs to stay on loopback. Forced, not defaulted: a caller's real proxy would
# let Ray's probes leave the machine.
LOOPBACK_ENV: dict[str, str] = {
    # No usage-stats reporting.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray 2.60 turns token auth on for local clusters (writing ~/.ray/auth_token); off on loopback.
    "RAY_AUTH_MODE": "disabled",
    # Ray's dashboard head probes cloud metadata over HTTP even with usage stats off; a dead proxy on
    # loopback port 9 makes the probe fail at once instead of leaving the machine...
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    # ...while loopback traffic (gRPC clients, Ray's own HTTP) goes direct.
    "no_proxy": "localhost,127.0.0.1,::1",
    # ray.init silently turns _node_ip_address="127.0.0.1" into the routed interface's IP (services.py,
    # resolve_ip_for_localhost) unless multi-node clusters are off: then GCS, raylet and workers bind 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}

# Ray Serve's own variable for how often replicas push autoscaling metrics. Ray 2.60 defines it but its replicas
# still push every `autoscaling_config.metrics_interval_s` (replica.py `start_metrics_pusher`), so cluster/app.py
# copies it into that field when it is set (tests set 0.5 s; the default is 10 s).
RAY_METRIC_PUSH_ENV = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"


def ray_metric_push_interval_s(environ: MutableMapping[str, str] = os.environ) -> float | None:
    raw = environ.get(RAY_METRIC_PUSH_ENV)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{RAY_METRIC_PUSH_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{RAY_METRIC_PUSH_ENV}={raw!r} must be > 0 seconds")
    return value


LOOPBACK_NODE_IP = "127.0.0.1"
# Enough for handles passing a few MB per call; Ray's default (30% of RAM) is too much on a shared 24 GB box.
OBJECT_STORE_BYTES = 256 * 1024 * 1024


def apply_loopback_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Force LOOPBACK_ENV into `environ` (before ray.init, so every Ray process inherits it); return it."""
    environ.update(LOOPBACK_ENV)
    return dict(LOOPBACK_ENV)


def ray_init_kwargs(
    num_cpus: int = 32, bind_host: str = LOOPBACK_NODE_IP, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Keyword arguments for `ray.init()` that start a small local cluster bound to loopback.

    `num_cpus` is Ray's logical CPU count, not the machine's: replicas reserve one CPU each by default, so a
    count above the real 2 cores lets several replicas start (Ray's own tests use 36).
    `bind_host` (`server.host`) is where Serve's gRPC proxy and the replicas' gRPC servers listen: Serve 2.60
    hard-codes every interface for them, which cluster/bind.py corrects in each worker process. Serve's
    SO_REUSEPORT is off, so two servers never share a port silently. `extra_env` joins the environment of
    every Ray worker (the proxies' certificate files, cluster/tls.py `tls_env`).
    """
    if num_cpus < 1:
        raise ValueError(f"num_cpus={num_cpus}: Ray needs at least 1 logical CPU to place any replica")
    return dict(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address=LOOPBACK_NODE_IP,
        object_store_memory=OBJECT_STORE_BYTES,
        runtime_env={
            "worker_process_setup_hook": SETUP_HOOK,
            "env_vars": {**server_env(bind_host), **(extra_env or {})},
        },
    )


# cluster/serve_fixes.py (binds, TLS at the proxies, dropped cancellations), named here so this module imports nothing heavy.
SETUP_HOOK = "cluster.serve_fixes.apply"


def server_env(bind_host: str) -> dict[str, str]:
    """Environment of every Ray worker process: where Serve's servers bind, and no port sharing."""
    return {"BLOCKSERVE_BIND_HOST": bind_host, "SERVE_SOCKET_REUSE_PORT_ENABLED": "0"}
