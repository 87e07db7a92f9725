"""An OTLP/gRPC trace receiver for the integration tests (the collector's trace service, nothing else).

It listens on the loopback port tests/conftest.py put in every Ray process's environment before `ray.init`; the
session samples requests at ratio 0, so it receives only the traces a test starts with its own `traceparent`.
"""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import TRACE_RECEIVER_PORT
from tests.integration.conftest import wait_for


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it (the OTLP collector's trace service, nothing else)."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def serve_receiver():
    """A module fixture's body: `yield from serve_receiver()` (one receiver at a time holds the port)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    received = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    server.add_insecure_port(f"127.0.0.1:{TRACE_RECEIVER_PORT}")
    server.start()
    yield received
    server.stop(0)


SENT: set[bytes] = set()  # trace ids the tests' requests carried


def traceparent() -> tuple[bytes, bytes, str]:
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    SENT.add(trace_id)
    return trace_id, span_id, f"00-{trace_id.hex()}-{span_id.hex()}-01"


def whole_trace(
    received: Receiver, trace_id: bytes, client_span: bytes, expected, timeout: float = 30.0
) -> list:
    """The trace's spans once `expected(names)` holds and every span hangs under another one or under the
    client's span. Each process (proxy, Router, Engine, shards) exports its spans in its own batches, in no fixed
    order, so spans taken as soon as some names have come can still lack a parent on its way. Past `timeout`,
    whatever has come: the test's own assertions then say what is missing."""

    def complete():
        spans = received.trace(trace_id)
        ids = {s.span_id for s in spans} | {client_span}
        whole = all(s.parent_span_id in ids for s in spans)
        return spans if whole and expected([s.name for s in spans]) else None

    try:
        return wait_for(complete, timeout=timeout, what="the whole trace at the receiver")
    except TimeoutError:
        return received.trace(trace_id)


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out
