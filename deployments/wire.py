"""gRPC service registration for Ray Serve's proxy, with request bytes that fail to decode kept visible.

The generated `add_BlockDiffusionServicer_to_server` decodes requests with `GenerateRequest.FromString`; in
Serve's proxy a DecodeError there escapes as `UNKNOWN` before any of our code runs. These `add_*` functions
register the same service, methods and serializers, but decode through `_tolerant`: bytes that do not parse
become an `UndecodableRequest`, which the proxy forwards like any request and the Router answers with
INVALID_ARGUMENT. cluster/app.py names these functions in `grpc_servicer_functions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from protos.blockserve.v1 import blockserve_pb2 as pb

SERVICE = "blockserve.v1.BlockDiffusion"


@dataclass
class UndecodableRequest:
    """Bytes that are not a valid `message_type` (answered INVALID_ARGUMENT with `error`)."""

    message_type: str
    error: str


def _tolerant(message_class):
    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested groups
            return UndecodableRequest(message_class.DESCRIPTOR.full_name, f"{type(e).__name__}: {e}"[:200])

    return decode


def _handlers(servicer) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_tolerant(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            request_deserializer=_tolerant(pb.GenerateRequest),
            response_serializer=pb.GenerateEvent.SerializeToString,
        ),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo,
            request_deserializer=_tolerant(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfoResponse.SerializeToString,
        ),
    }


def add_BlockDiffusion_to_server(servicer, server) -> None:
    handlers = _handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
