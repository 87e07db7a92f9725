"""Server certificates at Serve's proxies (`server.tls`): checked before start, handed to the proxy processes.

The HTTP proxy takes a certificate through Serve's own `http_options` (`ssl_certfile`, `ssl_keyfile`,
`ssl_ca_certs`; cluster/serve_config.py puts them there). Serve 2.60 passes `ssl_ca_certs` to uvicorn without
`ssl_cert_reqs`, so uvicorn would load the CA and still accept clients with no certificate: `require_client_
certificates` (run in the proxy process, cluster/serve_fixes.py) makes a configured CA mean "required".

Serve 2.60's gRPC proxy has no certificate option: it always calls `default_impl.add_grpc_address`, which adds
an insecure port. `secure_grpc_proxy` (also run in the proxy process) replaces that one function, so the proxy's
port (and only it: the replicas' inter-deployment servers bind elsewhere) is added with
`grpc.ssl_server_credentials` read from the files named by the environment variables below. A Ray worker learns
them from its environment: `blockserve serve` puts them in the job's runtime environment (cluster/env.py
`server_env`), the Helm chart in every Ray container's environment.

`problems` is the pre-flight check: each file exists and is readable, the certificate and key parse and belong
together, the client CA parses; the messages name the setting and say what to fix.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

CERT_ENV = "BLOCKSERVE_TLS_CERT_FILE"
KEY_ENV = "BLOCKSERVE_TLS_KEY_FILE"
CLIENT_CA_ENV = "BLOCKSERVE_TLS_CLIENT_CA_FILE"


class TlsFiles(Protocol):  # cluster/config.py TlsSection
    cert_file: str | None
    key_file: str | None
    client_ca_file: str | None


def tls_env(tls: TlsFiles) -> dict[str, str]:
    """Environment telling the proxy processes where the certificate is (empty: TLS off)."""
    if not tls.cert_file:
        return {}
    out = {CERT_ENV: _absolute(tls.cert_file), KEY_ENV: _absolute(tls.key_file)}
    if tls.client_ca_file:
        out[CLIENT_CA_ENV] = _absolute(tls.client_ca_file)
    return out


def _absolute(path: str | None) -> str:
    # Ray workers run in another directory; a path that does not exist here is kept as written (a pod's mount)
    p = Path(path or "")
    return str(p.resolve()) if p.exists() else str(p)


def problems(tls: TlsFiles, prefix: str = "server.tls") -> list[str]:
    """What keeps these files from serving TLS, one message per problem (empty: fine or TLS off)."""
    if not tls.cert_file:
        return []
    found = [
        msg
        for name in ("cert_file", "key_file", "client_ca_file")
        if (msg := _unreadable(f"{prefix}.{name}", getattr(tls, name)))
    ]
    if found:
        return found
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # an empty password: an encrypted key fails here instead of OpenSSL prompting on the terminal
        context.load_cert_chain(tls.cert_file, tls.key_file, password=b"")
    except ssl.SSLError as e:
        found.append(_chain_problem(prefix, tls, e))
    if tls.client_ca_file:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as e:
            found.append(
                f"{prefix}.client_ca_file: {tls.client_ca_file} holds no PEM CA certificate ({e.reason or e}); "
                "give the CA that signs your clients' certificates"
            )
    return found


def _unreadable(setting: str, path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return f"{setting}: {p} does not exist (or is not a file); give the path of a PEM file"
    if not os.access(p, os.R_OK):
        return f"{setting}: {p} is not readable by this user; fix its permissions"
    return None


def _chain_problem(prefix: str, tls: TlsFiles, error: ssl.SSLError) -> str:
    reason = (error.reason or "").upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return (
            f"{prefix}.key_file: {tls.key_file} is not the private key of the certificate {tls.cert_file}; "
            "give the key the certificate was issued for"
        )
    return (
        f"{prefix}: {tls.cert_file} / {tls.key_file} do not load as a PEM certificate and its unencrypted "
        f"private key ({error.reason or error}); give PEM files (an encrypted key is not supported)"
    )


def grpc_server_credentials(environ: Mapping[str, str] = os.environ):
    """`grpc.ServerCredentials` from the files the environment names, or None when TLS is off."""
    cert = environ.get(CERT_ENV)
    if not cert:
        return None
    import grpc

    key = environ.get(KEY_ENV)
    if not key:
        raise ValueError(f"{CERT_ENV} is set but {KEY_ENV} is not; set both or neither")
    ca = environ.get(CLIENT_CA_ENV)
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(ca).read_bytes() if ca else None,
        require_client_auth=bool(ca),
    )


def secure_grpc_proxy() -> None:
    """In a Ray worker process: Serve's gRPC proxy port gets TLS when the environment names a certificate."""
    if not os.environ.get(CERT_ENV):
        return
    from ray.serve._private import default_impl

    if getattr(default_impl.add_grpc_address, "_blockserve", False):
        return

    def add_grpc_address(grpc_server, server_address: str):
        # read when the proxy binds: a certificate renewed in its Secret is used by the next proxy started
        return grpc_server.add_secure_port(server_address, grpc_server_credentials())

    add_grpc_address._blockserve = True
    default_impl.add_grpc_address = add_grpc_address


def require_client_certificates() -> None:
    """In a Ray worker process: uvicorn (Serve's HTTP proxy) demands a client certificate when given a CA."""
    if not os.environ.get(CLIENT_CA_ENV):
        return
    import uvicorn

    init = uvicorn.Config.__init__
    if getattr(init, "_blockserve", False):
        return

    def __init__(self, *args, **kwargs):
        if kwargs.get("ssl_ca_certs"):
            kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        init(self, *args, **kwargs)

    __init__._blockserve = True
    uvicorn.Config.__init__ = __init__


def client_channel(
    address: str,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    server_name: str | None = None,
):
    """A gRPC channel to `address`: plaintext without `ca_file`, else TLS trusting that CA (with a client
    certificate when the server requires one; `server_name` when the certificate names another host)."""
    import grpc

    if not ca_file:
        if cert_file or key_file or server_name:
            raise ValueError("--tls-cert, --tls-key and --tls-server-name need --tls-ca (the server's CA)")
        return grpc.insecure_channel(address)
    if bool(cert_file) != bool(key_file):
        raise ValueError("give both --tls-cert and --tls-key (a client certificate and its key), or neither")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)
