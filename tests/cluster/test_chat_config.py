"""The `chat` section of ClusterConfig reaches the Router's reply parser, and refuses what cannot be a marker."""

import pytest
from pydantic import ValidationError

from cluster.config import ClusterConfig
from deployments.chat import ChatChoice, ChatFormat, choose_format, parse_reply


def test_defaults_follow_the_template_and_overrides_reach_the_router():
    assert ClusterConfig().to_router_settings().chat_format == ChatChoice("auto")
    config = ClusterConfig.model_validate(
        {"chat": {"parser": "json", "reasoning_start": "<plan>", "reasoning_end": "</plan>"}}
    )
    fmt = choose_format(config.to_router_settings().chat_format, None)
    assert parse_reply("<plan>plan</plan>answer", fmt).reasoning == "plan"
    assert fmt.tool_call_start == ChatFormat().tool_call_start  # what was not overridden is the format's


def test_empty_or_unknown_markers_are_refused():
    with pytest.raises(ValidationError, match="end_of_turn"):
        ClusterConfig.model_validate({"chat": {"end_of_turn": ""}})
    with pytest.raises(ValidationError, match="tool_parser"):
        ClusterConfig.model_validate({"chat": {"tool_parser": "gemma4"}})
    with pytest.raises(ValidationError, match="parser"):
        ClusterConfig.model_validate({"chat": {"parser": "hermes"}})
