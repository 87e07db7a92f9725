"""DecoderGraphs' policy (eager, capture, replay, drop) and its wiring in the runner, on CPU.

A CPU has no CUDA graphs, so these tests pass a recorder that behaves like one where it matters: the output is
one static buffer that each replay overwrites from the static input buffers the recorder was given. The real
CUDA recorder is checked on a GPU by bench/gpu_step.py (tokens with graphs == tokens without)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from deployments.decoder_graphs import DecoderGraphs, GraphState, StepGraphs
from deployments.engine_core import EngineCore
from deployments.experts import LocalExperts
from deployments.scheduler import CanvasEvent, EngineRequest, SchedulerLimits
from model import moe
from model.config import from_name
from model.sampling.params import SamplingParams
from model.transformer import DiffusionGemma
from model.weights import init_random


class Recorder:
    """Stands in for a CUDA graph recorder. Recording runs the body for real (a graph's capture runs nothing,
    but its first replay then does that work, so the first replay here does nothing); later replays run the
    body again and copy its results into the static outputs handed out at capture, as a graph overwrites its
    output buffers."""

    def __init__(self):
        self.recorded = 0

    def __call__(self, body):
        self.recorded += 1
        result = body()
        single = isinstance(result, torch.Tensor)
        static = tuple(t.clone() for t in ((result,) if single else result))
        pending = [True]

        def replay():
            if pending.pop() if pending else False:
                return
            got = body()
            for out, new in zip(static, (got,) if single else got, strict=True):
                out.copy_(new)

        return replay, static[0] if single else static


def forward_counting(calls: list):
    def forward(canvas, prefix, soft):
        calls.append(prefix)
        base = canvas.float()[..., None] * prefix
        return base if soft is None else base + soft

    return forward


def test_eager_twice_then_one_capture_and_replays():
    calls, storage = [], [0]
    graphs = DecoderGraphs(forward_counting(calls), lambda: storage[0], capture=Recorder())
    prefix = torch.tensor(2.0)
    canvas, soft = torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, 4)
    assert graphs(canvas, prefix, None).shape == (2, 3, 1)  # a canvas's first step: eager, no graph
    out = graphs(canvas, prefix, soft)  # first step of this composition with soft input: eager
    assert graphs.captures == 0 and graphs.replays == 0
    for step in range(3, 7):  # captured on the next step, replayed from then on, with each step's own inputs
        canvas_now, soft_now = canvas * step, soft + step
        got = graphs(canvas_now, prefix, soft_now)
        assert torch.equal(got, canvas_now.float()[..., None] * prefix + soft_now)
    assert graphs.captures == 1 and graphs.replays == 4
    assert not torch.equal(out, got)


@pytest.mark.parametrize("change", ["prefix", "rows", "storage", "drop"])
def test_any_change_of_what_the_graph_fixed_drops_it(change):
    calls, storage = [], [0]
    recorder = Recorder()
    graphs = DecoderGraphs(forward_counting(calls), lambda: storage[0], capture=recorder)
    prefix, canvas, soft = torch.tensor(2.0), torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, 4)
    for _ in range(3):
        graphs(canvas, prefix, soft)
    assert recorder.recorded == 1
    if change == "prefix":
        prefix = torch.tensor(2.0)  # equal values, another object: a new batch composition
    elif change == "rows":
        canvas, soft = canvas[:1], soft[:1]
    elif change == "storage":
        storage[0] += 1  # the KV pool grew: the graph's addresses are stale
    else:
        graphs.drop()
    replays = graphs.replays
    got = graphs(canvas, prefix, soft)  # eager again for one step
    assert graphs.replays == replays and recorder.recorded == 1
    assert torch.equal(got, canvas.float()[..., None] * prefix + soft)
    graphs(canvas, prefix, soft)
    assert recorder.recorded == 2 and graphs.replays == replays + 1


def test_a_failed_capture_leaves_the_forward_eager_for_good():
    calls = []

    def failing(body):
        calls.append("capture")
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = DecoderGraphs(forward_counting([]), lambda: 0, capture=failing)
    prefix, canvas, soft = torch.tensor(3.0), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, 4)
    for step in range(5):
        assert torch.equal(graphs(canvas + step, prefix, soft), (canvas + step).float()[..., None] * 3 + soft)
    assert calls == ["capture"] and graphs.disabled and graphs.replays == 0


@pytest.fixture(scope="module")
def model():
    return init_random(DiffusionGemma(from_name("tiny-test")), seed=3).eval()


def served_tokens(core: EngineCore, n: int) -> dict[str, list[int]]:
    out = {f"r{i}": [] for i in range(n)}
    for i in range(n):
        params = SamplingParams(max_new_tokens=40 + 20 * i, max_denoising_steps=6 + i, t_min=0.3 + 0.1 * i)
        sink = lambda e, rid=f"r{i}": out[rid].extend(e.token_ids) if isinstance(e, CanvasEvent) else None  # noqa: E731
        core.submit(EngineRequest(f"r{i}", list(range(3, 8 + 3 * i)), params, seed=11 + i), sink)
    while core.has_work:
        core.iterate()
    return out


def test_runner_with_replayed_decoder_delivers_the_eager_tokens(model):
    eager = EngineCore(model, SchedulerLimits(max_rows=3))
    assert eager.runner.graphs is None  # CPU: no graphs unless a recorder is given
    want = served_tokens(eager, 4)
    graphed = EngineCore(model, SchedulerLimits(max_rows=3))
    recorder = Recorder()
    graphed.runner.graphs = DecoderGraphs(model.denoise, lambda: id(model.kv_pool), capture=recorder)
    assert served_tokens(graphed, 4) == want
    # rows joined and finished at different steps: several compositions were captured and replayed
    assert recorder.recorded >= 3 and graphed.runner.graphs.replays > 10


def test_cuda_graphs_are_never_made_off_cuda(model):
    assert EngineCore(model, SchedulerLimits(max_rows=2), cuda_graphs=True).runner.graphs is None


def test_step_graphs_run_eagerly_once_then_capture_then_replay():
    calls, recorder = [], Recorder()
    graphs = StepGraphs(capture=recorder)
    state = torch.zeros(3)

    def body():  # reads and writes a persistent buffer, as the runner's step does
        calls.append(1)
        state.add_(1)
        return state * 2, state.sum()

    prefix = object()
    # one step's work per call, never two (read at once: a replay overwrites the same output buffers)
    assert [float(graphs(("rows", 3), prefix, body)[1]) for _ in range(5)] == [3, 6, 9, 12, 15]
    assert recorder.recorded == 1 and graphs.captures == 1 and graphs.replays == 4
    graphs(("rows", 2), prefix, body)  # another key: eager again
    assert graphs.replays == 4 and float(state[0]) == 6
    graphs(("rows", 2), object(), body)  # another prefix object: eager again
    graphs.drop()
    graphs(("rows", 2), prefix, body)
    assert recorder.recorded == 1 and graphs.replays == 4


def test_a_failed_step_capture_leaves_the_step_eager_for_good():
    def failing(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs, state = StepGraphs(capture=failing), torch.zeros(1)
    body = lambda: state.add_(1).clone()  # noqa: E731
    assert [float(graphs(("k",), None, body)) for _ in range(4)] == [1, 2, 3, 4]
    assert graphs.disabled and graphs.replays == 0


def test_a_failed_capture_turns_off_every_kind_sharing_its_state():
    """A runner's two kinds share one state: after a capture failed (which may leave the allocator recording),
    the other kind does not try to capture either."""

    def failing(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    shared, recorder = GraphState(), Recorder()
    steps = StepGraphs(capture=failing, state=shared)
    decoder = DecoderGraphs(forward_counting([]), lambda: 0, capture=recorder, state=shared)
    counter = torch.zeros(1)
    for _ in range(3):
        steps(("k",), None, lambda: counter.add_(1).clone())
    assert steps.disabled and decoder.disabled
    prefix, canvas, soft = torch.tensor(2.0), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, 4)
    for _ in range(4):
        assert torch.equal(decoder(canvas, prefix, soft), canvas.float()[..., None] * 2 + soft)
    assert recorder.recorded == 0 and decoder.captures == 0 and decoder.replays == 0
    alone = DecoderGraphs(forward_counting([]), lambda: 0, capture=Recorder())  # a state of its own
    assert not alone.disabled


def test_runner_falls_back_to_the_decoder_graph_when_step_graphs_are_off(model):
    """Whole-step graphs that failed (with a state of their own here) leave the decoder forward to its graph,
    not to eager steps that drop it every time."""

    def failing(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    core = EngineCore(model, SchedulerLimits(max_rows=2))
    core.runner.step_graphs = StepGraphs(capture=failing)
    decoder = Recorder()
    core.runner.graphs = DecoderGraphs(model.denoise, core.runner._storage, capture=decoder)
    for i in range(2):
        params = SamplingParams(max_new_tokens=64, max_denoising_steps=8)
        core.submit(EngineRequest(f"r{i}", list(range(3, 9 + 4 * i)), params, seed=i), lambda e: None)
    while core.has_work:
        core.iterate()
    assert core.runner.step_graphs.disabled and core.runner.step_graphs.captures == 0
    assert decoder.recorded >= 1 and core.runner.graphs.replays >= 3


def test_runner_with_a_replayed_whole_step_delivers_the_eager_tokens_and_drafts(model):
    def run(core):
        out = {}
        for i in range(4):
            params = SamplingParams(
                max_new_tokens=40 + 20 * i, max_denoising_steps=6 + i, t_min=0.3 + 0.1 * i
            )
            out[f"r{i}"] = events = []
            core.submit(
                EngineRequest(
                    f"r{i}", list(range(3, 8 + 3 * i)), params, seed=11 + i, stream_drafts=i % 2 == 0
                ),
                events.append,
            )
        while core.has_work:
            core.iterate()
        return {
            rid: [(type(e).__name__, getattr(e, "token_ids", None)) for e in ev] for rid, ev in out.items()
        }

    want = run(EngineCore(model, SchedulerLimits(max_rows=3)))
    graphed = EngineCore(model, SchedulerLimits(max_rows=3))
    steps, decoder = Recorder(), Recorder()
    graphed.runner.step_graphs = StepGraphs(capture=steps)
    graphed.runner.graphs = DecoderGraphs(model.denoise, graphed.runner._storage, capture=decoder)
    assert run(graphed) == want  # drafts, canvases and finals, in order
    assert steps.recorded >= 3 and graphed.runner.step_graphs.replays > 10
    assert decoder.recorded == 0  # every step with self-conditioning went whole (no constrained rows)
    counts = graphed.runner.graph_counts()  # what the Engine's metrics read
    assert counts == {"decoder": (0, 0), "step": (steps.recorded, graphed.runner.step_graphs.replays)}
    assert EngineCore(model, SchedulerLimits(max_rows=1)).runner.graph_counts() == {}  # CPU: no graphs


# What a CUDA graph cannot hold: a read back to the host (a sync) or a tensor built from host data (a copy in).
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
HOST_BUILT = ("tensor", "as_tensor", "bincount", "nonzero", "unique")


@contextmanager
def no_host_round_trips(found: list[str]):
    """Record every host read and every tensor made from host data (beyond a 0-dim scalar) while inside."""
    saved_methods = {m: getattr(torch.Tensor, m) for m in HOST_READS}
    saved_functions = {f: getattr(torch, f) for f in HOST_BUILT}

    def flag(name, original, scalar_ok=False):
        def wrapper(*a, **k):
            if not (scalar_ok and a and isinstance(a[0], int | float)):
                found.append(name)
            return original(*a, **k)

        return wrapper

    try:
        for m, fn in saved_methods.items():
            setattr(torch.Tensor, m, flag(f"Tensor.{m}", fn))
        for f, fn in saved_functions.items():
            setattr(torch, f, flag(f"torch.{f}", fn, scalar_ok=f in ("tensor", "as_tensor")))
        yield
    finally:
        for m, fn in saved_methods.items():
            setattr(torch.Tensor, m, fn)
        for f, fn in saved_functions.items():
            setattr(torch, f, fn)


class GuardedRecorder(Recorder):
    """A recorder that runs the captured body under `no_host_round_trips`."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __call__(self, body):
        with no_host_round_trips(self.found):
            return super().__call__(body)


def test_the_guard_sees_host_round_trips():
    found = []
    with no_host_round_trips(found):
        t = torch.arange(4)
        torch.tensor(2.0)  # a host scalar operand is fine
        t.sum().item()
        torch.bincount(t)
        torch.tensor([1, 2])
        if t[0]:
            pass
    assert found == ["Tensor.item", "torch.bincount", "torch.tensor", "Tensor.__bool__"]


@pytest.mark.parametrize("experts", ["bank", "served"])
@pytest.mark.parametrize("layout", ["counted", "sorted"])
@pytest.mark.parametrize("whole", [True, False])
def test_captured_bodies_neither_read_back_nor_build_tensors_from_host_data(
    model, whole, layout, experts, monkeypatch
):
    """What the runner hands a recorder — the whole step, or the decoder forward — holds no host round trip
    after its first eager run (on a GPU either would break the capture; `bincount` did, in the MoE's sorted
    layout, which large batches take: forced here for the tiny model). `served`: through the serving Engine's
    expert backend (LocalExperts, which also counts expert load)."""
    if layout == "sorted":
        monkeypatch.setattr(moe, "COUNTING_LAYOUT_ELEMENTS", 0)
    if experts == "served":
        monkeypatch.setattr(model, "moe_backend", LocalExperts(model))
    core = EngineCore(model, SchedulerLimits(max_rows=3))
    recorder = GuardedRecorder()
    if whole:
        core.runner.step_graphs = StepGraphs(capture=recorder)
    else:
        core.runner.graphs = DecoderGraphs(model.denoise, core.runner._storage, capture=recorder)
    for i in range(3):
        params = SamplingParams(max_new_tokens=64, max_denoising_steps=8)
        core.submit(
            EngineRequest(f"r{i}", list(range(3, 9 + 5 * i)), params, seed=i, stream_drafts=i == 1), print
        )
    while core.has_work:
        core.iterate()
    assert recorder.recorded >= 2
    assert recorder.found == []
    if experts == "served":
        assert model.moe_backend.load.sum() > 0  # the backend was in the captured bodies


def test_out_of_memory_in_a_capture_keeps_that_batch_eager_and_tries_the_next():
    attempts = []

    def short_of_memory(body):
        attempts.append(1)
        if len(attempts) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Recorder()(body)

    graphs, state = StepGraphs(capture=short_of_memory), torch.zeros(1)
    body = lambda: state.add_(1).clone()  # noqa: E731
    prefix = object()
    assert [float(graphs(("a",), prefix, body)) for _ in range(5)] == [
        1,
        2,
        3,
        4,
        5,
    ]  # eager after the failure
    assert len(attempts) == 1 and not graphs.disabled and graphs.replays == 0
    for _ in range(3):  # the next batch is captured again
        graphs(("b",), prefix, body)
    assert len(attempts) == 2 and graphs.replays == 2 and float(state[0]) == 8
