"""Optional API keys, shared by every ingress (gRPC metadata and the HTTP `Authorization` header).

Keys come from a file (one key a line, `#` comments; a Kubernetes Secret mounted as a file) and/or an
environment variable (comma-separated). No key configured = authentication off. A request authenticates with
`authorization: Bearer <key>` (gRPC metadata, lower-case as gRPC requires) or the same HTTP header. Keys are
compared in constant time (`hmac.compare_digest` against every key, no early exit) and never logged or put in
an error message.

    keys = ApiKeys.load(file="/etc/blockserve/api-keys", env_var="BLOCKSERVE_API_KEYS")
    keys.check_grpc(grpc_context.invocation_metadata())   # raises Unauthenticated
    keys.check_http(request.headers.get("authorization")) # raises Unauthenticated -> answer 401
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

SCHEME = "bearer"


class Unauthenticated(Exception):
    """Answered as gRPC UNAUTHENTICATED / HTTP 401 (with `WWW-Authenticate: Bearer`)."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class ApiKeys:
    def __init__(self, keys: Iterable[str] = ()):
        self._keys = tuple(k.encode() for k in keys if k)

    @classmethod
    def load(cls, file: str | None = None, env_var: str | None = None, environ=os.environ) -> ApiKeys:
        keys: list[str] = []
        if file:
            path = Path(file)
            if not path.is_file():
                raise ValueError(
                    f"API key file {path} does not exist; create it or unset the key file setting"
                )
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        if env_var:
            keys.extend(k.strip() for k in environ.get(env_var, "").split(",") if k.strip())
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:  # never the keys themselves
        return f"ApiKeys({len(self._keys)} keys)"

    def valid(self, presented: str | bytes | None) -> bool:
        if not self._keys:
            return True
        if not presented:
            return False
        got = presented.encode() if isinstance(presented, str) else presented
        match = False
        for key in self._keys:  # every key is compared: the time does not say which key (or prefix) matched
            match |= hmac.compare_digest(got, key)
        return match

    def check_header(self, value: str | bytes | None) -> None:
        """`value` is an `authorization` header: `Bearer <key>`."""
        if not self._keys:
            return
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = (value or "").strip().partition(" ")
        if scheme.lower() != SCHEME or not self.valid(token.strip()):
            raise Unauthenticated("missing or invalid API key: send the header `authorization: Bearer <key>`")

    def check_http(self, authorization: str | bytes | None) -> None:
        self.check_header(authorization)

    def check_grpc(self, metadata) -> None:
        """`metadata`: (key, value) pairs, as `invocation_metadata()` gives them."""
        if not self._keys:
            return
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        self.check_header(values[0] if len(values) == 1 else None)
