"""CLI template parsing and ClusterConfig validation (no Ray)."""

from __future__ import annotations

import pytest

from cluster.cli import main, parse_template
from cluster.config import ClusterConfig, ConfigFileError


def test_parse_template_splits_text_and_slots():
    t = parse_template(r"def {{name:4}}(x):\n    return {{expr:12}}")
    kinds = [p.WhichOneof("part") for p in t.parts]
    assert kinds == ["text", "slot", "text", "slot"]
    assert t.parts[2].text == "(x):\n    return "
    assert (t.parts[3].slot.name, t.parts[3].slot.max_tokens) == ("expr", 12)


def test_config_yaml_round_trip_and_errors(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("engine:\n  max_rows: 4\nsampling:\n  max_denoising_steps: 12\n")
    cfg = ClusterConfig.load(good)
    assert cfg.engine.max_rows == 4 and cfg.sampling.to_params().max_denoising_steps == 12
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  max_rowz: 4\n")
    with pytest.raises(ConfigFileError, match="max_rowz"):
        ClusterConfig.load(bad)
    worse = tmp_path / "worse.yaml"
    worse.write_text("sampling:\n  t_min: 0.9\n  t_max: 0.5\n")
    with pytest.raises(ConfigFileError, match="t_max must be >= t_min"):
        ClusterConfig.load(worse)
    with pytest.raises(ConfigFileError, match="does not exist"):
        ClusterConfig.load(tmp_path / "missing.yaml")


def test_model_path_without_checkpoint_says_what_to_run(tmp_path):
    cfg = ClusterConfig.model_validate({"model": {"path": str(tmp_path)}})
    with pytest.raises(ConfigFileError, match="make tiny-model"):
        cfg.model_path()


def test_plan_prints_the_published_shape(capsys):
    assert main(["plan", "diffusiongemma-26b-a4b"]) == 0
    out = capsys.readouterr().out
    assert '"total": "25.25B"' in out and '"active": "3.84B"' in out


def test_parse_template_slot_min_tokens_from_the_spec_or_the_flag():
    t = parse_template("a {{x:4}} b {{y:6:2}}", min_tokens=3)
    slots = [p.slot for p in t.parts if p.HasField("slot")]
    assert [(s.name, s.max_tokens, s.min_tokens) for s in slots] == [("x", 4, 3), ("y", 6, 2)]
    assert not parse_template("{{x:4}}").parts[0].slot.HasField("min_tokens")  # unset: the server's default
