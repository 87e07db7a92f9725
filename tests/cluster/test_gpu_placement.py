"""GPU placement and device defaults: what an Engine replica asks Ray for, and which dtype it loads (no Ray)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from cluster.app import engine_actor_options
from cluster.config import ClusterConfig
from deployments.engine import resolve_dtype


def test_cpu_engine_asks_for_no_gpu():
    assert engine_actor_options(ClusterConfig()) == {"num_cpus": 0}


@pytest.mark.parametrize("device,gpus", [("cuda", 1.0), ("cuda:1", 0.5), ("cuda", 2)])
def test_cuda_engine_asks_ray_for_its_gpus(device, gpus):
    cfg = ClusterConfig.model_validate({"model": {"device": device}, "engine": {"num_gpus": gpus}})
    assert engine_actor_options(cfg) == {"num_cpus": 0, "num_gpus": gpus}


def test_bad_device_and_gpu_count_are_rejected_with_the_field_named():
    with pytest.raises(ValidationError, match="model.device='tpu'"):
        ClusterConfig.model_validate({"model": {"device": "tpu"}})
    with pytest.raises(ValidationError, match="num_gpus"):
        ClusterConfig.model_validate({"engine": {"num_gpus": 0}})


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_cpu():
    assert ClusterConfig().model.dtype == "auto"
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:3") is torch.bfloat16
    assert resolve_dtype("float32", "cuda") is torch.float32
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu")


def test_engine_fields_reach_the_scheduler_limits(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = ClusterConfig.model_validate(
        {"model": {"path": str(tmp_path)}, "engine": {"prefill_chunk": 64, "token_budget": 1000}}
    )
    limits = cfg.to_engine_settings().limits
    assert (limits.prefill_chunk, limits.token_budget) == (64, 1000)
