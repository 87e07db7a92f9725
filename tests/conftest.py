"""Fixtures shared by the whole suite.

The loopback environment (cluster/env.py) is applied when pytest imports this file, before any test runs, so
Ray and every subprocess a test starts inherit it: nothing a test starts reaches beyond loopback.
"""

import os
import socket

import torch

# Without a GPU, Triton kernels (model/gemm.py's batch-invariant GEMM) run in Triton's interpreter on CPU tensors.
# It is read when a kernel is defined, so it is set before anything imports model code.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from cluster.env import apply_loopback_env, ray_init_kwargs  # noqa: E402
from cluster.telemetry import tracing_env  # noqa: E402

# Property tests draw the same examples on every machine and every run: Hypothesis loads its own "ci" profile
# (derandomized, no deadline) when CI is set, so without this a developer's runs drew random examples that CI
# never tried, and CI's fixed ones were never tried before a submission. No deadline and no too_slow health
# check: a test's speed is a benchmark's business, and a loaded 2-core machine must not fail a correct test.
# `pytest --hypothesis-profile=explore` draws fresh random examples (a failure prints its reproduction blob).
_PROPERTY_TESTS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("blockserve", derandomize=True, database=None, **_PROPERTY_TESTS)
settings.register_profile("explore", **_PROPERTY_TESTS)
settings.load_profile("blockserve")


@pytest.fixture
def torch_threads():
    """`torch_threads(n)` sets torch's intra-op threads for one test; restored after it. More threads than the
    machine has cores is fine for bit-exactness tests: torch splits work by its thread count, only slower."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _reserve_port() -> tuple[socket.socket, int]:
    """A loopback port held for the whole session by a bound, non-listening socket, so that no process takes it
    before the test that listens there starts. SO_REUSEPORT lets that test's gRPC server (which sets it too, on
    Linux) bind the same port; connections only ever go to listening sockets."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", 0))
    return held, held.getsockname()[1]


# Serve replicas push autoscaling metrics every 10 s by default; tests that watch scaling need them sooner.
TEST_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
# Serve restarts a proxy that is not ready within 3 checks of 5 s, or misses 3 health checks of 10 s, and
# `serve.start` then fails the whole session: a proxy still importing on a loaded 2-core machine (measured: on
# one core shared with a busy process) is slow, not broken. No test is about the proxy's own health checks.
TEST_ENV |= {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}

# Tracing is on for the session's Ray processes (Serve reads its tracing variables only when a process starts),
# but samples no request by itself (ratio 0): only a request that carries a sampled `traceparent` is traced
# (tests/integration/test_telemetry.py), and its spans go to the receiver that test runs on this loopback port.
# `environ={}`: a developer's own OTEL_* settings never send test spans anywhere else.
_TRACE_PORT_HOLDER, TRACE_RECEIVER_PORT = _reserve_port()
TEST_ENV.update(tracing_env(f"http://127.0.0.1:{TRACE_RECEIVER_PORT}", sampling_ratio=0.0, environ={}))
# Spans leave a process within 0.2 s (default 5 s) and Ray exports metrics every second (default 10 s).
TEST_ENV.update({"OTEL_BSP_SCHEDULE_DELAY": "200", "RAY_metrics_report_interval_ms": "1000"})

apply_loopback_env()
os.environ.update(TEST_ENV)
# One intra-op thread: on a 2-core machine shared with Ray, a second torch thread spins against the other
# processes and makes small-model forwards several times slower, not faster.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on loopback for the session (~3 s to start); Serve and Ray shut down after."""
    # Imported here so that unit tests which never start Ray do not pay for importing it.
    import ray
    from ray import serve

    apply_loopback_env()
    context = ray.init(**ray_init_kwargs(num_cpus=32))
    try:
        yield context
    finally:
        serve.shutdown()
        ray.shutdown()
