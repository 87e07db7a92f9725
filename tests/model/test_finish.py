"""The one finish rule (model/sampling/finish.py) the reference loop and the scheduler share (no model)."""

from __future__ import annotations

import pytest

from model.sampling.finish import canvas_outcome

EOS = (1,)


def outcome(committed, so_far=0, max_new=100, **kw):
    o = canvas_outcome(committed, delivered_so_far=so_far, max_new_tokens=max_new, eos_ids=EOS, **kw)
    return o.delivered, o.finish_reason


def test_a_canvas_without_eos_continues_until_max_new_tokens():
    assert outcome([5, 6, 7, 8]) == ([5, 6, 7, 8], None)
    assert outcome([5, 6, 7, 8], so_far=96) == ([5, 6, 7, 8], "length")  # exactly at the limit
    assert outcome([5, 6, 7, 8], so_far=98) == ([5, 6], "length")  # the last canvas is trimmed


def test_eos_stops_and_is_not_delivered():
    assert outcome([5, 1, 7, 1]) == ([5], "eos")
    assert outcome([1, 6]) == ([], "eos")
    assert outcome([5, 6, 1, 8], so_far=98) == ([5, 6], "eos")  # EOS right at the limit still counts as EOS
    assert outcome([5, 6, 7, 1], so_far=98) == ([5, 6], "length")  # the limit comes before the EOS


@pytest.mark.parametrize("index,reason", [(0, None), (1, None), (2, "template")])
def test_templates_deliver_whole_canvases_and_ignore_eos(index, reason):
    got = outcome([5, 1, 7], so_far=1000, max_new=4, template_canvases=3, canvas_index=index)
    assert got == ([5, 1, 7], reason)
