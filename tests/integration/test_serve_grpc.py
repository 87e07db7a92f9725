"""End to end: a real gRPC client against a real local Ray Serve app (Router + Engine)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from model.sampling.generate import generate
from model.sampling.params import SamplingParams
from model.tokenizer import Tokenizer
from model.weights import load_model
from protos.blockserve.v1 import blockserve_pb2 as pb
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.slow

FAST = dict(max_denoising_steps=6)


def request(prompt="def add(a, b):", max_new=20, seed=7, drafts=False, **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new, seed=seed, stream_drafts=drafts)
    for k, v in {**FAST, **sampling}.items():
        setattr(req.sampling, k, v)
    return req


def long_request(drafts: bool = True) -> pb.GenerateRequest:
    """Minutes of work that cannot end early: a template slot has no EOS, and no canvas is ever confident."""
    req = request(max_new=0, drafts=drafts, max_denoising_steps=48, confidence_threshold=1e-9)
    req.template.parts.add(slot=pb.Slot(name="essay", max_tokens=4000))
    return req


def test_health_serving_and_model_info(app):
    assert app.serving()
    info = app.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.architecture == "DiffusionGemmaForBlockDiffusion"
    assert info.vocab_size > 0 and info.canvas_length > 0
    assert info.defaults.max_denoising_steps == 48 and info.max_rows == 8


def test_request_id_is_echoed(app):
    req = request(max_new=3)
    req.request_id = "client-42"
    assert app.stub.Generate(req, timeout=60).request_id == "client-42"
    assert list(app.stub.GenerateStream(req, timeout=60))[-1].final.request_id == "client-42"


def test_unary_returns_exactly_max_new_tokens_unless_eos(app):
    tok = Tokenizer.from_dir(app.model_path)
    for max_new in (1, 17, 40):
        reply = app.stub.Generate(request(max_new=max_new), timeout=120)
        if reply.finish_reason == pb.FINISH_REASON_EOS:
            assert len(reply.token_ids) < max_new
        else:
            assert reply.finish_reason == pb.FINISH_REASON_LENGTH
            assert len(reply.token_ids) == max_new
        assert reply.usage.completion_tokens == len(reply.token_ids)
        assert reply.text == tok.decode(list(reply.token_ids))
        assert reply.usage.prompt_tokens > 0
        assert sum(reply.stats.steps_per_canvas) == reply.stats.denoising_steps > 0


def test_stream_sends_drafts_only_when_asked(app):
    with_drafts = list(app.stub.GenerateStream(request(max_new=30, drafts=True), timeout=120))
    without = list(app.stub.GenerateStream(request(max_new=30, drafts=False), timeout=120))
    kinds = [e.WhichOneof("event") for e in with_drafts]
    assert kinds[-1] == "final" and kinds.count("final") == 1
    drafts = [e.draft for e in with_drafts if e.HasField("draft")]
    canvases = [e.canvas for e in with_drafts if e.HasField("canvas")]
    assert len(drafts) == with_drafts[-1].final.stats.denoising_steps  # one draft per denoising step
    assert [d.step for d in drafts if d.canvas_index == 0] == list(range(1, canvases[0].steps + 1))
    assert all(e.WhichOneof("event") != "draft" for e in without)
    # drafts never change what is generated
    assert [c.token_ids for c in canvases] == [e.canvas.token_ids for e in without if e.HasField("canvas")]
    assert "".join(c.text_delta for c in canvases) == with_drafts[-1].final.text


def test_server_matches_in_process_generate_for_the_same_seed(app):
    model = load_model(app.model_path)
    tok = Tokenizer.from_dir(app.model_path)
    prompt = "import os\n"
    params = SamplingParams(max_new_tokens=40, max_denoising_steps=6)
    ids = [tok.bos_id, *tok.encode(prompt)]
    expected = generate(model, ids, params, seed=123, rng="fast").token_ids
    reply = app.stub.Generate(request(prompt=prompt, max_new=40, seed=123), timeout=120)
    assert list(reply.token_ids) == expected


def test_concurrent_clients_are_batched_and_unaffected_by_batch_mates(app):
    alone = {s: list(app.stub.Generate(request(max_new=40, seed=s), timeout=120).token_ids) for s in (1, 2)}
    # A stream that cannot end early holds a row while the clients run, so each of their forwards is shared
    # with it however fast this machine is (eight short requests alone may each finish before the next lands).
    holder = app.stub.GenerateStream(long_request(drafts=False), timeout=300)
    try:
        next(holder)  # its first canvas: the row is running
        before = app.engine_stats()
        prompts = [
            "def f(x):",
            "class A:",
            "import sys",
            "x = [",
            "for i in",
            "# note",
            "return",
            "while True:",
        ]
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(
                    app.stub.Generate,
                    request(prompt="def add(a, b):" if i < 2 else p, max_new=40, seed=i + 1),
                    timeout=300,
                )
                for i, p in enumerate(prompts)
            ]
            replies = [f.result() for f in futures]
        after = app.engine_stats()
    finally:
        holder.cancel()
    wait_for(lambda: app.engine_stats()["active_rows"] == 0, timeout=60, what="the holding row to be freed")
    assert all(len(r.token_ids) == 40 or r.finish_reason == pb.FINISH_REASON_EOS for r in replies)
    assert list(replies[0].token_ids) == alone[1]
    assert list(replies[1].token_ids) == alone[2]
    assert after["max_rows_per_forward"] > 1
    batched_rows = (
        after["rows_per_forward"] * after["forwards"] - before["rows_per_forward"] * before["forwards"]
    )
    assert batched_rows / (after["forwards"] - before["forwards"]) > 1.0


INVALID = {
    "no prompt": pb.GenerateRequest(max_new_tokens=5),
    "empty prompt": pb.GenerateRequest(prompt="", max_new_tokens=5),
    "empty token ids": pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[]), max_new_tokens=5),
    "token id out of vocab": pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=[1, 10**9]), max_new_tokens=5
    ),
    "negative token id": pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[-4]), max_new_tokens=5),
    "too many new tokens": pb.GenerateRequest(prompt="x", max_new_tokens=10**7),
    "zero steps": request(max_denoising_steps=0),
    "entropy bound": request(entropy_bound=0.0),
    "t_max below t_min": request(t_min=0.9, t_max=0.5),
    "nan temperature": request(t_min=float("nan")),
    "confidence": request(confidence_threshold=-1.0),
    "stability": request(stability_threshold=100000),
    "empty stop": pb.GenerateRequest(prompt="x", stop=[""]),
    "too many stops": pb.GenerateRequest(prompt="x", stop=[str(i) for i in range(50)]),
    "long request id": pb.GenerateRequest(prompt="x", request_id="r" * 1000),
    "bad schema json": pb.GenerateRequest(prompt="x", json_schema="{not json"),
    "unsupported schema": pb.GenerateRequest(
        prompt="x", json_schema='{"type": "string", "not": {"const": "a"}}'
    ),
    "empty template": pb.GenerateRequest(prompt="x", template=pb.Template()),
    "zero-token slot": pb.GenerateRequest(
        prompt="x", template=pb.Template(parts=[pb.TemplatePart(slot=pb.Slot(name="a", max_tokens=0))])
    ),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_fields_are_rejected_and_the_server_keeps_serving(app, name):
    with pytest.raises(grpc.RpcError) as err:
        app.stub.Generate(INVALID[name], timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details()  # says what to fix
    with pytest.raises(grpc.RpcError) as err2:
        list(app.stub.GenerateStream(INVALID[name], timeout=60))
    assert err2.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = app.stub.Generate(request(max_new=5), timeout=120)
    assert ok.usage.completion_tokens > 0


def test_invalid_request_does_not_disturb_a_stream_in_flight(app):
    # every canvas runs all 48 steps: still in flight when the invalid request is refused, on any machine
    stream = app.stub.GenerateStream(
        request(max_new=60, drafts=True, max_denoising_steps=48, confidence_threshold=1e-9), timeout=300
    )
    first = next(stream)
    with pytest.raises(grpc.RpcError):
        app.stub.Generate(INVALID["zero steps"], timeout=60)
    rest = [first, *stream]
    assert rest[-1].HasField("final")


def test_cancelling_a_stream_frees_its_row(app):
    stream = app.stub.GenerateStream(long_request(), timeout=300)
    next(stream)
    wait_for(lambda: app.engine_stats()["active_rows"] >= 1, timeout=30, what="the row to be active")
    stream.cancel()
    wait_for(lambda: app.engine_stats()["active_rows"] == 0, timeout=30, what="the cancelled row to be freed")


def test_deadline_is_enforced(app):
    # Whether the expired request's row is then freed depends on Ray Serve 2.60's proxy passing the
    # cancellation on, which it did not in about 1 of 10 runs here; see the issue note. Not asserted.
    with pytest.raises(grpc.RpcError) as err:
        for _ in app.stub.GenerateStream(long_request(), timeout=1.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_stop_string_ends_generation(app):
    reply = app.stub.Generate(request(max_new=60), timeout=120)
    assert len(reply.text) > 4
    stop = reply.text[2:4]
    stopped = app.stub.Generate(pb.GenerateRequest(**_fields(request(max_new=60)), stop=[stop]), timeout=120)
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.text == reply.text[: reply.text.find(stop)]


def _fields(req: pb.GenerateRequest) -> dict:
    return dict(prompt=req.prompt, max_new_tokens=req.max_new_tokens, seed=req.seed, sampling=req.sampling)


def test_streams_run_concurrently_from_threads(app):
    errors = []

    def run(seed):
        try:
            events = list(app.stub.GenerateStream(request(max_new=20, seed=seed), timeout=120))
            assert events[-1].HasField("final")
        except Exception as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_full_engine_queue_answers_resource_exhausted(app):
    long = long_request(drafts=False)
    streams = []
    with app.reconfigured(engine={"max_rows": 1, "max_queue": 1}):
        try:
            running = app.stub.GenerateStream(long, timeout=120)
            streams.append(running)
            next(running)  # holds the only row
            streams.append(app.stub.GenerateStream(long, timeout=120))  # waits in the engine queue
            wait_for(lambda: app.engine_stats()["queued_requests"] == 1, timeout=30, what="a queued request")
            with pytest.raises(grpc.RpcError) as err:
                app.stub.Generate(request(max_new=5), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in err.value.details()
        finally:
            for stream in streams:
                stream.cancel()
    assert app.engine_stats()["kv_budget_bytes"] == app.config.engine.kv_cache_gib * 2**30
