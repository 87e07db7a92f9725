"""`server.tls` (cluster/tls.py): config rules, the pre-flight file checks, and real gRPC servers on 127.0.0.1
built the way the proxy builds its port (certificates generated per test)."""

from __future__ import annotations

import os
import ssl
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError

from cluster import preflight, tls
from cluster.config import ClusterConfig, ConfigFileError, TlsSection
from cluster.serve_config import deploy_schema, render_serve_config
from tests.certs import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def section(certs, **overrides) -> TlsSection:
    fields = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), **overrides}
    return TlsSection(**fields)


# -- config --------------------------------------------------------------------------------------------------
def test_tls_is_off_by_default_and_needs_both_files():
    config = ClusterConfig()
    assert not config.server.tls.enabled and config.server.http_tls_options() == {}
    assert tls.tls_env(config.server.tls) == {}
    with pytest.raises(ValidationError, match="set both cert_file and key_file"):
        TlsSection(cert_file="a.crt")
    with pytest.raises(ValidationError, match="client_ca_file needs cert_file"):
        TlsSection(client_ca_file="ca.crt")


def test_the_serve_document_gets_https_options_only_when_http_is_on(certs):
    on = ClusterConfig.model_validate(
        {"server": {"tls": section(certs, client_ca_file=str(certs.ca)).model_dump()}}
    )
    http = render_serve_config(on)["http_options"]
    assert http["ssl_certfile"] == str(certs.server_cert) and http["ssl_keyfile"] == str(certs.server_key)
    assert http["ssl_ca_certs"] == str(certs.ca)
    assert deploy_schema(render_serve_config(on)).http_options.ssl_certfile == str(certs.server_cert)
    grpc_only = ClusterConfig.model_validate({"server": {"tls": section(certs, http=False).model_dump()}})
    assert "ssl_certfile" not in render_serve_config(grpc_only)["http_options"]
    assert tls.tls_env(grpc_only.server.tls) == {
        tls.CERT_ENV: str(certs.server_cert),
        tls.KEY_ENV: str(certs.server_key),
    }


# -- pre-flight ----------------------------------------------------------------------------------------------
def test_good_files_have_no_problems(certs):
    assert tls.problems(section(certs, client_ca_file=str(certs.ca))) == []


def test_missing_files_are_named(certs, tmp_path):
    found = tls.problems(section(certs, key_file=str(tmp_path / "nope.key")))
    assert found == [
        f"server.tls.key_file: {tmp_path / 'nope.key'} does not exist (or is not a file); "
        "give the path of a PEM file"
    ]


def test_a_key_of_another_certificate_is_named(certs):
    (found,) = tls.problems(section(certs, key_file=str(certs.other_key)))
    assert found.startswith(
        f"server.tls.key_file: {certs.other_key} is not the private key of the certificate"
    )


def test_files_that_are_not_pem_are_named(certs, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    (found,) = tls.problems(section(certs, cert_file=str(junk)))
    assert found.startswith("server.tls:") and "do not load as a PEM certificate" in found
    (found,) = tls.problems(section(certs, client_ca_file=str(junk)))
    assert found.startswith(f"server.tls.client_ca_file: {junk} holds no PEM CA certificate")


def test_an_encrypted_key_is_refused_without_prompting(certs, tmp_path):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    (found,) = tls.problems(section(certs, key_file=str(encrypted)))
    assert "unencrypted private key" in found


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_is_named(certs, tmp_path):
    key = tmp_path / "locked.key"
    key.write_bytes(certs.server_key.read_bytes())
    key.chmod(0)
    (found,) = tls.problems(section(certs, key_file=str(key)))
    assert "is not readable by this user" in found


def test_preflight_reports_tls_problems_before_ray_starts(certs, tmp_path):
    config = ClusterConfig.model_validate(
        {"server": {"tls": section(certs, key_file=str(certs.other_key)).model_dump()}}
    )
    config.server.grpc_port = config.server.http_port = 1  # whatever the ports, the TLS line is there too
    with pytest.raises(ConfigFileError, match="server.tls.key_file: .* is not the private key"):
        preflight.check(config)


# -- real gRPC servers -----------------------------------------------------------------------------------------
@pytest.fixture
def health_server():
    """Start a gRPC health server on 127.0.0.1 whose port is added by `add_port(server, address)`."""
    servers = []

    def start(add_port) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = add_port(server, "127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def check(channel) -> grpc.StatusCode:
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def env_of(certs, client_ca=False) -> dict[str, str]:
    return tls.tls_env(section(certs, client_ca_file=str(certs.ca) if client_ca else None))


def test_a_tls_port_answers_tls_clients_and_refuses_plaintext(certs, health_server):
    credentials = tls.grpc_server_credentials(env_of(certs))
    address = health_server(lambda server, where: server.add_secure_port(where, credentials))
    assert check(tls.client_channel(address, str(certs.ca))) == grpc.StatusCode.OK
    assert check(tls.client_channel(address)) == grpc.StatusCode.UNAVAILABLE
    localhost = address.replace("127.0.0.1", "localhost")  # the certificate names both
    assert check(tls.client_channel(localhost, str(certs.ca))) == grpc.StatusCode.OK


def test_a_client_ca_requires_a_client_certificate(certs, health_server):
    credentials = tls.grpc_server_credentials(env_of(certs, client_ca=True))
    address = health_server(lambda server, where: server.add_secure_port(where, credentials))
    with_cert = tls.client_channel(address, str(certs.ca), str(certs.client_cert), str(certs.client_key))
    assert check(with_cert) == grpc.StatusCode.OK
    assert check(tls.client_channel(address, str(certs.ca))) == grpc.StatusCode.UNAVAILABLE


def test_the_proxy_hook_adds_a_secure_port_only_when_a_certificate_is_named(
    certs, health_server, monkeypatch
):
    from ray.serve._private import default_impl

    monkeypatch.setattr(default_impl, "add_grpc_address", default_impl.add_grpc_address)  # restored after
    tls.secure_grpc_proxy()  # no certificate in the environment: Serve's own insecure port stays
    assert not getattr(default_impl.add_grpc_address, "_blockserve", False)
    for name, value in env_of(certs).items():
        monkeypatch.setenv(name, value)
    tls.secure_grpc_proxy()
    address = health_server(default_impl.add_grpc_address)  # what Serve's gRPC proxy calls for its port
    assert check(tls.client_channel(address, str(certs.ca))) == grpc.StatusCode.OK
    assert check(tls.client_channel(address)) == grpc.StatusCode.UNAVAILABLE


def test_the_http_proxy_requires_client_certificates_when_given_a_ca(certs, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Config, "__init__", uvicorn.Config.__init__)  # restored after
    files = {"ssl_certfile": str(certs.server_cert), "ssl_keyfile": str(certs.server_key)}
    assert uvicorn.Config(app=None, ssl_ca_certs=str(certs.ca), **files).ssl_cert_reqs == ssl.CERT_NONE
    for name, value in env_of(certs, client_ca=True).items():
        monkeypatch.setenv(name, value)
    tls.require_client_certificates()
    assert uvicorn.Config(app=None, ssl_ca_certs=str(certs.ca), **files).ssl_cert_reqs == ssl.CERT_REQUIRED
    assert uvicorn.Config(app=None, **files).ssl_cert_reqs == ssl.CERT_NONE  # no CA given: nothing to require


def test_client_flags_that_make_no_sense_without_a_ca_are_refused(certs):
    with pytest.raises(ValueError, match="need --tls-ca"):
        tls.client_channel("127.0.0.1:1", cert_file=str(certs.client_cert))
    with pytest.raises(ValueError, match="give both --tls-cert and --tls-key"):
        tls.client_channel("127.0.0.1:1", str(certs.ca), cert_file=str(certs.client_cert))
