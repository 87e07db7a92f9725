"""The committed gRPC code matches its .proto, and the messages behave as the API documents.

Generated code stays generated: this regenerates it the way `make protos` does and compares
bytes, so an edited .proto without `make protos` (or a hand edit of the output) fails here.
"""

from concurrent import futures
from importlib import resources
from pathlib import Path

import grpc
import pytest
from grpc_tools import protoc

from protos.blockserve.v1 import blockserve_pb2 as pb
from protos.blockserve.v1 import blockserve_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
PROTO = "protos/blockserve/v1/blockserve.proto"
GENERATED = ["blockserve_pb2.py", "blockserve_pb2_grpc.py", "blockserve_pb2.pyi"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    # Same flags as the Makefile's `protos` target: -I <repo root> keeps the imports package-absolute. The
    # well-known types (google/protobuf/struct.proto) ship inside grpc_tools; `python -m grpc_tools.protoc`
    # adds their directory itself, protoc.main() does not.
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{REPO}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}"]
    args.append(f"--grpc_python_out={out}")
    assert protoc.main([*args, str(REPO / PROTO)]) == 0, "grpc_tools.protoc failed on " + PROTO
    return out / "protos" / "blockserve" / "v1"


@pytest.mark.parametrize("name", GENERATED)
def test_committed_code_matches_proto(regenerated: Path, name: str) -> None:
    committed = REPO / "protos" / "blockserve" / "v1" / name
    fresh = (regenerated / name).read_bytes()
    assert committed.read_bytes() == fresh, f"{committed} is stale: run `make protos` and commit the result"


def test_grpc_module_imports_messages_package_absolute() -> None:
    source = (REPO / "protos" / "blockserve" / "v1" / "blockserve_pb2_grpc.py").read_text()
    assert "from protos.blockserve.v1 import blockserve_pb2" in source


class _EchoServicer(pb_grpc.BlockDiffusionServicer):
    """Answers with the prompt, so a test can see a request cross a real socket and come back."""

    def Generate(self, request, context):
        return pb.GenerateResponse(text=request.prompt, request_id=request.request_id)

    def GenerateStream(self, request, context):
        for index, word in enumerate(request.prompt.split()):
            yield pb.GenerateEvent(canvas=pb.Canvas(canvas_index=index, text_delta=word))
        yield pb.GenerateEvent(final=pb.Final(text=request.prompt, finish_reason=pb.FINISH_REASON_LENGTH))


def test_generated_stub_and_servicer_talk_over_loopback() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_BlockDiffusionServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.BlockDiffusionStub(channel)
            reply = stub.Generate(pb.GenerateRequest(prompt="a b", request_id="r7"), timeout=10)
            events = list(stub.GenerateStream(pb.GenerateRequest(prompt="a b"), timeout=10))
            with pytest.raises(grpc.RpcError) as unimplemented:
                stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    finally:
        server.stop(grace=None)

    assert (reply.text, reply.request_id) == ("a b", "r7")
    assert [e.WhichOneof("event") for e in events] == ["canvas", "canvas", "final"]
    assert [e.canvas.text_delta for e in events[:2]] == ["a", "b"]
    assert events[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
    assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_service_methods_and_streaming() -> None:
    service = pb.DESCRIPTOR.services_by_name["BlockDiffusion"]
    methods = {m.name: m for m in service.methods}
    assert sorted(methods) == ["Generate", "GenerateStream", "ModelInfo"]
    assert not methods["Generate"].server_streaming
    assert methods["GenerateStream"].server_streaming and not methods["GenerateStream"].client_streaming
    assert methods["GenerateStream"].output_type.name == "GenerateEvent"
    assert methods["ModelInfo"].output_type.name == "ModelInfoResponse"
    assert service.full_name == "blockserve.v1.BlockDiffusion"


def test_generate_request_round_trip_keeps_oneofs_and_presence() -> None:
    request = pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=[2, 17, 262143]),
        max_new_tokens=64,
        sampling=pb.SamplingOverrides(entropy_bound=0.0, max_denoising_steps=12),
        seed=0,
        stop=["\n\n"],
        template=pb.Template(
            parts=[
                pb.TemplatePart(text='{"name": "'),
                pb.TemplatePart(slot=pb.Slot(name="name", max_tokens=8)),
                pb.TemplatePart(text='"}'),
            ]
        ),
        request_id="req-1",
    )
    parsed = pb.GenerateRequest.FromString(request.SerializeToString())

    assert parsed == request
    assert parsed.WhichOneof("prompt_input") == "prompt_token_ids"
    assert list(parsed.prompt_token_ids.ids) == [2, 17, 262143]
    assert parsed.WhichOneof("structure") == "template"
    assert [p.WhichOneof("part") for p in parsed.template.parts] == ["text", "slot", "text"]
    assert parsed.template.parts[1].slot.max_tokens == 8
    # Explicit zeros survive the wire for `optional` fields; unset ones read as unset (server default).
    assert parsed.HasField("seed") and parsed.seed == 0
    assert parsed.sampling.HasField("entropy_bound") and parsed.sampling.entropy_bound == 0.0
    assert not parsed.sampling.HasField("t_min")
    assert not pb.GenerateRequest(prompt="hi").HasField("seed")


def test_setting_one_oneof_member_clears_the_other() -> None:
    request = pb.GenerateRequest(prompt="hello", template=pb.Template(parts=[pb.TemplatePart(text="x")]))
    request.prompt_token_ids.ids.append(5)
    request.json_schema = '{"type": "integer"}'
    parsed = pb.GenerateRequest.FromString(request.SerializeToString())

    assert parsed.WhichOneof("prompt_input") == "prompt_token_ids"
    assert parsed.prompt == ""
    assert parsed.WhichOneof("structure") == "json_schema"
    assert not parsed.HasField("template")


def test_stream_event_round_trip() -> None:
    final = pb.Final(
        usage=pb.Usage(prompt_tokens=3, completion_tokens=5),
        stats=pb.GenerationStats(
            canvases=1, denoising_steps=4, steps_per_canvas=[4], tokens_per_forward=1.25
        ),
        finish_reason=pb.FINISH_REASON_EOS,
        text="hello",
        slots=[pb.SlotContent(name="a", text="x", token_ids=[9])],
        request_id="r",
    )
    parsed = pb.GenerateEvent.FromString(pb.GenerateEvent(final=final).SerializeToString())

    assert parsed.WhichOneof("event") == "final"
    assert parsed.final.finish_reason == pb.FinishReason.FINISH_REASON_EOS
    assert list(parsed.final.stats.steps_per_canvas) == [4]
    assert parsed.final.stats.tokens_per_forward == pytest.approx(1.25)
    assert pb.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
