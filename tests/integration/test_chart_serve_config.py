"""The Helm chart's CPU demo runs, not only parses: its rendered serveConfigV2, deployed on the local Ray
cluster the way KubeRay hands it to Serve (a ServeDeploySchema applied to the Serve controller), serves gRPC
and answers a request. The session app is restored afterwards."""

from __future__ import annotations

import pytest
import yaml
from ray import serve

from cluster.app import APP_NAME
from cluster.config import ClusterConfig
from cluster.env import DEFAULT_MODEL_PATH
from cluster.serve_config import deploy
from protos.blockserve.v1 import blockserve_pb2 as pb
from tests.helm.chart import one, render
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.slow


def _model_info(app):
    try:
        return app.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    except Exception:
        return None


def test_cpu_demo_serve_config_serves_grpc(app):
    document = yaml.safe_load(one(render(), "RayService")["spec"]["serveConfigV2"])
    # On a pod the proxies listen on 0.0.0.0:9000; here Serve is already up on loopback at the session's ports,
    # which a running Serve instance keeps whatever a document says. The app's own config is the chart's.
    server = app.config.server
    document["http_options"] = {"host": server.host, "port": server.http_port}
    document["grpc_options"]["port"] = server.grpc_port
    (application,) = document["applications"]
    application["args"]["server"] = {
        "host": server.host,
        "http_port": server.http_port,
        "grpc_port": server.grpc_port,
    }
    if not (
        DEFAULT_MODEL_PATH / "config.json"
    ).exists():  # the image ships the default model; a bare checkout may not
        application["args"].setdefault("model", {})["path"] = str(app.model_path)
    chart_config = ClusterConfig.model_validate(application["args"])

    deploy(document)
    try:
        # the chart's app, not the session's, answers: ModelInfo reports the chart config's name and row limit
        info = wait_for(
            lambda: (i := _model_info(app)) and i.model_name == chart_config.model.name and i,
            timeout=180,
            what="the chart's app answering ModelInfo",
        )
        assert info.max_rows == chart_config.engine.max_rows != app.config.engine.max_rows
        wait_for(app.serving, timeout=60, what="health SERVING")
        req = pb.GenerateRequest(prompt="def add(a, b):", max_new_tokens=8, seed=3)
        req.sampling.max_denoising_steps = 4
        reply = app.stub.Generate(req, timeout=120)
        assert 0 < len(reply.token_ids) <= 8
        status = serve.status().applications[APP_NAME]
        assert {"Router", "Engine"} <= set(status.deployments)
    finally:
        app.redeploy(app.config)
    assert app.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).model_name == app.config.model.name
