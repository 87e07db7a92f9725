"""The client's gRPC deadline crosses Serve's proxy as metadata the Router reads (cluster/serve_fixes.py)."""

from __future__ import annotations

from cluster.serve_fixes import forward_deadline
from deployments.leases import DEADLINE_METADATA, client_timeout_s


class Context:  # the proxy's grpc context: only what forward_deadline reads
    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


class Copy:  # the picklable copy Serve hands the Router (`RayServegRPCContext`)
    def __init__(self, metadata):
        self._invocation_metadata = list(metadata)
        self._invocation_metadata_dict = dict(metadata)


class ProxyRequest:
    def __init__(self, remaining, metadata=()):
        self.context = Context(remaining)
        self.ray_serve_grpc_context = Copy(metadata)


def test_the_remaining_deadline_is_added_and_a_client_value_replaced():
    req = ProxyRequest(2.5, [("authorization", "Bearer k"), (DEADLINE_METADATA, "99999")])
    forward_deadline(req)
    md = req.ray_serve_grpc_context._invocation_metadata
    assert ("authorization", "Bearer k") in md
    assert [v for k, v in md if k == DEADLINE_METADATA] == ["2.500"]
    assert req.ray_serve_grpc_context._invocation_metadata_dict[DEADLINE_METADATA] == "2.500"
    assert client_timeout_s(md, 600.0) == 2.5


def test_no_client_deadline_means_the_server_maximum():
    req = ProxyRequest(None, [(DEADLINE_METADATA, "0.001")])  # a client cannot shorten it by metadata either
    forward_deadline(req)
    md = req.ray_serve_grpc_context._invocation_metadata
    assert all(k != DEADLINE_METADATA for k, _ in md)
    assert client_timeout_s(md, 600.0) == 600.0


def test_the_server_maximum_caps_a_longer_client_deadline():
    assert client_timeout_s([(DEADLINE_METADATA, "3600")], 600.0) == 600.0
    assert client_timeout_s([(DEADLINE_METADATA, "nan")], 600.0) == 600.0
    assert client_timeout_s([(DEADLINE_METADATA, "soon")], 600.0) == 600.0
    assert client_timeout_s(None, 30.0) == 30.0
