"""The chart's values.schema.json is generated from ClusterConfig and must match it; the CLI renders the same
Serve config document the chart embeds."""

from __future__ import annotations

import typing

import yaml
from pydantic import BaseModel

from cluster.cli import main
from cluster.config import ClusterConfig
from cluster.helm_schema import SCHEMA_FILE, values_schema, values_schema_text
from tests.helm.chart import REPO


def test_values_schema_is_fresh():
    committed = (REPO / SCHEMA_FILE).read_text()
    assert committed == values_schema_text(), (
        f"{SCHEMA_FILE} no longer matches cluster/config.py: run `make helm-schema` and commit the result"
    )


def test_config_schema_carries_every_field_with_its_default():
    schema = values_schema()
    defs = schema["$defs"]
    for section, field in ClusterConfig.model_fields.items():
        model = field.annotation
        if not isinstance(model, type):  # `Section | None`
            model = next(
                a for a in typing.get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)
            )
        ref = schema["properties"]["config"]["properties"][section]
        props = defs[ref["$ref"].split("/")[-1]]["properties"] if "$ref" in ref else ref["properties"]
        for name, sub in model.model_fields.items():
            assert name in props, f"config.{section}.{name} missing from the values schema"
            if sub.default_factory is None and isinstance(sub.default, int | float | str):
                assert props[name]["default"] == sub.default, f"config.{section}.{name}"


def test_render_serve_config_cli(tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    path.write_text("engine:\n  max_rows: 4\nserver:\n  grpc_port: 9100\n")
    assert main(["render-serve-config", "--config", str(path)]) == 0
    document = yaml.safe_load(capsys.readouterr().out)
    assert document["grpc_options"]["port"] == 9100
    (app,) = document["applications"]
    assert app["import_path"] == "cluster.app:app_builder"
    assert app["args"] == {"engine": {"max_rows": 4}, "server": {"grpc_port": 9100}}
