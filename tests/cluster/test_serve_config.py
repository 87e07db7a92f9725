"""The Serve config document of a ClusterConfig (no Ray cluster: Ray's schema and Serve's builder call only)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.app import APP_NAME, app_builder
from cluster.config import ClusterConfig
from cluster.serve_config import config_args, deploy_schema, render_serve_config


def test_args_hold_what_was_set_even_when_assigned_after_loading():
    config = ClusterConfig.model_validate({"engine": {"max_rows": 3}})
    config.server.grpc_port = 9555  # what `blockserve serve --port` does
    assert config_args(config) == {"engine": {"max_rows": 3}, "server": {"grpc_port": 9555}}
    assert ClusterConfig.model_validate(config_args(config)).model_dump() == config.model_dump()


def test_document_parses_as_ray_serve_deploy_schema():
    config = ClusterConfig.model_validate({"server": {"grpc_port": 9100, "http_port": 9101}})
    schema = deploy_schema(render_serve_config(config))
    assert schema.grpc_options.port == 9100 and schema.http_options.port == 9101
    assert [a.name for a in schema.applications] == [APP_NAME]


def test_builder_rejects_bad_args_naming_the_field():
    with pytest.raises(ValidationError, match="engine.max_rowz"):
        app_builder({"engine": {"max_rowz": 4}})
