"""Expert placement, the `experts` config section and `blockserve plan` (no Ray)."""

from __future__ import annotations

import pytest

from cluster.cli import main, parse_bytes
from cluster.config import ClusterConfig, ConfigFileError
from cluster.placement import (
    Hardware,
    PlacementError,
    Workload,
    even_split,
    plan,
    ranges,
    replication_plan,
)
from model.config import from_name
from model.transformer import DiffusionGemma
from model.weights import init_random, save_model


@pytest.mark.parametrize(("experts", "shards", "want"), [(8, 2, [4, 4]), (8, 3, [3, 3, 2]), (128, 1, [128])])
def test_even_split(experts, shards, want):
    assert even_split(experts, shards) == want
    assert ranges(want)[-1].stop == experts


def test_more_shards_than_experts_is_refused():
    with pytest.raises(PlacementError, match="at most 8"):
        even_split(8, 9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_model(init_random(DiffusionGemma(from_name("tiny-test")), seed=0), path)  # 8 experts
    return path


def _config(path, **experts) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {"model": {"path": str(path)}, "engine": {"execution_mode": "disaggregated"}, "experts": experts}
    )


def test_split_is_checked_against_the_checkpoint_before_anything_starts(checkpoint):
    assert [(r.start, r.stop) for r in _config(checkpoint, split=[1, 4, 3]).expert_ranges()] == [
        (0, 1),
        (1, 5),
        (5, 8),
    ]
    assert [(s.first, s.stop) for s in _config(checkpoint, shards=3).to_shard_settings()] == [
        (0, 3),
        (3, 6),
        (6, 8),
    ]
    with pytest.raises(
        ConfigFileError, match=r"sums to 7 but the model has 8 experts; make the entries sum to 8"
    ):
        _config(checkpoint, split=[3, 4]).expert_ranges()
    with pytest.raises(ConfigFileError, match="at most 8"):
        _config(checkpoint, shards=9).expert_ranges()
    from cluster.app import build_app

    with pytest.raises(ConfigFileError, match="sums to 9"):  # the app builder fails before any deployment
        build_app(_config(checkpoint, split=[5, 4]))


def test_bad_split_yaml_is_a_config_error(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("experts:\n  split: [4, 0, 4]\n")
    with pytest.raises(ConfigFileError, match="at least one expert"):
        ClusterConfig.load(bad)
    bad.write_text("experts:\n  shards: 2\n  split: [2, 3, 3]\n")
    with pytest.raises(ConfigFileError, match="drop `shards` or make them agree"):
        ClusterConfig.load(bad)
    bad.write_text("engine:\n  execution_mode: split\n")
    with pytest.raises(ConfigFileError, match="disaggregated"):
        ClusterConfig.load(bad)


def test_plan_balances_bytes_and_beats_one_gpu():
    cfg = from_name("diffusiongemma-26b-a4b")
    p = plan(cfg, Hardware(gpus=8, gpu_mem_bytes=80e9))
    assert sum(p.split) == 128 and len(p.gpus) == 8
    read = [g.weight_bytes for g in p.gpus]
    assert max(read) / min(read) < 1.1  # every GPU reads about the same bytes per step
    assert p.fused_step_s is not None and p.step_s < p.fused_step_s / 3
    two = plan(cfg, Hardware(gpus=2, gpu_mem_bytes=80e9))
    assert p.step_s < two.step_s < two.fused_step_s


def test_plan_says_what_to_change_when_it_cannot_fit():
    cfg = from_name("diffusiongemma-26b-a4b")
    with pytest.raises(PlacementError, match="add GPUs or use fp8"):
        plan(cfg, Hardware(gpus=2, gpu_mem_bytes=24e9))
    assert plan(cfg, Hardware(gpus=1, gpu_mem_bytes=80e9), Workload(kv_reserve_bytes=8e9)).split == [128]


def test_replication_plan_relieves_the_busiest_shard():
    load = [[100, 10, 10, 10, 1, 1, 1, 1]]  # one layer, shard 0 ([0, 4)) is hot
    copies = replication_plan(load, [4, 4], spare_per_shard=1)
    assert [(c.expert, c.home, c.to) for c in copies] == [(0, 0, 1)]
    assert replication_plan([[5] * 8], [4, 4]) == []  # balanced: nothing to copy


def test_cli_plan_prints_the_placement_and_step_estimate(capsys):
    assert main(["plan", "--preset", "diffusiongemma-26b-a4b", "--gpus", "8", "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "experts.split: [" in out and "estimated step (disaggregated)" in out and "x faster" in out
    assert parse_bytes("80GB") == 80e9 and parse_bytes("1GiB") == 2**30
