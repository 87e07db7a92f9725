"""bench/gpu_step.py's code path on CPU with a tiny config, so the GPU benchmark cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_step_runs_its_code_path_on_a_tiny_config(capsys, tmp_path):
    bench = _load()
    if torch.cuda.is_available():  # the real thing would build 50 GB of weights
        return
    assert bench.run(["--config", "tiny-test"]) == []  # without a GPU it refuses unless asked
    argv = ["--allow-cpu", "--config", "tiny-test", "--rows", "1,3", "--steps", "2", "--prefix", "9"]
    results = bench.run([*argv, "--check-requests", "2", "--profile", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "no CUDA device" in out and "tiny-test on cpu" in out
    # on CPU the engine is batch-invariant and the same device: every check finds identical tokens
    assert "check  cpu float32 vs cpu float32, batched: 2/2" in out
    assert "check  cpu bfloat16: alone vs batched with 1 others: 2/2" in out
    for dtype in ("float32", "bfloat16"):  # the sub-step locator (bench/invariance.py) runs in the checks
        for part in ("encoder", "decoder", "sampler"):
            assert f"check  cpu {dtype}: batching changes bits in the {part}: no difference" in out
    assert "Traceback" not in err  # a failing part is reported and skipped, never silently
    assert [r["rows"] for r in results] == [1, 3]
    for r in results:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and 0 < r["floor_fraction"] < 1
        assert r["syncs"] == 1  # the serving step's one packed read (no row finishes while timed)
        assert 0 < r["decoder_ms"] and 0 < r["sampler_ms"]
    assert "aten::" in (tmp_path / "profile_rows1.txt").read_text()


def test_check_requests_differ_in_prompt_settings_and_seed():
    requests = _load().check_requests(512, 4)
    assert len({len(p) for _, p, _, _ in requests}) == 4
    assert len({(q.t_min, q.entropy_bound) for _, _, q, _ in requests}) == 4
    assert len({s for *_, s in requests}) == 4


def test_built_weights_are_random_where_they_should_be():
    model = _load().build_model("tiny-test", torch.device("cpu"), torch.float32)
    assert model.layers[0].input_layernorm.weight.eq(1).all()
    assert 0.015 < model.layers[0].experts.gate_up_proj.std() < 0.025
    assert model.layers[2].encoder_scalar.item() == 1.0
    assert not torch.isnan(model.layers[0].self_attn.inv_freq).any()
