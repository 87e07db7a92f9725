"""TLS at the proxies through a real `blockserve serve` (its own Ray cluster and ports: the session's Serve
instance has its proxies fixed in plaintext), with certificates generated for the test and mutual TLS on."""

from __future__ import annotations

import http.client
import signal
import ssl
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import tls
from protos.blockserve.v1 import blockserve_pb2 as pb
from protos.blockserve.v1 import blockserve_pb2_grpc
from tests.certs import make_certs
from tests.integration.conftest import free_port, served_model_path

pytestmark = pytest.mark.slow


def _serving(channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """`blockserve serve` with server.tls (client CA included) on fresh loopback ports; stopped by PID after."""
    tmp = tmp_path_factory.mktemp("tls")
    certs = make_certs(tmp)
    grpc_port, http_port = free_port(), free_port()
    config = {
        "model": {"path": str(served_model_path(tmp_path_factory))},
        "engine": {"max_rows": 4},
        "server": {
            "grpc_port": grpc_port,
            "http_port": http_port,
            "metrics_port": free_port(),
            "ray_num_cpus": 4,
            "tls": {
                "cert_file": str(certs.server_cert),
                "key_file": str(certs.server_key),
                "client_ca_file": str(certs.ca),
            },
        },
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--config", str(tmp / "config.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{grpc_port}"
    try:
        with tls.client_channel(address, str(certs.ca), str(certs.client_cert), str(certs.client_key)) as ch:
            deadline = time.monotonic() + 150
            while not _serving(ch):
                assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    "not SERVING in 150 s:\n" + (tmp / "serve.log").read_text()
                )
                time.sleep(1)
        yield address, http_port, certs
    finally:
        proc.send_signal(signal.SIGTERM)  # `serve` shuts Serve and its Ray cluster down, then exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _request() -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt="def add(a, b):", max_new_tokens=8, seed=3)
    req.sampling.max_denoising_steps = 4
    return req


def _generate(channel):
    with channel:
        return blockserve_pb2_grpc.BlockDiffusionStub(channel).Generate(_request(), timeout=60)


def test_grpc_over_tls_answers_and_plaintext_or_certless_clients_are_refused(tls_server):
    address, _, c = tls_server
    mutual = tls.client_channel(address, str(c.ca), str(c.client_cert), str(c.client_key))
    assert _generate(mutual).usage.completion_tokens > 0
    for refused in (tls.client_channel(address), tls.client_channel(address, str(c.ca))):
        with pytest.raises(grpc.RpcError) as e:
            _generate(refused)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    run = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "def f(x):", "--address", address,
         "--max-new-tokens", "8", "--no-drafts", "--tls-ca", str(c.ca),
         "--tls-cert", str(c.client_cert), "--tls-key", str(c.client_key)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and "tokens in" in run.stderr, run.stderr


def test_https_at_the_http_proxy_requires_the_client_certificate(tls_server):
    _, http_port, c = tls_server
    url = f"https://127.0.0.1:{http_port}/v1/models"
    context = ssl.create_default_context(cafile=str(c.ca))
    context.load_cert_chain(str(c.client_cert), str(c.client_key))
    with urllib.request.urlopen(url, context=context, timeout=30) as reply:
        assert reply.status == 200 and b'"object":"list"' in reply.read().replace(b" ", b"")
    certless = ssl.create_default_context(cafile=str(c.ca))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, context=certless, timeout=30).read()
    with pytest.raises(
        (urllib.error.URLError, ConnectionError, http.client.HTTPException)
    ):  # plaintext HTTP on the TLS port
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=30).read()
