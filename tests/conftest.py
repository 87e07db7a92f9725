"""Fixtures shared by the whole suite.

The loopback environment (cluster/env.py) is applied when pytest imports this file, before any test runs, so
Ray and every subprocess a test starts inherit it: nothing a test starts reaches beyond loopback.
"""

import os

import pytest
import torch

from cluster.env import apply_loopback_env, ray_init_kwargs

# Serve replicas push autoscaling metrics every 10 s by default; tests that watch scaling need them sooner.
TEST_ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}

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
