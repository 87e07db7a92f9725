"""bench/op_counts.py runs and counts what it says (so the figures in bench/README.md can be re-made)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "op_counts.py"


def test_op_counts_cover_the_decoder_the_sampler_and_the_layout(capsys):
    spec = importlib.util.spec_from_file_location("op_counts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = module.main([])
    assert set(counts) >= {
        "decoder forward, sorted layout, 1 row(s)",
        "sampler step, per vocabulary block",
        "MoE sorted layout, every expert",
    }
    assert all(n > 0 for n in counts.values())
    # the forward's op count does not grow with the rows (no per-row Python loop)
    assert (
        counts["decoder forward, sorted layout, 1 row(s)"]
        == counts["decoder forward, sorted layout, 4 row(s)"]
    )
    # a shard's bank masks the pairs routed elsewhere: more ops than a bank of every expert
    assert counts["MoE sorted layout, a shard's bank"] > counts["MoE sorted layout, every expert"]
    assert "sampler step, per vocabulary block" in capsys.readouterr().out
