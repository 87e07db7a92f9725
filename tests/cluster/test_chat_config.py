"""The `chat` section of ClusterConfig reaches the Router's reply parser, and refuses what cannot be a marker."""

import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig
from deployments.chat import ChatFormat, parse_reply


def test_defaults_are_the_shipped_templates_markers_and_overrides_reach_the_router():
    assert ClusterConfig().to_router_settings().chat_format == ChatFormat()
    config = ClusterConfig.model_validate(
        {"chat": {"reasoning_start": "<|channel>", "reasoning_end": "<channel|>"}}
    )
    fmt = config.to_router_settings().chat_format
    assert parse_reply("<|channel>plan<channel|>answer", fmt).reasoning == "plan"


def test_empty_or_unknown_markers_are_refused():
    with pytest.raises(ValidationError, match="end_of_turn"):
        ClusterConfig.model_validate({"chat": {"end_of_turn": ""}})
    with pytest.raises(ValidationError, match="tool_parser"):
        ClusterConfig.model_validate({"chat": {"tool_parser": "gemma4"}})
